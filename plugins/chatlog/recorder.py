"""The one writer: a thread that owns the bot's SQLite connection.

Capture handlers hand messages over with :meth:`Recorder.submit` (a queue put, microseconds) and
return; the writer thread stores each message, applies the concat rule and the question filter, and
tells listeners (the resolver, the labels plugin) about the updated run on the event loop. Other
plugins run their database work on the same thread with :meth:`Recorder.call`, so there is one
writer and the event loop never waits on SQLite.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Awaitable, Callable, TypeVar

from corefbot.pipeline.build import score_run
from corefbot.pipeline.merge import Merger
from corefbot.pipeline.question import QuestionFilter
from corefbot.pipeline.records import Merged, Message
from corefbot.pipeline.store import Store

log = logging.getLogger("corefbot.chatlog")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Update:
    """A message was stored: the run it belongs to now, and that run's context window."""

    message: Message
    merged: Merged
    window: list[Merged]  # previous merged messages of the group, oldest first
    new_run: bool


Listener = Callable[[Update], Awaitable[None]]
_STOP = object()


class Recorder:
    def __init__(self, db_path: str | Path, *, gap_s: float = 18.0, window: int = 12,
                 question_filter: QuestionFilter = QuestionFilter(), queue_size: int = 10_000) -> None:
        self.db_path = Path(db_path)
        self.window = window
        self.question_filter = question_filter
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._listeners: list[Listener] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._gap_s = gap_s
        self.store: Store | None = None  # owned by the writer thread once started
        # The writer thread's concat state; only touch it in call(), e.g. to drop a forgotten member's open run.
        self.merger: Merger | None = None
        self.handler_ms: deque[float] = deque(maxlen=100_000)  # capture-side cost, for benchmarks
        self.dropped = 0

    # ---- lifecycle (event loop side) ----
    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        ready: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="corefbot-writer", daemon=True)
        self._thread.start()
        ready.result()  # surfaces a database that cannot be opened, with its path

    def stop(self, timeout: float = 30.0) -> None:
        """Write everything queued, then close the database."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join(timeout)
        self._thread = None

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def submit(self, message: Message) -> bool:
        """Queue a message for storage; False (and counted) if the writer is hopelessly behind."""
        try:
            self._queue.put_nowait(message)
            return True
        except queue.Full:
            self.dropped += 1
            log.error("capture queue full (%d); message %s not recorded", self._queue.maxsize, message.key)
            return False

    def call(self, fn: Callable[[Store], T]) -> "asyncio.Future[T]":
        """Run ``fn(store)`` on the writer thread; await the result from the event loop."""
        future: Future[T] = Future()
        self._queue.put((fn, future))
        return asyncio.wrap_future(future)

    async def flush(self) -> None:
        """Wait until everything submitted so far is written."""
        await self.call(lambda store: None)

    # ---- writer thread ----
    def _run(self, ready: Future[None]) -> None:
        try:
            self.store = Store(self.db_path)
        except Exception as exc:  # noqa: BLE001 - reported to start() with the path
            ready.set_exception(RuntimeError(f"cannot open the corefbot database {self.db_path}: {exc}"))
            return
        merger = self.merger = Merger(self._gap_s, load_open=self.store.last_merged)
        ready.set_result(None)
        while True:
            item = self._queue.get()
            if item is _STOP:
                break
            if isinstance(item, Message):
                try:
                    self._record(item, merger)
                except Exception:  # noqa: BLE001 - one bad message must not stop capture
                    log.exception("failed to record message %s", item.key)
            else:
                fn, future = item
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(self.store))
                    except BaseException as exc:  # noqa: BLE001 - handed to the awaiting caller
                        future.set_exception(exc)
        self.store.close()

    def _record(self, message: Message, merger: Merger) -> None:
        store = self.store
        assert store is not None
        if store.is_opted_out(message.platform, message.sender):
            return  # members who opted out are not recorded at all
        if store.insert_messages([message]) == 0:
            return  # already stored (a duplicate delivery)
        run, closed = merger.feed(message)
        run = score_run(run, self.question_filter)
        store.upsert_merged([run])
        if not self._listeners or self._loop is None:
            return
        # The merger grows its open run in place on this thread; listeners on the event loop get a
        # snapshot, so a later line of the run cannot change the text they are reading.
        snapshot = replace(run, message_ids=list(run.message_ids))
        update = Update(message=message, merged=snapshot, window=store.window_before(run, self.window),
                        new_run=closed is not None or len(run.message_ids) == 1)
        for listener in self._listeners:
            self._loop.call_soon_threadsafe(_spawn, listener, update)


def _spawn(listener: Listener, update: Update) -> None:
    task = asyncio.ensure_future(listener(update))
    task.add_done_callback(_log_failure)


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("listener failed", exc_info=task.exception())


