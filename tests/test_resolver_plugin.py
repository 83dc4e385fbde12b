"""nonebug tests of the resolver plugin as the bot loads it: a question reaches the real handlers
(chatlog preprocessor → recorder → resolver service), is resolved by the rules backend, forwarded to a
loopback assistant, and answered with ``send_group_msg`` (quote + @asker). Reply modes, runs that grow,
the rate limit, start-up fallback from a bad model, and the resolution hook."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from pathlib import Path

import pytest
from nonebot.adapters.onebot.v11 import Message, MessageSegment
from nonebug import App

from corefbot.demo.assistant import EchoAssistant
from corefbot.pipeline.records import Turn
from tests.onebot_events import group_message, make_bot, reply_to

BOT = 10000


@contextlib.asynccontextmanager
async def assistant_for(service, **options):
    """Point the running service at a loopback assistant (and per-test options) for the test's duration."""
    from corefbot.plugins.resolver.forward import AssistantClient
    from corefbot.plugins.resolver.service import RateLimiter

    saved = service.assistant, service.options
    async with EchoAssistant() as assistant:
        service.assistant = AssistantClient(assistant.url, api="json", timeout_s=5)
        service.options = dataclasses.replace(saved[1], rate=options.pop("rate", RateLimiter(0, 60.0)), **options)
        try:
            yield assistant
        finally:
            await service.assistant.close()
            service.assistant, service.options = saved


async def settle() -> None:
    from corefbot.plugins.chatlog import get_recorder
    from corefbot.plugins.resolver import get_service

    await get_recorder().flush()
    await get_service().wait_idle()


async def say(bot, text, **kw) -> None:
    from nonebot.message import handle_event

    await handle_event(bot, group_message(text, **kw))
    await settle()


def expected_reply(window: list[str], question: str, *, reply_id: int, asker: int) -> tuple[Message, str]:
    """The reply the bot should post, computed by the same served resolver (rules) on the same window."""
    from corefbot.models.serve.resolver import load_resolver
    from corefbot.pipeline.records import Turn

    resolution = load_resolver("rules").resolve([Turn("x", t, 0.0) for t in window], Turn("y", question, 1.0))
    query = resolution.query(question)
    text = (f"「{query}」\n" if query != question else "") + f"(echo) {query}"
    return MessageSegment.reply(reply_id) + MessageSegment.at(asker) + MessageSegment.text(" " + text), query


async def decisions(group: int) -> list[tuple]:
    from corefbot.plugins.chatlog import get_recorder

    return await get_recorder().call(lambda s: s.db.conn.execute(
        "SELECT d.question, d.decision, d.forwarded FROM decisions d JOIN merged m ON m.id = d.merged_id "
        "WHERE m.group_id = ? ORDER BY m.timestamp", (str(group),)).fetchall())


async def delivered(group: int) -> list[tuple[str, str]]:
    """(status, reply message id) of the group's outbox items: a reply nonebug rejected stays undelivered."""
    from corefbot.plugins.chatlog import get_recorder

    return await get_recorder().call(lambda s: s.db.conn.execute(
        "SELECT status, reply_message_id FROM outbox WHERE group_id = ? ORDER BY id", (str(group),)).fetchall())


async def test_mentioned_question_is_resolved_forwarded_and_answered(app: App) -> None:
    from corefbot.plugins.resolver import get_service

    now, g = time.time() - 100, 601
    async with assistant_for(get_service(), reply_mode="mention") as assistant:
        async with app.test_api() as ctx:
            bot = make_bot(ctx)
            await say(bot, "Can mmpose be deployed on mobile phones?", group=g, user=20001, message_id=6011, timestamp=now)
            await say(bot, "Yes, through ncnn or mmdeploy, it runs on Android.", group=g, user=20002,
                      message_id=6012, timestamp=now + 30)
            message, query = expected_reply(["Can mmpose be deployed on mobile phones?",
                                             "Yes, through ncnn or mmdeploy, it runs on Android."],
                                            "BTW, how to deploy it on TX2?", reply_id=6013, asker=20003)
            ctx.should_call_api("send_group_msg", {"group_id": g, "message": message}, {"message_id": 6099})
            await say(bot, "BTW, how to deploy it on TX2?", group=g, user=20003, message_id=6013,
                      timestamp=now + 60, to_me=True)
    assert [r.query for r in assistant.requests] == [query]
    assert query != "BTW, how to deploy it on TX2?"  # the rules backend rewrote it from the window
    assert await delivered(g) == [("delivered", "6099")]
    rows = await decisions(g)
    assert rows[-1] == ("BTW, how to deploy it on TX2?", "needs", query)
    # The first question was resolved and recorded too, but not answered: nobody asked the bot.
    assert rows[0][0] == "Can mmpose be deployed on mobile phones?" and rows[0][2] is None


