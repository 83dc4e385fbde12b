"""Start NoneBot with the OneBot v11 adapter and corefbot's plugins.

Configuration comes from NoneBot's ``.env`` (HOST, PORT, SUPERUSERS, ONEBOT_ACCESS_TOKEN…) and
corefbot's ``COREFBOT_*`` keys. Defaults: the ASGI driver (reverse websocket at
``ws://127.0.0.1:8080/onebot/v11/ws``) plus an HTTP client driver.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from corefbot.plugins.common.settings import ChatlogSettings

PLUGINS = [
    "corefbot.plugins.chatlog",
    "corefbot.plugins.resolver",
    "corefbot.plugins.labels",
    "corefbot.plugins.nightly",
]
DEFAULTS: dict[str, Any] = {"driver": "~fastapi+~aiohttp", "host": "127.0.0.1", "port": 8080}


def init(**overrides: Any) -> None:
    import os

    import nonebot

    from corefbot.adapter import Adapter as OneBotV11  # captures plain chat lines before dispatch (bot/adapter.py)

    # Values from .env / the environment win over our defaults; explicit overrides win over both.
    defaults = {k: v for k, v in DEFAULTS.items() if k.upper() not in os.environ and k not in os.environ}
    nonebot.init(**{**defaults, **overrides})
    _log_at_level(nonebot.get_driver().config.log_level)
    nonebot.get_driver().register_adapter(OneBotV11)
    for plugin in PLUGINS:
        nonebot.load_plugin(plugin)


def _log_at_level(level: int | str) -> None:
    """NoneBot's log handler takes every level and drops records below LOG_LEVEL in a filter, so each of
    its several DEBUG calls per event built a full record (time formatting included) only to discard it:
    a tenth of the event loop's time in a burst. The same handler with LOG_LEVEL as its level lets
    loguru return at once for those calls; what is printed does not change."""
    import sys

    from nonebot.log import default_filter, default_format, logger, logger_id

    logger.remove(logger_id)
    logger.add(sys.stdout, level=level, diagnose=False, filter=default_filter, format=default_format)


def keepalive(settings: "ChatlogSettings") -> dict[str, float | None]:
    """uvicorn's websocket keep-alive from COREFBOT_WS_PING_INTERVAL_S / COREFBOT_WS_PING_TIMEOUT_S.

    uvicorn's own default (20 s ping, 20 s to answer) closed the OneBot connection with 1011 during a
    10,000-message burst: while NoneBot works through a backlog, the pong waits behind it, and every
    event the client sent after the close was lost. The pong only has to arrive eventually; a dead peer is
    still noticed, after the timeout (0 turns pinging off)."""
    interval, timeout = settings.corefbot_ws_ping_interval_s, settings.corefbot_ws_ping_timeout_s
    return {"ws_ping_interval": interval or None, "ws_ping_timeout": timeout or None}


def run(**overrides: Any) -> None:
    import nonebot

    init(**overrides)
    from corefbot.plugins.common.settings import ChatlogSettings

    nonebot.run(**keepalive(nonebot.get_plugin_config(ChatlogSettings)))
