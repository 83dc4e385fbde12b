"""The durable outbox: one SQLite row per question forwarded to the assistant.

Every function here takes the writer thread's :class:`Store` (call them through
``get_recorder().call``). A row moves through::

    pending ──ask ok──▶ answered ──claim──▶ replying ──posted──▶ delivered
       │  ╰─ask failed (retryable)─▶ pending, attempts+1, next_at = now + backoff
       ├─ask failed (permanent, or the attempt cap — a safety valve far beyond the age limit)─▶ failed
       ╰─older than max age (pending or answered)─▶ expired

Retrying is bounded by the item's age (``COREFBOT_OUTBOX_MAX_AGE_S``), not by a count of attempts: an
assistant outage of minutes must not lose the questions asked meanwhile. An item that gives up without
an answer (failed while asking, or expired while pending) owes its asker one short notice that the
assistant is unavailable (column ``notice``: due ──claim──▶ sending ──▶ sent | failed; a notice found
in ``sending`` at start-up is marked failed, never posted twice).

Delivered, failed and expired rows are deleted once the keep period has passed (:func:`purge_finished`).

``merged_id`` is UNIQUE, so a question is queued once however many times its run is updated. Every
transition is a guarded UPDATE (``WHERE status = <expected>``) so a row expired or claimed meanwhile is
never acted on twice. ``history`` (other members' recent messages, sent along to the json API) is
cleared as soon as the assistant has answered or the item has given up: it is kept only while needed.
A row found in ``replying`` at start-up was interrupted while the reply was
being posted: it is marked failed and not re-sent, because it may already be in the group (never twice
beats at-least-once for a chat reply).
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from typing import Literal, Sequence

from corefbot.pipeline.store import Store

Status = Literal["pending", "answered", "replying", "delivered", "failed", "expired"]
_COLS = ("id, merged_id, platform, group_id, self_id, reply_to, asker, question, query, history, status, "
         "attempts, next_at, created_at, answer, error")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    base_s: float = 2.0
    max_s: float = 300.0
    max_attempts: int = 1000  # a safety valve only: the age limit ends retrying long before
    max_age_s: float = 3600.0

    def delay(self, attempts: int) -> float:
        """Exponential backoff after ``attempts`` failed attempts, capped, with up to 10% jitter so
        items that failed together do not all retry in the same instant."""
        d = min(self.base_s * 2 ** max(attempts - 1, 0), self.max_s)
        return d * (1 + 0.1 * random.random())


@dataclass(frozen=True, slots=True)
class OutboxItem:
    id: int
    merged_id: str
    platform: str
    group: str
    self_id: str
    reply_to: str  # message id of the asker's line the answer quotes
    asker: str
    question: str  # as asked
    query: str  # what is forwarded (the accepted rewrite, or the question)
    history: list[dict]
    status: Status
    attempts: int
    next_at: float
    created_at: float
    answer: str | None = None
    error: str | None = None


def _item(row: Sequence) -> OutboxItem:
    return OutboxItem(
        id=row[0], merged_id=row[1], platform=row[2], group=row[3], self_id=row[4] or "", reply_to=row[5] or "",
        asker=row[6] or "", question=row[7] or "", query=row[8] or "", history=json.loads(row[9] or "[]"),
        status=row[10], attempts=row[11] or 0, next_at=row[12] or 0.0, created_at=row[13] or 0.0,
        answer=row[14], error=row[15],
    )


def enqueue(store: Store, *, merged_id: str, platform: str, group: str, self_id: str, reply_to: str, asker: str,
            question: str, query: str, history: list[dict], delay_s: float = 0.0, now: float | None = None) -> int | None:
    """Queue a question, first attempt ``delay_s`` from now; returns the new row id, or None when this
    question was queued before."""
    now = time.time() if now is None else now
    with store.db.conn:
        cur = store.db.conn.execute(
            "INSERT OR IGNORE INTO outbox (merged_id, platform, group_id, self_id, reply_to, asker, question, query, "
            "history, status, attempts, next_at, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', 0, ?, ?, ?)",
            (merged_id, platform, group, self_id, reply_to, asker, question, query,
             json.dumps(history, ensure_ascii=False), now + delay_s, now, now),
        )
        return cur.lastrowid if cur.rowcount else None


def get(store: Store, item_id: int) -> OutboxItem | None:
    row = store.db.conn.execute(f"SELECT {_COLS} FROM outbox WHERE id = ?", (item_id,)).fetchone()
    return _item(row) if row else None


def is_queued(store: Store, merged_id: str) -> bool:
    return store.db.conn.execute("SELECT 1 FROM outbox WHERE merged_id = ?", (merged_id,)).fetchone() is not None


def expire_old(store: Store, max_age_s: float, now: float | None = None) -> int:
    """Mark undelivered items older than ``max_age_s`` expired; returns how many."""
    now = time.time() if now is None else now
    with store.db.conn:
        cur = store.db.conn.execute(
            "UPDATE outbox SET status = 'expired', updated_at = ?, history = NULL, "
            "notice = CASE WHEN status = 'pending' THEN 'due' ELSE notice END, "
            "error = coalesce(error || '; ', '') || 'expired after ' || ? || ' s undelivered' "
            "WHERE status IN ('pending', 'answered') AND created_at < ?",
            (now, int(max_age_s), now - max_age_s),
        )
        return cur.rowcount


def purge_finished(store: Store, keep_s: float, now: float | None = None) -> int:
    """Delete delivered, failed and expired items last changed more than ``keep_s`` ago; returns how many.

    Finished rows hold members' questions and the assistant's answers; kept forever they only grow the
    database. A purged question cannot come back: its run closed long ago (the merge gap is seconds)."""
    now = time.time() if now is None else now
    with store.db.conn:
        return store.db.conn.execute(
            "DELETE FROM outbox WHERE status IN ('delivered', 'failed', 'expired') AND updated_at < ?",
            (now - keep_s,)).rowcount


def due(store: Store, now: float | None = None, limit: int = 32) -> tuple[list[OutboxItem], float | None]:
    """Items whose next attempt is due (pending: ask the assistant; answered: post the reply), oldest
    first, and the earliest ``next_at`` among the rest (None when nothing else is waiting)."""
    now = time.time() if now is None else now
    rows = store.db.conn.execute(
        f"SELECT {_COLS} FROM outbox WHERE status IN ('pending', 'answered') AND next_at <= ? "
        "ORDER BY next_at, id LIMIT ?", (now, limit)).fetchall()
    later = store.db.conn.execute(
        "SELECT min(next_at) FROM outbox WHERE status IN ('pending', 'answered') AND next_at > ?", (now,)).fetchone()[0]
    return [_item(r) for r in rows], later


def record_failure(store: Store, item_id: int, error: str, *, retryable: bool, policy: RetryPolicy,
                   now: float | None = None) -> Status:
    """Count a failed assistant attempt: schedule the retry, or mark the item failed/expired."""
    now = time.time() if now is None else now
    row = store.db.conn.execute("SELECT attempts, created_at FROM outbox WHERE id = ? AND status = 'pending'",
                                (item_id,)).fetchone()
    if row is None:
        return "failed"  # expired or handled meanwhile; nothing to schedule
    attempts = (row[0] or 0) + 1
    next_at = now + policy.delay(attempts)
    if not retryable:
        status: Status = "failed"
    elif attempts >= policy.max_attempts:
        status, error = "failed", f"gave up after {attempts} attempts; last error: {error}"
    elif next_at - row[1] > policy.max_age_s:
        # The next try would come after the item's deadline.
        status, error = "expired", f"expired: undelivered within {policy.max_age_s:g} s; last error: {error}"
    else:
        status = "pending"
    with store.db.conn:
        store.db.conn.execute(
            "UPDATE outbox SET status = ?, attempts = ?, next_at = ?, error = ?, updated_at = ?, "
            "history = CASE WHEN ? = 'pending' THEN history END, "
            "notice = CASE WHEN ? = 'pending' THEN notice ELSE 'due' END "
            "WHERE id = ? AND status = 'pending'", (status, attempts, next_at, error, now, status, status, item_id))
    return status


def record_answer(store: Store, item_id: int, answer: str, now: float | None = None) -> bool:
    """pending → answered; False when the item is no longer pending (expired meanwhile)."""
    now = time.time() if now is None else now
    with store.db.conn:
        cur = store.db.conn.execute(
            "UPDATE outbox SET status = 'answered', answer = ?, attempts = attempts + 1, error = NULL, "
            "history = NULL, next_at = ?, updated_at = ? WHERE id = ? AND status = 'pending'", (answer, now, now, item_id))
        return cur.rowcount == 1


def claim_reply(store: Store, item_id: int, now: float | None = None) -> bool:
    """answered → replying, just before the reply is posted: only one poster can win."""
    now = time.time() if now is None else now
    with store.db.conn:
        cur = store.db.conn.execute(
            "UPDATE outbox SET status = 'replying', updated_at = ? WHERE id = ? AND status = 'answered'", (now, item_id))
        return cur.rowcount == 1


def release_reply(store: Store, item_id: int, retry_at: float, reason: str) -> None:
    """replying → answered: nothing was sent (no bot connected yet); try again at ``retry_at``."""
    with store.db.conn:
        store.db.conn.execute(
            "UPDATE outbox SET status = 'answered', next_at = ?, error = ?, updated_at = ? "
            "WHERE id = ? AND status = 'replying'", (retry_at, reason, time.time(), item_id))


def record_delivered(store: Store, item_id: int, reply_message_id: str | None, now: float | None = None) -> None:
    now = time.time() if now is None else now
    with store.db.conn:
        store.db.conn.execute(
            "UPDATE outbox SET status = 'delivered', delivered_at = ?, reply_message_id = ?, error = NULL, "
            "updated_at = ? WHERE id = ? AND status = 'replying'", (now, reply_message_id, now, item_id))


def record_reply_failed(store: Store, item_id: int, error: str) -> None:
    """The chat app refused the reply or the link broke mid-send: failed, not retried (it may be posted)."""
    with store.db.conn:
        store.db.conn.execute(
            "UPDATE outbox SET status = 'failed', error = ?, updated_at = ? WHERE id = ? AND status = 'replying'",
            (error, time.time(), item_id))


def recover(store: Store) -> int:
    """At start-up: items left in ``replying`` by a crash are failed, never re-posted; so are notices left
    in ``sending``. Returns how many replies were interrupted."""
    with store.db.conn:
        cur = store.db.conn.execute(
            "UPDATE outbox SET status = 'failed', updated_at = ?, "
            "error = 'interrupted while posting the reply; not re-sent (it may already be in the group)' "
            "WHERE status = 'replying'", (time.time(),))
        store.db.conn.execute("UPDATE outbox SET notice = 'failed' WHERE notice = 'sending'")
        return cur.rowcount


def notices_due(store: Store, limit: int = 32) -> list[OutboxItem]:
    """Items that gave up without an answer and have not told their asker yet, oldest first."""
    rows = store.db.conn.execute(f"SELECT {_COLS} FROM outbox WHERE notice = 'due' ORDER BY id LIMIT ?",
                                 (limit,)).fetchall()
    return [_item(r) for r in rows]


def claim_notice(store: Store, item_id: int) -> bool:
    """due → sending, just before the notice is posted: only one poster can win."""
    with store.db.conn:
        return store.db.conn.execute("UPDATE outbox SET notice = 'sending' WHERE id = ? AND notice = 'due'",
                                     (item_id,)).rowcount == 1


def finish_notice(store: Store, item_id: int, outcome: Literal["sent", "failed", "due"]) -> None:
    """sending → sent, failed (never retried: it may be in the group), or due again (nothing was sent)."""
    with store.db.conn:
        store.db.conn.execute("UPDATE outbox SET notice = ? WHERE id = ? AND notice = 'sending'", (outcome, item_id))


def counts(store: Store) -> dict[str, int]:
    return dict(store.db.conn.execute("SELECT status, count(*) FROM outbox GROUP BY status").fetchall())


def notice_counts(store: Store) -> dict[str, int]:
    return dict(store.db.conn.execute(
        "SELECT notice, count(*) FROM outbox WHERE notice IS NOT NULL GROUP BY notice").fetchall())
