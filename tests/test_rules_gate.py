"""The rules backend and the gate: cues, rewrites, the shipped classifier's figures, retraining."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from corefbot.models.serve.gate import DEFAULT_PATH, Gate, features
from corefbot.models.train.gate import OWN_DATA, default_training_examples
from corefbot.models.serve.cues import cues, terms
from corefbot.models.serve.rules import RulesBackend, pronoun_baseline, rewrite_question as rewrite
from corefbot.pipeline.examples import load_unified
from corefbot.pipeline.metrics import Confusion
from corefbot.pipeline.records import Example, Turn
from tests.conftest import shared_data

MMPOSE = (Turn("u1", "有人用过 mmpose 吗？", 1.0), Turn("u2", "用过，x86 上跑得挺快的", 2.0))


def q(text: str) -> Turn:
    return Turn("u3", text, 9.0)


@pytest.fixture(scope="module")
def gate() -> Gate:
    return Gate.load()


# -- cues ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, cue", [
    ("它支持 TX2 吗？", "zh_personal"),
    ("那个怎么装？", "zh_dem"),
    ("上述方案能用吗？", "zh_dem"),
    ("那在 Windows 上呢？", "zh_initial"),
    ("为什么不好用？", "zh_predicate_only"),
    ("在 TX2 上呢？", "zh_ne"),
    ("how to deploy it on TX2?", "en_personal"),
    ("Does that version work?", "en_dem_np"),
    ("what about TX2?", "en_what_about"),
    ("What else did he do?", "en_else_other"),
    ("What happened next?", "en_continuation"),
    ("Who wrote the script?", "en_the_type"),
])
def test_cues_fire(text: str, cue: str) -> None:
    assert cue in cues(MMPOSE, q(text))


def test_relative_that_is_not_a_reference() -> None:
    found = cues(MMPOSE, q("Is there a restaurant that serves Indian food?"))
    assert not {"en_dem_np", "en_dem_bare"} & set(found)


def test_shortened_and_full_names() -> None:
    window = (Turn("a", "Virat Kohli", 0.0), Turn("b", "Cricket career", 1.0))
    assert "partial_name" in cues(window, q("Who has Kohli been compared to?"))
    full = cues(window, q("Who has Virat Kohli been compared to?"))
    assert "full_name" in full and "partial_name" not in full


def test_a_capitalised_question_word_does_not_hide_the_name() -> None:
    assert terms("Was Vlade Divac on the national team?") == ["Vlade Divac"]
    assert terms("Did Georgia go to New York?") == ["Georgia", "New York"]


def test_chinese_overlap_counts_character_pairs() -> None:
    window = (Turn("a", "三星堆又挖出新东西了", 0.0),)
    assert "overlap_2+" in cues(window, q("三星堆到底是啥年代的"))
    assert "overlap_0" in cues(window, q("到底是啥年代的"))


# -- rewrites --------------------------------------------------------------------------------------

@pytest.mark.parametrize("window, question, expected", [
    (MMPOSE, "在 TX2 上呢？", "mmpose 在 TX2 上呢？"),
    (MMPOSE, "它支持 TX2 吗？", "mmpose 支持 TX2 吗？"),
    ((Turn("a", "显卡驱动装不上，一直报错", 1.0),), "那个怎么装？", "显卡驱动怎么装？"),
    ((Turn("a", "Has anyone tried mmpose?", 1.0),), "BTW, how to deploy it on TX2?", "BTW, how to deploy mmpose on TX2?"),
    ((Turn("a", "I suggest Curry Prince. They serve Indian food.", 1.0),), "What is the address?",
     "What is the address of Curry Prince?"),
    # "he" wants a person: the newest full name, not the newer message's club.
    ((Turn("a", "Mikel Arteta was a midfielder before coaching", 1.0), Turn("b", "now he manages Arsenal", 2.0)),
     "When did he take over?", "When did Mikel Arteta take over?"),
])
def test_nearest_antecedent_rewrite(window, question: str, expected: str) -> None:
    assert rewrite(window, q(question)) == expected


def test_rewrite_needs_something_to_attach() -> None:
    assert rewrite((), q("它支持 TX2 吗？")) is None


def test_rules_backend_decides_with_confidence() -> None:
    backend = RulesBackend()
    res = backend.resolve(MMPOSE, q("BTW, how to deploy it on TX2?"))
    assert res.decision == "needs" and res.rewrite == "BTW, how to deploy mmpose on TX2?"
    plain = backend.resolve(MMPOSE, q("Ubuntu 22.04 怎么装 CUDA 11.8？"))
    assert plain.decision == "not_needed" and plain.rewrite is None
    for r in (res, plain):
        assert sum(r.probs.values()) == pytest.approx(1.0)
        assert set(r.probs) == {"needs", "not_needed", "unknown"}
    assert res.probs["needs"] > 0.75 and plain.probs["not_needed"] > 0.5
    assert 0 < res.margin <= 1


# -- the shipped gate ------------------------------------------------------------------------------

def test_shipped_gate_is_small_and_complete(gate: Gate) -> None:
    assert DEFAULT_PATH.stat().st_size < 400_000
    assert 0 < gate.threshold < gate.decision_threshold < 1 or gate.threshold <= gate.decision_threshold
    assert gate.meta["oof_recall"] >= 0.98  # chosen on out-of-fold training scores
    # The rules backend decides "needs" below the sure side, so it need not honour rewrite="always" there.
    assert gate.sure_threshold is not None and gate.decision_threshold < gate.sure_threshold < 1
    assert {"corefbot_zh", "corefbot_en"} <= set(gate.meta["sources"])


@pytest.mark.parametrize("text", ["BTW, how to deploy it on TX2?", "为什么不好用？", "在 TX2 上呢？", "那个怎么装？", "what about TX2?"])
def test_gate_sends_the_issue_examples(gate: Gate, text: str) -> None:
    assert gate.needs_model(MMPOSE, q(text))


@pytest.mark.parametrize("text", ["请问 YOLOv8 训练自己的数据集要准备什么格式？", "How do I install CUDA 11.8 on Ubuntu 22.04?",
                                  "Linux 下怎么查看哪个进程占用了 8080 端口？"])
def test_gate_skips_self_contained_questions(gate: Gate, text: str) -> None:
    assert not gate.needs_model(MMPOSE, q(text))


def _measure(gate: Gate, examples: list[Example]) -> tuple[Confusion, Confusion, Confusion]:
    gold = [e.label == "needs" for e in examples]
    backend = RulesBackend(gate=gate)
    return (Confusion.of(gold, [gate.needs_model(e.window, e.question) for e in examples]),
            Confusion.of(gold, [backend.resolve(e.window, e.question).decision == "needs" for e in examples]),
            Confusion.of(gold, [pronoun_baseline(e.question) for e in examples]))


@pytest.mark.parametrize("path", OWN_DATA, ids=lambda p: p.name)
def test_held_out_own_cases(gate: Gate, path: Path) -> None:
    test = load_unified(path, split="test")
    assert len(test) >= 60 and {e.label for e in test} == {"needs", "not_needed"}
    gate_c, rules_c, base_c = _measure(gate, test)
    assert gate_c.recall >= 0.98 and gate_c.specificity >= 0.5
    assert rules_c.f1 > base_c.f1 and rules_c.mcc > base_c.mcc


def test_task_dev_split(gate: Gate) -> None:
    dev = load_unified(shared_data("task_gecor.jsonl"), split="dev")
    gate_c, rules_c, base_c = _measure(gate, dev)
    assert gate_c.recall >= 0.98 and gate_c.specificity >= 0.5
    assert rules_c.f1 > base_c.f1 and rules_c.mcc > base_c.mcc


@pytest.mark.slow
def test_canard_dev(gate: Gate) -> None:
    canard = load_unified(shared_data("canard_dev.jsonl"))
    gate_c, rules_c, base_c = _measure(gate, canard)
    assert rules_c.f1 > base_c.f1 and rules_c.mcc > base_c.mcc
    assert gate_c.recall >= 0.95  # the measured floor; the issue's 0.98/0.5 target is the xfail below


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="CANARD dev: the gate reaches recall ~0.97 at specificity ~0.36, short of 0.98/0.5 "
                   "(fitted on CANARD itself its features reach only ~0.30 specificity at 0.98 recall)")
def test_canard_dev_gate_target(gate: Gate) -> None:
    gate_c, _, _ = _measure(gate, load_unified(shared_data("canard_dev.jsonl")))
    assert gate_c.recall >= 0.98 and gate_c.specificity >= 0.5


def test_no_evaluation_row_is_fitted() -> None:
    ids = {e.id for e in default_training_examples()}
    assert ids and all(e.split == "train" for e in default_training_examples())
    for path in OWN_DATA:
        assert not ids & {e.id for e in load_unified(path, split="test")}


# -- training --------------------------------------------------------------------------------------

def _toy(n: int) -> list[Example]:
    rows = []
    for i in range(n):
        window = (Turn("a", f"mmpose {i} 部署到 TX2 了", 0.0),)
        rows.append(Example(f"t:{i}n", f"c{i}", window, Turn("b", "它怎么装？" if i % 2 else "为什么不好用？", 1.0), "needs"))
        rows.append(Example(f"t:{i}p", f"c{i}", window, Turn("b", f"请问 CUDA 1{i % 10}.0 在 Ubuntu 上怎么装？", 1.0), "not_needed"))
    return rows


def test_the_sure_side_is_the_lowest_cut_that_keeps_the_precision() -> None:
    from corefbot.models.serve.gate import _precision_threshold

    scored = [(0.99, 1)] * 30 + [(0.9, 0)] + [(0.8, 1)] * 70 + [(0.5, 0)] * 5
    assert _precision_threshold(scored, 0.99) == pytest.approx(0.8)  # 100 of 101 from 0.8 on
    # a tie is selected whole: 100 of 102 from 0.8 on is under 0.99, whichever way the tie is ordered
    assert _precision_threshold(scored + [(0.8, 0)], 0.99) == pytest.approx(0.99)
    assert _precision_threshold(scored, 1.0) == pytest.approx(0.99)
    assert _precision_threshold(scored, 1.0, min_selected=31) is None
    assert _precision_threshold([(0.9, 0)] * 40, 0.5) is None


def test_train_save_load_roundtrip(tmp_path: Path) -> None:
    data = _toy(40)
    gate = Gate.train(data, folds=4, epochs=4)
    assert gate.meta["oof_recall"] >= 0.99
    path = tmp_path / "gate.json"
    gate.save(path)
    again = Gate.load(path)
    assert again.sure_threshold == gate.sure_threshold
    for e in data[:10]:
        assert again.evidence(e.window, e.question)[0] == pytest.approx(gate.evidence(e.window, e.question)[0], abs=1e-3)
        assert again.needs_model(e.window, e.question) == gate.needs_model(e.window, e.question)
    needs = [e for e in data if e.label == "needs"]
    assert all(again.needs_model(e.window, e.question) for e in needs)


def test_the_cut_is_per_language(tmp_path: Path) -> None:
    # No weights: every question scores 0.5, so only the cut decides (the questions carry no strong cue).
    gate = Gate(weights={}, threshold=0.4, thresholds={"zh": 0.6})
    zh, en = q("Qwen2.5 的技术报告里训练数据有多少 token？"), q("How many tokens was Qwen2.5 trained on?")
    assert not gate.needs_model(MMPOSE, zh) and gate.needs_model(MMPOSE, en)
    gate.save(tmp_path / "g.json")
    assert Gate.load(tmp_path / "g.json").thresholds == {"zh": 0.6}
    trained = Gate.train(_toy(40) + [Example(f"e:{i}", f"e{i}", (Turn("a", "Has anyone tried mmpose?", 0.0),),
                                              Turn("b", "how to deploy it?" if i % 2 else f"How do I install CUDA 1{i % 10}?", 1.0),
                                              "needs" if i % 2 else "not_needed") for i in range(80)],
                         folds=4, epochs=4, min_language_positives=30)
    assert set(trained.thresholds) == {"zh", "en"}


def test_only_mode_needs_data_and_spares_the_shipped_model() -> None:
    from corefbot.models.train.gate import main

    with pytest.raises(SystemExit):
        main(["--only"])
    with pytest.raises(SystemExit):
        main(["--only", "--extra", str(OWN_DATA[0])])  # --out defaults to the shipped model


def test_train_needs_both_classes() -> None:
    with pytest.raises(ValueError, match="both classes"):
        Gate.train([e for e in _toy(10) if e.label == "needs"])


@pytest.mark.parametrize("content, match", [("{not json", "not valid JSON"), ('{"format": "other"}', "expected format"),
                                            ('{"format": "corefbot-gate/1"}', "missing key 'threshold'")])
def test_bad_model_files_name_the_path(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as info:
        Gate.load(path)
    assert str(path) in str(info.value)
    with pytest.raises(FileNotFoundError, match="absent.json"):
        Gate.load(tmp_path / "absent.json")


def test_gate_path_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    retrained = Gate.train(_toy(20), folds=2, epochs=2)
    retrained.save(tmp_path / "retrained.json")
    monkeypatch.setenv("COREFBOT_GATE_PATH", str(tmp_path / "retrained.json"))
    assert Gate.load().meta == json.loads((tmp_path / "retrained.json").read_text())["meta"]
    monkeypatch.setenv("COREFBOT_GATE_PATH", str(tmp_path / "missing.json"))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        Gate.load()


def test_served_resolver_uses_the_configured_gate(tmp_path: Path) -> None:
    """COREFBOT_GATE_PATH from the bot's .env reaches both the gate and the rules backend's classifier."""
    from corefbot.models.serve.resolver import load_resolver

    retrained = Gate.train(_toy(20), folds=2, epochs=2)
    retrained.save(tmp_path / "retrained.json")
    rules = load_resolver("rules", gate_path=tmp_path / "retrained.json")
    assert rules.backend.gate.meta == retrained.meta
    fallback = load_resolver("llama-cpp", model_path=str(tmp_path / "none.gguf"), fallback=True,
                             gate_path=tmp_path / "retrained.json")
    assert fallback.fallback_reason and fallback.backend.gate.meta == retrained.meta


@pytest.mark.slow
def test_shipped_model_is_what_the_trainer_builds(tmp_path: Path) -> None:
    shared_data("task_gecor.jsonl")
    from corefbot.models.train.gate import main

    out = tmp_path / "gate.json"
    assert main(["--out", str(out)]) == 0
    built, shipped = json.loads(out.read_text()), json.loads(DEFAULT_PATH.read_text())
    assert built["threshold"] == pytest.approx(shipped["threshold"])
    assert built["weights"] == shipped["weights"]


def test_features_are_bilingual() -> None:
    zh = features(MMPOSE, q("那个在 TX2 上怎么装？"))
    assert "c1:装" in zh and "r:zh_dem" in zh
    en = features(MMPOSE, q("what about TX2?"))
    assert "w0:what" in en and "r:en_what_about" in en


def test_retrain_from_the_store_labels(store) -> None:
    from corefbot.models.train.gate import train_from_store
    from corefbot.pipeline.build import build
    from corefbot.pipeline.labels.rows import set_label
    from corefbot.pipeline.export import iter_records
    from corefbot.pipeline.records import Message

    chat = []
    for i in range(24):  # one question per minute, alternating senders so nothing merges
        chat.append(("u_a", i * 120, f"有人在 Jetson 上跑过 mmpose {i} 吗？"))
        chat.append(("u_b", i * 120 + 60, "那个在 TX2 上怎么装？" if i % 2 else f"请问 Ubuntu 2{i % 10}.04 怎么装 CUDA？"))
    store.insert_messages([Message("qq", "g1", str(i), s, 1000 + t, text) for i, (s, t, text) in enumerate(chat)])
    build(store)
    labelled = 0
    for record in iter_records(store):
        if record["text"] == "那个在 TX2 上怎么装？":  # short texts (< 7 characters) are never labelled
            set_label(store, record["id"], "needs", "moderator", labeler="mod", rewrite="mmpose 在 TX2 上怎么装？")
            labelled += 1
        elif record["text"].startswith("请问"):
            set_label(store, record["id"], "not_needed", "moderator", labeler="mod")
            labelled += 1
    assert labelled >= 20
    gate = train_from_store(store, base=False, folds=3, epochs=4)
    assert gate.meta["n"] == labelled
    assert gate.needs_model((Turn("a", "有人在 Jetson 上跑过 mmpose 吗？", 0.0),), q("那个在 TX2 上怎么装？"))


def test_merged_runs_placeholders_and_two_clause_ellipsis() -> None:
    """What the demo chat showed: a multi-line window turn, a run of several lines, a sticker, 「X 上呢？能…吗」."""
    from corefbot.models.serve.validate import validate_rewrite

    window = (Turn("a", "大家好，我在看 mmpose 的文档\nCan mmpose be deployed on mobile phones?", 0.0),
              Turn("b", "Yes, through ncnn or mmdeploy, it runs on Android.", 1.0))
    assert rewrite(window, q("BTW, how to deploy it on TX2?")) == "BTW, how to deploy mmpose on TX2?"
    run = rewrite(window, q("[face]\n它在 TX2 上怎么部署？"))
    assert run is not None and "\n" not in run and "mmpose" in run
    assert validate_rewrite("[face]\n它在 TX2 上怎么部署？", run, [t.text for t in window])[0]
    assert "face" not in (rewrite((Turn("a", "[face]", 0.0),), q("为什么不好用？")) or "")
    assert {"zh_ne", "zh_predicate_only"} <= set(cues(window, q("在 Jetson Nano 上呢？能跑起来吗")))


def test_best_mcc_threshold_reaches_low_scores_and_stays_near_half_on_ties() -> None:
    from corefbot.pipeline.metrics import best_mcc_threshold, leave_one_out_cuts

    # The positives the argmax misses sit at p = 0.02–0.03: the cut must go below them, not to a round 0.05.
    scored = [(0.9, True), (0.8, True), (0.03, True), (0.02, True), (0.001, False), (0.002, False), (0.004, False)]
    cut = best_mcc_threshold(scored)
    assert 0.004 < cut <= 0.02
    # Perfectly separated at 0.5 already: every cut between the classes ties, and 0.5 is kept.
    assert best_mcc_threshold([(0.9, True), (0.7, True), (0.2, False), (0.1, False)]) == 0.5
    # Out of sample each example is judged by a cut chosen without it: one lone positive among low scores
    # cannot choose its own cut.
    loo = leave_one_out_cuts([(0.9, True), (0.8, True), (0.01, True), (0.001, False), (0.002, False)])
    assert loo == [True, True, False, False, False]


def test_bootstrap_interval_holds_the_mean_and_narrows_with_more_values() -> None:
    from corefbot.pipeline.metrics import bootstrap_mean_ci

    few = [0.0, 0.1, 0.3, 0.0, 0.2] * 4
    many = few * 25
    lo, hi = bootstrap_mean_ci(few)
    assert lo < sum(few) / len(few) < hi and bootstrap_mean_ci(few) == (lo, hi)  # seeded: the same interval
    mlo, mhi = bootstrap_mean_ci(many)
    assert lo < mlo < mhi < hi  # 25 times the questions: a narrower interval around the same mean
    assert bootstrap_mean_ci([0.5] * 10) == (0.5, 0.5) and bootstrap_mean_ci([]) == (0.0, 0.0)


def test_restoration_scores_only_what_the_rewrite_adds() -> None:
    from corefbot.pipeline.metrics import restoration

    q, gold = "how to deploy it on TX2?", "how to deploy mmpose on TX2?"
    assert restoration([(q, gold, gold)]) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert restoration([(q, q, gold)]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}  # as asked: nothing restored
    wrong = restoration([(q, "how to deploy mmdet on TX2?", gold)])
    assert wrong["recall"] == 0.0 and wrong["precision"] == 0.0
    # Summed over pairs, characters for Chinese: "mmpose" and 可, 灵 put back, as the golds do.
    both = restoration([(q, gold, gold), ("那个多少钱", "可灵 那个多少钱", "可灵多少钱")])
    assert both == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    half = restoration([(q, "how to deploy mmpose v2 on TX2?", gold)])
    assert half["precision"] == 0.5 and half["recall"] == 1.0


def test_mcnemar_p_is_exact_symmetric_and_one_without_disagreements() -> None:
    from corefbot.pipeline.metrics import mcnemar_p

    assert mcnemar_p(4, 2) == pytest.approx(2 * (1 + 6 + 15) / 64)  # seedrw7: 4 questions only the rewrite got right, 2 only the letter
    assert mcnemar_p(2, 4) == mcnemar_p(4, 2)
    assert mcnemar_p(10, 0) == pytest.approx(2 / 1024)  # ten to none: not chance
    assert mcnemar_p(0, 0) == 1.0 and mcnemar_p(3, 3) == 1.0
