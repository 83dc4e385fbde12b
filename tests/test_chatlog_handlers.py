"""nonebug tests of the chatlog capture: the preprocessor, the sent-message hook, opt-out, blocking matchers."""
from __future__ import annotations

import time

from nonebot.adapters.onebot.v11 import Bot, Message, MessageSegment
from nonebug import App

from tests.onebot_events import db, group_message, make_bot, reply_to


def rows(group: int):
    def read(store):
        return [dict(zip(("sender", "text", "reply_to", "mentions", "from_self", "sender_name"), r))
                for r in store.db.conn.execute(
                    "SELECT sender, text, reply_to, mentions, from_self, sender_name FROM messages "
                    "WHERE group_id = ? ORDER BY timestamp, rowid", (str(group),))]
    return read


async def test_group_messages_are_recorded_with_segments_mentions_and_reply(app: App) -> None:
    now = time.time()
    async with app.test_matcher() as ctx:
        bot = make_bot(ctx)
        message = Message([MessageSegment.text("看这个 "), MessageSegment.image("http://x/y.png"),
                           MessageSegment.face(178), MessageSegment.at(30003), MessageSegment.text(" 怎么办？")])
        ctx.receive_event(bot, group_message(message, group=501, user=30001, message_id=1, timestamp=now,
                                             nickname="Lin"))
        ctx.receive_event(bot, group_message("收到", group=501, user=30002, message_id=2, timestamp=now + 1,
                                             reply=reply_to(1, 30001)))
    got = await db(rows(501))
    assert [r["text"] for r in got] == ["看这个 [image][face]@30003 怎么办？", "收到"]
    assert got[0]["mentions"] == '["30003"]' and got[0]["sender_name"] == "Lin"
    assert got[1]["reply_to"] == "1"


async def test_bot_own_messages_are_recorded(app: App) -> None:
    async with app.test_api() as ctx:
        bot = make_bot(ctx)
        ctx.should_call_api("send_group_msg", {"group_id": 502, "message": Message("mmpose 支持 TX2")},
                            {"message_id": 777})
        await bot.send_group_msg(group_id=502, message=Message("mmpose 支持 TX2"))
    got = await db(rows(502))
    assert got == [{"sender": "10000", "text": "mmpose 支持 TX2", "reply_to": None, "mentions": None,
                    "from_self": 1, "sender_name": "bot"}]


async def test_opted_out_member_is_not_recorded(app: App) -> None:
    await db(lambda store: store.opt_out("onebotv11", "30009"))
    async with app.test_matcher() as ctx:
        bot = make_bot(ctx)
        ctx.receive_event(bot, group_message("我不想被记录，可以吗？", group=503, user=30009))
        ctx.receive_event(bot, group_message("Does anyone know how to install mmpose?", group=503, user=30010))
    got = await db(rows(503))
    assert [r["sender"] for r in got] == ["30010"]
    await db(lambda store: store.opt_in("onebotv11", "30009"))


async def test_a_matcher_that_blocks_does_not_stop_recording(app: App) -> None:
    from nonebot import on_message

    blocker = on_message(priority=1, block=True)

    @blocker.handle()
    async def _() -> None:
        pass

    try:
        async with app.test_matcher(blocker) as ctx:
            bot = make_bot(ctx)
            ctx.receive_event(bot, group_message("blocked but recorded?", group=504, user=30011))
    finally:
        blocker.destroy()
    got = await db(rows(504))
    assert [r["text"] for r in got] == ["blocked but recorded?"]


async def test_runs_merge_live_and_questions_are_scored(app: App) -> None:
    now = time.time()
    async with app.test_matcher() as ctx:
        bot = make_bot(ctx)
        for i, (user, dt, text) in enumerate([
            (30021, 0, "mmdeploy 转 TensorRT 的时候报错了"), (30021, 10, "提示 CUDA out of memory"),
            (30021, 28, "这个怎么解决？"), (30022, 30, "batch size 调小"),
        ]):
            ctx.receive_event(bot, group_message(text, group=505, user=user, message_id=5050 + i, timestamp=now + dt))

    def merged(store):
        return [(m.sender, len(m.message_ids), m.is_question) for m in store.iter_merged("onebotv11", "505")]

    assert await db(merged) == [("30021", 3, True), ("30022", 1, False)]


async def test_private_sends_are_not_recorded(app: App) -> None:
    async with app.test_api() as ctx:
        bot = make_bot(ctx)
        ctx.should_call_api("send_private_msg", {"user_id": 1, "message": "hi"}, {"message_id": 1})
        await bot.call_api("send_private_msg", user_id=1, message="hi")
    assert await db(lambda s: s.db.conn.execute("SELECT count(*) FROM messages WHERE text = 'hi'").fetchone()[0]) == 0
