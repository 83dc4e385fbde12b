"""Context windows: the previous merged messages of the same group, the question excluded."""
from __future__ import annotations

from collections import deque
from typing import Iterable, Iterator

from corefbot.pipeline.records import Merged, Turn

DEFAULT_WINDOW = 12  # the paper's rule (its reference code used 11)


def turn(merged: Merged) -> Turn:
    return Turn(sender=merged.sender, text=merged.text, timestamp=merged.timestamp)


def with_windows(merged: Iterable[Merged], size: int = DEFAULT_WINDOW) -> Iterator[tuple[Merged, list[Merged]]]:
    """Pair each merged message (sorted by group and time) with the ``size`` before it in its group."""
    group: tuple[str, str] | None = None
    previous: deque[Merged] = deque(maxlen=size)
    for item in merged:
        if (item.platform, item.group) != group:
            group = (item.platform, item.group)
            previous.clear()
        yield item, list(previous)
        previous.append(item)
