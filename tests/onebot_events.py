"""OneBot v11 event builders for nonebug tests."""
from __future__ import annotations

import itertools
import time

from nonebot.adapters.onebot.v11 import GroupMessageEvent, Message
from nonebot.adapters.onebot.v11.event import Reply, Sender

_ids = itertools.count(1)


def group_message(text: str | Message, *, group: int = 100, user: int = 200, self_id: int = 10000,
                  message_id: int | None = None, timestamp: float | None = None, to_me: bool = False,
                  reply: Reply | None = None, role: str = "member", nickname: str = "") -> GroupMessageEvent:
    message = Message(text) if isinstance(text, str) else text
    return GroupMessageEvent(
        time=int(timestamp if timestamp is not None else time.time()), self_id=self_id, post_type="message",
        sub_type="normal", user_id=user, message_type="group", group_id=group,
        message_id=message_id if message_id is not None else next(_ids), message=message,
        original_message=message, raw_message=str(message), font=0,
        sender=Sender(user_id=user, nickname=nickname or f"user{user}", card="", role=role),
        to_me=to_me, reply=reply,
    )


def reply_to(message_id: int, user: int, text: str = "") -> Reply:
    return Reply(time=int(time.time()), message_type="group", message_id=message_id, real_id=message_id,
                 sender=Sender(user_id=user, nickname=f"user{user}"), message=Message(text))


def make_bot(ctx, self_id: str = "10000"):
    """A OneBot v11 bot on the real registered adapter (so its platform is "onebotv11", as in production)."""
    import nonebot
    from nonebot.adapters.onebot.v11 import Adapter, Bot

    return ctx.create_bot(base=Bot, adapter=nonebot.get_adapter(Adapter), self_id=self_id)


class Like:
    """Matches a sent message whose plain text matches ``pattern`` (nonebug compares expected != sent)."""

    def __init__(self, pattern: str) -> None:
        import re

        self.pattern = re.compile(pattern, re.S)

    def __eq__(self, other: object) -> bool:
        text = other.extract_plain_text() if hasattr(other, "extract_plain_text") else str(other)
        return bool(self.pattern.search(text))

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __repr__(self) -> str:
        return f"Like({self.pattern.pattern!r})"


async def db(fn):
    """Run ``fn(store)`` on the bot's single writer (the nonebug session's database)."""
    from corefbot.plugins.chatlog import get_recorder

    return await get_recorder().call(fn)
