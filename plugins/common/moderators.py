"""Who may label and steer the model: superusers, the group's owner and admins, and ``COREFBOT_MODERATORS``."""
from __future__ import annotations

from nonebot import get_plugin_config
from nonebot.adapters import Bot, Event
from nonebot.permission import SUPERUSER

from corefbot.plugins.chatlog.capture import group_of

from .settings import LabelsSettings

config = get_plugin_config(LabelsSettings)


async def is_moderator(bot: Bot, event: Event) -> bool:
    if await SUPERUSER(bot, event):
        return True
    if str(event.get_user_id()) in config.corefbot_moderators:
        return True
    role = getattr(getattr(event, "sender", None), "role", None)
    return group_of(event) is not None and role in ("owner", "admin")
