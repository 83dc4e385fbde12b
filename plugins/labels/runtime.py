"""Shared state of the labels plugin: settings and the clock."""
from __future__ import annotations

import time
from typing import Callable

from nonebot import get_plugin_config

from corefbot.pipeline.labels.limits import ConfirmLimits

from .config import Config

config = get_plugin_config(Config)
limits: ConfirmLimits = config.limits()
#: The clock every limit, expiry and "today" reads; tests replace it to move time.
clock: Callable[[], float] = time.time


def now(event_time: float | None = None) -> float:
    """The time limits and expiry are judged at: the clock, or the message's time with COREFBOT_LABELS_CLOCK=event."""
    if event_time is not None and config.corefbot_labels_clock == "event":
        return event_time
    return clock()
