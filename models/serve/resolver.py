"""The resolver interface: decide whether a question needs coreference resolution, and rewrite it.

Backends (``rules``, ``llama-cpp``, ``http``) implement :class:`Backend`: raw decisions and rewrites.
:class:`Resolver` composes what every deployment wants in front of and behind a backend: the cheap
gate that lets plainly self-contained questions skip the model, and the rewrite validation that keeps
hallucinated or injected text from being forwarded. The bot, ``corefbot eval`` and the benchmarks all
go through :func:`load_resolver`, so they measure what is served.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from corefbot.models.serve.types import BACKENDS, Backend, BackendName, Resolution
from corefbot.pipeline.records import Turn

if TYPE_CHECKING:
    from corefbot.models.serve.types import DecideSetting

log = logging.getLogger(__name__)


def _log_odds(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)  # a backend without probabilities gives 0/1: its word then stands
    return math.log(p / (1 - p))


def _letter_cut(backend: Backend) -> float | None:
    """The log-odds of "needs" from which ``backend``'s letter decides "needs" (0: the likelier side; a measured
    threshold moves it), or None where its decision is not the letter's (the rewrite decides)."""
    if getattr(backend, "decide_by", "letter") != "letter":
        return None
    threshold = getattr(backend, "needs_threshold", None)
    return 0.0 if threshold is None else _log_odds(threshold)


@dataclass
class Resolver:
    """Gate → backend → rewrite validation. Thread-compatible as far as the backend is.

    Between the gate's two sure sides the model's letter decides, with the gate's probability weighed in
    (``weigh_gate``): "needs" where the two log-odds add up to the letter's own cut, as two independent
    detectors with even priors would. The gate reads the question's surface (「那 Windows 呢？」 is an
    ellipsis whatever the topic) and the model its window, and the two err on different questions
    (measured: models/EXPERIMENTS.md). Where the sum turns the letter, the decision is the sum's; a
    question turned to "needs" gets its rewrite from a second call with the same prompt (cached)."""

    backend: Backend
    gate: "object | None" = None  # corefbot.models.serve.gate.Gate; typed loosely to keep the import lazy
    validate: bool = True
    weigh_gate: bool = True
    fallback_reason: str | None = field(default=None)  # set when a configured model could not load

    @property
    def name(self) -> str:
        return self.backend.name

    def resolve(self, window: Sequence[Turn], question: Turn, *, group: str | None = None) -> Resolution:
        start = time.perf_counter()
        side, p_gate = self.gate.assess(window, question) if self.gate is not None else ("model", None)  # type: ignore[attr-defined]
        if side == "skip":
            res = Resolution("not_needed", {"needs": 0.0, "not_needed": 1.0, "unknown": 0.0},
                             backend=self.backend.name, gated=True)
        else:
            # Where the gate is sure the question needs resolution it decides so, and the backend writes the rewrite
            # whatever its own letter says; between its two sure sides the model decides, the gate weighed in.
            sure = side == "sure"
            res = self.backend.resolve(window, question, group=group, rewrite="always" if sure else "auto")
            if sure and res.decision != "needs":
                res = replace(res, decision="needs", gate_sure=True)
            elif not sure and p_gate is not None and self.weigh_gate:
                res = self._weigh(res, p_gate, window, question, group)
            if self.validate and res.decision == "needs" and res.rewrite:
                from corefbot.models.serve.validate import validate_rewrite

                ok, reason = validate_rewrite(question.text, res.rewrite, [t.text for t in window])
                if not ok:
                    log.warning("rewrite rejected (%s): %r -> %r", reason, question.text, res.rewrite)
                    res = replace(res, rewrite=None, rejected_rewrite=res.rewrite, reject_reason=reason)
        return replace(res, gate_p=p_gate, latency_ms=(time.perf_counter() - start) * 1000)

    def _weigh(self, res: Resolution, p_gate: float, window: Sequence[Turn], question: Turn,
               group: str | None) -> Resolution:
        """The backend's answer with the gate's probability added to its letter's (see the class)."""
        cut = _letter_cut(self.backend)
        if cut is None:
            return res
        needs = _log_odds(res.probs.get("needs", 0.0)) + _log_odds(p_gate) >= cut
        if needs == (res.decision == "needs"):
            return res
        if needs:
            res = self.backend.resolve(window, question, group=group, rewrite="always")
            return replace(res, decision="needs", gate_swayed=True)
        rest = {d: p for d, p in res.probs.items() if d != "needs"}
        return replace(res, decision=max(rest, key=rest.__getitem__), rewrite=None, gate_swayed=True)

    def observe(self, group: str, window: Sequence[Turn]) -> None:
        self.backend.observe(group, window)

    def close(self) -> None:
        self.backend.close()


SERVING_TIMEOUT_S = 30.0  # a member is waiting: a later answer is worse than none


def load_backend(name: BackendName, *, model_path: str | None = None, url: str | None = None,
                 http_model: str = "default", api_key: str | None = None, n_threads: int | None = None,
                 gate_path: str | Path | None = None, timeout_s: float | None = SERVING_TIMEOUT_S,
                 decide_by: "DecideSetting" = "auto") -> Backend:
    """Build one backend; raises ``ValueError``/``FileNotFoundError`` naming what is wrong.
    ``gate_path``: a retrained gate (the rules backend decides with its classifier). ``model_path``: a
    GGUF or a finetune run folder. ``timeout_s``: how long a model call may take; ``None`` waits (an
    evaluation measures answers, and a loaded machine must not turn slow ones into failures)."""
    if name == "rules":
        return _rules(gate_path)
    if name == "llama-cpp":
        if not model_path:
            raise ValueError("the llama-cpp backend needs a GGUF model path or a run folder (COREFBOT_MODEL_PATH or --model)")
        from corefbot.models.serve.llama import LlamaBackend

        return LlamaBackend(model_path, n_threads=n_threads, timeout_s=timeout_s, decide_by=decide_by)
    if name == "http":
        if not url:
            raise ValueError("the http backend needs an OpenAI-compatible base URL (COREFBOT_RESOLVER_URL or --url)")
        from corefbot.models.serve.http import HttpBackend

        return HttpBackend(url, model=http_model, api_key=api_key, timeout_s=timeout_s)
    raise ValueError(f"unknown resolver backend {name!r}; choose one of {', '.join(BACKENDS)}")


def _rules(gate_path: str | Path | None) -> Backend:
    from corefbot.models.serve.gate import Gate
    from corefbot.models.serve.rules import RulesBackend

    return RulesBackend(gate=Gate.load(gate_path))


def load_resolver(name: BackendName, *, gate: bool = True, fallback: bool = False,
                  gate_path: str | Path | None = None, weigh_gate: bool = True, **kwargs) -> Resolver:
    """The served composition. With ``fallback``, a backend that fails to load (missing or corrupt
    model, bad URL) is logged and replaced by ``rules`` so the bot keeps running. ``weigh_gate``: see
    :class:`Resolver`."""
    try:
        backend = load_backend(name, gate_path=gate_path, **kwargs)
        reason = None
    except Exception as exc:  # noqa: BLE001 - any load failure falls back, with the reason kept
        if not fallback or name == "rules":
            raise
        log.error("resolver backend %s failed to load (%s); falling back to rules", name, exc)
        backend, reason = _rules(gate_path), f"{name}: {exc}"
    gate_obj = None
    if gate and backend.name != "rules":
        from corefbot.models.serve.gate import Gate

        gate_obj = Gate.load(gate_path)
    return Resolver(backend=backend, gate=gate_obj, weigh_gate=weigh_gate, fallback_reason=reason)