async def test_mention_mode_ignores_unaddressed_questions_but_answers_replies_to_the_bot(app: App) -> None:
    from corefbot.plugins.resolver import get_service

    now, g = time.time() - 100, 602
    async with assistant_for(get_service(), reply_mode="mention") as assistant:
        async with app.test_api() as ctx:
            bot = make_bot(ctx)
            await say(bot, "How do I install PyTorch 2.3 on Windows?", group=g, user=20001, message_id=6021,
                      timestamp=now)
            assert assistant.requests == []
            # The bot's own earlier message, then a member quoting it without any @.
            ctx.should_call_api("send_group_msg", {"group_id": g, "message": Message("pip install torch")},
                                {"message_id": 6029})
            await bot.send_group_msg(group_id=g, message=Message("pip install torch"))
            await settle()
            message, query = expected_reply(["How do I install PyTorch 2.3 on Windows?", "pip install torch"],
                                            "Does it need CUDA 12 drivers?", reply_id=6022, asker=20004)
            ctx.should_call_api("send_group_msg", {"group_id": g, "message": message}, {"message_id": 6030})
            await say(bot, "Does it need CUDA 12 drivers?", group=g, user=20004, message_id=6022, timestamp=now + 20,
                      reply=reply_to(6029, BOT))
    assert [r.query for r in assistant.requests] == [query]
    assert await delivered(g) == [("delivered", "6030")]


async def test_all_mode_answers_every_question_and_never_the_bots_own(app: App) -> None:
    from corefbot.plugins.resolver import get_service

    now, g = time.time() - 100, 603
    async with assistant_for(get_service(), reply_mode="all") as assistant:
        async with app.test_api() as ctx:
            bot = make_bot(ctx)
            message, _ = expected_reply([], "How do I install PyTorch 2.3 on Windows?", reply_id=6031, asker=20001)
            ctx.should_call_api("send_group_msg", {"group_id": g, "message": message}, {"message_id": 6039})
            await say(bot, "How do I install PyTorch 2.3 on Windows?", group=g, user=20001, message_id=6031,
                      timestamp=now)
            # A question-shaped message from the bot's own account is recorded, never answered.
            await say(bot, "Which CUDA version do you use?", group=g, user=BOT, message_id=6032, timestamp=now + 40)
    assert len(assistant.requests) == 1
    assert await delivered(g) == [("delivered", "6039")]


async def test_a_run_is_forwarded_once_when_a_later_line_addresses_the_bot(app: App) -> None:
    from corefbot.plugins.resolver import get_service

    now, g = time.time() - 100, 604
    async with assistant_for(get_service(), reply_mode="mention") as assistant:
        async with app.test_api() as ctx:
            bot = make_bot(ctx)
            await say(bot, "mmdeploy 转 TensorRT 的时候报错了，怎么解决？", group=g, user=20005, message_id=6041,
                      timestamp=now)
            assert assistant.requests == []  # a question, but not to the bot
            merged_text = "mmdeploy 转 TensorRT 的时候报错了，怎么解决？\n提示 CUDA out of memory，有人知道吗？"
            message, query = expected_reply([], merged_text, reply_id=6042, asker=20005)
            ctx.should_call_api("send_group_msg", {"group_id": g, "message": message}, {"message_id": 6049})
            await say(bot, "提示 CUDA out of memory，有人知道吗？", group=g, user=20005, message_id=6042,
                      timestamp=now + 5, to_me=True)
            # The bot's reply has closed the run, so this line starts a new one; addressed to the bot it
            # would now be answered whatever its score (tests/test_question_addressed.py), so it is not.
            await say(bot, "用的是 TX2", group=g, user=20005, message_id=6043, timestamp=now + 10)
    assert [r.query for r in assistant.requests] == [query]


