"""Turn a NoneBot event (any adapter, through the generic event API) into a plain :class:`Message`.

OneBot v11 is the tested adapter; for others the group is read from the first of ``group_id``,
``channel_id``, ``chat_id``, ``guild_id`` the event has. Non-text segments become readable
placeholders (``[image]``, ``[face]``…), @mentions are kept both in the text and as ids.
"""
from __future__ import annotations

import time
from typing import Any

from corefbot.pipeline.records import Message

_GROUP_ATTRS = ("group_id", "channel_id", "chat_id", "guild_id")
_PLACEHOLDER_TYPES = {"mface": "sticker", "record": "voice", "node": "forward"}


def platform_of(bot: Any) -> str:
    return bot.adapter.get_name().lower().replace(" ", "")


def group_of(event: Any) -> str | None:
    for attr in _GROUP_ATTRS:
        value = getattr(event, attr, None)
        if value not in (None, ""):
            return str(value)
    return None


def render(message: Any) -> tuple[str, tuple[str, ...]]:
    """Plain text with placeholders, and the ids of members @-mentioned."""
    parts: list[str] = []
    mentions: list[str] = []
    for seg in message:
        if seg.is_text():
            parts.append(seg.data.get("text", str(seg)))  # str() may be adapter-escaped (OneBot: &#91;)
        elif seg.type == "at":
            target = str(seg.data.get("qq") or seg.data.get("user_id") or seg.data.get("target") or "")
            mentions.append(target)
            # Always the id, never a display name: exports replace "@<id>" by the member's pseudonym.
            parts.append(f"@{target}")
        elif seg.type == "reply":
            continue  # kept as reply_to, not as text
        else:
            parts.append(f"[{_PLACEHOLDER_TYPES.get(seg.type, seg.type)}]")
    return "".join(parts).strip(), tuple(mentions)


def from_event(bot: Any, event: Any) -> Message | None:
    """The record of a group message event, or None for anything else (private chats, notices)."""
    if event.get_type() != "message":
        return None
    group = group_of(event)
    if group is None:
        return None
    text, mentions = render(event.get_message())
    if getattr(event, "to_me", False) and str(bot.self_id) not in mentions:
        # OneBot strips a leading @bot from the message and sets to_me; keep the mention.
        mentions = (str(bot.self_id), *mentions)
    reply = getattr(event, "reply", None)
    sender = getattr(event, "sender", None)
    name = (getattr(sender, "card", None) or getattr(sender, "nickname", None) or "") if sender else ""
    return Message(
        platform=platform_of(bot), group=group,
        message_id=str(getattr(event, "message_id", "") or f"t{time.time_ns()}"),
        sender=str(event.get_user_id()), sender_name=str(name),
        timestamp=float(getattr(event, "time", None) or time.time()), text=text,
        reply_to=str(reply.message_id) if reply is not None else None,
        mentions=mentions, from_self=str(event.get_user_id()) == str(bot.self_id),
    )


def from_sent(bot: Any, api: str, data: dict[str, Any], result: Any) -> Message | None:
    """The record of a message the bot sent to a group (OneBot v11 ``send_group_msg``/``send_msg``)."""
    if api not in ("send_group_msg", "send_msg") or not isinstance(result, dict):
        return None
    if api == "send_msg" and data.get("message_type", "group" if data.get("group_id") else None) != "group":
        return None
    group, message_id = data.get("group_id"), result.get("message_id")
    if group is None or message_id is None:
        return None
    content = data.get("message", "")
    reply_to = None
    if isinstance(content, str):
        text, mentions = content, ()
    else:
        text, mentions = render(content)
        reply_to = next((str(s.data.get("id")) for s in content if s.type == "reply"), None)
    return Message(
        platform=platform_of(bot), group=str(group), message_id=str(message_id), sender=str(bot.self_id),
        sender_name="bot", timestamp=time.time(), text=text, reply_to=reply_to, mentions=mentions,
        from_self=True,
    )
