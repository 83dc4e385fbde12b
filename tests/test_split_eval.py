"""The split never leaks; the option-permutation evaluation does not reward a letter-biased model."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from corefbot.models.train.split import LeakError, Split, assert_no_leak, conversation_side, split_examples
from corefbot.pipeline.prompt import ALL_ORDERS, LETTERS, build_prompt
from corefbot.pipeline.records import Example, Turn


def _examples(n_conv: int = 60, per_conv: int = 4) -> list[Example]:
    out = []
    for c in range(n_conv):
        for k in range(per_conv):
            label = "needs" if (c + k) % 2 else "not_needed"
            out.append(Example(
                id=f"c{c}q{k}", conversation=f"conv{c}",
                window=(Turn("u1", f"message {c} {k}", 0.0), Turn("u2", "answer", 1.0)),
                question=Turn("u1", "what about it?" if label == "needs" else f"what is thing {c}?", 2.0),
                label=label, rewrite=f"what about thing {c}?" if label == "needs" else None,
            ))
    return out


def test_split_keeps_conversations_whole_and_is_stable() -> None:
    exs = _examples()
    split = split_examples(exs, seed=3)
    sides = {}
    for name in ("train", "validation", "test"):
        for e in split.side(name):
            assert sides.setdefault(e.conversation, name) == name
    assert len(split.train) + len(split.validation) + len(split.test) == len(exs)
    assert split.test and split.validation and len(split.train) > len(split.test)
    # Stable as data grows: adding conversations moves no existing one.
    bigger = split_examples(exs + _examples(90)[len(exs):], seed=3)
    assert {e.id for e in split.test} <= {e.id for e in bigger.test}
    assert {e.id for e in split.train} <= {e.id for e in bigger.train}
    # Another seed gives another split.
    assert split_examples(exs, seed=4).ids() != split.ids()
    assert conversation_side("conv1", 3) == conversation_side("conv1", 3)


def test_leak_detection() -> None:
    exs = _examples()
    split = split_examples(exs, seed=0)
    assert_no_leak(split, trained_on=split.train)
    with pytest.raises(LeakError, match="held out"):
        assert_no_leak(split, trained_on=[*split.train, split.test[0]])
    moved = Split(split.train + (split.test[0],), split.validation, split.test, 0, (0.8, 0.1, 0.1))
    with pytest.raises(LeakError, match="both"):
        assert_no_leak(moved)
    with pytest.raises(ValueError, match="fractions"):
        split_examples(exs, fractions=(0.5, 0.5, 0.5))


def test_training_asserts_the_test_split_is_never_trained_on(tiny_hf: Path) -> None:
    from corefbot.models.train.finetune import load_preset, train_and_eval

    split = split_examples(_examples(), seed=0)
    with pytest.raises(LeakError):
        train_and_eval(tiny_hf, [*split.train, *split.test[:1]], split, load_preset("tiny"), progress=False)


def test_letter_biased_model_does_not_look_good() -> None:
    """Scores from a model that always answers A: good in the orders where A means needs, bad in the
    others; the mean over the six orders exposes it."""
    from corefbot.models.train.evaluate import decide, score_decisions

    exs = _examples(10)
    predicted = {}
    for order in ALL_ORDERS:
        prompts = [build_prompt(e.window, e.question, order) for e in exs]
        predicted[order] = [decide(p, (0.0, -5.0, -5.0)) for p in prompts]  # always A
    ev = score_decisions(exs, predicted)
    recalls = [r.confusion.recall for r in ev.per_order]
    assert sorted(recalls) == [0.0] * 4 + [1.0] * 2
    assert ev.stat("recall").mean == pytest.approx(1 / 3)
    assert ev.stat("f1").mean < 0.5 and ev.stat("f1").std > 0.2
    assert all(r.letter_share == (1.0, 0.0, 0.0) for r in ev.per_order)
    # An oracle is perfect in every order, with no spread.
    oracle = score_decisions(exs, {o: [e.label for e in exs] for o in ALL_ORDERS})
    assert oracle.stat("f1").mean == 1.0 and oracle.stat("f1").std == 0.0
    summary = ev.summary()
    assert summary["orders"] == 6 and 0 <= summary["precision"]["mean"] <= 1


def test_real_model_decisions_over_all_orders(tiny_hf: Path) -> None:
    """A real (random) tiny model: log-prob decisions are always one of the options, every order is
    evaluated, and rewrites are scored on the needs cases only."""
    from corefbot.models.train.evaluate import evaluate, letter_ids, load_model, option_logprobs

    model, tok = load_model(tiny_hf)
    ids = letter_ids(tok)
    assert len(set(ids)) == 3
    exs = _examples(6, 2)
    logps = option_logprobs(model, tok, [build_prompt(e.window, e.question) for e in exs])
    assert all(len(lp) == 3 and all(v <= 0 and math.isfinite(v) for v in lp) for lp in logps)
    report = evaluate(model, tok, exs, max_new_tokens=4)
    assert report["decision"]["orders"] == len(ALL_ORDERS) == 6
    assert report["decision"]["examples"] == len(exs)
    for row in report["decision"]["per_order"]:
        assert row["tp"] + row["fp"] + row["fn"] + row["tn"] == len(exs)
        assert sum(row["letter_share"]) == pytest.approx(1.0)
    assert report["rewrite"]["examples"] == sum(e.label == "needs" for e in exs)
    assert 0 <= report["rewrite"]["token_f1"] <= 1
    # Batching does not change decisions: one at a time gives the same log-probs.
    single = option_logprobs(model, tok, [build_prompt(exs[0].window, exs[0].question)], max_batch=1)
    assert single[0] == pytest.approx(logps[0], abs=1e-4)
    assert LETTERS == "ABC"


def test_shared_prefix_scoring_equals_plain_scoring(tiny_hf: Path) -> None:
    """Reusing one example's prompt prefix across its six orders changes no log-prob."""
    from corefbot.models.train.evaluate import load_model, option_logprobs, shared_prefix_logprobs

    model, tok = load_model(tiny_hf)
    exs = _examples(3, 2)
    groups = [[build_prompt(e.window, e.question, o) for o in ALL_ORDERS] for e in exs]
    shared = [lp for g in shared_prefix_logprobs(model, tok, groups) for lp in g]
    plain = option_logprobs(model, tok, [p for g in groups for p in g])
    assert len(shared) == len(plain) == 6 * len(exs)
    for a, b in zip(shared, plain):
        assert a == pytest.approx(b, abs=1e-4)


def test_one_chat_group_splits_by_day() -> None:
    """A deployment with one group: "auto" keeps each day whole instead of putting it all on one side."""
    exs = [Example(id=f"q{i}", conversation="qq:group1", window=(Turn("a", "hi", 0.0),),
                   question=Turn("b", "and it?", 1_700_000_000.0 + i * 3_000.0), label="needs")
           for i in range(2_000)]  # ~70 days
    split = split_examples(exs, seed=0)
    assert split.unit == "day" and split.test and split.validation and split.train
    days = {}
    for name in ("train", "validation", "test"):
        for e in split.side(name):
            assert days.setdefault(int(e.question.timestamp // 86_400), name) == name
    whole = split_examples(exs, seed=0, unit="conversation")
    assert whole.unit == "conversation" and sum(bool(whole.side(n)) for n in ("train", "validation", "test")) == 1
    assert split.manifest()["unit"] == "day"
