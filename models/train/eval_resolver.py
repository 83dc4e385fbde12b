"""``corefbot eval``: measure a resolver backend on labelled examples.

Backends evaluated:
- ``rules``, ``llama-cpp``, ``http``: what is served — :func:`corefbot.models.serve.resolver.load_resolver` (gate in
  front of the model backends, rewrite validation behind every backend);
- ``gate``: the gate alone as the decision ("needs" = sent to the model), the recall/skip trade-off;
- ``pronoun``: the plain pronoun-list baseline (it/they/this/that…; 它/他/这/那…) that ``rules`` must beat.

``rows`` (``--rows OUT.jsonl``) writes every question's outcome, one JSON line each and as it is measured, so a long
run interrupted keeps what it measured and two runs can be paired question by question (the report keeps only the
first ``MAX_MISTAKES`` mistakes).

Figures (fractions 0–1): decision precision/recall/F1 (positive = needs resolution, as in the paper),
Matthews correlation, the confusion matrix; rewrite exact match and token F1 of the forwarded text
against the gold rewrite over the gold-needs rows (characters for Chinese; a question forwarded as
asked scores what it shares with the gold), a bootstrap interval of the gain over the question as asked,
and restoration P/R/F1 (what the rewrite added to the question against what the gold added); the gate's
recall, skip rate and specificity; latency p50/p95 per question, gate included.
"""
from __future__ import annotations

import contextlib
import json
import logging
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

from corefbot.pipeline.metrics import (Confusion, bootstrap_mean_ci, exact_match, percentile, restoration,
                                       token_f1)
from corefbot.pipeline.records import Decision, Example

log = logging.getLogger(__name__)

