"""Forwarding to the assistant against a real aiohttp server on loopback: the client (both APIs, slow,
bad JSON, refusals) and the service's durable outbox (down then up, restart, retries, expiry)."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from corefbot.demo.assistant import EchoAssistant
from corefbot.demo.process import free_port
from corefbot.pipeline.question import QuestionFilter
from corefbot.pipeline.records import Message

# plugins.* import NoneBot plugins, which need the NoneBot that nonebug starts after collection: import late.
BOT = "10000"


def _forward():
    from corefbot.plugins.resolver import forward

    return forward


def _policy(**kw):
    from corefbot.plugins.resolver.outbox import RetryPolicy

    return RetryPolicy(**kw)


# ---- the client --------------------------------------------------------------------------------

async def test_json_api_sends_query_group_history_and_reads_answer() -> None:
    async with EchoAssistant() as assistant:
        client = _forward().AssistantClient(assistant.url, api="json", key="s3cret")
        history = [{"sender": "A", "text": "Can mmpose be deployed on mobile phones?", "timestamp": 1.0}]
        answer = await client.ask("How to deploy mmpose on TX2?", group="onebotv11:1", history=history,
                                  request_id="q1")
        await client.close()
    assert answer == "(echo) How to deploy mmpose on TX2?"
    (req,) = assistant.requests
    assert req.body == {"query": "How to deploy mmpose on TX2?", "group": "onebotv11:1", "history": history, "id": "q1"}
    assert req.headers["Authorization"] == "Bearer s3cret" and req.headers["Idempotency-Key"] == "q1"


async def test_openai_api_posts_chat_completions() -> None:
    async with EchoAssistant() as assistant:
        client = _forward().AssistantClient(assistant.openai_url, api="openai", model="qwen-max", system="Be brief.")
        answer = await client.ask("How to deploy mmpose on TX2?", group="g")
        await client.close()
    assert answer == "(echo) How to deploy mmpose on TX2?"
    (req,) = assistant.requests
    assert req.path == "/v1/chat/completions" and req.body["model"] == "qwen-max"
    assert req.body["messages"] == [{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "How to deploy mmpose on TX2?"}]


@pytest.mark.parametrize("script, fragment, retryable", [
    ("bad_json", "invalid JSON", True),
    ("no_answer", 'without "answer"', True),
    ("500", "HTTP 500", True),
    ("400", "HTTP 400", False),
])
async def test_bad_answers_raise_clear_errors(script: str, fragment: str, retryable: bool) -> None:
    async with EchoAssistant(script=[script]) as assistant:
        client = _forward().AssistantClient(assistant.url, api="json")
        with pytest.raises(_forward().AssistantError) as err:
            await client.ask("q?", group="g")
        await client.close()
    assert fragment in str(err.value) and assistant.url in str(err.value)
    assert err.value.retryable is retryable


async def test_slow_assistant_times_out() -> None:
    async with EchoAssistant(script=["slow"], slow_s=1.0) as assistant:
        client = _forward().AssistantClient(assistant.url, api="json", timeout_s=0.3)
        started = time.monotonic()
        with pytest.raises(_forward().AssistantError, match="no answer within 0.3 s") as err:
            await client.ask("q?", group="g")
        elapsed = time.monotonic() - started
        await client.close()
    assert err.value.retryable and elapsed < 0.9


async def test_unreachable_assistant_is_retryable() -> None:
    client = _forward().AssistantClient(f"http://127.0.0.1:{free_port()}/ask", api="json", timeout_s=2)
    with pytest.raises(_forward().AssistantError, match="unreachable") as err:
        await client.ask("q?", group="g")
    await client.close()
    assert err.value.retryable


def test_bad_configuration_is_named() -> None:
    with pytest.raises(ValueError, match="COREFBOT_ASSISTANT_API"):
        _forward().AssistantClient("http://x/ask", api="soap")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="COREFBOT_ASSISTANT_URL"):
        _forward().AssistantClient("ftp://x/ask")


# ---- the service's outbox, over a real recorder and SQLite file --------------------------------

class Harness:
    """A recorder + resolver service on one database file, the chat side recorded in ``posted``."""

    def __init__(self, db: Path, url: str | None, *, retry, timeout_s: float = 5.0, rate=None) -> None:
        from corefbot.models.serve.resolver import load_resolver
        from corefbot.plugins.chatlog.recorder import Recorder
        from corefbot.plugins.resolver.service import RateLimiter, ResolverService, ServiceOptions

        self.db = db
        self.recorder = Recorder(db, question_filter=QuestionFilter())
        self.posted: list = []
        assistant = _forward().AssistantClient(url, api="json", timeout_s=timeout_s) if url else None
        self.service = ResolverService(
            load_resolver("rules"), self.recorder.call, assistant=assistant, post_reply=self._post,
            bot_ids=lambda: {BOT},
            options=ServiceOptions(retry=retry, rate=rate or RateLimiter(0, 60.0)))
        self._ids = iter(range(1, 10_000))
        self.sent: list[Message] = []

    async def _post(self, item, text: str) -> str:
        self.posted.append((item, text))
        return f"r{len(self.posted)}"

    async def __aenter__(self) -> "Harness":
        self.recorder.start()
        await self.service.start()
        self.recorder.add_listener(self.service.on_update)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.service.stop()
        self.recorder.stop()

    def say(self, user: str, text: str, *, at: float, mention: bool = False, group: str = "1") -> str:
        mid = str(next(self._ids) + int(at) % 100_000 * 100)
        message = Message("onebotv11", group, mid, user, at, text, mentions=(BOT,) if mention else ())
        self.sent.append(message)
        self.recorder.submit(message)
        return mid

    async def exchange(self, *, group: str = "1") -> str:
        """The paper's exchange; the TX2 question @-mentions the bot. Returns its message id."""
        now = time.time() - 60
        self.say("20001", "Can mmpose be deployed on mobile phones?", at=now, group=group)
        self.say("20002", "Yes, through ncnn or mmdeploy.", at=now + 30, group=group)
        return self.say("20003", "BTW, how to deploy it on TX2?", at=now + 60, mention=True, group=group)

    async def rows(self) -> list[dict]:
        def read(store):
            cur = store.db.conn.execute("SELECT * FROM outbox ORDER BY id")
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r)) for r in cur.fetchall()]
        return await self.recorder.call(read)

    async def wait_status(self, status: str, timeout: float = 10.0, attempts: int = 0,
                          notice: str | None = None) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = await self.rows()
            if (rows and rows[0]["status"] == status and rows[0]["attempts"] >= attempts
                    and notice in (None, rows[0]["notice"])):
                return rows[0]
            await asyncio.sleep(0.02)
        raise AssertionError(f"outbox never reached {status!r} (attempts ≥ {attempts}, notice {notice}): "
                             f"{await self.rows()}")


