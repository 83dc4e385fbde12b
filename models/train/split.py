"""Deterministic train / validation / test split by conversation.

A conversation's side is decided by a hash of its id (and a seed) against the split fractions, not by
its position in the data set: when new labels arrive, no conversation ever moves from test to train,
so a model trained yesterday is still evaluated tonight on examples it never saw. Examples of one
conversation (overlapping windows of one dialogue or chat segment) always land on the same side.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Iterable, Literal, Sequence

from corefbot.pipeline.records import Example

Side = Literal["train", "validation", "test"]
SIDES: tuple[Side, ...] = ("train", "validation", "test")
#: What is kept whole on one side. "conversation": ``Example.conversation`` (a dialogue, or a whole chat
#: group). "day": a conversation's questions of one UTC day — for deployments with one or two chat
#: groups, where "conversation" would put everything on one side; windows overlap across the day
#: boundary only. "auto": "conversation" when there are at least ``AUTO_MIN_CONVERSATIONS``, else "day".
Unit = Literal["conversation", "day", "auto"]
AUTO_MIN_CONVERSATIONS = 10


def unit_of(example: Example, unit: Unit) -> str:
    if unit == "day":
        return f"{example.conversation}@{int(example.question.timestamp // 86_400)}"
    return example.conversation


class LeakError(AssertionError):
    """A conversation (or an example) sits on more than one side of a split."""


@dataclass(frozen=True, slots=True)
class Split:
    train: tuple[Example, ...]
    validation: tuple[Example, ...]
    test: tuple[Example, ...]
    seed: int
    fractions: tuple[float, float, float]
    unit: Unit = "conversation"  # resolved ("conversation" or "day"), never "auto"

    def side(self, name: Side) -> tuple[Example, ...]:
        return getattr(self, name)

    def manifest(self) -> dict:
        """Counts, label balance and a hash of each side's ids: enough to tell two splits apart."""
        out: dict = {"seed": self.seed, "fractions": list(self.fractions), "unit": self.unit}
        for name in SIDES:
            exs = self.side(name)
            ids = sorted(e.id for e in exs)
            out[name] = {
                "examples": len(exs),
                "conversations": len({e.conversation for e in exs}),
                "units": len({unit_of(e, self.unit) for e in exs}),
                "needs": sum(e.label == "needs" for e in exs),
                "ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
            }
        return out

    def ids(self) -> dict[str, list[str]]:
        return {name: [e.id for e in self.side(name)] for name in SIDES}


def conversation_side(conversation: str, seed: int = 0,
                      fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> Side:
    """The side one conversation belongs to: a stable function of its id and the seed."""
    digest = hashlib.sha256(f"{seed}\x00{conversation}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    train, validation, _ = fractions
    if u < train:
        return "train"
    if u < train + validation:
        return "validation"
    return "test"


def split_examples(examples: Iterable[Example], seed: int = 0,
                   fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), unit: Unit = "auto") -> Split:
    """Split by conversation (or conversation-day, see :data:`Unit`); order within a side follows the input."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    if unit not in ("conversation", "day", "auto"):
        raise ValueError(f"unknown split unit {unit!r}; choose conversation, day or auto")
    examples = list(examples)
    if unit == "auto":
        unit = "conversation" if len({e.conversation for e in examples}) >= AUTO_MIN_CONVERSATIONS else "day"
    sides: dict[Side, list[Example]] = {s: [] for s in SIDES}
    for e in examples:
        sides[conversation_side(unit_of(e, unit), seed, fractions)].append(e)
    split = Split(tuple(sides["train"]), tuple(sides["validation"]), tuple(sides["test"]), seed,
                  tuple(fractions), unit)  # type: ignore[arg-type]
    assert_no_leak(split)
    return split


def assert_no_leak(split: Split, trained_on: Sequence[Example] | None = None) -> None:
    """Raise :class:`LeakError` when a split unit (conversation or conversation-day) or an example id
    is on two sides, or when ``trained_on`` (what a model actually saw) contains anything from
    validation or test."""
    seen: dict[str, str] = {}
    for name in SIDES:
        for e in split.side(name):
            for key in (f"{split.unit} {unit_of(e, split.unit)!r}", f"example {e.id!r}"):
                other = seen.setdefault(key, name)
                if other != name:
                    raise LeakError(f"{key} is in both {other} and {name}")
    if trained_on is not None:
        held = split.validation + split.test
        held_units = {unit_of(e, split.unit) for e in held}
        held_ids = {e.id for e in held}
        for e in trained_on:
            if unit_of(e, split.unit) in held_units or e.id in held_ids:
                raise LeakError(f"example {e.id!r} ({split.unit} {unit_of(e, split.unit)!r}) is held out but was trained on")


def dump_ids(split: Split) -> str:
    return json.dumps(split.ids(), ensure_ascii=False)