EvalBackend = Literal["rules", "gate", "pronoun", "llama-cpp", "http"]
EVAL_BACKENDS: tuple[EvalBackend, ...] = ("rules", "gate", "pronoun", "llama-cpp", "http")
MAX_MISTAKES = 25  # wrong decisions, and forwarded questions unlike the gold, kept in the report for reading


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one backend made of one example."""

    decision: Decision
    forwarded: str  # the text that would be sent to the assistant
    sent_to_model: bool  # the gate's answer
    latency_ms: float
    rejected_rewrite: str | None = None  # the model's rewrite that failed validation (the question went as asked)
    error: str | None = None
    p_needs: float | None = None  # the backend's probability of "needs" (None where it gives none)
    gate_sure: bool = False  # the gate was sure it needs resolution where the backend decided otherwise
    gate_swayed: bool = False  # the gate's probability, weighed with the backend's letter, turned the decision
    gate_p: float | None = None  # the gate's probability of "needs" (None where no gate ran)

    @property
    def rejected(self) -> bool:
        return self.rejected_rewrite is not None


def _predictor(name: EvalBackend, *, gate: bool, model_path: str | None, url: str | None, http_model: str,
               api_key: str | None, n_threads: int | None, gate_path: str | Path | None = None,
               decide_by: str = "auto", weigh_gate: bool = True):
    """A function example -> Outcome, and a closer."""
    from corefbot.models.serve.gate import Gate

    gate_obj = Gate.load(gate_path)
    if name == "pronoun":
        from corefbot.models.serve.rules import pronoun_baseline

        def predict(e: Example) -> Outcome:
            start = time.perf_counter()
            needs = pronoun_baseline(e.question)
            sent = gate_obj.needs_model(e.window, e.question)
            return Outcome("needs" if needs else "not_needed", e.question.text, sent,
                           (time.perf_counter() - start) * 1000)
        return predict, lambda: None
    if name == "gate":
        def predict(e: Example) -> Outcome:
            start = time.perf_counter()
            sent = gate_obj.needs_model(e.window, e.question)
            return Outcome("needs" if sent else "not_needed", e.question.text, sent,
                           (time.perf_counter() - start) * 1000)
        return predict, lambda: None

    from corefbot.models.serve.resolver import load_resolver

    # No serving timeout: under load a slow answer is still an answer (the bot's 30 s limit once counted
    # such questions as failed here).
    kwargs: dict[str, Any] = {"timeout_s": None}
    if name == "llama-cpp":
        kwargs.update(model_path=model_path, n_threads=n_threads, decide_by=decide_by)
    elif name == "http":
        kwargs.update(url=url, http_model=http_model, api_key=api_key)
    resolver = load_resolver(name, gate=gate, gate_path=gate_path, weigh_gate=weigh_gate, **kwargs)

    def predict(e: Example) -> Outcome:
        start = time.perf_counter()
        try:
            res = resolver.resolve(e.window, e.question, group=e.conversation)
        except Exception as exc:  # noqa: BLE001 - a timeout or a server error counts as "unknown", and is reported
            log.warning("%s: %s failed: %s", e.id, name, exc)
            return Outcome("unknown", e.question.text, True, (time.perf_counter() - start) * 1000, error=str(exc))
        if resolver.gate is not None:
            sent = not res.gated
        elif name == "rules":  # no model behind it: report what the shipped gate would have sent
            sent = gate_obj.needs_model(e.window, e.question)
        else:  # --no-gate: everything went to the model
            sent = True
        return Outcome(res.decision, res.query(e.question.text), sent, (time.perf_counter() - start) * 1000,
                       rejected_rewrite=res.rejected_rewrite, p_needs=res.probs.get("needs") if res.probs else None,
                       gate_sure=res.gate_sure, gate_swayed=res.gate_swayed, gate_p=res.gate_p)
    return predict, resolver.close


def row_record(e: Example, o: Outcome) -> dict[str, Any]:
    """One question's outcome for ``--rows``: what was decided and forwarded, next to the gold. The rewrite scores
    are those :func:`score` averages, present where it counts the row (gold needs, with a gold rewrite)."""
    scored = e.label == "needs" and bool(e.rewrite)
    return {"id": e.id, "lang": e.lang, "question": e.question.text, "gold": e.label, "decision": o.decision,
            "p_needs": None if o.p_needs is None else round(o.p_needs, 4),
            "gate_p": None if o.gate_p is None else round(o.gate_p, 4),
            "sent_to_model": o.sent_to_model, "gate_sure": o.gate_sure, "gate_swayed": o.gate_swayed,
            "forwarded": o.forwarded,
            "gold_rewrite": e.rewrite,
            "refused_rewrite": o.rejected_rewrite,
            "exact_match": exact_match(o.forwarded, e.rewrite or "") if scored else None,
            "token_f1": token_f1(o.forwarded, e.rewrite or "") if scored else None,
            "as_asked_token_f1": token_f1(e.question.text, e.rewrite or "") if scored else None,
            "latency_ms": round(o.latency_ms, 1), "error": o.error}


def score(examples: Sequence[Example], outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """The report's figures for paired examples and outcomes."""
    gold = [e.label == "needs" for e in examples]
    conf = Confusion.of(gold, [o.decision == "needs" for o in outcomes])
    decision = {**conf.report(), "unknown": sum(o.decision == "unknown" for o in outcomes)}

    needs = [(e, o) for e, o in zip(examples, outcomes) if e.label == "needs" and e.rewrite]
    f1 = [token_f1(o.forwarded, e.rewrite or "") for e, o in needs]
    asked_f1 = [token_f1(e.question.text, e.rewrite or "") for e, _ in needs]
    rewrite = {
        "n": len(needs),
        "exact_match": statistics.fmean(exact_match(o.forwarded, e.rewrite or "") for e, o in needs) if needs else 0.0,
        "token_f1": statistics.fmean(f1) if needs else 0.0,
        "changed": statistics.fmean(o.forwarded != e.question.text for e, o in needs) if needs else 0.0,
        "as_asked_token_f1": statistics.fmean(asked_f1) if needs else 0.0,
        # How far the gain over the question as asked could move on another sample of this size.
        "gain_ci95": bootstrap_mean_ci([a - b for a, b in zip(f1, asked_f1)]),
        "restoration": restoration((e.question.text, o.forwarded, e.rewrite or "") for e, o in needs),
        "rejected": sum(o.rejected for o in outcomes),
        # The harm a member sees on the other side: a self-contained question forwarded changed.
        "altered_not_needed": sum(e.label == "not_needed" and o.forwarded != e.question.text
                                  for e, o in zip(examples, outcomes)),
    }
    # What validation cost or saved: the rejected rewrites of gold-needs rows scored as if forwarded.
    refused = [(e, o.rejected_rewrite) for e, o in needs if o.rejected_rewrite is not None]
    if refused:
        rewrite.update(
            rejected_needs=len(refused),
            rejected_exact_match=statistics.fmean(exact_match(r, e.rewrite or "") for e, r in refused),
            rejected_token_f1=statistics.fmean(token_f1(r, e.rewrite or "") for e, r in refused),
            rejected_as_asked_token_f1=statistics.fmean(token_f1(e.question.text, e.rewrite or "") for e, _ in refused))
    gate_conf = Confusion.of(gold, [o.sent_to_model for o in outcomes])
    gate = {"recall": gate_conf.recall, "specificity": gate_conf.specificity,
            "skip_rate": _div(sum(not o.sent_to_model for o in outcomes), len(outcomes)),
            "sent_rate": _div(sum(o.sent_to_model for o in outcomes), len(outcomes)),
            "tp": gate_conf.tp, "fp": gate_conf.fp, "fn": gate_conf.fn, "tn": gate_conf.tn,
            # "needs" where the gate was sure and the model's letter said otherwise, and how many of them were right
            "sure_overruled": sum(o.gate_sure for o in outcomes),
            "sure_overruled_right": sum(o.gate_sure and e.label == "needs" for e, o in zip(examples, outcomes)),
            # decisions the gate's probability turned when weighed with the letter, and how many it turned right
            "swayed": sum(o.gate_swayed for o in outcomes),
            "swayed_right": sum(o.gate_swayed and (o.decision == "needs") == (e.label == "needs")
                                for e, o in zip(examples, outcomes))}
    lat = [o.latency_ms for o in outcomes]
    latency = {"p50": percentile(lat, 50), "p95": percentile(lat, 95), "mean": statistics.fmean(lat) if lat else 0.0}

    by_lang: dict[str, dict[str, float]] = {}
    groups: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(examples):
        groups[e.lang or "?"].append(i)
    if len(groups) > 1:
        for lang, idx in sorted(groups.items()):
            c = Confusion.of([gold[i] for i in idx], [outcomes[i].decision == "needs" for i in idx])
            g = Confusion.of([gold[i] for i in idx], [outcomes[i].sent_to_model for i in idx])
            by_lang[lang] = {"n": len(idx), "f1": c.f1, "mcc": c.mcc, "gate_recall": g.recall,
                             "gate_specificity": g.specificity}
    mistakes = [{"id": e.id, "question": e.question.text, "gold": e.label, "decision": o.decision,
                 "forwarded": o.forwarded, "gold_rewrite": e.rewrite}
                for e, o in zip(examples, outcomes) if (o.decision == "needs") != (e.label == "needs")][:MAX_MISTAKES]
    # What the exact match misses: the question that reached the assistant next to the gold rewrite.
    misses = [{"id": e.id, "question": e.question.text, "decision": o.decision, "forwarded": o.forwarded,
               "gold_rewrite": e.rewrite, "refused_rewrite": o.rejected_rewrite}
              for e, o in needs if not exact_match(o.forwarded, e.rewrite or "")][:MAX_MISTAKES]
    return {"n": len(examples), "decision": decision, "rewrite": rewrite, "gate": gate, "latency_ms": latency,
            "errors": sum(o.error is not None for o in outcomes), "by_lang": by_lang, "mistakes": mistakes,
            "rewrite_misses": misses}