FAST = dict(base_s=0.05, max_s=0.2, max_attempts=50, max_age_s=60)


async def test_delivered_once_with_reply_to_the_asker(tmp_path: Path) -> None:
    async with EchoAssistant() as assistant, Harness(tmp_path / "b.db", assistant.url, retry=_policy(**FAST)) as h:
        mid = await h.exchange()
        await h.service.wait_idle()
        row = await h.wait_status("delivered")
    (req,) = assistant.requests
    (item, text), = h.posted
    assert item.reply_to == mid and item.asker == "20003" and item.self_id == BOT
    assert text.endswith(f"(echo) {req.query}") and row["answer"] == f"(echo) {req.query}"
    assert req.body["history"][-1]["text"] == "Yes, through ncnn or mmdeploy." and req.body["id"] == item.merged_id
    assert row["history"] is None  # other members' messages are not kept once the assistant has answered


async def test_assistant_down_then_up_delivers_exactly_once(tmp_path: Path) -> None:
    assistant = EchoAssistant(port=free_port())  # reserved, nothing listening yet: connection refused
    async with Harness(tmp_path / "b.db", assistant.url, retry=_policy(**FAST)) as h:
        await h.exchange()
        down = await h.wait_status("pending", attempts=3)
        assert "unreachable" in down["error"] and h.posted == []
        await assistant.start()
        try:
            await h.wait_status("delivered")
            await asyncio.sleep(0.5)  # any duplicate retry would land in this time
        finally:
            await assistant.stop()
        assert len(assistant.requests) == 1 and len(h.posted) == 1
        for message in h.sent:  # the same events again (a chat app re-delivering after a reconnect)
            h.recorder.submit(message)
        await h.recorder.flush()
        await h.service.wait_idle()
        assert len(assistant.requests) == 1 and len(h.posted) == 1


