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


#: How sure the rewrite's lead on the test split must be before it is served (see :func:`measure_decide_modes`).
REWRITE_P = 0.05


def measure_decide_modes(model: str | Path, examples: Sequence[Example], *, route: str,
                         n_threads: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Both ways the served model can decide, on ``examples`` in the serving order: the letters, and its
    own rewrite. The record names the mode to serve; it is what a run folder's ``decide.json`` holds and
    what ``COREFBOT_DECIDE_BY=auto`` serves. The letters are served unless the rewrite decides better by
    Matthews *and* the difference is more than chance (:func:`~corefbot.pipeline.metrics.mcnemar_p` below
    :data:`REWRITE_P`): deciding by the rewrite generates a whole question before every decision (on 2
    cores the real 0.5B's decision p50 goes from 185 ms to 567 ms), and on a test split of ~200 questions
    two modes 0.02 apart differ on a handful of questions, which is no reason to triple every member's wait.

    The letters are also tried with a cut on p(needs) (:func:`~corefbot.pipeline.metrics.best_mcc_threshold`):
    the likeliest letter is rarely a small fine-tuned model's best cut (the 0.5B after one sitting was
    precise and missed a third of the questions that need resolution; after two it over-called). The cut is
    judged out of sample (leave-one-out) and kept (``letter_threshold``) only when that beats the likeliest
    letter; ``letter`` then holds the leave-one-out figures, ``letter_argmax`` the plain ones."""
    from tqdm import tqdm

    from corefbot.models.train.evaluate import METRICS
    from corefbot.pipeline.metrics import Confusion, best_mcc_threshold, leave_one_out_cuts, mcnemar_p

    gold = [e.label == "needs" for e in examples]

    def figures(pred: Sequence[bool]) -> dict[str, float]:
        conf = Confusion.of(gold, pred)
        return {m: _finite(getattr(conf, m)) for m in METRICS}

    with open_backend(model, n_threads=n_threads, decide_by="letter") as backend:
        backend.needs_threshold = None  # measured from the raw letters, whatever the folder served before
        resolved = [backend.resolve(e.window, e.question, rewrite="never")
                    for e in tqdm(examples, desc="letters", unit="question", disable=not progress, leave=False)]
        backend.decide_by = "rewrite"  # type: ignore[assignment]  # read per question: one loaded model, both modes
        by_rewrite = [backend.resolve(e.window, e.question).decision == "needs"
                      for e in tqdm(examples, desc="rewrites", unit="question", disable=not progress, leave=False)]
    by_argmax = [r.decision == "needs" for r in resolved]
    scored = [(r.probs["needs"], g) for r, g in zip(resolved, gold)]
    by_cut = leave_one_out_cuts(scored)
    argmax, out_of_sample, rewrite = figures(by_argmax), figures(by_cut), figures(by_rewrite)
    threshold = best_mcc_threshold(scored) if out_of_sample["mcc"] > argmax["mcc"] else None
    letter, by_letter = (out_of_sample, by_cut) if threshold is not None else (argmax, by_argmax)
    only_rewrite = sum(r == g != l for r, l, g in zip(by_rewrite, by_letter, gold))
    only_letter = sum(l == g != r for r, l, g in zip(by_rewrite, by_letter, gold))
    p = mcnemar_p(only_rewrite, only_letter)
    better = "rewrite" if rewrite["mcc"] > letter["mcc"] and p < REWRITE_P else "letter"
    return {"decide_by": better, "route": route, "examples": len(examples),
            "needs": sum(gold), "chosen_by": f"mcc, the rewrite only at McNemar p < {REWRITE_P}",
            "letter": letter, "rewrite": rewrite,
            "mcnemar": {"only_rewrite_right": only_rewrite, "only_letter_right": only_letter, "p": p},
            "letter_threshold": threshold, "letter_argmax": argmax}


def _finite(x: float) -> float:
    return 0.0 if math.isnan(x) else float(x)
