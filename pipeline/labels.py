"""Labels: one row per (question, source), every change in the audit trail.

The effective label of a question is the moderator's if there is one, else the member's (when
member labels are used), else an imported one.
"""
from __future__ import annotations

import json
import random
import re
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from typing import Iterable, Literal, get_args

from pipeline.records import Label, LabelSource, Merged
from pipeline.store import Store

PRIORITY: tuple[LabelSource, ...] = ("moderator", "member", "import")


@dataclass(frozen=True, slots=True)
class LabelRow:
    merged_id: str
    label: Label
    source: LabelSource
    rewrite: str | None = None
    labeler: str | None = None
    at: float = 0.0


def set_label(store: Store, merged_id: str, label: Label, source: LabelSource, *, labeler: str | None = None,
              rewrite: str | None = None, at: float | None = None) -> LabelRow:
    """Write (or overwrite) one source's label for a question, keeping the change in the audit trail."""
    if label not in get_args(Label):
        raise ValueError(f"unknown label {label!r}; expected one of {', '.join(get_args(Label))}")
    if source not in get_args(LabelSource):
        raise ValueError(f"unknown label source {source!r}")
    at = time.time() if at is None else at
    conn = store.db.conn
    with conn:
        old = conn.execute("SELECT label, rewrite FROM labels WHERE merged_id = ? AND source = ?",
                           (merged_id, source)).fetchone()
        conn.execute(
            "INSERT OR REPLACE INTO labels (merged_id, source, label, rewrite, labeler, at) VALUES (?, ?, ?, ?, ?, ?)",
            (merged_id, source, label, rewrite, labeler, at),
        )
        conn.execute(
            "INSERT INTO label_audit (merged_id, source, labeler, at, old_label, new_label, old_rewrite, new_rewrite)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (merged_id, source, labeler, at, old[0] if old else None, label, old[1] if old else None, rewrite),
        )
    return LabelRow(merged_id, label, source, rewrite, labeler, at)


def effective_labels(store: Store, *, use_member: bool = True) -> dict[str, LabelRow]:
    """Each labelled question's winning label (moderator > member > import)."""
    sources = [s for s in PRIORITY if use_member or s != "member"]
    best: dict[str, LabelRow] = {}
    rows = store.db.conn.execute("SELECT merged_id, label, source, rewrite, labeler, at FROM labels")
    for merged_id, label, source, rewrite, labeler, at in rows:
        if source not in sources:
            continue
        current = best.get(merged_id)
        if current is None or sources.index(source) < sources.index(current.source):
            best[merged_id] = LabelRow(merged_id, label, source, rewrite, labeler, at)
    return best


# ---- short item ids for moderators ------------------------------------------------------------

def item_id(store: Store, merged_id: str) -> int:
    """The short, typeable number a moderator uses for a question (made on first use, then stable)."""
    conn = store.db.conn
    row = conn.execute("SELECT id FROM label_items WHERE merged_id = ?", (merged_id,)).fetchone()
    if row:
        return row[0]
    # Never reuse a number (rows go with /forgetme): an old id typed later must not name another question.
    with conn:
        last = conn.execute("SELECT value FROM meta WHERE key = 'label_items_last'").fetchone()
        top = conn.execute("SELECT max(id) FROM label_items").fetchone()[0] or 0
        new = max(top, int(last[0]) if last else 0) + 1
        conn.execute("INSERT INTO label_items (id, merged_id) VALUES (?, ?)", (new, merged_id))
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('label_items_last', ?)", (str(new),))
        return new


def merged_of_item(store: Store, item: int) -> str | None:
    row = store.db.conn.execute("SELECT merged_id FROM label_items WHERE id = ?", (item,)).fetchone()
    return row[0] if row else None


def labels_of(store: Store, merged_id: str) -> dict[LabelSource, LabelRow]:
    """Every source's label for one question."""
    rows = store.db.conn.execute(
        "SELECT merged_id, label, source, rewrite, labeler, at FROM labels WHERE merged_id = ?", (merged_id,))
    return {r[2]: LabelRow(*r) for r in rows}


# ---- the review queue (active learning) -------------------------------------------------------

