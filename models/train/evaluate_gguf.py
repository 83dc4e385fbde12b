"""Evaluation through llama.cpp: the same report as :func:`corefbot.models.train.evaluate.evaluate`, for
what is actually served — a GGUF, or a run folder's base GGUF with its ``adapter.gguf``.

On a CPU this is the fast route (a Q4_K_M 1.5B answers in about a second where its float32 conversion
under PyTorch takes ten), so the scaling check and the seed recipe's figures can cover real models.
Decisions: the letters' logits after each prompt, in all six option orders (order after order, so
consecutive prompts share their header's KV); a backend that decides by the rewrite is asked once per
question (the options play no part). Rewrites: the served path itself
(:meth:`~corefbot.models.serve.llama.LlamaBackend.resolve` with ``rewrite="always"``: the "needs" letter,
then one greedy line, as served).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

from corefbot.models.train.evaluate import DecisionEval, RewriteEval, decide, score_decisions, score_rewrites
from corefbot.pipeline.prompt import ALL_ORDERS, SERVE_ORDER, Order, build_prompt
from corefbot.pipeline.records import Decision, Example

if TYPE_CHECKING:
    from corefbot.models.serve.llama import DecideBy, LlamaBackend

Engine = Literal["auto", "hf", "llama"]


def pick_engine(model: str | Path, engine: Engine = "auto") -> Literal["hf", "llama"]:
    """``auto``: llama.cpp for a GGUF file, PyTorch for a folder (a run folder's trained adapter)."""
    if engine == "auto":
        return "llama" if Path(model).is_file() else "hf"
    if engine not in ("hf", "llama"):
        raise ValueError(f"engine must be 'auto', 'hf' or 'llama', not {engine!r}")
    return engine


def open_backend(model: str | Path, n_threads: int | None = None, decide_by: "DecideBy" = "letter") -> "LlamaBackend":
    """A backend for evaluation: no serving timeout (a slow machine must not count answers as failed)."""
    from corefbot.models.serve.llama import LlamaBackend

    return LlamaBackend(model, n_threads=n_threads, n_ctx=4096, timeout_s=None, max_queue=1, decide_by=decide_by)


def evaluate_decisions_gguf(backend: "LlamaBackend", examples: Sequence[Example],
                            orders: Sequence[Order] = ALL_ORDERS, *, progress: bool = False) -> DecisionEval:
    from tqdm import tqdm

    if not examples:
        raise ValueError("no examples to evaluate")
    if backend.decide_by == "rewrite":
        # The rewrite decides and the options play no part: one "order", the served one.
        return score_decisions(examples, {SERVE_ORDER: [
            backend.resolve(e.window, e.question).decision
            for e in tqdm(examples, desc="deciding", unit="question", disable=not progress, leave=False)]})
    predicted: dict[Order, list[Decision]] = {}
    bar = tqdm(total=len(orders) * len(examples), desc="deciding", unit="prompt", disable=not progress, leave=False)
    for order in orders:
        for e in examples:
            prompt = build_prompt(e.window, e.question, order)
            predicted.setdefault(order, []).append(decide(prompt, backend.letter_logits(prompt)))
            bar.update()
    bar.close()
    return score_decisions(examples, predicted)


def evaluate_rewrites_gguf(backend: "LlamaBackend", examples: Sequence[Example], *,
                           progress: bool = False) -> RewriteEval:
    from tqdm import tqdm

    needs = [e for e in examples if e.label == "needs" and e.rewrite]
    if not needs:
        return RewriteEval(0, math.nan, math.nan, ())
    return score_rewrites(needs, [backend.resolve(e.window, e.question, rewrite="always").rewrite or ""
                                  for e in tqdm(needs, desc="rewriting", unit="question", disable=not progress,
                                                leave=False)])


def evaluate_gguf(backend: "LlamaBackend", examples: Sequence[Example], *, rewrites: bool = True,
                  progress: bool = False) -> dict[str, Any]:
    """The report :func:`corefbot.models.train.evaluate.evaluate` gives, from the served model."""
    report: dict[str, Any] = {"decision": evaluate_decisions_gguf(backend, examples, progress=progress).summary()}
    if rewrites:
        report["rewrite"] = evaluate_rewrites_gguf(backend, examples, progress=progress).summary()
    return report


def measure_decide_modes(model: str | Path, examples: Sequence[Example], *, route: str,
                         n_threads: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Both ways the served model can decide, on ``examples`` in the serving order: the letters, and its
    own rewrite. The record names the better by Matthews (the letters on a tie: they cost less); it is
    what a run folder's ``decide.json`` holds and what ``COREFBOT_DECIDE_BY=auto`` serves.

    The letters are also tried with a cut on p(needs) (:func:`~corefbot.pipeline.metrics.best_mcc_threshold`):
    the likeliest letter is rarely a small fine-tuned model's best cut (the 0.5B after one sitting was
    precise and missed a third of the questions that need resolution; after two it over-called). The cut is
    judged out of sample (leave-one-out) and kept (``letter_threshold``) only when that beats the likeliest
    letter; ``letter`` then holds the leave-one-out figures, ``letter_argmax`` the plain ones."""
    from tqdm import tqdm

    from corefbot.models.train.evaluate import METRICS
    from corefbot.pipeline.metrics import Confusion, best_mcc_threshold, leave_one_out_cuts

    gold = [e.label == "needs" for e in examples]

    def figures(pred: Sequence[bool]) -> dict[str, float]:
        conf = Confusion.of(gold, pred)
        return {m: _finite(getattr(conf, m)) for m in METRICS}

    with open_backend(model, n_threads=n_threads, decide_by="letter") as backend:
        backend.needs_threshold = None  # measured from the raw letters, whatever the folder served before
        resolved = [backend.resolve(e.window, e.question, rewrite="never")
                    for e in tqdm(examples, desc="letters", unit="question", disable=not progress, leave=False)]
        backend.decide_by = "rewrite"  # type: ignore[assignment]  # read per question: one loaded model, both modes
        rewrite = figures([backend.resolve(e.window, e.question).decision == "needs"
                           for e in tqdm(examples, desc="rewrites", unit="question", disable=not progress,
                                         leave=False)])
    argmax = figures([r.decision == "needs" for r in resolved])
    scored = [(r.probs["needs"], g) for r, g in zip(resolved, gold)]
    out_of_sample = figures(leave_one_out_cuts(scored))
    threshold = best_mcc_threshold(scored) if out_of_sample["mcc"] > argmax["mcc"] else None
    letter = out_of_sample if threshold is not None else argmax
    better = "rewrite" if rewrite["mcc"] > letter["mcc"] else "letter"
    return {"decide_by": better, "route": route, "examples": len(examples),
            "needs": sum(gold), "chosen_by": "mcc", "letter": letter, "rewrite": rewrite,
            "letter_threshold": threshold, "letter_argmax": argmax}


def _finite(x: float) -> float:
    return 0.0 if math.isnan(x) else float(x)
