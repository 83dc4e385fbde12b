"""Evaluation through llama.cpp (the served model) on the tiny Q4_K_M GGUF: all option orders, rewrites by the
served path, the scaling check and the seed figures on a GGUF without PyTorch weights."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")

from corefbot.models.train.evaluate_gguf import (evaluate_decisions_gguf, evaluate_gguf, open_backend,  # noqa: E402
                                                 pick_engine)
from corefbot.pipeline.prompt import ALL_ORDERS, SERVE_ORDER, build_prompt  # noqa: E402
from tests.test_finetune import chat_examples, write_unified  # noqa: E402


def test_engine_follows_what_the_model_is(tiny_gguf: Path, tiny_hf: Path) -> None:
    assert pick_engine(tiny_gguf) == "llama" and pick_engine(tiny_hf) == "hf"
    assert pick_engine(tiny_gguf, "hf") == "hf" and pick_engine(tiny_hf, "llama") == "llama"
    with pytest.raises(ValueError, match="engine"):
        pick_engine(tiny_gguf, "onnx")  # type: ignore[arg-type]


def test_letter_logits_ask_what_serving_asks(tiny_gguf: Path) -> None:
    """In the serving order, the letters' soft-maxed logits are the probabilities resolve() serves."""
    examples = chat_examples(4)
    with open_backend(tiny_gguf, n_threads=2) as backend:
        for e in examples:
            logits = backend.letter_logits(build_prompt(e.window, e.question, SERVE_ORDER))
            top = max(logits)
            probs = [math.exp(x - top) for x in logits]
            served = backend.resolve(e.window, e.question, rewrite="never").probs
            assert [p / sum(probs) for p in probs] == pytest.approx([served[d] for d in SERVE_ORDER], abs=1e-4)


def test_report_over_all_orders_and_served_rewrites(tiny_gguf: Path) -> None:
    examples = chat_examples(6)
    with open_backend(tiny_gguf, n_threads=2) as backend:
        report = evaluate_gguf(backend, examples)
        served = [backend.resolve(e.window, e.question, rewrite="never").decision for e in examples]
        ev = evaluate_decisions_gguf(backend, examples)
    decision = report["decision"]
    assert decision["examples"] == 6 and decision["orders"] == len(ALL_ORDERS) == 6
    assert all(sum(o["letter_share"]) == pytest.approx(1.0) for o in decision["per_order"])
    assert list(ev.order_result(SERVE_ORDER).predicted) == served  # the serving order is what resolve() decides
    assert report["rewrite"]["examples"] == sum(e.label == "needs" for e in examples)
    assert 0.0 <= report["rewrite"]["token_f1"] <= 1.0


def test_deciding_by_the_rewrite(tiny_gguf: Path) -> None:
    """decide_by="rewrite": needs resolution exactly when the served rewrite adds content to the question; the
    evaluation then asks once per question (one order)."""
    from corefbot.models.serve.llama import LlamaBackend
    from corefbot.models.serve.validate import adds_content

    examples = chat_examples(6)
    with pytest.raises(ValueError, match="decide_by"):
        LlamaBackend(tiny_gguf, decide_by="vibes")  # type: ignore[arg-type]
    with open_backend(tiny_gguf, n_threads=2, decide_by="rewrite") as backend:
        for e in examples:
            res = backend.resolve(e.window, e.question, rewrite="always")
            changed = bool(res.rewrite) and adds_content(e.question.text, res.rewrite or "")
            assert res.decision == ("needs" if changed else "not_needed")
            auto = backend.resolve(e.window, e.question)
            assert auto.decision == res.decision and (auto.rewrite is None) == (res.decision != "needs")
        ev = evaluate_decisions_gguf(backend, examples)
    assert [r.order for r in ev.per_order] == [SERVE_ORDER]


@pytest.mark.slow
def test_scaling_check_and_seed_figures_on_a_gguf(tiny_gguf: Path, tmp_path: Path, capsys) -> None:
    from corefbot.cli import main
    from corefbot.models.train.scaling import count_parameters, scaling_check

    examples = chat_examples(6)
    report = scaling_check([tiny_gguf], examples, progress=False, n_threads=2)
    (row,) = report.rows
    assert row.kind == "base" and row.parameters == count_parameters(tiny_gguf)
    with open_backend(tiny_gguf, n_threads=2) as backend:
        assert row.stats["f1"] == evaluate_decisions_gguf(backend, examples).stat("f1")
    heldout = tmp_path / "seed-data"
    heldout.mkdir()
    write_unified(heldout / "heldout-task.jsonl", examples)
    out = tmp_path / "figures.json"
    assert main(["seed-eval", "--model", str(tiny_gguf), "--heldout", str(heldout), "--per-set", "6",
                 "--threads", "2", "--served", "--report", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["engine"] == "llama" and data["sets"][0]["examples"] == 6
    assert data["sets"][0]["model"]["decision"]["orders"] == 6
    served = data["sets"][0]["served"]  # the bot's resolver: gate, the GGUF deciding by the letter, validation
    d = served["decision"]
    assert served["decide_by"] == "letter" and d["tp"] + d["fp"] + d["fn"] + d["tn"] == 6
    printed = capsys.readouterr().out
    assert "| task (en) | 6 (3) |" in printed and "| task (en) | 6 (3) | letter |" in printed

    # The served resolver as COREFBOT_DECIDE_BY=rewrite would serve the same model.
    assert main(["seed-eval", "--model", str(tiny_gguf), "--heldout", str(heldout), "--per-set", "6",
                 "--threads", "2", "--served", "--served-decide-by", "rewrite", "--report", str(out)]) == 0
    assert json.loads(out.read_text())["sets"][0]["served"]["decide_by"] == "rewrite"
    assert "| task (en) | 6 (3) | rewrite |" in capsys.readouterr().out