async def test_pending_items_resume_after_restart_and_are_not_resent(tmp_path: Path) -> None:
    assistant = EchoAssistant(port=free_port())
    db = tmp_path / "b.db"
    async with Harness(db, assistant.url, retry=_policy(**FAST)) as h:
        await h.exchange()
        await h.wait_status("pending", attempts=1)
    async with assistant, Harness(db, assistant.url, retry=_policy(**FAST)) as h2:
        row = await h2.wait_status("delivered")
        await asyncio.sleep(0.3)
    assert len(assistant.requests) == 1 and len(h2.posted) == 1 and row["attempts"] >= 2
    # A third start finds the item delivered: nothing is asked or posted again.
    async with assistant, Harness(db, assistant.url, retry=_policy(**FAST)) as h3:
        await asyncio.sleep(0.3)
        await h3.service.wait_idle()
    assert len(assistant.requests) == 1 and h3.posted == []


async def test_reply_interrupted_mid_post_is_never_resent(tmp_path: Path) -> None:
    from corefbot.plugins.resolver import outbox

    db = tmp_path / "b.db"
    async with EchoAssistant() as assistant:
        async with Harness(db, None, retry=_policy(**FAST)) as h:  # no assistant: decided, queued by hand below
            await h.recorder.call(lambda s: outbox.enqueue(
                s, merged_id="m1", platform="onebotv11", group="1", self_id=BOT, reply_to="5", asker="20003",
                question="q?", query="q?", history=[]))
            await h.recorder.call(lambda s: outbox.record_answer(s, 1, "42"))
            assert await h.recorder.call(lambda s: outbox.claim_reply(s, 1))  # then the process dies
        async with Harness(db, assistant.url, retry=_policy(**FAST)) as h2:
            await h2.service.wait_idle()
            row = (await h2.rows())[0]
    assert row["status"] == "failed" and "not re-sent" in row["error"] and h2.posted == []


async def test_slow_assistant_times_out_then_the_retry_is_delivered(tmp_path: Path) -> None:
    async with EchoAssistant(script=["slow"], slow_s=1.0) as assistant, \
            Harness(tmp_path / "b.db", assistant.url, retry=_policy(**FAST), timeout_s=0.3) as h:
        await h.exchange()
        row = await h.wait_status("delivered")
    assert row["attempts"] == 2 and len(h.posted) == 1
    # Both requests carried the same idempotency key, so an assistant can tell the retry from a new question.
    assert len({r.headers["Idempotency-Key"] for r in assistant.requests}) == 1 and len(assistant.requests) == 2


async def test_bad_json_is_retried_then_failed_with_the_reason(tmp_path: Path) -> None:
    retry = _policy(base_s=0.02, max_s=0.05, max_attempts=3, max_age_s=60)
    async with EchoAssistant(script=["bad_json"] * 10) as assistant, \
            Harness(tmp_path / "b.db", assistant.url, retry=retry) as h:
        await h.exchange()
        # the notice goes out after the row fails: wait for both (a loaded machine once read the row in between)
        row = await h.wait_status("failed", notice="sent")
        await asyncio.sleep(0.2)  # room for a second notice, which must not come
    assert row["attempts"] == 3 and "invalid JSON" in row["error"] and row["history"] is None
    assert len(assistant.requests) == 3
    # No answer was posted; the asker got the one short "assistant unavailable" notice instead.
    assert [text for _, text in h.posted] == [h.service.options.unavailable_reply] and row["notice"] == "sent"


