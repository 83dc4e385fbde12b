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
from corefbot.pipeline.repair import bounded_run, repair_orphans
from corefbot.pipeline.sanitize import bounded, clean_message
from corefbot.pipeline.store import Store, quick_check

log = logging.getLogger("corefbot.chatlog")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Update:
    """A message was stored: the run it belongs to now, and that run's context window."""

    message: Message
    merged: Merged
    window: list[Merged]  # previous merged messages of the group, oldest first
    new_run: bool


@dataclass(frozen=True, slots=True)
class RecorderHealth:
    """What the writer has done since start: ``/corefbot health`` shows it, the benchmark reads it."""

    stored: int  # new messages stored with their run
    duplicates: int  # deliveries of a message already stored
    dropped: int  # shed because the queue was full (each one logged as an ERROR)
    failed: int  # messages whose write failed (each one logged as an ERROR with the traceback)
    sanitized: int  # messages with a lone surrogate replaced
    truncated: int  # messages whose derived copies (run, decision, outbox) were bounded
    orphans_repaired: int  # messages found in no run at start and attached
    queued: int  # waiting for the writer now
    queue_size: int


class CorruptDatabase(RuntimeError):
    """The database file fails SQLite's integrity check: the bot must not half-run on it."""


Listener = Callable[[Update], Awaitable[None]]
_STOP = object()


