"""Answering a command off the record: the command and the bot's answer are about the data, not part of
the conversation, so neither stays in the chat log (``/label``, ``/model``)."""
from __future__ import annotations

from nonebot.adapters import Bot, Event
from nonebot.matcher import Matcher

from corefbot.pipeline.records import message_key
from corefbot.plugins.chatlog.capture import group_of, platform_of

from .database import purge


def traffic_keys(bot: Bot, event: Event, sent: object) -> list[str]:
    """The chat-log keys of a command message and of the bot's answer to it (none outside groups)."""
    group = group_of(event)
    if group is None:
        return []
    platform = platform_of(bot)
    keys = [message_key(platform, group, str(getattr(event, "message_id", "")))]
    if isinstance(sent, dict) and sent.get("message_id") is not None:
        keys.append(message_key(platform, group, str(sent["message_id"])))
    return keys


async def reply_off_the_record(matcher: Matcher, bot: Bot, event: Event, text: str) -> None:
    """Send ``text`` as the answer to a command, then take the command and the answer out of the chat log."""
    sent = await matcher.send(text)
    await purge(traffic_keys(bot, event, sent))
