"""``/corefbot health``: what capture and the outbox have done since start, so nothing is lost silently.

Shows the writer's counters (stored, duplicates, shed for a full queue, failed writes, sanitised and
bounded messages, orphans repaired at start, queue depth), websocket disconnects, and the outbox by
status with the give-up notices. Moderators only (the labels plugin's rule when it is loaded, else
superusers and the group's owner and admins).

Also here: the log bound. NoneBot logs every received event in full; one 950 kB paste became a 950 kB
log line. A loguru patcher cuts every record's message to ``COREFBOT_MAX_LOG_CHARS`` with a marker.
"""
from __future__ import annotations

import time
from typing import Any

from nonebot import get_driver, get_plugin_config, logger, on_command
from nonebot.adapters import Bot, Event, Message
from nonebot.matcher import Matcher
from nonebot.params import CommandArg

from corefbot.pipeline.sanitize import bounded_middle
from corefbot.pipeline.store import Store
from corefbot.plugins.common.moderators import is_moderator

from .config import Config
from .handlers import get_recorder
from .recorder import Recorder

_started = time.time()
disconnects: list[tuple[float, str]] = []  # (when, bot id): a dropped OneBot connection


def install_log_patch(max_chars: int) -> None:
    """Cut every log record's message (ours, NoneBot's event lines, std logging routed to loguru) to
    ``max_chars`` (0: no bound), and make NoneBot's "Event message… is ignored" line, which the capture
    fast path (fastpath.py) causes for every plain chat line, a DEBUG line: at the default INFO level it
    doubled the log and cost a tenth of the event loop's time during a burst. NoneBot's own line for
    each received event (SUCCESS) is kept."""

    # NoneBot installs its own patcher (it names each record after its plugin); loguru holds one per
    # core, so ours calls it first rather than replacing it.
    previous = getattr(getattr(logger, "_core", None), "patcher", None)

    def patch(record: dict[str, Any]) -> None:
        if previous is not None:
            previous(record)
        message = record["message"]
        if record["level"].no == _INFO and message.startswith("Event message") and message.endswith(" is ignored"):
            debug = logger.level("DEBUG")
            record["level"] = type(record["level"])(debug.name, debug.no, debug.icon)  # loguru's record level
        if 0 < max_chars < len(message):
            record["message"] = bounded_middle(message, max_chars)

    logger.configure(patcher=patch)


_INFO = logger.level("INFO").no


def outbox_counts(store: Store) -> tuple[dict[str, int], dict[str, int]]:
    """The outbox (owned by the resolver plugin) by status, and its give-up notices by state."""
    if "outbox" not in store.db.table_names():
        return {}, {}
    status = dict(store.db.conn.execute("SELECT status, count(*) FROM outbox GROUP BY status").fetchall())
    notices = dict(store.db.conn.execute(
        "SELECT notice, count(*) FROM outbox WHERE notice IS NOT NULL GROUP BY notice").fetchall())
    return status, notices


def health_text(recorder: Recorder, status: dict[str, int], notices: dict[str, int], now: float) -> str:
    h = recorder.health()
    lost = h.dropped + h.failed
    lines = [
        f"corefbot health ({'LOSING MESSAGES' if lost else 'ok'}; up {(now - _started) / 60:.0f} min)",
        f"capture: {h.stored} stored, {h.duplicates} duplicates, {h.dropped} shed (queue full), "
        f"{h.failed} failed writes; queue {h.queued}/{h.queue_size}",
        f"cleaned: {h.sanitized} with lone surrogates, {h.truncated} oversized (bounded copies), "
        f"{h.orphans_repaired} orphans attached at start",
        f"connection: {len(disconnects)} disconnect(s)"
        + (f", last {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(disconnects[-1][0]))}" if disconnects else ""),
    ]
    if status or notices:
        order = ("pending", "answered", "replying", "delivered", "failed", "expired")
        lines.append("outbox: " + ", ".join(f"{status.get(s, 0)} {s}" for s in order)
                     + f"; unavailable notices: {notices.get('sent', 0)} sent, {notices.get('due', 0)} due, "
                       f"{notices.get('failed', 0)} failed")
    return "\n".join(lines)


health_cmd = on_command("corefbot", priority=5, block=True, force_whitespace=True)


@health_cmd.handle()
async def _health(bot: Bot, event: Event, matcher: Matcher, arg: Message = CommandArg()) -> None:
    if arg.extract_plain_text().strip() not in ("health", ""):
        await matcher.send("usage: /corefbot health")
        return
    if not await is_moderator(bot, event):
        await matcher.send("/corefbot health is for moderators.")
        return
    recorder = get_recorder()
    status, notices = await recorder.call(outbox_counts)
    await matcher.send(health_text(recorder, status, notices, time.time()))


driver = get_driver()


@driver.on_bot_disconnect
async def _disconnected(bot: Bot) -> None:
    disconnects.append((time.time(), str(bot.self_id)))
    logger.error(f"corefbot: the chat connection of bot {bot.self_id} closed ({len(disconnects)} so far); "
                 "events sent meanwhile are not received until the client reconnects")


# Log lines are bounded from the moment the plugin loads (NoneBot's own event lines included).
install_log_patch(get_plugin_config(Config).corefbot_max_log_chars)