class Recorder:
    BATCH = 256  # queued messages written in one transaction at most

    def __init__(self, db_path: str | Path, *, gap_s: float = 18.0, window: int = 12,
                 question_filter: QuestionFilter = QuestionFilter(), queue_size: int = 10_000,
                 max_text_chars: int = 0, check_integrity: bool = True) -> None:
        self.db_path = Path(db_path)
        self.window = window
        self.question_filter = question_filter
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._listeners: list[tuple[Listener, Callable[[Update], bool] | None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._gap_s = gap_s
        self.store: Store | None = None  # owned by the writer thread once started
        # The writer thread's concat state; only touch it in call(), e.g. to drop a forgotten member's open run.
        self.merger: Merger | None = None
        self.handler_ms: deque[float] = deque(maxlen=100_000)  # capture-side cost, for benchmarks
        self.max_text_chars = max_text_chars
        self.check_integrity = check_integrity
        self.dropped = 0
        self.stored = self.duplicates = self.failed = self.sanitized = self.truncated = self.orphans_repaired = 0

    def health(self) -> RecorderHealth:
        return RecorderHealth(
            stored=self.stored, duplicates=self.duplicates, dropped=self.dropped, failed=self.failed,
            sanitized=self.sanitized, truncated=self.truncated, orphans_repaired=self.orphans_repaired,
            queued=self._queue.qsize(), queue_size=self._queue.maxsize)

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

    def add_listener(self, listener: Listener, wants: Callable[[Update], bool] | None = None) -> None:
        """Call ``await listener(update)`` on the event loop for every stored message, or only for those
        ``wants(update)`` accepts (checked on the event loop, synchronously). A cheap ``wants`` spares the
        loop a task per chat line: during a burst that was a tenth of the bot's time."""
        self._listeners.append((listener, wants))

    def submit(self, message: Message) -> bool:
        """Queue a message for storage; False (and counted) if the writer is hopelessly behind."""
        try:
            self._queue.put_nowait(message)
            return True
        except queue.Full:
            self.dropped += 1
            log.error("capture queue full (%d waiting); message %s NOT recorded (%d shed so far; "
                      "COREFBOT_QUEUE_SIZE)", self._queue.maxsize, message.key, self.dropped)
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
    def _open(self) -> Store:
        if self.check_integrity and self.db_path.exists() and self.db_path.stat().st_size > 0:
            # A database with corrupt pages opens fine and then fails writes one by one: members see
            # silence. Refuse to start instead, saying which file and how to get the data back.
            if problems := quick_check(self.db_path):
                raise CorruptDatabase(
                    f"the corefbot database {self.db_path} is corrupt (PRAGMA quick_check: "
                    f"{'; '.join(problems[:3])}). The bot will not start on it. Recover: stop everything "
                    f"using it, then either restore your backup of {self.db_path.name}, or salvage what is "
                    f"readable with `sqlite3 {self.db_path} .recover | sqlite3 {self.db_path.with_suffix('.recovered.db')}` "
                    f"and point COREFBOT_DB at the recovered file (or move it into place).")
        store = Store(self.db_path)
        report = repair_orphans(store, gap_s=self._gap_s, question_filter=self.question_filter,
                                max_chars=self.max_text_chars)
        if report.orphans:
            self.orphans_repaired = report.orphans
            log.warning("attached %d stored message(s) that were in no merged run (rebuilt the runs of %d group(s))",
                        report.orphans, report.groups)
        return store

    def _run(self, ready: Future[None]) -> None:
        try:
            self.store = self._open()
        except CorruptDatabase as exc:
            ready.set_exception(exc)
            return
        except Exception as exc:  # noqa: BLE001 - reported to start() with the path
            ready.set_exception(RuntimeError(f"cannot open the corefbot database {self.db_path}: {exc}"))
            return
        merger = self.merger = Merger(self._gap_s, load_open=self.store.last_merged)
        ready.set_result(None)
        pending: Any = None
        while True:
            item, pending = (self._queue.get() if pending is None else pending), None
            if item is _STOP:
                break
            if isinstance(item, Message):
                # Whatever else is already queued goes into the same transaction (one commit for a burst,
                # not one per message); each message and its run still commit or roll back together.
                batch = [item]
                while len(batch) < self.BATCH:
                    try:
                        nxt = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if not isinstance(nxt, Message):
                        pending = nxt  # a call or the stop: after this batch, in order
                        break
                    batch.append(nxt)
                self._record_batch(batch, merger)
            else:
                fn, future = item
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(self.store))
                    except BaseException as exc:  # noqa: BLE001 - handed to the awaiting caller
                        future.set_exception(exc)
        self.store.close()

    def _record_batch(self, batch: list[Message], merger: Merger) -> None:
        store = self.store
        assert store is not None
        updates: list[Update] = []
        try:
            with store.transaction():
                for message in batch:
                    try:
                        if (update := self._record(message, merger)) is not None:
                            updates.append(update)
                    except Exception:  # noqa: BLE001 - one bad message must not stop capture
                        self.failed += 1
                        merger.forget(message.platform, message.group)  # its open run may hold the unwritten line
                        log.exception("failed to record message %s (%d write failures so far)", message.key,
                                      self.failed)
        except Exception:  # noqa: BLE001 - the commit itself failed (disk full, I/O error): say how many
            self.failed += len(batch)
            self.stored -= len(updates)
            for message in batch:
                merger.forget(message.platform, message.group)
            log.exception("failed to commit %d message(s) (%d write failures so far)", len(batch), self.failed)
            return
        if updates and self._listeners and self._loop is not None:
            self._loop.call_soon_threadsafe(_spawn_all, list(self._listeners), updates)

    def _record(self, message: Message, merger: Merger) -> Update | None:
        store = self.store
        assert store is not None
        if store.is_opted_out(message.platform, message.sender):
            return None  # members who opted out are not recorded at all
        clean = clean_message(message)
        if clean is not message:
            self.sanitized += 1
            log.warning("message %s had lone UTF-16 surrogates; replaced by U+FFFD", clean.key)
            message = clean
        # The raw message row keeps the text whole; the run (and what is derived from it: decisions,
        # outbox, the forwarded query) holds a bounded copy.
        line = message
        if self.max_text_chars > 0 and len(message.text) > self.max_text_chars:
            self.truncated += 1
            line = replace(message, text=bounded(message.text, self.max_text_chars))
        closed: list[Merged | None] = [None]

        def run_of(m: Message) -> Merged:
            run, closed[0] = merger.feed(line)
            # The merger grows its open run in place on this thread; the row and the listeners get a
            # snapshot, so a later line of the run cannot change the text they are reading.
            return score_run(bounded_run(replace(run, message_ids=list(run.message_ids)), self.max_text_chars),
                             self.question_filter)

        snapshot = store.record_message(message, run_of)
        if snapshot is None:
            self.duplicates += 1
            return None  # already stored (a duplicate delivery)
        self.stored += 1
        if not self._listeners or self._loop is None:
            return None
        return Update(message=line, merged=snapshot, window=store.window_before(snapshot, self.window),
                      new_run=closed[0] is not None or len(snapshot.message_ids) == 1)


def _spawn_all(listeners: list[tuple[Listener, Callable[[Update], bool] | None]], updates: list[Update]) -> None:
    for update in updates:
        for listener, wants in listeners:
            try:
                if wants is not None and not wants(update):
                    continue
            except Exception:  # noqa: BLE001 - a broken filter must not hide the update from the listener
                log.exception("listener filter failed")
            _spawn(listener, update)


def _spawn(listener: Listener, update: Update) -> None:
    task = asyncio.ensure_future(listener(update))
    task.add_done_callback(_log_failure)


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("listener failed", exc_info=task.exception())


