"""The resolver service: question → decision → outbox → assistant → reply, off the event loop.

One :class:`ResolverService` runs per bot process (``get_service()``). It listens to the chatlog
recorder's updates; for a merged run that the question filter passes it:

1. decides whether the bot answers it (``COREFBOT_REPLY_MODE``: ``mention`` — the bot is @-mentioned or
   the run quotes a bot message; ``all`` — every question);
2. resolves it on a dedicated thread (one resolution at a time; the llama-cpp backend has its own
   bounded queue behind that) and records the decision in ``decisions``;
3. tells resolution listeners (the labels plugin) about it;
4. queues the resolved query in the durable outbox (per-group rate limit); a worker task asks the
   assistant, retries with backoff, and posts the answer as a reply (quote + @asker).

**Runs that grow.** A run's id is its first message's key, so a later line of the same run (same
sender, ≤ 18 s) updates the same question. A run is queued for the assistant at most once: the first
update that is both a question and addressed to the bot queues it (with the text so far); later lines
are recorded but not forwarded again. A run resolved without being addressed (``mention`` mode) is not
resolved again on later lines unless one of them addresses the bot, in which case it is resolved anew
with the whole text and forwarded. Lines that arrive while their run is being decided are looked at
once the decision is recorded (only the latest of them: it carries the whole run).

**Failures.** A backend error or timeout forwards the question as asked (decision ``unknown``, the
error kept in ``decisions.reject_reason``). No assistant configured: questions are still resolved and
recorded, nothing is forwarded (logged once at start).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Literal, TypeVar

from corefbot.pipeline.records import Merged, Turn, message_key
from corefbot.pipeline.sanitize import bounded
from corefbot.pipeline.window import turn
from corefbot.plugins.common.settings import UNAVAILABLE_REPLY

from . import notice, outbox
from .forward import AssistantClient, AssistantError
from .worker import ADDRESSED, BACKGROUND, PriorityWorker

if TYPE_CHECKING:
    from corefbot.models.serve.resolver import Resolver
    from corefbot.models.serve.types import Resolution
    from corefbot.pipeline.store import Store
    from corefbot.plugins.chatlog import Update

log = logging.getLogger("corefbot.resolver")
T = TypeVar("T")

ReplyMode = Literal["mention", "all"]
#: Called with every resolution the service makes (addressed to the bot or not).
ResolutionListener = Callable[["Update", "Resolution"], Awaitable[None]]
#: Runs ``fn(store)`` on the database's single writer and returns the result (``Recorder.call``).
DbCall = Callable[[Callable[["Store"], Any]], Awaitable[Any]]
#: Posts an answered outbox item into its group; returns the reply's message id.
PostReply = Callable[[outbox.OutboxItem, str], Awaitable[str | None]]


class BotUnavailable(Exception):
    """No connected bot can post into the item's group yet; the reply waits (nothing was sent)."""


@dataclass
class RateLimiter:
    """At most ``limit`` forwards per group in any ``period_s`` (0 disables).

    A question over the limit is not dropped at once: it takes the group's next free slot when that is at
    most one period away (a burst is smoothed, the asker still gets an answer); beyond that it is dropped,
    so a flood cannot build an hour of backlog for the assistant."""

    limit: int
    period_s: float
    _slots: dict[tuple[str, str], deque[float]] = field(default_factory=lambda: defaultdict(deque))

    def reserve(self, key: tuple[str, str], now: float | None = None) -> float | None:
        """Seconds until this group's next forward may go (0: now), reserving that slot; None: dropped."""
        if self.limit <= 0:
            return 0.0
        now = time.monotonic() if now is None else now
        slots = self._slots[key]
        while slots and now - slots[0] >= self.period_s:
            slots.popleft()
        at = now if len(slots) < self.limit else slots[-self.limit] + self.period_s
        if at - now > self.period_s:
            return None
        slots.append(at)
        return at - now