async def test_rate_limit_per_group(app: App) -> None:
    from corefbot.plugins.resolver import get_service
    from corefbot.plugins.resolver.service import RateLimiter

    now, g = time.time() - 100, 605
    first, second, third = ("How do I install PyTorch 2.3 on Windows?", "Which TensorRT version supports CUDA 12.4?",
                            "Does vLLM run on AMD MI300 cards?")
    async with assistant_for(get_service(), reply_mode="all", rate=RateLimiter(1, 2.0)) as assistant:
        async with app.test_api() as ctx:
            bot = make_bot(ctx)
            # Replies in the order they are posted: the deferred second question's comes last.
            for group, reply_id, asker, text, mid in ((g, 6051, 20001, first, 6059), (g + 100, 6053, 20002, second, 6058),
                                                      (g, 6052, 20001, second, 6057)):
                message, _ = expected_reply([], text, reply_id=reply_id, asker=asker)
                ctx.should_call_api("send_group_msg", {"group_id": group, "message": message}, {"message_id": mid})
            await say(bot, first, group=g, user=20001, message_id=6051, timestamp=now)
            # Over the limit: the second waits for the group's next slot (one period), the third would wait
            # longer than a period and is not forwarded.
            await say(bot, second, group=g, user=20001, message_id=6052, timestamp=now + 30)
            await say(bot, third, group=g, user=20001, message_id=6054, timestamp=now + 60)
            # Another group has its own budget.
            await say(bot, second, group=g + 100, user=20002, message_id=6053, timestamp=now + 31)
            assert await delivered(g) == [("delivered", "6059"), ("pending", None)]
            await asyncio.sleep(2.2)
            await settle()
    assert [r.query for r in assistant.requests] == [first, second, second]
    assert await delivered(g) == [("delivered", "6059"), ("delivered", "6057")]
    assert await delivered(g + 100) == [("delivered", "6058")]
    rows = await decisions(g)
    assert [r[2] is not None for r in rows] == [True, True, False]  # all decided and recorded; the third not forwarded


async def test_resolution_listeners_hear_every_question(app: App) -> None:
    from corefbot.plugins.resolver import get_service

    heard: list[tuple[str, str]] = []

    async def listener(update, resolution) -> None:
        heard.append((update.merged.text, resolution.decision))

    async def broken(update, resolution) -> None:
        raise RuntimeError("a buggy listener")

    service = get_service()
    service.add_resolution_listener(broken)
    service.add_resolution_listener(listener)
    now, g = time.time() - 100, 606
    try:
        async with app.test_api() as ctx:
            bot = make_bot(ctx)
            await say(bot, "Can mmpose be deployed on mobile phones?", group=g, user=20001, message_id=6061,
                      timestamp=now)
            await say(bot, "ok", group=g, user=20002, message_id=6062, timestamp=now + 30)
            await say(bot, "BTW, how to deploy it on TX2?", group=g, user=20003, message_id=6063, timestamp=now + 60)
    finally:
        service._listeners.remove(broken)
        service._listeners.remove(listener)
    assert [t for t, _ in heard] == ["Can mmpose be deployed on mobile phones?", "BTW, how to deploy it on TX2?"]
    assert heard[1][1] == "needs"


