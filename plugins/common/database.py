"""The plugins' one database handle: work runs on the chatlog's single writer thread, never on the event loop."""
from __future__ import annotations

from typing import Awaitable, Callable, Iterable, TypeVar

from corefbot.pipeline.labels.forget import purge_messages
from corefbot.pipeline.store import Store
from corefbot.plugins.chatlog import get_recorder

T = TypeVar("T")


def db(fn: Callable[[Store], T]) -> Awaitable[T]:
    """Run ``fn(store)`` on the chatlog's single writer thread and await its result."""
    return get_recorder().call(fn)


def forget_open_runs(groups: Iterable[tuple[str, str]]) -> None:
    """On the writer thread: make the live concat rule reload these groups' open runs from the database."""
    merger = get_recorder().merger
    if merger is not None:
        for platform, group in groups:
            merger.forget(platform, group)


async def purge(keys: Iterable[str]) -> None:
    """Drop messages from the chat log (queued after their own writes, so they exist by then)."""
    keys = [k for k in keys if k]
    if keys:
        await db(lambda store: forget_open_runs(purge_messages(store, keys)))
