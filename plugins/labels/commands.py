"""/label: moderators review questions one by one (queue by the model's smallest margin, plus a random share),
label them a/b/c with an optional rewrite, undo, skip, look one up, and see statistics.

Permission: superusers, the group's owner and admins, and ``COREFBOT_MODERATORS``. In a group a moderator
reviews that group's questions; superusers and listed moderators in a private chat review every group's."""
from __future__ import annotations

import json
import random
import re
import time
import zlib
from dataclasses import dataclass, field

from nonebot import get_driver, on_command, on_message
from nonebot.adapters import Bot, Event, Message
from nonebot.matcher import Matcher
from nonebot.params import CommandArg

from corefbot.pipeline.labels.review import review_next
from corefbot.pipeline.labels.rows import item_id, labels_of, merged_of_item, set_label
from corefbot.pipeline.labels.stats import label_stats
from corefbot.pipeline.labels.undo import UndoConflict, undo_last
from corefbot.pipeline.store import Store
from corefbot.plugins.chatlog import fastpath
from corefbot.plugins.chatlog.capture import group_of, platform_of

from corefbot.plugins.common.database import db, purge
from corefbot.plugins.common.moderators import is_moderator
from corefbot.plugins.common.replies import traffic_keys

from . import runtime
from .texts import LETTER_LABEL, REFUSAL, USAGE, item_text, stats_text

Scope = tuple[str, str | None]  # (platform, group or None for every group)


@dataclass
class Session:
    """A moderator's review in one chat: the item on screen and what they skipped."""

    rng: random.Random
    current: str | None = None  # merged id
    skipped: set[str] = field(default_factory=set)
    touched: float = 0.0


_sessions: dict[tuple[str, str | None, str], Session] = {}
handler_ms: list[float] = []  # per command, event in → reply sent (benchmark)
db_ms: list[float] = []  # of which the database work on the writer, queueing included


def _scope(bot: Bot, event: Event) -> Scope:
    return platform_of(bot), group_of(event)


def _session(bot: Bot, event: Event) -> Session:
    platform, group = _scope(bot, event)
    key = (platform, group, str(event.get_user_id()))
    if key not in _sessions:
        _sessions[key] = Session(rng=random.Random(zlib.crc32(repr(key).encode())))  # stable across restarts
    session = _sessions[key]
    session.touched = runtime.now()
    return session


def _decision(store: Store, merged_id: str) -> tuple | None:
    row = store.db.conn.execute("SELECT decision, margin, rewrite FROM decisions WHERE merged_id = ?",
                                (merged_id,)).fetchone()
    return (row[0], row[1] or 0.0, row[2]) if row else None


def _in_scope(store: Store, merged_id: str, scope: Scope) -> bool:
    merged = store.get_merged(merged_id)
    return merged is not None and merged.platform == scope[0] and (scope[1] is None or merged.group == scope[1])


def _show(store: Store, merged_id: str, header: str = "") -> str:
    merged = store.get_merged(merged_id)
    if merged is None:
        return f"{header}that question is no longer stored"
    window = store.window_before(merged, runtime.config.corefbot_labels_show_window)
    return item_text(item_id(store, merged_id), merged, window, labels_of(store, merged_id),
                     _decision(store, merged_id), header=header)


def _next(store: Store, session: Session, scope: Scope, header: str = "") -> str:
    merged_id = review_next(store, rng=session.rng, random_share=runtime.config.corefbot_labels_random_share,
                            platform=scope[0], group=scope[1], exclude=session.skipped)
    session.current = merged_id
    if merged_id is None:
        return f"{header}nothing left to review here"
    return _show(store, merged_id, header)


def _label(store: Store, merged_id: str, letter: str, rewrite: str | None, labeler: str, at: float) -> str:
    if store.get_merged(merged_id) is None:
        return "that question is no longer stored (its author used /forgetme)"
    label = LETTER_LABEL[letter]
    if label != "needs":
        rewrite = None  # a rewrite only means something for a question that needs one
    old = labels_of(store, merged_id).get("moderator")
    set_label(store, merged_id, label, "moderator", labeler=labeler, rewrite=rewrite, at=at)
    was = f"{old.label} → " if old else ""
    return f"✓ #{item_id(store, merged_id)} {was}{label}" + (f" ({rewrite})" if rewrite else "")


_ID_LABEL = re.compile(r"^#?(\d+)\s+([abcABC])(?:\s+(.+))?$", re.S)
_LETTER = re.compile(r"^([abcABC])(?:\s+(.+))?$", re.S)
_SHOW = re.compile(r"^show\s+#?(\d+)$")

label_cmd = on_command("label", priority=5, block=True, force_whitespace=True)


