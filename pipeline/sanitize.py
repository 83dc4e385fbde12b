"""Text hygiene for what the bot captures, stores, forwards and logs.

Two rules, applied where text enters and where it leaves:

- **Encodable.** A chat app may hand over a lone UTF-16 surrogate (half of an emoji cut by a client, a
  nickname truncated mid-pair). Python keeps it in a ``str``, but SQLite, JSON encoders and sockets
  reject it with ``UnicodeEncodeError``; the whole message was lost. :func:`clean` replaces each lone
  surrogate by U+FFFD and leaves everything else as it is.
- **Bounded.** A 950 kB paste was copied into four tables, forwarded whole to a paid assistant and
  logged in full. :func:`bounded` keeps the head of an oversized text and says, in a marker, how much
  was cut, so a reader (a moderator, the assistant) knows the text is not complete.
"""
from __future__ import annotations

import dataclasses
import re
from typing import TypeVar

from corefbot.pipeline.records import Message

REPLACEMENT = "\ufffd"
_SURROGATE = re.compile("[\ud800-\udfff]")
M = TypeVar("M", bound=Message)


def clean(text: str) -> str:
    """``text`` with every lone surrogate replaced by U+FFFD (valid surrogate pairs cannot occur in a
    ``str`` decoded from UTF-8; a pair arriving as two escapes is joined first)."""
    if not _SURROGATE.search(text):
        return text  # the common case: no copy
    # "\ud83d\ude00" escapes decode to two code points; surrogatepass joins a valid pair back into one.
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def is_clean(text: str) -> bool:
    return _SURROGATE.search(text) is None


def clean_message(message: M) -> M:
    """The message with every text field encodable (the same object when nothing needed changing)."""
    changes: dict[str, object] = {}
    for name in ("platform", "group", "message_id", "sender", "text", "sender_name", "reply_to"):
        value = getattr(message, name)
        if isinstance(value, str) and not is_clean(value):
            changes[name] = clean(value)
    if any(not is_clean(m) for m in message.mentions):
        changes["mentions"] = tuple(clean(m) for m in message.mentions)
    return dataclasses.replace(message, **changes) if changes else message


def marker(cut: int) -> str:
    return f" […{cut:,} characters cut]"


def bounded(text: str, limit: int) -> str:
    """``text`` if it has at most ``limit`` characters, else its head and a marker naming the cut, the
    whole at most ``limit`` characters long. ``limit <= 0`` means no bound."""
    if limit <= 0 or len(text) <= limit:
        return text
    # The marker's length depends on the number it shows; one refinement is enough (the count only shrinks).
    keep = max(limit - len(marker(len(text))), 0)
    return text[:keep] + marker(len(text) - keep)


def bounded_middle(text: str, limit: int) -> str:
    """Like :func:`bounded` but keeps the head and the tail (log lines: a traceback's last line is the
    one that says what went wrong)."""
    if limit <= 0 or len(text) <= limit:
        return text
    keep = max(limit - len(marker(len(text))) - 1, 0)  # - 1: the space before the tail
    head, tail = keep - keep // 3, keep // 3
    if not tail:
        return bounded(text, limit)
    return text[:head] + marker(len(text) - head - tail) + " " + text[len(text) - tail:]


def is_bounded_copy(text: str) -> bool:
    """Whether ``text`` ends with the marker :func:`bounded` adds."""
    return re.search(r" \[…[\d,]+ characters cut\]$", text) is not None