def review_next(store: Store, *, rng: random.Random, random_share: float = 0.2, platform: str | None = None,
                group: str | None = None, exclude: Iterable[str] = ()) -> str | None:
    """The next question for a moderator: usually the one the serving model was least sure of
    (smallest margin between its top two options; questions it never decided come after), with
    probability ``random_share`` a random one (the next eligible after a random point in storage order) so
    the labelled set stays representative.
    Questions a moderator labelled never come back; opted-out members' questions never appear."""
    where = ["m.is_question = 1", "m.from_self = 0",
             "NOT EXISTS (SELECT 1 FROM labels l WHERE l.merged_id = m.id AND l.source = 'moderator')",
             "NOT EXISTS (SELECT 1 FROM optout o WHERE o.platform = m.platform AND o.sender = m.sender)"]
    args: list = []
    if platform is not None:
        where.append("m.platform = ?")
        args.append(platform)
    if group is not None:
        where.append("m.group_id = ?")
        args.append(group)
    excluded = list(exclude)
    if excluded:
        where.append(f"m.id NOT IN ({','.join('?' * len(excluded))})")
        args.extend(excluded)
    cond = " AND ".join(where)
    conn = store.db.conn
    if rng.random() < random_share:
        # A random point in rowid order, then the first eligible question from there (wrapping around):
        # an index walk instead of counting every candidate.
        lo, hi = conn.execute("SELECT min(rowid), max(rowid) FROM merged").fetchone()
        if lo is None:
            return None
        start = rng.randint(lo, hi)
        for op in (">=", "<"):
            row = conn.execute(f"SELECT m.id FROM merged m NOT INDEXED WHERE m.rowid {op} ? AND {cond} "
                               "ORDER BY m.rowid LIMIT 1",
                               [start, *args]).fetchone()
            if row:
                return row[0]
        return None
    # Walk decisions by margin (indexed) and stop at the first eligible question; undecided ones come after.
    row = conn.execute(f"SELECT m.id FROM decisions d CROSS JOIN merged m ON m.id = d.merged_id WHERE {cond} "
                       "ORDER BY d.margin LIMIT 1", args).fetchone()
    if row is None:
        row = conn.execute(f"SELECT m.id FROM merged m WHERE {cond} AND NOT EXISTS "
                           "(SELECT 1 FROM decisions d WHERE d.merged_id = m.id AND d.margin IS NOT NULL) "
                           "ORDER BY m.timestamp LIMIT 1", args).fetchone()
    return row[0] if row else None


# ---- undo ---------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Undone:
    merged_id: str
    undone: Label  # the label the undone change had set
    restored: Label | None  # the label now in force for that source (None: the source has none again)


class UndoConflict(Exception):
    """The change to undo was overwritten since by someone else."""


