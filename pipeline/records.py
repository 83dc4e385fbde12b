"""The records that cross module lines: one raw chat message, one merged query, one window turn."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, TypedDict

#: A question's label: needs coreference resolution, does not, or is not a question at all.
Label = Literal["needs", "not_needed", "not_question"]
#: The model's three options (the paper's single-choice question).
Decision = Literal["needs", "not_needed", "unknown"]
LabelSource = Literal["moderator", "member", "import"]


@dataclass(frozen=True, slots=True)
class Message:
    """One raw group message as captured or imported. ``key`` is unique per deployment."""

    platform: str
    group: str
    message_id: str
    sender: str
    timestamp: float  # Unix seconds
    text: str
    sender_name: str = ""
    reply_to: str | None = None  # message_id of the quoted message, same group
    mentions: tuple[str, ...] = ()
    from_self: bool = False  # sent by the bot itself

    @property
    def key(self) -> str:
        return message_key(self.platform, self.group, self.message_id)


def message_key(platform: str, group: str, message_id: str) -> str:
    return f"{platform}:{group}:{message_id}"


@dataclass(slots=True)
class Merged:
    """A run of one member's consecutive messages merged by the concat rule.

    ``id`` is the key of the run's first message, so it is stable whether the run was built
    incrementally or in batch.
    """

    id: str
    platform: str
    group: str
    sender: str
    text: str
    timestamp: float  # first message
    end_timestamp: float  # last message
    message_ids: list[str] = field(default_factory=list)  # message keys, in order
    sender_name: str = ""
    reply_to: str | None = None
    mentions: tuple[str, ...] = ()
    from_self: bool = False
    question_score: float = 0.0
    is_question: bool = False


@dataclass(frozen=True, slots=True)
class Turn:
    """One item of a context window: the paper's ``{sender, text, timestamp}``."""

    sender: str
    text: str
    timestamp: float


class WindowItem(TypedDict):
    sender: str
    text: str
    timestamp: float


class Record(TypedDict):
    """The paper's record schema, one per merged question (``corefbot export records``)."""

    id: str
    sender: str
    text: str
    timestamp: float
    question_score: float
    is_question: bool
    cr_window: list[WindowItem]
    cr_need_gt: bool | None


class AlpacaRow(TypedDict):
    instruction: str
    input: str
    output: str


@dataclass(frozen=True, slots=True)
class Example:
    """One labelled question with its window: what training, evaluation and the gate learn from.

    ``conversation`` groups examples whose windows can overlap (a chat group, a dialogue), so a
    split never puts one conversation's messages on both sides.
    """

    id: str
    conversation: str
    window: tuple[Turn, ...]
    question: Turn
    label: Decision
    rewrite: str | None = None
    split: str | None = None  # the source's own split, when it has one ("train", "dev", "test")
    lang: str | None = None
