"""Shared state of the labels plugin: settings, the clock, database access on the chatlog writer, purging."""
from __future__ import annotations

import time
from typing import Awaitable, Callable, Iterable, TypeVar

from nonebot import get_plugin_config

from corefbot.pipeline.labels.forget import purge_messages
from corefbot.pipeline.labels.limits import ConfirmLimits
from corefbot.pipeline.store import Store
from corefbot.plugins.chatlog import get_recorder

from .config import Config

T = TypeVar("T")
config = get_plugin_config(Config)
limits: ConfirmLimits = config.limits()
#: The clock every limit, expiry and "today" reads; tests replace it to move time.
clock: Callable[[], float] = time.time


def now(event_time: float | None = None) -> float:
    """The time limits and expiry are judged at: the clock, or the message's time with COREFBOT_LABELS_CLOCK=event."""
    if event_time is not None and config.corefbot_labels_clock == "event":
        return event_time
    return clock()


def db(fn: Callable[[Store], T]) -> Awaitable[T]:
    """Run ``fn(store)`` on the chatlog's single writer thread (the event loop never waits on SQLite)."""
    return get_recorder().call(fn)


def forget_open_runs(groups: Iterable[tuple[str, str]]) -> None:
    """On the writer thread: make the live concat rule reload these groups' open runs from the database."""
    merger = get_recorder().merger
    if merger is not None:
        for platform, group in groups:
            merger.forget(platform, group)


async def purge(keys: Iterable[str]) -> None:
    """Drop label traffic from the chat log (queued after the messages' own writes, so they exist by then)."""
    keys = [k for k in keys if k]
    if keys:
        await db(lambda store: forget_open_runs(purge_messages(store, keys)))
