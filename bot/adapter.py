"""The OneBot v11 adapter, with plain chat lines captured before NoneBot dispatches them.

Profiled during a burst (py-spy on ``python -m corefbot``), once matchers were out of the way
(plugins/chatlog/fastpath.py) NoneBot's dispatch of each event to the capture preprocessor — dependency
solving inside anyio task groups, then the "ignored" exception — was still ~45% of the bot's CPU. A group
line made of text alone that no loaded matcher could take gains nothing from that dispatch, so the adapter
hands it to capture (:func:`plugins.chatlog.handlers.capture_without_dispatch`, which decides) as it is
parsed, and NoneBot never schedules it. Everything else is dispatched exactly as by the stock adapter.
"""
from __future__ import annotations

from typing import Any

from nonebot.adapters.onebot.v11 import Adapter as OneBotV11Adapter
from nonebot.adapters.onebot.v11 import Event


class Adapter(OneBotV11Adapter):
    @classmethod
    def json_to_event(cls, json_data: Any) -> Event | None:
        event = super().json_to_event(json_data)
        if event is None or getattr(event, "post_type", None) != "message":
            return event
        try:
            from corefbot.plugins.chatlog.handlers import capture_without_dispatch
        except ImportError:  # the chatlog plugin is not loaded: nothing to shortcut
            return event
        return None if capture_without_dispatch(event) else event