def _div(a: float, b: float) -> float:
    return a / b if b else 0.0


def evaluate(examples: Sequence[Example], backend: EvalBackend, *, gate: bool = True, model_path: str | None = None,
             url: str | None = None, http_model: str = "default", api_key: str | None = None,
             n_threads: int | None = None, gate_path: str | Path | None = None, progress: bool = True,
             decide_by: str = "auto", weigh_gate: bool = True, rows: str | Path | None = None) -> dict[str, Any]:
    """Run ``backend`` over ``examples`` and return the report (see the module docstring). ``decide_by``:
    how ``llama-cpp`` decides (``COREFBOT_DECIDE_BY``; ``auto`` as the bot does by default). ``weigh_gate``: the
    gate's probability weighed with the letter (``COREFBOT_WEIGH_GATE``). ``rows``: a JSONL file that receives
    :func:`row_record` for each question as it is answered."""
    if backend not in EVAL_BACKENDS:
        raise ValueError(f"unknown eval backend {backend!r}; choose one of {', '.join(EVAL_BACKENDS)}")
    if not examples:
        raise ValueError("no examples to evaluate (check the file and --split)")
    from tqdm import tqdm

    predict, close = _predictor(backend, gate=gate, model_path=model_path, url=url, http_model=http_model,
                                api_key=api_key, n_threads=n_threads, gate_path=gate_path, decide_by=decide_by,
                                weigh_gate=weigh_gate)
    outcomes: list[Outcome] = []
    with open(rows, "w", encoding="utf-8") if rows else contextlib.nullcontext() as out:
        try:
            for e in tqdm(examples, desc=f"eval {backend}", unit="q", disable=not progress):
                outcomes.append(predict(e))
                if out:
                    out.write(json.dumps(row_record(e, outcomes[-1]), ensure_ascii=False) + "\n")
                    out.flush()
        finally:
            close()
    report = score(examples, outcomes)
    report["backend"] = backend
    if backend == "llama-cpp":
        from corefbot.models.serve.llama import served_model

        report["decide_by"] = served_model(model_path).decide_mode(decide_by)  # what "auto" resolved to
    if backend in ("llama-cpp", "http"):  # a gate in front of a model
        report["weigh_gate"] = weigh_gate and gate
    report["labels"] = dict(Counter(e.label for e in examples))
    return report