@label_cmd.handle()
async def _label_command(bot: Bot, event: Event, matcher: Matcher, arg: Message = CommandArg()) -> None:
    started = time.perf_counter()
    if not await is_moderator(bot, event):
        await _reply(matcher, bot, event, REFUSAL, started)
        return
    text = arg.extract_plain_text().strip()
    user, scope, session = str(event.get_user_id()), _scope(bot, event), _session(bot, event)
    at = runtime.now()

    def work(store: Store) -> str:
        if text in ("", "next"):
            return _next(store, session, scope)
        if text == "skip":
            if session.current:
                session.skipped.add(session.current)
            return _next(store, session, scope, "skipped. ")
        if text == "undo":
            try:
                undone = undo_last(store, user, at=at)
            except UndoConflict:
                return "not undone: that label was changed since by someone else"
            if undone is None:
                return "nothing to undo"
            return f"undone #{item_id(store, undone.merged_id)}: {undone.undone} → {undone.restored or 'unlabelled'}"
        if text == "stats":
            s = label_stats(store, now=at, tz=runtime.limits.tz, platform=scope[0], group=scope[1])
            return stats_text(s)
        if m := _SHOW.match(text):
            merged_id = merged_of_item(store, int(m.group(1)))
            if merged_id is None or not _in_scope(store, merged_id, scope):
                return f"no item #{m.group(1)} here"
            return _show(store, merged_id)
        if m := _ID_LABEL.match(text):
            merged_id = merged_of_item(store, int(m.group(1)))
            if merged_id is None or not _in_scope(store, merged_id, scope):
                return f"no item #{m.group(1)} here"
            done = _label(store, merged_id, m.group(2).lower(), _rewrite(m.group(3)), user, at)
            return _next(store, session, scope, done + "\nnext: ")
        if m := _LETTER.match(text):
            if session.current is None:
                return "no item on screen: /label next"
            done = _label(store, session.current, m.group(1).lower(), _rewrite(m.group(2)), user, at)
            return _next(store, session, scope, done + "\nnext: ")
        return USAGE

    await _reply(matcher, bot, event, await _timed_db(work), started)


async def _timed_db(work) -> str:
    started = time.perf_counter()
    text = await db(work)
    db_ms.append((time.perf_counter() - started) * 1000)
    return text


def _rewrite(text: str | None) -> str | None:
    text = " ".join((text or "").split())
    return text or None


async def _reply(matcher: Matcher, bot: Bot, event: Event, text: str, started: float) -> None:
    sent = await matcher.send(text)
    handler_ms.append((time.perf_counter() - started) * 1000)
    await purge(traffic_keys(bot, event, sent))


async def _bare_answer_rule(bot: Bot, event: Event) -> bool:
    """A lone a/b/c from a moderator whose review item is on screen (recently).

    Runs for every message event, so it decides from the cheapest facts first: no review session at
    all (the usual case) answers False without reading the message. Events that carry no message
    (``get_plaintext`` raises for them) are not answers either, and not errors."""
    if not _sessions or event.get_type() != "message":
        return False
    try:
        text = event.get_plaintext().strip()
    except (ValueError, NotImplementedError):
        return False
    if len(text) != 1 or not _LETTER.match(text):
        return False  # "a lot of people…" is chat, not an answer: rewrites need the /label form
    key = (platform_of(bot), group_of(event), str(event.get_user_id()))
    session = _sessions.get(key)
    return (session is not None and session.current is not None
            and runtime.now() - session.touched <= runtime.config.corefbot_labels_session_s)


bare_answer = on_message(rule=_bare_answer_rule, priority=5, block=True)
# Without a moderator's review session on screen no event can be a bare answer: plain chat skips the rule.
fastpath.register(bare_answer, lambda event: bool(_sessions))


@bare_answer.handle()
async def _bare(bot: Bot, event: Event, matcher: Matcher) -> None:
    started = time.perf_counter()
    if not await is_moderator(bot, event):  # lost the role since
        return
    letter, user, scope, session = event.get_plaintext().strip().lower(), str(event.get_user_id()), \
        _scope(bot, event), _session(bot, event)
    at = runtime.now()

    def work(store: Store) -> str:
        if session.current is None:
            return "no item on screen: /label next"
        done = _label(store, session.current, letter, None, user, at)
        return _next(store, session, scope, done + "\nnext: ")

    await _reply(matcher, bot, event, await _timed_db(work), started)


@get_driver().on_shutdown
async def _write_timings() -> None:
    path = runtime.config.corefbot_labels_timings_file
    if path and handler_ms:
        path.write_text(json.dumps({"handler_ms": handler_ms, "db_ms": db_ms}))
