"""One resolver thread with priorities: questions put to the bot first, background work after.

The model computes one thing at a time, so every resolution queues behind the ones before it. In a busy
group with ``COREFBOT_RESOLVE_ALL`` (questions resolved for the labels even when nobody asked the bot),
a FIFO would make an @-mention wait for every unaddressed question ahead of it; here it jumps the queue.
"""
from __future__ import annotations

import heapq
import itertools
import threading
from concurrent.futures import Future
from typing import Callable, TypeVar

T = TypeVar("T")

ADDRESSED, BACKGROUND = 0, 1  # priorities: lower runs first; FIFO within one priority


class PriorityWorker:
    def __init__(self, name: str = "corefbot-resolve") -> None:
        self._heap: list[tuple[int, int, Callable[[], object], Future]] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, priority: int, fn: Callable[[], T]) -> "Future[T]":
        future: Future[T] = Future()
        with self._cv:
            if self._closing:
                raise RuntimeError("the resolver worker is shut down")
            heapq.heappush(self._heap, (priority, next(self._seq), fn, future))
            self._cv.notify()
        return future

    def pending(self, priority: int | None = None) -> int:
        """Jobs waiting (not running) at ``priority``, or at any priority."""
        with self._cv:
            return sum(1 for p, *_ in self._heap if priority is None or p == priority)

    def shutdown(self, wait: bool = True) -> None:
        """Finish the running job, cancel the waiting ones."""
        with self._cv:
            self._closing = True
            waiting, self._heap = self._heap, []
            self._cv.notify_all()
        for *_, future in waiting:
            future.cancel()
        if wait:
            self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._heap and not self._closing:
                    self._cv.wait()
                if not self._heap:
                    return
                _, _, fn, future = heapq.heappop(self._heap)
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting caller
                future.set_exception(exc)