def load_for_eval(path: str | Path, split: str | None = None) -> list[Example]:
    """Unified JSONL or a corefbot alpaca export; ``split`` keeps rows of that split only."""
    from corefbot.pipeline.examples import load_examples

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"evaluation data not found: {path}")
    examples = load_examples(path)
    if split is not None:
        kept = [e for e in examples if e.split == split]
        if not kept:
            splits = sorted({str(e.split) for e in examples})
            raise ValueError(f"{path}: no rows with split {split!r} (splits present: {', '.join(splits)})")
        examples = kept
    return examples


def summary_lines(report: dict[str, Any]) -> list[str]:
    d, r, g, lat = report["decision"], report["rewrite"], report["gate"], report["latency_ms"]
    lines = [
        f"backend {report['backend']}"
        + (f" (decided by the {report['decide_by']})" if "decide_by" in report else "")
        + f"  n {report['n']}  labels {report.get('labels', {})}",
        f"decision  P {d['precision']:.3f}  R {d['recall']:.3f}  F1 {d['f1']:.3f}  MCC {d['mcc']:.3f}  "
        f"tp {d['tp']} fp {d['fp']} fn {d['fn']} tn {d['tn']}  unknown {d['unknown']}",
        f"rewrite   EM {r['exact_match']:.3f}  token F1 {r['token_f1']:.3f}  (as asked {r['as_asked_token_f1']:.3f}, "
        f"changed {r['changed']:.3f}, rejected {r['rejected']}, n {r['n']}; "
        f"self-contained questions changed {r['altered_not_needed']})",
        f"          token F1 over as asked {r['token_f1'] - r['as_asked_token_f1']:+.3f} "
        f"(95% bootstrap interval {r['gain_ci95'][0]:+.3f} to {r['gain_ci95'][1]:+.3f}); restoration "
        f"P {r['restoration']['precision']:.3f} R {r['restoration']['recall']:.3f} F1 {r['restoration']['f1']:.3f}",
        *([f"rejected  {r['rejected_needs']} rewrites of gold-needs questions would have scored EM "
           f"{r['rejected_exact_match']:.3f}, token F1 {r['rejected_token_f1']:.3f} (forwarded as asked: "
           f"{r['rejected_as_asked_token_f1']:.3f})"] if r.get("rejected_needs") else []),
        f"gate      recall {g['recall']:.3f}  specificity {g['specificity']:.3f}  skip rate {g['skip_rate']:.3f}  "
        f"sent to model {g['sent_rate']:.3f}"
        + (f"  sure over the model {g['sure_overruled']} ({g['sure_overruled_right']} right)"
           if g.get("sure_overruled") else "")
        + (f"  weighed against the letter {g['swayed']} ({g['swayed_right']} right)" if g.get("swayed") else ""),
        f"latency   p50 {lat['p50']:.2f} ms  p95 {lat['p95']:.2f} ms",
    ]
    for lang, m in report.get("by_lang", {}).items():
        lines.append(f"  {lang}: n {m['n']}  F1 {m['f1']:.3f}  MCC {m['mcc']:.3f}  gate recall {m['gate_recall']:.3f}  "
                     f"specificity {m['gate_specificity']:.3f}")
    if report.get("errors"):
        lines.append(f"errors    {report['errors']} questions failed (counted as 'unknown')")
    return lines
