"""nonebug tests: a message put to the bot (@-mention or a reply to a bot message) is resolved and
forwarded whatever its question score; the same text unaddressed is not. The second stage (an
OpenAI-compatible loopback endpoint here) turns a borderline line into a question, or leaves it."""
from __future__ import annotations

import time

from nonebot.adapters.onebot.v11 import Message
from nonebug import App

from corefbot.pipeline.question import QuestionFilter
from tests.loopback import chat_endpoint
from tests.onebot_events import make_bot, reply_to
from tests.test_resolver_plugin import BOT, assistant_for, decisions, expected_reply, say

LOW = "这段日志我贴一下 train.log 里的 第 300 行开始"  # a statement: the rules give it 0
BORDERLINE = "这个 shape 对不上啊"  # a bare 啊 ending: in the second stage's band


async def merged_row(group: int) -> list[tuple]:
    from corefbot.plugins.chatlog import get_recorder

    return await get_recorder().call(lambda s: s.db.conn.execute(
        "SELECT text, question_score, is_question FROM merged WHERE group_id = ? AND from_self = 0 "
        "ORDER BY timestamp", (str(group),)).fetchall())


def test_the_texts_are_what_the_tests_assume() -> None:
    f = QuestionFilter()
    assert f.score(LOW) == 0.0
    assert 3.0 <= f.score(BORDERLINE) < 5.0


async def test_a_mention_with_a_low_score_is_forwarded_and_the_same_text_unaddressed_is_not(app: App) -> None:
    from corefbot.plugins.resolver import get_service

    now, addressed_group, other_group = time.time() - 100, 1101, 1102
    async with assistant_for(get_service(), reply_mode="mention") as assistant:
        async with app.test_api() as ctx:
            bot = make_bot(ctx)
            await say(bot, LOW, group=other_group, user=21001, message_id=11021, timestamp=now)
            assert assistant.requests == []  # not a question, not to the bot: nothing
            message, query = expected_reply([], LOW, reply_id=11011, asker=21002)
            ctx.should_call_api("send_group_msg", {"group_id": addressed_group, "message": message},
                                {"message_id": 11019})
            await say(bot, LOW, group=addressed_group, user=21002, message_id=11011, timestamp=now, to_me=True)
    assert [r.query for r in assistant.requests] == [query]
    assert await decisions(other_group) == []
    assert [row[0] for row in await decisions(addressed_group)] == [LOW]
    # Recorded with its own score: still not a question for the labels queue and the exports.
    assert await merged_row(addressed_group) == [(LOW, 0.0, 0)]


async def test_a_reply_to_the_bot_with_a_low_score_is_forwarded(app: App) -> None:
    from corefbot.plugins.resolver import get_service

    now, g = time.time() - 100, 1103
    async with assistant_for(get_service(), reply_mode="mention") as assistant:
        async with app.test_api() as ctx:
            bot = make_bot(ctx)
            ctx.should_call_api("send_group_msg", {"group_id": g, "message": Message("pip install mmcv==2.1.0")},
                                {"message_id": 11039})
            await bot.send_group_msg(group_id=g, message=Message("pip install mmcv==2.1.0"))
            message, query = expected_reply(["pip install mmcv==2.1.0"], LOW, reply_id=11031, asker=21003)
            ctx.should_call_api("send_group_msg", {"group_id": g, "message": message}, {"message_id": 11040})
            await say(bot, LOW, group=g, user=21003, message_id=11031, timestamp=now + 10,
                      reply=reply_to(11039, BOT))
    assert [r.query for r in assistant.requests] == [query]


async def test_the_second_stage_decides_a_borderline_line(app: App) -> None:
    from corefbot.plugins.resolver import get_service

    service = get_service()
    now, yes_group, no_group = time.time() - 100, 1104, 1105
    for answer, group in (("9", yes_group), ("2", no_group)):
        service._second = None  # a new endpoint: rebuild the stage
        try:
            with chat_endpoint(lambda prompt, answer=answer: answer) as (url, _):
                async with assistant_for(service, reply_mode="all", question_llm="http",
                                         question_llm_url=url) as assistant:
                    async with app.test_api() as ctx:
                        bot = make_bot(ctx)
                        if answer == "9":
                            message, _ = expected_reply([], BORDERLINE, reply_id=11041, asker=21004)
                            ctx.should_call_api("send_group_msg", {"group_id": group, "message": message},
                                                {"message_id": 11049})
                        await say(bot, BORDERLINE, group=group, user=21004, message_id=11041 + (answer == "2"),
                                  timestamp=now)
        finally:
            service._second = None
        if answer == "9":
            assert len(assistant.requests) == 1
            assert await merged_row(group) == [(BORDERLINE, 9.0, 1)]  # the model's score is recorded
        else:
            assert assistant.requests == []
            (row,) = await merged_row(group)
            assert row[2] == 0 and 3.0 <= row[1] < 5.0  # the rule score stands
