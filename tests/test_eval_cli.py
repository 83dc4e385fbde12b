"""``corefbot eval`` end to end: every backend, both input formats, the report's shape and errors."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from aiohttp import web

from corefbot.cli import main
from corefbot.models.train.eval_resolver import evaluate, load_for_eval, score
from corefbot.pipeline.examples import load_unified
from corefbot.pipeline.export import alpaca_rows
from tests.test_http_backend import LoopbackServer, completion

ZH = Path(__file__).resolve().parents[1] / "models" / "train" / "cases" / "zh_cases.jsonl"


def run_eval(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "report.json"
    assert main(["eval", *args, "--report", str(out)]) == 0
    return json.loads(out.read_text(encoding="utf-8"))


def check_shape(report: dict, n: int) -> None:
    assert report["n"] == n
    d = report["decision"]
    assert d["tp"] + d["fp"] + d["fn"] + d["tn"] == n
    for section, keys in {"decision": ("precision", "recall", "f1"), "rewrite": ("exact_match", "token_f1"),
                          "gate": ("recall", "skip_rate", "specificity")}.items():
        for key in keys:
            assert 0.0 <= report[section][key] <= 1.0, (section, key)
    assert -1.0 <= report["decision"]["mcc"] <= 1.0
    assert 0 <= report["latency_ms"]["p50"] <= report["latency_ms"]["p95"]


def test_rules_beat_the_pronoun_baseline_on_held_out_chinese(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    n = len(load_unified(ZH, split="test"))
    rules = run_eval(tmp_path, "--backend", "rules", "--split", "test", str(ZH))
    printed = capsys.readouterr().out
    assert "decision" in printed and "gate" in printed and "report written" in printed
    base = run_eval(tmp_path, "--backend", "pronoun", "--split", "test", str(ZH))
    for r in (rules, base):
        check_shape(r, n)
    assert rules["decision"]["f1"] > base["decision"]["f1"] and rules["decision"]["mcc"] > base["decision"]["mcc"]
    assert base["rewrite"]["changed"] == 0.0  # the baseline forwards questions as asked
    assert rules["rewrite"]["token_f1"] > rules["rewrite"]["as_asked_token_f1"]  # its rewrites help on Chinese
    gate = run_eval(tmp_path, "--backend", "gate", "--split", "test", str(ZH))
    assert gate["decision"]["recall"] == gate["gate"]["recall"] >= 0.98
    assert gate["gate"]["specificity"] >= 0.5


def test_rows_hold_every_question_and_add_up_to_the_report(tmp_path: Path) -> None:
    rows_path = tmp_path / "rows.jsonl"
    report = run_eval(tmp_path, "--backend", "rules", "--split", "test", "--rows", str(rows_path), str(ZH))
    rows = [json.loads(line) for line in rows_path.read_text(encoding="utf-8").splitlines()]
    examples = load_unified(ZH, split="test")
    assert [r["id"] for r in rows] == [e.id for e in examples]
    # Paired per question, the rows give back the report's figures: what a comparison of two runs stands on.
    assert sum(r["gold"] == "needs" and r["decision"] == "needs" for r in rows) == report["decision"]["tp"]
    assert sum(r["gold"] == "not_needed" and r["decision"] == "needs" for r in rows) == report["decision"]["fp"]
    assert all((r["p_needs"] > 0.5) == (r["decision"] == "needs") for r in rows)  # the probability the decision read
    scored = [r for r in rows if r["token_f1"] is not None]
    assert len(scored) == report["rewrite"]["n"]
    assert sum(r["token_f1"] for r in scored) / len(scored) == pytest.approx(report["rewrite"]["token_f1"])
    assert sum(r["exact_match"] for r in scored) / len(scored) == pytest.approx(report["rewrite"]["exact_match"])
    assert all(r["token_f1"] is None for r in rows if r["gold"] == "not_needed")


def test_eval_compare_pairs_two_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    reports = {}
    for backend in ("rules", "pronoun"):
        reports[backend] = run_eval(tmp_path, "--backend", backend, "--split", "test",
                                    "--rows", str(tmp_path / f"{backend}.jsonl"), str(ZH))
    out = tmp_path / "cmp.json"
    assert main(["eval-compare", str(tmp_path / "rules.jsonl"), str(tmp_path / "pronoun.jsonl"), "--report", str(out)]) == 0
    assert "McNemar" in capsys.readouterr().out
    c = json.loads(out.read_text(encoding="utf-8"))
    right = {b: r["decision"]["tp"] + r["decision"]["tn"] for b, r in reports.items()}
    # What each got right alone is the whole difference in questions decided right.
    assert c["only_a_decided_right"] - c["only_b_decided_right"] == right["rules"] - right["pronoun"] > 0
    assert c["paired"] == reports["rules"]["n"] and c["rewrites"] == reports["rules"]["rewrite"]["n"]
    assert c["a_token_f1"] == pytest.approx(reports["rules"]["rewrite"]["token_f1"])
    assert c["b_token_f1"] == pytest.approx(reports["pronoun"]["rewrite"]["as_asked_token_f1"])  # it forwards as asked
    assert c["a_closer"] > c["b_closer"] and 0 < c["decision_p"] < 0.05
    assert len(c["a_only_ids"]) == c["only_a_decided_right"]


def test_eval_compare_names_what_is_wrong(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"id": "x", "gold": "needs", "decision": "needs", "token_f1": 1.0, "exact_match": 1.0}\n')
    b.write_text('{"id": "y", "gold": "needs", "decision": "needs", "token_f1": 1.0, "exact_match": 1.0}\nnot json\n')
    assert main(["eval-compare", str(a), str(b)]) == 2
    assert f"{b}:2" in capsys.readouterr().err
    b.write_text('{"id": "y", "gold": "needs", "decision": "needs", "token_f1": 1.0, "exact_match": 1.0}\n')
    assert main(["eval-compare", str(a), str(b)]) == 2
    assert "share no question id" in capsys.readouterr().err
    assert main(["eval-compare", str(a), str(tmp_path / "none.jsonl")]) == 2
    assert "rows file not found" in capsys.readouterr().err


def test_alpaca_export_is_read_too(tmp_path: Path) -> None:
    examples = load_unified(ZH, split="test")[:20]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(alpaca_rows(examples), ensure_ascii=False), encoding="utf-8")
    assert [e.id for e in load_for_eval(path)] == [e.id for e in examples]
    report = run_eval(tmp_path, "--backend", "rules", str(path))
    check_shape(report, 20)
    unified = evaluate(examples, "rules", progress=False)
    assert report["decision"] == unified["decision"]


def test_score_counts_forwarded_text() -> None:
    from corefbot.models.train.eval_resolver import Outcome

    examples = load_unified(ZH, split="test")[:2]  # a needs row, then its self-contained twin
    assert [e.label for e in examples] == ["needs", "not_needed"]
    perfect = [Outcome("needs", examples[0].rewrite, True, 1.0), Outcome("not_needed", examples[1].question.text, False, 2.0)]
    report = score(examples, perfect)
    assert report["decision"]["f1"] == 1.0 and report["rewrite"]["exact_match"] == 1.0
    assert report["gate"] == pytest.approx({"recall": 1.0, "specificity": 1.0, "skip_rate": 0.5, "sent_rate": 0.5,
                                            "tp": 1, "fp": 0, "fn": 0, "tn": 1, "sure_overruled": 0,
                                            "sure_overruled_right": 0, "swayed": 0, "swayed_right": 0})
    sure = score(examples, [replace(perfect[0], gate_sure=True), Outcome("needs", "x", True, 2.0, gate_sure=True)])
    assert (sure["gate"]["sure_overruled"], sure["gate"]["sure_overruled_right"]) == (2, 1)
    swayed = score(examples, [replace(perfect[0], gate_swayed=True), Outcome("needs", "x", True, 2.0, gate_swayed=True)])
    assert (swayed["gate"]["swayed"], swayed["gate"]["swayed_right"]) == (2, 1)
    wrong = [Outcome("not_needed", examples[0].question.text, False, 1.0), Outcome("needs", "x", True, 2.0)]
    bad = score(examples, wrong)
    assert bad["decision"]["f1"] == 0.0 and bad["decision"]["mcc"] == -1.0 and bad["gate"]["recall"] == 0.0
    assert [m["id"] for m in bad["mistakes"]] == [e.id for e in examples] and not report["mistakes"]
    # The self-contained question went out as "x": counted; sent as asked it is not.
    assert bad["rewrite"]["altered_not_needed"] == 1 and report["rewrite"]["altered_not_needed"] == 0
    assert not report["rewrite_misses"]
    assert bad["rewrite_misses"] == [{"id": examples[0].id, "question": examples[0].question.text,
                                      "decision": "not_needed", "forwarded": examples[0].question.text,
                                      "gold_rewrite": examples[0].rewrite, "refused_rewrite": None}]
    assert "rejected_needs" not in report["rewrite"]
    # A rewrite that validation refused went as asked, and is scored as if it had been forwarded.
    refused = [Outcome("needs", examples[0].question.text, True, 1.0, rejected_rewrite=examples[0].rewrite),
               perfect[1]]
    r = score(examples, refused)["rewrite"]
    assert r["rejected"] == 1 and r["exact_match"] == 0.0
    assert r["rejected_needs"] == 1 and r["rejected_exact_match"] == 1.0 and r["rejected_token_f1"] == 1.0
    assert r["rejected_as_asked_token_f1"] == pytest.approx(r["as_asked_token_f1"]) and r["as_asked_token_f1"] < 1.0


def test_http_backend_eval_with_the_gate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response(completion("A", {"A": -0.1, "B": -2.5, "C": -4.0}))

    server = LoopbackServer(handler)
    try:
        report = run_eval(tmp_path, "--backend", "http", "--url", server.url, "--split", "test", str(ZH))
        asked = len(server.requests)
        monkeypatch.setenv("COREFBOT_WEIGH_GATE", "false")
        alone = run_eval(tmp_path, "--backend", "http", "--url", server.url, "--split", "test", str(ZH))
    finally:
        server.close()
    n = len(load_unified(ZH, split="test"))
    check_shape(report, n)
    # Only what the gate sent reached the server; the rest was answered "not needed" without it.
    assert asked == report["gate"]["tp"] + report["gate"]["fp"] < n
    # The server's letter says "needs" every time; only where the gate's probability outweighed it was it turned.
    d, g = report["decision"], report["gate"]
    assert d["tp"] + d["fp"] + g["swayed"] == asked and g["swayed"] > 0 and report["weigh_gate"]
    # As configured for the bot: the letter alone.
    assert not alone["weigh_gate"] and alone["gate"]["swayed"] == 0
    assert alone["decision"]["tp"] + alone["decision"]["fp"] == asked


@pytest.mark.slow
def test_llama_cpp_eval_on_the_tiny_model(tmp_path: Path, tiny_gguf: Path) -> None:
    report = run_eval(tmp_path, "--backend", "llama-cpp", "--model", str(tiny_gguf), "--threads", "2",
                      "--no-gate", "--split", "test", "--limit", "6", str(ZH))
    check_shape(report, 6)
    assert report["errors"] == 0
    assert report["gate"]["sent_rate"] == 1.0  # --no-gate
    assert report["decide_by"] == "letter"  # auto, on a bare GGUF


@pytest.mark.slow
def test_llama_cpp_eval_decides_as_the_bot_is_configured(tmp_path: Path, tiny_gguf: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """`corefbot eval` measured "auto" while COREFBOT_DECIDE_BY told the bot to decide otherwise."""
    args = ("--backend", "llama-cpp", "--model", str(tiny_gguf), "--threads", "2", "--no-gate", "--limit", "2", str(ZH))
    monkeypatch.setenv("COREFBOT_DECIDE_BY", "rewrite")
    assert run_eval(tmp_path, *args)["decide_by"] == "rewrite"
    assert run_eval(tmp_path, *args, "--decide-by", "letter")["decide_by"] == "letter"  # the option wins


def test_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", str(tmp_path / "absent.jsonl")]) == 2
    assert "absent.jsonl" in capsys.readouterr().err
    assert main(["eval", "--split", "nope", str(ZH)]) == 2
    err = capsys.readouterr().err
    assert "'nope'" in err and "test" in err and "train" in err
    assert main(["eval", "--backend", "llama-cpp", "--model", "", str(ZH)]) == 2
    assert "GGUF" in capsys.readouterr().err


def test_eval_applies_no_serving_timeout(tiny_gguf, monkeypatch) -> None:
    """Under load a slow answer is still an answer: eval builds the model backend without the bot's 30 s limit."""
    pytest.importorskip("llama_cpp")
    from corefbot.models.serve.llama import LlamaBackend
    from corefbot.models.train.eval_resolver import evaluate
    from corefbot.pipeline.records import Example, Turn

    seen: list[object] = []
    real = LlamaBackend.__init__

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("timeout_s", "serving default"))
        real(self, *args, **kwargs)

    monkeypatch.setattr(LlamaBackend, "__init__", spy)
    ex = Example(id="x1", conversation="c", window=(Turn("a", "mmpose runs on TX2", 0.0),),
                 question=Turn("b", "how to deploy it?", 1.0), label="needs", rewrite="how to deploy mmpose?")
    report = evaluate([ex], "llama-cpp", gate=False, model_path=str(tiny_gguf), progress=False)
    assert seen == [None] and report["errors"] == 0


def test_eval_compare_tells_two_runs_of_one_set_apart_by_their_paths(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    row = '{"id": "x", "gold": "needs", "decision": "needs", "token_f1": 1.0, "exact_match": 1.0}\n'
    a, b = tmp_path / "old" / "set.jsonl", tmp_path / "new" / "set.jsonl"
    for path in (a, b):
        path.parent.mkdir()
        path.write_text(row)
    assert main(["eval-compare", str(a), str(b)]) == 0
    assert f"right only in {a}: 0, only in {b}: 0" in capsys.readouterr().out