@pytest.mark.parametrize("content", [None, b"GGUF\x03\x00\x00\x00 truncated garbage", b"not a model at all"])
def test_missing_or_corrupt_model_falls_back_to_rules(tmp_path: Path, content: bytes | None,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    from corefbot.plugins.resolver.config import Config
    from corefbot.plugins.resolver.handlers import backend_name, load_configured_resolver

    path = tmp_path / "model.gguf"
    if content is not None:
        path.write_bytes(content)
    cfg = Config(corefbot_model_path=path)
    assert backend_name(cfg) == "llama-cpp"
    resolver = load_configured_resolver(cfg)
    assert resolver.name == "rules" and str(path) in (resolver.fallback_reason or "")
    assert any(str(path) in r.getMessage() for r in caplog.records if r.levelname == "ERROR")


@pytest.mark.slow
async def test_swap_model_under_load_keeps_every_request_and_closes_the_old_model(tmp_path: Path,
                                                                                  tiny_gguf: Path) -> None:
    from corefbot.models.serve.resolver import load_resolver
    from corefbot.pipeline.question import QuestionFilter
    from corefbot.pipeline.records import Message
    from corefbot.plugins.chatlog.recorder import Recorder
    from corefbot.plugins.resolver.service import ResolverService, ServiceOptions

    first, second = tiny_gguf, tiny_gguf.parent / "tiny-q8_0.gguf"
    recorder = Recorder(tmp_path / "swap.db", question_filter=QuestionFilter())
    recorder.start()

    async def no_post(item, text):  # no assistant configured: nothing is ever posted
        raise AssertionError("nothing should be posted")

    service = ResolverService(load_resolver("llama-cpp", model_path=str(first), n_threads=2), recorder.call,
                              assistant=None, post_reply=no_post, bot_ids=lambda: {str(BOT)},
                              options=ServiceOptions(reply_mode="all"))
    await service.start()
    recorder.add_listener(service.on_update)
    heard: list[str] = []

    async def listener(update, resolution) -> None:
        heard.append(resolution.backend)

    service.add_resolution_listener(listener)
    old = service.resolver
    now = time.time() - 500

    def ask(i: int) -> None:
        recorder.submit(Message("onebotv11", "7", str(i), str(30000 + i), now + 30 * i,
                                f"BTW, how to deploy it on TX{i}? 它支持吗"))

    try:
        for i in range(6):
            ask(i)
        await recorder.flush()
        # Let the first resolutions start on the old model: polled, as a loaded machine (CI installing beside
        # it) can take longer than a fixed pause, and finely, as each tiny-model resolution is short.
        for _ in range(1000):
            if service._in_use[id(old)] > 0:
                break
            await asyncio.sleep(0.005)
        assert service._in_use[id(old)] > 0  # the swap below really happens under load
        await service.swap_model(second)  # returns once the old model has finished and is closed
        assert service.resolver is not old and str(service.resolver.backend.model_path) == str(second)
        with pytest.raises(RuntimeError, match="closed"):
            old.backend.resolve([], Turn("a", "how to deploy it?", 0.0))
        for i in range(6, 9):
            ask(i)
        await recorder.flush()
        await service.wait_idle(60)
        # A broken model is refused and the serving one stays.
        broken = tmp_path / "broken.gguf"
        broken.write_bytes(b"GGUF" + b"\x00" * 64)
        serving = service.resolver
        with pytest.raises(ValueError, match="broken.gguf"):
            await service.swap_model(broken)
        assert service.resolver is serving
        ask(9)
        await recorder.flush()
        await service.wait_idle(60)
    finally:
        await service.stop()
        recorder.stop()
    assert heard == ["llama-cpp"] * 10  # every question resolved by a model, none failed on a closed one



def test_priority_worker_runs_questions_to_the_bot_before_background_ones() -> None:
    import threading

    from corefbot.plugins.resolver.worker import ADDRESSED, BACKGROUND, PriorityWorker

    worker = PriorityWorker("test-worker")
    gate, order = threading.Event(), []
    try:
        blocker = worker.submit(BACKGROUND, gate.wait)  # the model is busy with one question
        time.sleep(0.05)
        futures = [worker.submit(BACKGROUND, lambda: order.append("b1")),
                   worker.submit(BACKGROUND, lambda: order.append("b2")),
                   worker.submit(ADDRESSED, lambda: order.append("a1")),
                   worker.submit(ADDRESSED, lambda: 1 / 0)]
        assert worker.pending(BACKGROUND) == 2 and worker.pending(ADDRESSED) == 2
        gate.set()
        blocker.result(5)
        for f in futures[:3]:
            f.result(5)
        with pytest.raises(ZeroDivisionError):
            futures[3].result(5)
    finally:
        worker.shutdown()
    assert order == ["a1", "b1", "b2"]
    with pytest.raises(RuntimeError, match="shut down"):
        worker.submit(ADDRESSED, lambda: None)


async def test_a_line_addressing_the_bot_while_its_run_is_being_decided_is_not_lost(tmp_path: Path) -> None:
    import threading

    from corefbot.models.serve.resolver import Resolver
    from corefbot.models.serve.rules import RulesBackend
    from corefbot.pipeline.question import QuestionFilter
    from corefbot.pipeline.records import Message
    from corefbot.plugins.chatlog.recorder import Recorder
    from corefbot.plugins.resolver.forward import AssistantClient
    from corefbot.plugins.resolver.service import ResolverService, ServiceOptions

    release = threading.Event()

    class HeldRules(RulesBackend):  # the real rules backend, held until the test lets it answer
        def resolve(self, window, question, *, group=None, rewrite="auto"):
            release.wait(10)
            return super().resolve(window, question, group=group, rewrite=rewrite)

    recorder = Recorder(tmp_path / "held.db", question_filter=QuestionFilter())
    recorder.start()
    posted: list[str] = []

    async def post(item, text):
        posted.append(item.question)
        return "1"

    async with EchoAssistant() as assistant:
        service = ResolverService(Resolver(HeldRules()), recorder.call,
                                  assistant=AssistantClient(assistant.url, api="json"), post_reply=post,
                                  bot_ids=lambda: {str(BOT)}, options=ServiceOptions(reply_mode="mention"))
        await service.start()
        recorder.add_listener(service.on_update)
        now = time.time() - 100
        try:
            recorder.submit(Message("onebotv11", "8", "1", "20005", now, "mmdeploy 转 TensorRT 报错了，怎么解决？"))
            await recorder.flush()
            await asyncio.sleep(0.1)  # the unaddressed first line is now being decided (held)
            recorder.submit(Message("onebotv11", "8", "2", "20005", now + 5, "提示 CUDA out of memory，有人知道吗？",
                                    mentions=(str(BOT),)))
            await recorder.flush()
            await asyncio.sleep(0.1)
            release.set()
            await service.wait_idle(10)
        finally:
            await service.stop()
            recorder.stop()
    assert posted == ["mmdeploy 转 TensorRT 报错了，怎么解决？\n提示 CUDA out of memory，有人知道吗？"]
    assert len(assistant.requests) == 1
