"""Capture: an event preprocessor (runs before any matcher, so none can block it) and an API hook for
the bot's own messages. Both only turn the event into a record and queue it for the writer."""
from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import nonebot_plugin_localstore as localstore
from nonebot import get_driver, get_plugin_config, logger
from nonebot.utils import escape_tag
from nonebot.adapters import Bot, Event
from nonebot.exception import IgnoredException
from nonebot.message import _event_preprocessors, event_preprocessor

from corefbot.pipeline.question import QuestionFilter
from corefbot.plugins.common.settings import DB_FILE

from . import fastpath
from .capture import from_event, from_sent, group_of
from .config import Config
from .recorder import Recorder

config = get_plugin_config(Config)
_recorder: Recorder | None = None


def db_path():
    return config.corefbot_db or localstore.get_data_file(*DB_FILE)


def get_recorder() -> Recorder:
    """The running recorder (started with the driver)."""
    if _recorder is None:
        raise RuntimeError("the chatlog recorder is not running (NoneBot driver not started)")
    return _recorder


driver = get_driver()


@driver.on_startup
async def _start() -> None:
    global _recorder
    _recorder = Recorder(
        db_path(), gap_s=config.corefbot_merge_gap_s, window=config.corefbot_window,
        question_filter=QuestionFilter(config.corefbot_question_threshold, config.corefbot_min_chars),
        queue_size=config.corefbot_queue_size, max_text_chars=config.corefbot_max_text_chars,
    )
    try:
        _recorder.start()
    except RuntimeError as exc:  # a corrupt or unopenable database: say it plainly, then refuse to start
        logger.critical(str(exc))
        raise
    logger.info(f"corefbot chatlog recording to {_recorder.db_path}")


@driver.on_shutdown
async def _stop() -> None:
    if _recorder is None:
        return
    _recorder.stop()
    if config.corefbot_timings_file and _recorder.handler_ms:
        config.corefbot_timings_file.write_text(json.dumps(
            {"handler_ms": list(_recorder.handler_ms), "dropped": _recorder.dropped}))


def _capture(bot: Bot, event: Event) -> bool:
    """Queue the event's record for the writer; True when it was a group message that was queued."""
    if _recorder is None:
        return False
    started = time.perf_counter()
    try:
        message = from_event(bot, event)
    except Exception as exc:  # noqa: BLE001 - an odd event must not break other handlers
        logger.warning(f"chatlog: could not read event {event.get_event_name()}: {exc!r}")
        return False
    if message is None:
        return False
    _recorder.submit(message)
    _recorder.handler_ms.append((time.perf_counter() - started) * 1000)
    return True


#: group -> its messages handed to NoneBot's dispatch by the adapter and not captured yet. A line captured
#: straight from the adapter must not overtake them: the concat rule reads each group in arrival order.
_dispatching: Counter[str] = Counter()


@event_preprocessor
async def _record_event(bot: Bot, event: Event) -> None:
    group = group_of(event)
    if group is not None and _dispatching[group] > 0:
        _dispatching[group] -= 1
    if _capture(bot, event) and fastpath.can_skip(event, len(_event_preprocessors)):
        fastpath.skipped += 1
        raise IgnoredException("no matcher can take this chat line")  # recorded above; see fastpath.py


def capture_without_dispatch(event: Event) -> bool:
    """For the adapter (bot/adapter.py): capture a plain chat line that NoneBot's dispatch could do nothing
    more with, before it is dispatched at all; False (dispatch it as usual) for anything else.

    Only a group message made of text segments alone qualifies (no reply to fetch, no @ to strip, so the
    OneBot bot's own pre-dispatch checks would not change it), with no bot nicknames configured (a line
    starting with one is addressed to the bot), from a connected bot, and only when no loaded matcher or
    other preprocessor could take it (:func:`fastpath.can_skip`). NoneBot's own log line for the event is
    written as NoneBot writes it."""
    from nonebot import get_bots
    from nonebot.adapters.onebot.v11 import GroupMessageEvent

    if _recorder is None or not isinstance(event, GroupMessageEvent):
        return False
    group = str(event.group_id)
    bot = get_bots().get(str(event.self_id))
    if (_dispatching[group] or not event.message or any(seg.type != "text" for seg in event.message)
            or bot is None or bot.config.nickname or not fastpath.can_skip(event, len(_event_preprocessors))):
        _dispatching[group] += 1  # dispatched: captured by the preprocessor, which counts it back
        return False
    event.message.reduce()
    logger.opt(colors=True).success(f"<m>{escape_tag(bot.type)} {escape_tag(bot.self_id)}</m> | "
                                    f"{event.get_log_string()}")
    if not _capture(bot, event):
        return False
    fastpath.skipped += 1
    return True


@Bot.on_called_api
async def _record_sent(bot: Bot, exception: Exception | None, api: str, data: dict[str, Any], result: Any) -> None:
    if _recorder is None or exception is not None or not config.corefbot_record_self:
        return
    try:
        message = from_sent(bot, api, data, result)
    except Exception as exc:  # noqa: BLE001
        logger.warning(f"chatlog: could not read sent message ({api}): {exc!r}")
        return
    if message is not None:
        _recorder.submit(message)
