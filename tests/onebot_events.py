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
