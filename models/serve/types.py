"""What a resolver backend is and what it returns: shared by every backend and the composition."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Protocol, Sequence

from corefbot.pipeline.records import Decision, Turn

BackendName = Literal["rules", "llama-cpp", "http"]
BACKENDS: tuple[BackendName, ...] = ("rules", "llama-cpp", "http")

#: When a backend writes the rewrite. "auto": when it decides "needs"; "always": whatever it decides (the gate is sure
#: the question needs resolution, see ``Resolver``; and rewrite quality is evaluated against gold rewrites whatever the
#: decision); "never": the decision only.
RewriteMode = Literal["auto", "always", "never"]
#: How the llama-cpp backend decides. "letter": the option letters' logits (the paper's single choice; with a run
#: folder's measured ``letter_threshold``, "needs" from that probability on, see ``llama.ServedModel``). "rewrite":
#: the model rewrites every question after the "needs" letter and the question needs resolution exactly when its
#: rewrite adds a content word (or Chinese character) to it (:func:`~corefbot.models.serve.validate.adds_content`;
#: a rewrite that only drops a 「那」 or reorders was the most common false "needs" on zh topics). Measured on the
#: seed recipe's held-out sets, a fine-tuned 0.5B rewrites well long before its letters carry the decision
#: (models/EXPERIMENTS.md); the price is a rewrite's generation time on every question (a question the model
#: copies costs one batch, see ``llama.LlamaBackend._generate_line``). ``probs`` (and so the margin the labels
#: plugin asks and queues by) follow the mode: the letters', or in rewrite mode the probability that the model
#: copies the question as it is ("not_needed") and the rest ("needs").
DecideBy = Literal["letter", "rewrite"]
#: "auto": the mode a run folder's ``decide.json`` names (written by ``corefbot export-lora`` and the nightly job:
#: the letters unless the rewrite is clearly better); "letter" for a bare GGUF or a run folder without it.
DecideSetting = Literal["auto", "letter", "rewrite"]


@dataclass(frozen=True, slots=True)
class Resolution:
    """What a resolver made of one question."""

    decision: Decision
    probs: Mapping[Decision, float]  # per-option confidence, summing to 1
    rewrite: str | None = None  # the self-contained question, when the decision is "needs"
    backend: str = ""
    gated: bool = False  # True when the gate answered and no model ran
    gate_sure: bool = False  # True when the gate was sure it needs resolution and so decided, over the backend
    gate_swayed: bool = False  # True when the gate's probability, weighed with the letter's, turned the decision
    gate_p: float | None = None  # the gate's probability that the question needs resolution (None: no gate)
    rejected_rewrite: str | None = None  # a rewrite that failed validation (kept for the log)
    reject_reason: str | None = None
    latency_ms: float = 0.0

    @property
    def margin(self) -> float:
        """Top option's probability minus the runner-up's: small means the model is unsure."""
        top = sorted(self.probs.values(), reverse=True) + [0.0, 0.0]
        return top[0] - top[1]

    def query(self, question: str) -> str:
        """The text to forward: the accepted rewrite, or the question as asked."""
        return self.rewrite if self.decision == "needs" and self.rewrite else question


class Backend(Protocol):
    """A raw decision + rewrite source. ``resolve`` blocks; callers run it off the event loop."""

    name: str

    def resolve(self, window: Sequence[Turn], question: Turn, *, group: str | None = None,
                rewrite: RewriteMode = "auto") -> Resolution: ...

    def observe(self, group: str, window: Sequence[Turn]) -> None:
        """A new message arrived in ``group``: a backend may prefill its state for the next question."""

    def close(self) -> None: ...