@dataclass
class ServiceOptions:
    reply_mode: ReplyMode = "mention"
    resolve_all: bool = True
    window: int = 12
    history: int = 12
    show_query: bool = True
    max_answer_chars: int = 3000
    concurrency: int = 4
    max_background: int = 16  # unaddressed questions waiting for the model beyond this are not resolved
    rate: RateLimiter = field(default_factory=lambda: RateLimiter(5, 60.0))
    retry: outbox.RetryPolicy = field(default_factory=outbox.RetryPolicy)
    keep_finished_s: float = 30 * 86400.0  # delivered/failed/expired outbox rows are deleted after this; 0 keeps them
    # The question filter's second stage: rule scores in question_band are re-scored by a model
    # ("local": the resolver's llama.cpp model; "http": an OpenAI-compatible endpoint).
    question_llm: Literal["off", "local", "http"] = "off"
    question_band: tuple[float, float] = (3.0, 5.0)
    question_threshold: float = 5.0
    question_llm_url: str | None = None
    question_llm_model: str = "default"
    question_llm_key: str | None = None
    max_query_chars: int = 4000  # a longer forwarded query (and each history text) is cut, with a marker; 0: no bound
    # Told once to the asker when the outbox gives up on their question; "" tells nothing.
    unavailable_reply: str = UNAVAILABLE_REPLY