def undo_last(store: Store, labeler: str, *, source: LabelSource = "moderator", at: float | None = None) -> Undone | None:
    """Revert ``labeler``'s most recent label change not yet undone (repeatable: each call goes one further
    back). The revert is itself an audit entry. None when there is nothing left to undo."""
    at = time.time() if at is None else at
    conn = store.db.conn
    row = conn.execute(
        "SELECT a.id, a.merged_id, a.old_label, a.new_label, a.old_rewrite, a.new_rewrite FROM label_audit a "
        "WHERE a.labeler = ? AND a.source = ? AND a.new_label IS NOT NULL "
        "AND a.id NOT IN (SELECT audit_id FROM label_undo) AND a.id NOT IN (SELECT undo_audit_id FROM label_undo) "
        "ORDER BY a.id DESC LIMIT 1", (labeler, source)).fetchone()
    if row is None:
        return None
    audit_id, merged_id, old_label, new_label, old_rewrite, new_rewrite = row
    current = conn.execute("SELECT label, rewrite FROM labels WHERE merged_id = ? AND source = ?",
                           (merged_id, source)).fetchone()
    if current is None or tuple(current) != (new_label, new_rewrite):
        raise UndoConflict(f"the {source} label of {merged_id} was changed since; not undoing it")
    with conn:
        if old_label is None:
            conn.execute("DELETE FROM labels WHERE merged_id = ? AND source = ?", (merged_id, source))
        else:
            conn.execute("UPDATE labels SET label = ?, rewrite = ?, labeler = ?, at = ? WHERE merged_id = ? AND source = ?",
                         (old_label, old_rewrite, labeler, at, merged_id, source))
        undo_audit = conn.execute(
            "INSERT INTO label_audit (merged_id, source, labeler, at, old_label, new_label, old_rewrite, new_rewrite)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (merged_id, source, labeler, at, new_label, old_label, new_rewrite, old_rewrite)).lastrowid
        conn.execute("INSERT INTO label_undo (audit_id, undo_audit_id, at) VALUES (?, ?, ?)", (audit_id, undo_audit, at))
    return Undone(merged_id, new_label, old_label)


# ---- statistics ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class LabelStats:
    by_label: dict[str, int]  # effective labels (moderator > member > import)
    by_source: dict[str, int]  # label rows per source
    kappa: float | None  # Cohen's kappa, member vs moderator, on questions both labelled (None: none)
    kappa_n: int
    today: dict[str, int]  # label rows set since local midnight, per source
    week: dict[str, int]  # … since Monday 00:00 local
    prompts: dict[str, int]  # member confirmation prompts per status


def _since(rows: Iterable[tuple[str, float]], start: float) -> dict[str, int]:
    out: dict[str, int] = {}
    for source, at in rows:
        if at is not None and at >= start:
            out[source] = out.get(source, 0) + 1
    return out


def label_stats(store: Store, *, now: float | None = None, tz: tzinfo | None = None,
                platform: str | None = None, group: str | None = None) -> LabelStats:
    """Counts per label and source, member-vs-moderator agreement, and what was labelled today / this week
    (calendar day and ISO week in ``tz``, the server's local time by default); optionally one group only."""
    from pipeline.metrics import cohen_kappa

    now = time.time() if now is None else now
    conn = store.db.conn
    scope, args = "", ()
    if group is not None:
        scope = " WHERE merged_id IN (SELECT id FROM merged WHERE platform = ? AND group_id = ?)"
        args = (platform or "", group)
    rows = conn.execute(f"SELECT merged_id, source, label, at FROM labels{scope}", args).fetchall()
    by_source: dict[str, int] = {}
    per_item: dict[str, dict[str, str]] = {}
    for merged_id, source, label, _ in rows:
        by_source[source] = by_source.get(source, 0) + 1
        per_item.setdefault(merged_id, {})[source] = label
    by_label: dict[str, int] = {}
    for labels in per_item.values():
        winner = next(labels[s] for s in PRIORITY if s in labels)
        by_label[winner] = by_label.get(winner, 0) + 1
    pairs = [(v["member"], v["moderator"]) for v in per_item.values() if "member" in v and "moderator" in v]
    kappa = cohen_kappa([a for a, _ in pairs], [b for _, b in pairs]) if pairs else None
    local = datetime.fromtimestamp(now, tz or datetime.now().astimezone().tzinfo)
    midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
    monday = midnight - timedelta(days=midnight.weekday())
    timed = [(source, at) for _, source, _, at in rows]
    pscope = " WHERE platform = ? AND group_id = ?" if group is not None else ""
    prompts = dict(conn.execute(f"SELECT status, count(*) FROM label_prompts{pscope} GROUP BY status", args).fetchall())
    return LabelStats(by_label, by_source, kappa, len(pairs), _since(timed, midnight.timestamp()),
                      _since(timed, monday.timestamp()), prompts)


# ---- member confirmation prompts ----------------------------------------------------------------

Reading = Literal["needs", "not_needed", "unknown"]
#: What a member's 1/2/3 means, given what the bot showed them: 1 confirms the reading, 2 is the other
#: decision, 3 is "not a question". An unsure reading is asked as "does this need earlier messages?".
ANSWERS: dict[Reading, dict[str, Label]] = {
    "needs": {"1": "needs", "2": "not_needed", "3": "not_question"},
    "unknown": {"1": "needs", "2": "not_needed", "3": "not_question"},
    "not_needed": {"1": "not_needed", "2": "needs", "3": "not_question"},
}
_DIGITS = str.maketrans("１２３", "123")
_ANSWER = re.compile(r"^(?:@\S+\s*)*([123])[\s。.!！]*$")


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


@dataclass(frozen=True, slots=True)
class Prompt:
    id: int
    platform: str
    group: str
    merged_id: str
    author: str
    reading: Reading
    rewrite: str | None
    asked_at: float
    expires_at: float
    status: str  # sending, open, answered, expired, failed
    prompt_message_id: str | None = None
    answer: str | None = None


_PROMPT_COLS = ("id, platform, group_id, merged_id, author, reading, rewrite, asked_at, expires_at, status, "
                "prompt_message_id, answer")


def reserve_prompt(store: Store, merged: Merged, reading: Reading, rewrite: str | None, now: float,
                   limits: ConfirmLimits) -> Prompt | str:
    """Check the limits and, if the author may be asked, reserve the prompt (status ``sending``) in one step
    on the writer, so two questions resolved at once cannot both pass a limit. Returns the refusal otherwise."""
    reason = ask_refusal(store, merged, now, limits)
    if reason is not None:
        return reason
    conn = store.db.conn
    with conn:
        pid = conn.execute(
            "INSERT INTO label_prompts (platform, group_id, merged_id, author, reading, rewrite, asked_at, expires_at,"
            " status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'sending')",
            (merged.platform, merged.group, merged.id, merged.sender, reading, rewrite, now,
             now + limits.expire_s)).lastrowid
    return Prompt(pid, merged.platform, merged.group, merged.id, merged.sender, reading, rewrite, now,
                  now + limits.expire_s, "sending")


def prompt_sent(store: Store, prompt_id: int, message_id: str | None) -> None:
    """The prompt went out (``message_id`` of the bot's message) or, with None, could not be sent."""
    with store.db.conn:
        store.db.conn.execute("UPDATE label_prompts SET prompt_message_id = ?, status = ? WHERE id = ?",
                              (message_id, "open" if message_id else "failed", prompt_id))


def get_prompt(store: Store, prompt_id: int) -> Prompt | None:
    row = store.db.conn.execute(f"SELECT {_PROMPT_COLS} FROM label_prompts WHERE id = ?", (prompt_id,)).fetchone()
    return Prompt(*row) if row else None


def parse_answer(text: str) -> str | None:
    """A member's 1/2/3 (full-width digits, a leading @mention and trailing punctuation allowed)."""
    match = _ANSWER.match(text.strip().translate(_DIGITS))
    return match.group(1) if match else None


@dataclass(frozen=True, slots=True)
class Answered:
    prompt: Prompt
    label: Label
    row: LabelRow


def answer_prompt(store: Store, *, platform: str, group: str, sender: str, text: str, reply_to: str | None,
                  now: float) -> Answered | None:
    """Record a member's answer when it is one: 1/2/3 from the prompt's author, as a reply to the prompt or bare
    (then for their latest prompt in this group), before it expires. A later answer within the expiry replaces
    the earlier one (the audit trail keeps both). None when the message is no answer."""
    answer = parse_answer(text)
    if answer is None:
        return None
    conn = store.db.conn
    if reply_to is not None:
        row = conn.execute(f"SELECT {_PROMPT_COLS} FROM label_prompts WHERE platform = ? AND group_id = ? "
                           "AND prompt_message_id = ?", (platform, group, reply_to)).fetchone()
    else:
        row = conn.execute(f"SELECT {_PROMPT_COLS} FROM label_prompts WHERE platform = ? AND group_id = ? "
                           "AND author = ? AND status IN ('open', 'answered') ORDER BY asked_at DESC LIMIT 1",
                           (platform, group, sender)).fetchone()
    if row is None:
        return None
    prompt = Prompt(*row)
    if prompt.author != sender or prompt.status not in ("open", "answered"):
        return None  # only the author's answer counts
    if now > prompt.expires_at:
        if prompt.status == "open":
            with conn:
                conn.execute("UPDATE label_prompts SET status = 'expired' WHERE id = ?", (prompt.id,))
        return None
    label = ANSWERS[prompt.reading][answer]
    row_ = set_label(store, prompt.merged_id, label, "member", labeler=sender,
                     rewrite=prompt.rewrite if label == "needs" else None, at=now)
    with conn:
        conn.execute("UPDATE label_prompts SET status = 'answered', answer = ?, answered_at = ? WHERE id = ?",
                     (answer, now, prompt.id))
    return Answered(prompt, label, row_)


def expire_prompts(store: Store, now: float) -> int:
    with store.db.conn:
        return store.db.conn.execute(
            "UPDATE label_prompts SET status = 'expired' WHERE status = 'open' AND expires_at < ?", (now,)).rowcount


def close_prompts_of(store: Store, platform: str, sender: str) -> int:
    """A member opted out: their open prompts no longer take answers."""
    with store.db.conn:
        return store.db.conn.execute(
            "UPDATE label_prompts SET status = 'expired' WHERE platform = ? AND author = ? AND status IN ('open', 'sending')",
            (platform, sender)).rowcount


# ---- forgetting a member ------------------------------------------------------------------------

FORGOTTEN = "forgotten"


@dataclass(frozen=True, slots=True)
class Forgotten:
    messages: int  # the member's own
    bot_messages: int  # the bot's messages quoting, mentioning or prompting them
    rows: dict[str, int]  # other rows deleted, per table


def forget_member(store: Store, platform: str, sender: str) -> Forgotten:
    """Delete everything stored of one member: their messages and merged queries, every row keyed by one
    of their questions in any table with a ``merged_id`` column (labels, audit, decisions, outbox, prompts…),
    the bot's messages that quoted, @-mentioned or prompted them, and their name as labeler elsewhere."""
    conn = store.db.conn
    own_ids = {(g, mid) for g, mid in conn.execute(
        "SELECT group_id, message_id FROM messages WHERE platform = ? AND sender = ?", (platform, sender))}
    prompted = {(g, mid) for g, mid in conn.execute(
        "SELECT group_id, prompt_message_id FROM label_prompts WHERE platform = ? AND author = ? "
        "AND prompt_message_id IS NOT NULL", (platform, sender))}
    bot_keys: set[str] = set()
    for key, group, message_id, reply_to, mentions in conn.execute(
            "SELECT key, group_id, message_id, reply_to, mentions FROM messages WHERE platform = ? AND from_self = 1",
            (platform,)):
        if ((group, reply_to) in own_ids or (group, message_id) in prompted
                or (mentions and sender in json.loads(mentions))):
            bot_keys.add(key)
    bot_runs = {mid for mid, ids in conn.execute(
        "SELECT id, message_ids FROM merged WHERE platform = ? AND from_self = 1", (platform,))
        if bot_keys.intersection(json.loads(ids))} if bot_keys else set()
    rows = store.delete_merged(bot_runs)
    with conn:
        n = conn.execute("DELETE FROM label_prompts WHERE platform = ? AND author = ?", (platform, sender)).rowcount
        if n:
            rows["label_prompts"] = rows.get("label_prompts", 0) + n
        for table in ("labels", "label_audit"):
            conn.execute(f"UPDATE [{table}] SET labeler = ? WHERE labeler = ?", (FORGOTTEN, sender))
        conn.executemany("DELETE FROM messages WHERE key = ?", [(k,) for k in bot_keys])
    messages, own_rows = store.forget_member(platform, sender)
    for table, n in own_rows.items():
        rows[table] = rows.get(table, 0) + n
    return Forgotten(messages, len(bot_keys), rows)


# ---- label traffic out of the chat log ----------------------------------------------------------

def purge_messages(store: Store, keys: Iterable[str]) -> set[tuple[str, str]]:
    """Take label traffic (commands, 1/2/3 answers, the bot's prompts and item displays) out of the chat log:
    it is about the data, not part of the conversation, and an item display repeats other members' words.
    A merged run that held such a message is rebuilt from its remaining messages (or deleted when none
    remain). Returns the (platform, group) pairs touched, whose open run the live merger must reload."""
    conn = store.db.conn
    touched: set[tuple[str, str]] = set()
    with conn:
        for key in keys:
            row = conn.execute("SELECT platform, group_id FROM messages WHERE key = ?", (key,)).fetchone()
            if row is None:
                continue
            platform, group = row
            touched.add((platform, group))
            conn.execute("DELETE FROM messages WHERE key = ?", (key,))
            runs = conn.execute("SELECT id, message_ids FROM merged WHERE platform = ? AND group_id = ? "
                                "AND message_ids LIKE ?", (platform, group, f'%{json.dumps(key)}%')).fetchall()
            for run_id, ids_json in runs:
                ids = [k for k in json.loads(ids_json) if k != key]
                rest = [conn.execute("SELECT text, timestamp FROM messages WHERE key = ?", (k,)).fetchone() for k in ids]
                rest = [r for r in rest if r is not None]
                if not rest:
                    conn.execute("DELETE FROM merged WHERE id = ?", (run_id,))
                    continue
                conn.execute("UPDATE merged SET text = ?, timestamp = ?, end_timestamp = ?, message_ids = ? WHERE id = ?",
                             ("\n".join(r[0] for r in rest), rest[0][1], rest[-1][1], json.dumps(ids), run_id))
    return touched
