"""What a resolver backend is and what it returns: shared by every backend and the composition."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Protocol, Sequence

from corefbot.pipeline.records import Decision, Turn

BackendName = Literal["rules", "llama-cpp", "http"]
BACKENDS: tuple[BackendName, ...] = ("rules", "llama-cpp", "http")


@dataclass(frozen=True, slots=True)
class Resolution:
    """What a resolver made of one question."""

    decision: Decision
    probs: Mapping[Decision, float]  # per-option confidence, summing to 1
    rewrite: str | None = None  # the self-contained question, when the decision is "needs"
    backend: str = ""
    gated: bool = False  # True when the gate answered and no model ran
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

    def resolve(self, window: Sequence[Turn], question: Turn, *, group: str | None = None) -> Resolution: ...

    def observe(self, group: str, window: Sequence[Turn]) -> None:
        """A new message arrived in ``group``: a backend may prefill its state for the next question."""

    def close(self) -> None: ...