class ResolverService:
    def __init__(self, resolver: "Resolver | None", db: DbCall, *, assistant: AssistantClient | None,
                 post_reply: PostReply, bot_ids: Callable[[], set[str]],
                 options: ServiceOptions | None = None, model_loader: Callable[[str], "Resolver"] | None = None) -> None:
        self._resolver = resolver
        self._db = db
        self.assistant = assistant
        self._post_reply = post_reply
        self._bot_ids = bot_ids
        self.options = options or ServiceOptions()
        self._model_loader = model_loader
        self._listeners: list[ResolutionListener] = []
        self._worker_thread = PriorityWorker()
        self._in_use: dict[int, int] = defaultdict(int)  # id(resolver) -> resolutions running on it
        self._released = asyncio.Condition()
        self._swap_lock = asyncio.Lock()
        self._handling: set[str] = set()  # merged ids being decided right now
        self._recheck: dict[str, "Update"] = {}  # newer lines of a run that arrived while it was being decided
        self._tasks: set[asyncio.Task] = set()
        self._inflight: set[int] = set()  # outbox ids being worked on
        self._wake = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self._sem = asyncio.Semaphore(max(1, self.options.concurrency))
        self._closing = False
        self.forward_latency_ms: deque[float] = deque(maxlen=10_000)  # question stored → assistant request sent
        self._second: tuple[int, Any] | None = None  # (id of the backend it runs on, models.question_llm.SecondStage)

    # ---- hooks for other plugins ---------------------------------------------------------------

    def add_resolution_listener(self, listener: ResolutionListener) -> None:
        """Call ``await listener(update, resolution)`` after each question is resolved and recorded.

        ``update`` is the chatlog :class:`~corefbot.plugins.chatlog.Update` (``update.merged`` is the question's
        run, ``update.window`` its context); ``resolution`` is the :class:`corefbot.models.serve.resolver.Resolution`
        (``decision``, ``probs``, ``margin``, ``rewrite``; ``resolution.query(update.merged.text)`` is
        what was or would be forwarded). The row is already in ``decisions`` when the listener runs.
        Listeners run on the event loop, after the question was queued for the assistant, so a slow
        listener never delays an answer; an exception is logged and does not affect other listeners.
        Called for every question resolved — also those the bot does not answer (``mention`` mode) —
        and possibly twice for one run when a later line addresses the bot (see the module docstring).
        """
        self._listeners.append(listener)

    @property
    def resolver(self) -> "Resolver":
        if self._resolver is None:
            raise RuntimeError("the resolver service has no model yet (it is loaded when the driver starts)")
        return self._resolver

    async def swap_model(self, gguf_path: str | Path) -> None:
        """Serve ``gguf_path`` from now on, without dropping a request.

        The new llama-cpp backend is loaded off the event loop while the old one keeps serving;
        then the reference is swapped between two resolutions (requests already running finish on the
        old model, every later one uses the new), and the old backend is closed once no resolution
        uses it any more. On any load failure the old model keeps serving and the error is raised.
        """
        loader = self._model_loader or _load_llama
        async with self._swap_lock:
            new = await asyncio.to_thread(loader, str(gguf_path))
            old, self._resolver = self.resolver, new
            log.info("resolver model swapped: %s -> %s", _describe(old), _describe(new))
            async with self._released:
                await self._released.wait_for(lambda: self._in_use.get(id(old), 0) == 0)
            self._in_use.pop(id(old), None)
            await asyncio.to_thread(old.close)

    # ---- lifecycle -------------------------------------------------------------------------------

    async def start(self, resolver: "Resolver | None" = None) -> None:
        """Begin serving (with ``resolver``, when the service was made before the model was loaded)."""
        if resolver is not None:
            self._resolver = resolver
        if self._resolver is None:
            raise RuntimeError("ResolverService.start needs a resolver")
        interrupted = await self._db(outbox.recover)
        if interrupted:
            log.warning("%d outbox item(s) were interrupted while posting their reply; marked failed, not re-sent",
                        interrupted)
        if self.assistant is None:
            log.warning("COREFBOT_ASSISTANT_URL is not set: questions are resolved and recorded, nothing is forwarded")
        self._worker = asyncio.create_task(self._run_outbox(), name="corefbot-outbox")
        if self.options.question_llm != "off":  # build (and warm) the second stage before the first borderline line
            resolver = self._resolver
            self._worker_thread.submit(BACKGROUND, lambda: self._stage_for(resolver))

    async def stop(self) -> None:
        self._closing = True
        self._wake.set()
        for task in list(self._tasks):
            task.cancel()
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, *self._tasks, return_exceptions=True)
        if self.assistant is not None:
            await self.assistant.close()
        await asyncio.to_thread(self._worker_thread.shutdown, True)
        if self._resolver is not None:
            await asyncio.to_thread(self._resolver.close)

    async def wait_idle(self, timeout: float = 30.0) -> None:
        """Wait until no question is being decided and nothing in the outbox is due or in flight
        (tests, the demo); items waiting for a later retry do not count."""
        deadline = time.monotonic() + timeout
        while True:
            items, _ = await self._db(outbox.due)
            if not self._tasks and not self._inflight and not items:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"resolver service still busy after {timeout:g} s "
                                   f"({len(self._tasks)} tasks, {len(self._inflight)} in flight, {len(items)} due)")
            self._wake.set()
            await asyncio.sleep(0.02)

    # ---- questions -------------------------------------------------------------------------------

    def wants_update(self, update: "Update") -> bool:
        """Cheap pre-check for the recorder: whether :meth:`on_update` would do anything with ``update``
        (a question, a line that may be put to the bot or is in the second stage's band, a run being decided,
        or a backend that prefills per group; rules does not)."""
        resolver, merged = self._resolver, update.merged
        return (merged.is_question or merged.id in self._handling or resolver is None or resolver.name != "rules"
                or self._may_ask(merged))

    async def on_update(self, update: "Update") -> None:
        """The chatlog listener: every stored message lands here (on the event loop)."""
        if self._closing:
            return
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self._handle(update)
        finally:
            if task is not None:
                self._tasks.discard(task)

    async def _handle(self, update: "Update") -> None:
        merged = update.merged
        window = [turn(m) for m in update.window]
        group_key = f"{merged.platform}:{merged.group}"
        if merged.id in self._handling:
            self._recheck[merged.id] = update  # looked at again once the current look is over
            return
        if merged.from_self or not (merged.is_question or self._may_ask(merged)):
            # Keep the backend's per-group state warm for the group's next question.
            self._observe(group_key, [*window, turn(merged)])
            return
        self._handling.add(merged.id)  # claimed before the first await: one look at a run at a time
        try:
            await self._look(update, window, group_key)
        finally:
            self._handling.discard(merged.id)
        self._observe(group_key, [*window, turn(merged)])
        if (later := self._recheck.pop(merged.id, None)) is not None:
            await self._handle(later)  # e.g. a line that @-mentions the bot arrived meanwhile

    async def _look(self, update: "Update", window: list[Turn], group_key: str) -> None:
        merged = update.merged
        bots = self._bot_ids()
        reply_key = message_key(merged.platform, merged.group, merged.reply_to) if merged.reply_to else None

        def state(store: "Store") -> tuple[bool, bool, bool]:
            queued = outbox.is_queued(store, merged.id)
            decided = store.db.conn.execute("SELECT 1 FROM decisions WHERE merged_id = ?",
                                            (merged.id,)).fetchone() is not None
            to_bot = reply_key is not None and store.db.conn.execute(
                "SELECT 1 FROM messages WHERE key = ? AND from_self = 1", (reply_key,)).fetchone() is not None
            return queued, decided, to_bot

        queued, decided, reply_to_bot = await self._db(state)
        mentioned = bool(bots & set(merged.mentions))
        # Put to the bot (@-mention, reply): handled whatever its question score; anything else must be a
        # question, by the rules or by the second stage.
        if not (merged.is_question or mentioned or reply_to_bot or await self._second_stage(merged)):
            return
        addressed = self.options.reply_mode == "all" or mentioned or reply_to_bot
        if queued or (decided and not addressed) or (not addressed and not self.options.resolve_all):
            return
        if not addressed and self._worker_thread.pending(BACKGROUND) >= self.options.max_background:
            # Busy: questions nobody put to the bot are recorded for the labels only when there is time.
            log.info("resolver busy (%d questions waiting); not resolving unaddressed %s", self.options.max_background,
                     merged.id)
            return
        await self._decide(update, window, group_key, addressed, bots)

    async def _decide(self, update: "Update", window: list[Turn], group_key: str, addressed: bool,
                      bots: set[str]) -> None:
        merged = update.merged
        resolution = await self._resolve(window, turn(merged), group_key, ADDRESSED if addressed else BACKGROUND)
        query = bounded(resolution.query(merged.text), self.options.max_query_chars)
        forward = addressed and self.assistant is not None
        delay = self.options.rate.reserve((merged.platform, merged.group)) if forward else 0.0
        if delay is None:
            log.warning("rate limit: group %s has %d questions forwarded or waiting within %g s; not forwarding %s",
                        group_key, self.options.rate.limit, self.options.rate.period_s, merged.id)
            forward = False
        elif delay > 0:
            log.info("rate limit: question %s waits %.0f s for the group's next forward", merged.id, delay)
        self_id = _pick_bot(bots, merged.mentions)
        history = _history(update.window[-self.options.history:] if self.options.history > 0 else [],
                           self.options.max_query_chars)
        reply_to = update.message.message_id  # the run's latest line: the one that made it a question to the bot

        def record(store: "Store") -> int | None:
            _record_decision(store, merged, resolution, query if forward else None)
            if not forward:
                return None
            return outbox.enqueue(store, merged_id=merged.id, platform=merged.platform, group=merged.group,
                                  self_id=self_id, reply_to=reply_to, asker=merged.sender,
                                  question=bounded(merged.text, self.options.max_query_chars),
                                  query=query, history=history, delay_s=delay)

        item_id = await self._db(record)
        if item_id is not None:
            self._wake.set()
            log.info("question %s queued for the assistant as %r (%s, p=%.2f)", merged.id, query,
                     resolution.decision, resolution.probs.get(resolution.decision, 0.0))
        for listener in list(self._listeners) if merged.is_question else ():  # labels keep using the filter
            try:
                await listener(update, resolution)
            except Exception:  # noqa: BLE001 - one listener's bug must not stop the others
                log.exception("resolution listener %r failed on %s", listener, merged.id)

    async def _resolve(self, window: list[Turn], question: Turn, group_key: str, priority: int) -> "Resolution":
        resolver = self.resolver  # pinned: a swap meanwhile lets this request finish on the old model
        self._in_use[id(resolver)] += 1
        try:
            return await asyncio.wrap_future(self._worker_thread.submit(
                priority, lambda: resolver.resolve(window, question, group=group_key)))
        except Exception as exc:  # noqa: BLE001 - a failing model must not lose the question
            from corefbot.models.serve.types import Resolution

            log.error("resolver %s failed on a question of %s (%s); forwarding it as asked",
                      resolver.name, group_key, exc)
            return Resolution("unknown", {"needs": 0.0, "not_needed": 0.0, "unknown": 1.0},
                              backend=f"{resolver.name}:error", reject_reason=f"backend error: {exc}")
        finally:
            async with self._released:
                self._in_use[id(resolver)] -= 1
                self._released.notify_all()

    def _may_ask(self, merged: Merged) -> bool:
        """Worth a closer look though the filter did not pass it: it may be put to the bot (checked in
        ``_look``), or its rule score is in the second stage's band."""
        opts = self.options
        return (bool(merged.reply_to) or bool(self._bot_ids() & set(merged.mentions))
                or (opts.question_llm != "off" and opts.question_band[0] <= merged.question_score < opts.question_band[1]))

    async def _second_stage(self, merged: Merged) -> bool:
        """Re-score a borderline run with the model; True (and the run marked a question) when it passes.
        A busy queue, a late or failing model, or no model: the rule score stands."""
        opts = self.options
        if opts.question_llm == "off" or not opts.question_band[0] <= merged.question_score < opts.question_band[1]:
            return False
        if self._worker_thread.pending(BACKGROUND) >= opts.max_background:
            return False  # the same bound as unaddressed questions: the rules decide when the model is busy
        resolver, rule = self.resolver, merged.question_score
        self._in_use[id(resolver)] += 1

        def run() -> Any:
            stage = self._stage_for(resolver)
            return None if stage is None else stage.score(merged.text, rule)

        try:
            result = await asyncio.wrap_future(self._worker_thread.submit(BACKGROUND, run))
        finally:
            async with self._released:
                self._in_use[id(resolver)] -= 1
                self._released.notify_all()
        if result is None or not result.used or result.score < opts.question_threshold:
            return False
        merged.question_score, merged.is_question = result.score, True

        def mark(store: "Store") -> None:
            with store.db.conn:
                store.db.conn.execute("UPDATE merged SET question_score = ?, is_question = 1 WHERE id = ?",
                                      (result.score, merged.id))

        await self._db(mark)
        log.info("second stage: %s scored %.1f (rules %.1f) in %.0f ms", merged.id, result.score, rule, result.ms)
        return True

    def _stage_for(self, resolver: "Resolver") -> Any:
        """The second stage bound to ``resolver``'s backend (rebuilt after a model swap); None if unusable.
        Runs on the worker thread: a local scorer evaluates its instruction prefix once, here."""
        from corefbot.models.serve.question_llm import SecondStage, make_scorer

        key = id(resolver.backend)
        if self._second is None or self._second[0] != key:
            opts = self.options
            try:
                scorer = make_scorer(opts.question_llm, backend=resolver.backend, url=opts.question_llm_url,
                                     model=opts.question_llm_model, api_key=opts.question_llm_key)
            except ValueError as exc:
                log.error("question second stage disabled: %s", exc)
                scorer = None
            if hasattr(scorer, "warm"):
                try:
                    scorer.warm()
                except Exception as exc:  # noqa: BLE001 - a busy model warms on its first line instead
                    log.warning("question second stage: warming the local model failed (%s)", exc)
            self._second = (key, SecondStage(scorer, *opts.question_band) if scorer is not None else None)
        return self._second[1]

    def _observe(self, group_key: str, turns: list[Turn]) -> None:
        if self._closing:
            return
        resolver = self._resolver
        turns = turns[-self.options.window:]
        if resolver is None:
            return

        def run() -> None:
            try:
                resolver.observe(group_key, turns)
            except Exception as exc:  # noqa: BLE001 - a prefill is an optimisation; never fatal
                log.debug("observe failed for %s: %s", group_key, exc)

        if resolver.name == "rules":
            return  # nothing to prefill
        try:
            self._worker_thread.submit(ADDRESSED, run)  # only queues the backend's own prefill: cheap, keep it early
        except RuntimeError:
            pass  # shut down

    # ---- the outbox worker -----------------------------------------------------------------------

    async def _run_outbox(self) -> None:
        next_purge = 0.0
        while not self._closing:
            self._wake.clear()  # before reading: a wake-up during the reads then runs the loop again at once
            try:
                await self._db(lambda s: outbox.expire_old(s, self.options.retry.max_age_s))
                if self.options.keep_finished_s > 0 and time.time() >= next_purge:
                    next_purge = time.time() + 3600
                    purged = await self._db(lambda s: outbox.purge_finished(s, self.options.keep_finished_s))
                    if purged:
                        log.info("outbox: deleted %d finished item(s) older than %g days", purged,
                                 self.options.keep_finished_s / 86400)
                items, later = await self._db(outbox.due)
            except Exception:  # noqa: BLE001 - database trouble: log and try again shortly
                log.exception("outbox: could not read due items")
                items, later = [], time.time() + 5
            for item in await notice.due(self._db, self.options.unavailable_reply, self._inflight):
                self._inflight.add(item.id)
                task = asyncio.create_task(notice.tell_asker(item, self.options.unavailable_reply, db=self._db,
                                                             post_reply=self._post_reply, unavailable=BotUnavailable))
                task.add_done_callback(lambda t, i=item.id: self._inflight.discard(i))
            for item in items:
                if item.id in self._inflight:
                    continue
                self._inflight.add(item.id)
                task = asyncio.create_task(self._work(item))
                task.add_done_callback(lambda t, i=item.id: self._inflight.discard(i))
            wait = 5.0 if later is None else min(max(later - time.time(), 0.01), 5.0)
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except asyncio.TimeoutError:
                pass

    async def _work(self, item: outbox.OutboxItem) -> None:
        try:
            if item.status == "pending":
                if self.assistant is None:
                    return  # queued by an earlier run with an assistant; waits until one is configured
                async with self._sem:
                    started = time.time()
                    if item.attempts == 0:
                        self.forward_latency_ms.append((started - item.created_at) * 1000)
                    try:
                        answer = await self.assistant.ask(item.query, group=f"{item.platform}:{item.group}",
                                                          history=item.history, request_id=item.merged_id)
                    except Exception as exc:  # noqa: BLE001 - anything but AssistantError is a bug: not retried
                        retryable = isinstance(exc, AssistantError) and exc.retryable
                        error = str(exc) if isinstance(exc, AssistantError) else f"unexpected error: {exc!r}"
                        status = await self._db(lambda s: outbox.record_failure(
                            s, item.id, error, retryable=retryable, policy=self.options.retry))
                        log.warning("outbox %d (%s): %s -> %s (attempt %d)", item.id, item.merged_id, error, status,
                                    item.attempts + 1)
                        return
                if not await self._db(lambda s: outbox.record_answer(s, item.id, answer)):
                    return
            else:
                answer = item.answer or ""
            await self._reply(item, answer)
        finally:
            self._wake.set()

    async def _reply(self, item: outbox.OutboxItem, answer: str) -> None:
        if not await self._db(lambda s: outbox.claim_reply(s, item.id)):
            return
        text = answer
        if self.options.show_query and item.query.strip() != item.question.strip():
            text = f"「{item.query}」\n{answer}"
        if len(text) > self.options.max_answer_chars:
            text = text[: self.options.max_answer_chars - 1] + "…"
        try:
            message_id = await self._post_reply(item, text)
        except BotUnavailable as exc:
            retry_at = time.time() + self.options.retry.base_s
            await self._db(lambda s: outbox.release_reply(s, item.id, retry_at, str(exc)))
            return
        except Exception as exc:  # noqa: BLE001 - the chat app refused or the link broke mid-send
            log.error("outbox %d: posting the reply into %s failed (%r); not retried so it is never posted twice",
                      item.id, item.group, exc)
            await self._db(lambda s: outbox.record_reply_failed(s, item.id, f"reply failed: {exc!r}"))
            return
        await self._db(lambda s: outbox.record_delivered(s, item.id, message_id))
        log.info("outbox %d: answer posted in %s:%s", item.id, item.platform, item.group)


