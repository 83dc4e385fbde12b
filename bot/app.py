"""Start NoneBot with the OneBot v11 adapter and corefbot's plugins.

Configuration comes from NoneBot's ``.env`` (HOST, PORT, SUPERUSERS, ONEBOT_ACCESS_TOKEN…) and
corefbot's ``COREFBOT_*`` keys. Defaults: the ASGI driver (reverse websocket at
``ws://127.0.0.1:8080/onebot/v11/ws``) plus an HTTP client driver.
"""
from __future__ import annotations

from typing import Any

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
    from nonebot.adapters.onebot.v11 import Adapter as OneBotV11

    # Values from .env / the environment win over our defaults; explicit overrides win over both.
    defaults = {k: v for k, v in DEFAULTS.items() if k.upper() not in os.environ and k not in os.environ}
    nonebot.init(**{**defaults, **overrides})
    nonebot.get_driver().register_adapter(OneBotV11)
    for plugin in PLUGINS:
        nonebot.load_plugin(plugin)


def run(**overrides: Any) -> None:
    import nonebot

    init(**overrides)
    nonebot.run()