async def test_client_error_fails_at_once(tmp_path: Path) -> None:
    async with EchoAssistant(script=["400"]) as assistant, Harness(tmp_path / "b.db", assistant.url, retry=_policy(**FAST)) as h:
        await h.exchange()
        row = await h.wait_status("failed")
    assert row["attempts"] == 1 and "HTTP 400" in row["error"] and len(assistant.requests) == 1


async def test_items_past_max_age_expire_unsent(tmp_path: Path) -> None:
    retry = _policy(base_s=0.05, max_s=0.1, max_attempts=100, max_age_s=0.4)
    assistant = EchoAssistant(port=free_port())
    async with Harness(tmp_path / "b.db", assistant.url, retry=retry) as h:
        await h.exchange()
        row = await h.wait_status("expired", timeout=5)
        async with assistant:
            await asyncio.sleep(0.3)
    assert "expired" in row["error"] and assistant.requests == []
    assert [text for _, text in h.posted] == [h.service.options.unavailable_reply]  # the notice, once


async def test_no_assistant_still_resolves_and_records(tmp_path: Path) -> None:
    async with Harness(tmp_path / "b.db", None, retry=_policy(**FAST)) as h:
        await h.exchange()
        await h.recorder.flush()
        await h.service.wait_idle()
        decisions = await h.recorder.call(lambda s: s.db.conn.execute(
            "SELECT question, decision, forwarded, backend FROM decisions").fetchall())
        assert await h.rows() == []
    assert ("BTW, how to deploy it on TX2?", "needs", None, "rules") in decisions


def test_backoff_doubles_and_is_capped() -> None:
    policy = _policy(base_s=1, max_s=10)
    delays = [policy.delay(n) for n in range(1, 7)]
    for expected, got in zip([1, 2, 4, 8, 10, 10], delays):
        assert expected <= got <= expected * 1.1


def test_finished_items_are_purged_after_the_keep_period(store) -> None:
    from corefbot.plugins.resolver import outbox

    now = 1_000_000.0
    ids = {}
    for n, status in enumerate(["pending", "answered", "delivered", "failed", "expired", "delivered"]):
        ids[n] = outbox.enqueue(store, merged_id=f"m{n}", platform="onebotv11", group="1", self_id=BOT, reply_to="1",
                                asker="2", question="q?", query="q?", history=[], now=now - 10 * 86400)
        # The last one finished recently; every other row was last touched ten days ago.
        store.db.conn.execute("UPDATE outbox SET status = ?, updated_at = ? WHERE id = ?",
                              (status, now - (3600 if n == 5 else 10 * 86400), ids[n]))
    assert outbox.purge_finished(store, keep_s=30 * 86400, now=now) == 0
    assert outbox.purge_finished(store, keep_s=7 * 86400, now=now) == 3
    left = {r[0] for r in store.db.conn.execute("SELECT merged_id FROM outbox")}
    assert left == {"m0", "m1", "m5"}  # undelivered work is never purged, whatever its age


def test_rate_limiter_smooths_a_burst_then_drops() -> None:
    from corefbot.plugins.resolver.service import RateLimiter

    rate, a, b = RateLimiter(2, 60.0), ("onebotv11", "1"), ("onebotv11", "2")
    assert [rate.reserve(a, now=0.0), rate.reserve(a, now=1.0)] == [0.0, 0.0]
    assert rate.reserve(a, now=2.0) == 58.0  # the next slot: when the first forward leaves the window
    assert rate.reserve(a, now=3.0) == 58.0  # then the second's
    assert rate.reserve(a, now=4.0) is None  # a third would wait longer than a period: dropped
    assert rate.reserve(b, now=4.0) == 0.0  # each group has its own budget
    assert rate.reserve(a, now=125.0) == 0.0  # the window has moved on
    assert RateLimiter(0, 60.0).reserve(a, now=0.0) == 0.0