# ---- helpers ------------------------------------------------------------------------------------

def _record_decision(store: "Store", merged: Merged, res: "Resolution", forwarded: str | None) -> None:
    with store.db.conn:
        store.db.conn.execute(
            "INSERT OR REPLACE INTO decisions (merged_id, backend, decision, p_needs, p_not_needed, p_unknown, "
            "margin, rewrite, forwarded, at, question, gated, rejected_rewrite, reject_reason, latency_ms) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (merged.id, res.backend, res.decision, res.probs.get("needs"), res.probs.get("not_needed"),
             res.probs.get("unknown"), res.margin, res.rewrite, forwarded, time.time(), merged.text, int(res.gated),
             res.rejected_rewrite, res.reject_reason, res.latency_ms),
        )


def _history(window: list[Merged], max_chars: int = 0) -> list[dict]:
    """The window for the json API, senders renamed A, B, C… as in the prompt (no member ids leave)."""
    names: dict[str, str] = {}
    out = []
    for m in window:
        name = names.setdefault(m.sender, "bot" if m.from_self else chr(ord("A") + len(names) % 26))
        out.append({"sender": name, "text": bounded(m.text, max_chars), "timestamp": m.timestamp})
    return out


def _pick_bot(bots: set[str], mentions: tuple[str, ...]) -> str:
    for mention in mentions:
        if mention in bots:
            return mention
    return min(bots) if bots else ""


def _describe(resolver: "Resolver") -> str:
    path = getattr(resolver.backend, "model_path", None)
    return f"{resolver.name}({path})" if path else resolver.name


def _load_llama(path: str) -> "Resolver":
    from corefbot.models.serve.resolver import load_resolver

    return load_resolver("llama-cpp", model_path=path, fallback=False)
