"""When the bot may ask a member to confirm its reading: limits, quiet hours, share of voice."""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, tzinfo

from corefbot.pipeline.records import Merged
from corefbot.pipeline.store import Store


@dataclass(frozen=True, slots=True)
class ConfirmLimits:
    """When the bot may ask a member to confirm its reading. Defaults keep it far from a spam bot."""

    margin: float = 0.3  # ask when the resolver rewrote, or its top-two margin is below this
    per_group_day: int = 3  # prompts per group in any 24 h
    per_member_day: int = 1  # prompts per member in any 24 h
    per_1000: float = 8.0  # prompts per 1,000 messages of the group over the last 7 days (share of voice)
    group_gap_s: float = 900.0  # at least this long between two prompts in one group
    quiet: tuple[int, int] | None = (23 * 60, 8 * 60)  # local minutes [start, end) with no prompts
    tz: tzinfo | None = None  # for quiet hours; None: the server's local time
    expire_s: float = 1800.0  # answers after this are ignored


def parse_quiet_hours(text: str) -> tuple[int, int] | None:
    """``"23:00-08:00"`` (or ``"23-8"``) → minutes of the day; ``""`` → no quiet hours."""
    text = text.strip()
    if not text:
        return None
    match = re.fullmatch(r"(\d{1,2})(?::(\d\d))?\s*-\s*(\d{1,2})(?::(\d\d))?", text)
    if not match:
        raise ValueError(f"quiet hours {text!r}: expected HH:MM-HH:MM, e.g. 23:00-08:00")
    h1, m1, h2, m2 = (int(g or 0) for g in match.groups())
    if h1 > 24 or h2 > 24 or m1 > 59 or m2 > 59:
        raise ValueError(f"quiet hours {text!r}: hour or minute out of range")
    return h1 * 60 + m1, h2 * 60 + m2


def in_quiet_hours(now: float, limits: ConfirmLimits) -> bool:
    if limits.quiet is None:
        return False
    local = datetime.fromtimestamp(now, limits.tz or datetime.now().astimezone().tzinfo)
    minute = local.hour * 60 + local.minute
    start, end = limits.quiet
    return start <= minute < end if start <= end else (minute >= start or minute < end)


def wants_confirmation(decision: str, rewrite: str | None, margin: float, limits: ConfirmLimits) -> bool:
    """The resolver rewrote the question, or was unsure of it."""
    return (decision == "needs" and bool(rewrite)) or margin < limits.margin


def ask_refusal(store: Store, merged: Merged, now: float, limits: ConfirmLimits) -> str | None:
    """Why the author of ``merged`` may not be asked now (None: they may)."""
    conn = store.db.conn
    if merged.from_self:
        return "the bot's own message"
    if store.is_opted_out(merged.platform, merged.sender):
        return "member opted out"
    if conn.execute("SELECT 1 FROM label_prompts WHERE merged_id = ?", (merged.id,)).fetchone():
        return "asked before"
    if conn.execute("SELECT 1 FROM labels WHERE merged_id = ? AND source IN ('member', 'moderator')",
                    (merged.id,)).fetchone():
        return "already labelled"
    if in_quiet_hours(now, limits):
        return "quiet hours"
    day, week = now - 86_400, now - 7 * 86_400
    member = conn.execute("SELECT count(*) FROM label_prompts WHERE platform = ? AND author = ? AND asked_at > ?",
                          (merged.platform, merged.sender, day)).fetchone()[0]
    if member >= limits.per_member_day:
        return "member's daily limit"
    group = conn.execute(
        "SELECT count(*), max(asked_at) FROM label_prompts WHERE platform = ? AND group_id = ? AND asked_at > ?",
        (merged.platform, merged.group, day)).fetchone()
    if group[0] >= limits.per_group_day:
        return "group's daily limit"
    if group[1] is not None and now - group[1] < limits.group_gap_s:
        return "too soon after the last prompt in this group"
    prompts_week = conn.execute("SELECT count(*) FROM label_prompts WHERE platform = ? AND group_id = ? AND asked_at > ?",
                                (merged.platform, merged.group, week)).fetchone()[0]
    messages_week = conn.execute("SELECT count(*) FROM messages WHERE platform = ? AND group_id = ? AND timestamp > ?",
                                 (merged.platform, merged.group, week)).fetchone()[0]
    if (prompts_week + 1) * 1000 > limits.per_1000 * messages_week:
        return "group's share of bot messages"
    return None
