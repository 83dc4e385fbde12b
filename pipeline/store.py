"""The SQLite store: schema, migrations, and the typed reads and writes the rest of corefbot uses.

One database file per deployment, WAL journal with a busy timeout so the bot (one writer) and the
CLI or nightly job (readers, short writers) never hold each other up for long.
Migrations are an append-only list; ``PRAGMA user_version`` records how many have run.
"""
from __future__ import annotations

import hashlib
import secrets
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import orjson
import sqlite_utils

from corefbot.pipeline.records import Merged, Message

BUSY_TIMEOUT_MS = 10_000


def _m1_core(db: sqlite_utils.Database) -> None:
    db["meta"].create({"key": str, "value": str}, pk="key")
    db["messages"].create(
        {
            "key": str, "platform": str, "group_id": str, "message_id": str, "sender": str,
            "sender_name": str, "timestamp": float, "text": str, "reply_to": str,
            "mentions": str, "from_self": int,
        },
        pk="key",
    )
    db["messages"].create_index(["platform", "group_id", "timestamp"])
    db["messages"].create_index(["platform", "sender"])
    db["merged"].create(
        {
            "id": str, "platform": str, "group_id": str, "sender": str, "sender_name": str,
            "text": str, "timestamp": float, "end_timestamp": float, "message_ids": str,
            "reply_to": str, "mentions": str, "from_self": int, "question_score": float,
            "is_question": int,
        },
        pk="id",
    )
    db["merged"].create_index(["platform", "group_id", "timestamp"])
    db["merged"].create_index(["platform", "sender"])
    db["optout"].create({"platform": str, "sender": str, "at": float}, pk=("platform", "sender"))


def _m2_labels_models(db: sqlite_utils.Database) -> None:
    # One row per (question, source): the effective label is moderator > member > import.
    db["labels"].create(
        {"merged_id": str, "source": str, "label": str, "rewrite": str, "labeler": str, "at": float},
        pk=("merged_id", "source"),
    )
    db["label_audit"].create(
        {
            "id": int, "merged_id": str, "source": str, "labeler": str, "at": float,
            "old_label": str, "new_label": str, "old_rewrite": str, "new_rewrite": str,
        },
        pk="id",
    )
    db["label_audit"].create_index(["merged_id"])
    # What the serving resolver decided for a question, with its per-option confidence.
    db["decisions"].create(
        {
            "merged_id": str, "backend": str, "decision": str, "p_needs": float,
            "p_not_needed": float, "p_unknown": float, "margin": float, "rewrite": str,
            "forwarded": str, "at": float,
        },
        pk="merged_id",
    )
    db["model_versions"].create(
        {
            "id": int, "created_at": float, "status": str, "gguf_path": str, "run_dir": str,
            "base": str, "metrics": str, "note": str,
        },
        pk="id",
    )


def _m3_model_versions_promotion(db: sqlite_utils.Database) -> None:
    # When a version last started serving (rollback returns to the one retired most recently) and its quant.
    db["model_versions"].add_column("promoted_at", float)
    db["model_versions"].add_column("quant", str)


def _m4_outbox(db: sqlite_utils.Database) -> None:
    # The resolver plugin's durable outbox: one row per forwarded question (merged_id UNIQUE: never twice).
    db["outbox"].create(
        {
            "id": int, "merged_id": str, "platform": str, "group_id": str, "self_id": str, "reply_to": str,
            "asker": str, "question": str, "query": str, "history": str, "status": str, "attempts": int,
            "next_at": float, "created_at": float, "updated_at": float, "delivered_at": float,
            "answer": str, "error": str, "reply_message_id": str,
        },
        pk="id", not_null={"merged_id", "status"}, defaults={"attempts": 0},
    )
    db["outbox"].create_index(["merged_id"], unique=True)
    db["outbox"].create_index(["status", "next_at"])
    # What the decision was made from and how: the question as resolved, gate, rejected rewrite, latency.
    for column, kind in (("question", str), ("gated", int), ("rejected_rewrite", str), ("reject_reason", str),
                         ("latency_ms", float)):
        db["decisions"].add_column(column, kind)


def _m5_label_prompts_items(db: sqlite_utils.Database) -> None:
    # Member confirmation prompts: one per question ever (never the same message twice); limits count them.
    db["label_prompts"].create(
        {
            "id": int, "platform": str, "group_id": str, "merged_id": str, "author": str,
            "prompt_message_id": str, "reading": str, "rewrite": str, "asked_at": float,
            "expires_at": float, "answered_at": float, "answer": str, "status": str,
        },
        pk="id",
    )
    db["label_prompts"].create_index(["merged_id"], unique=True)
    db["label_prompts"].create_index(["platform", "group_id", "asked_at"])
    db["label_prompts"].create_index(["platform", "author", "asked_at"])
    db["label_prompts"].create_index(["platform", "group_id", "prompt_message_id"])
    # Short, typeable ids for moderators ("/label 12 b"): merged rowids change on every upsert.
    db["label_items"].create({"id": int, "merged_id": str}, pk="id")
    db["label_items"].create_index(["merged_id"], unique=True)
    # Which audit entries a moderator's "/label undo" reverted (and the audit entry of the revert).
    db["label_undo"].create({"audit_id": int, "undo_audit_id": int, "at": float}, pk="audit_id")


def _m6_nightly_runs(db: sqlite_utils.Database) -> None:
    # One row per nightly retraining run (models/nightly.py): outcome, F1 before/after, summary. label_cutoff
    # is the newest label time the run trained on: "new labels" for the next run are those after it.
    db["nightly_runs"].create(
        {
            "id": int, "started_at": float, "finished_at": float, "status": str, "trigger": str, "pid": int,
            "run_dir": str, "labels": int, "new_labels": int, "label_cutoff": float, "f1_before": float,
            "f1_after": float, "baseline": str, "version_id": int, "reason": str, "summary": str, "report": str,
        },
        pk="id",
    )
    db["nightly_runs"].create_index(["status"])


def _m7_decisions_margin_index(db: sqlite_utils.Database) -> None:
    # The review queue walks decisions by margin (smallest first) and stops at the first eligible question.
    db["decisions"].create_index(["margin"])


def _m8_drop_messages_sender_index(db: sqlite_utils.Database) -> None:
    # Every imported or captured message paid for this index (a third of a bulk import's insert
    # time); only /forgetme and stats read by sender, and a scan serves those rare calls.
    db.conn.execute("DROP INDEX IF EXISTS idx_messages_platform_sender")


def _m9_outbox_notice(db: sqlite_utils.Database) -> None:
    # An outbox item that gave up tells its asker once: NULL (nothing to tell), due, sending, sent, failed.
    db["outbox"].add_column("notice", str)
    db["outbox"].create_index(["notice"])


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [_m1_core, _m2_labels_models, _m3_model_versions_promotion,
                                                        _m4_outbox, _m5_label_prompts_items, _m6_nightly_runs,
                                                        _m7_decisions_margin_index, _m8_drop_messages_sender_index,
                                                        _m9_outbox_notice]


def connect(path: str | Path) -> sqlite_utils.Database:
    """Open (creating folders as needed) and migrate the database at ``path`` (":memory:" works)."""
    if str(path) != ":memory:":
        Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
    db = sqlite_utils.Database(conn)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    if str(path) != ":memory:":
        conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    # Imports arrive in any order, so index inserts are random: a 64 MB page cache keeps them in memory.
    conn.execute("PRAGMA cache_size = -65536")
    migrate(db)
    return db


def quick_check(path: str | Path) -> list[str]:
    """``PRAGMA quick_check`` of an existing database file: [] when sound, else SQLite's complaints
    (also when the file cannot be read as a database at all). Reads every page once, without
    checking indexes against tables: seconds for gigabytes."""
    try:
        conn = sqlite3.connect(f"file:{Path(path).expanduser()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
    except sqlite3.Error as exc:
        return [str(exc)]
    try:
        rows = [str(r[0]) for r in conn.execute("PRAGMA quick_check(20)")]
    except sqlite3.DatabaseError as exc:
        return [str(exc)]
    finally:
        conn.close()
    return [] if rows == ["ok"] else rows


def migrate(db: sqlite_utils.Database) -> int:
    """Run the migrations not yet applied; returns the schema version."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    for i, step in enumerate(MIGRATIONS[version:], start=version + 1):
        with db.conn:
            step(db)
            db.conn.execute(f"PRAGMA user_version = {i}")
    return len(MIGRATIONS)


def _dumps(value: object) -> str:
    return orjson.dumps(value).decode()


# ---- rows <-> records -----------------------------------------------------------------------

def _message_row(m: Message) -> tuple:
    return (
        m.key, m.platform, m.group, m.message_id, m.sender, m.sender_name, m.timestamp, m.text,
        m.reply_to, _dumps(list(m.mentions)) if m.mentions else None, int(m.from_self),
    )


def _message(row: sqlite3.Row | tuple) -> Message:
    return Message(
        platform=row[1], group=row[2], message_id=row[3], sender=row[4], sender_name=row[5] or "",
        timestamp=row[6], text=row[7], reply_to=row[8],
        mentions=tuple(orjson.loads(row[9])) if row[9] else (), from_self=bool(row[10]),
    )


_MESSAGE_COLS = "key, platform, group_id, message_id, sender, sender_name, timestamp, text, reply_to, mentions, from_self"
_MERGED_COLS = (
    "id, platform, group_id, sender, sender_name, text, timestamp, end_timestamp, message_ids, "
    "reply_to, mentions, from_self, question_score, is_question"
)


def _merged_row(m: Merged) -> tuple:
    return (
        m.id, m.platform, m.group, m.sender, m.sender_name, m.text, m.timestamp, m.end_timestamp,
        _dumps(m.message_ids), m.reply_to, _dumps(list(m.mentions)) if m.mentions else None,
        int(m.from_self), m.question_score, int(m.is_question),
    )


def _merged(row: sqlite3.Row | tuple) -> Merged:
    return Merged(
        id=row[0], platform=row[1], group=row[2], sender=row[3], sender_name=row[4] or "",
        text=row[5], timestamp=row[6], end_timestamp=row[7], message_ids=orjson.loads(row[8]),
        reply_to=row[9], mentions=tuple(orjson.loads(row[10])) if row[10] else (),
        from_self=bool(row[11]), question_score=row[12], is_question=bool(row[13]),
    )


class Store:
    """Typed access to one corefbot database. Not thread-safe: give each thread its own."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.db = connect(path)

    def close(self) -> None:
        self.db.conn.close()

    # ---- messages ----
    def insert_messages(self, messages: Iterable[Message]) -> int:
        """Insert, ignoring keys already stored (imports are idempotent). Returns rows added."""
        # Sorted by key, the primary-key index is appended to rather than updated at random: 2× faster.
        rows = sorted(_message_row(m) for m in messages)
        with self.db.conn:
            before = self.db.conn.total_changes
            self.db.conn.executemany(
                f"INSERT OR IGNORE INTO messages ({_MESSAGE_COLS}) VALUES ({','.join('?' * 11)})", rows
            )
            return self.db.conn.total_changes - before

    def record_message(self, message: Message, run_of: Callable[[Message], Merged]) -> Merged | None:
        """Store one captured message and the run it belongs to atomically: a crash or an error leaves
        neither or both, never a message that is in no run. ``run_of`` (the concat rule) is called only
        for a new message; returns the stored run, or None when the message was already stored.

        Outside a transaction this commits; inside :meth:`transaction` it is a savepoint of it."""
        conn = self.db.conn
        own = not conn.in_transaction
        conn.execute("SAVEPOINT record_message")
        try:
            cur = conn.execute(
                f"INSERT OR IGNORE INTO messages ({_MESSAGE_COLS}) VALUES ({','.join('?' * 11)})",
                _message_row(message))
            run = None
            if cur.rowcount:
                run = run_of(message)
                conn.execute(f"INSERT OR REPLACE INTO merged ({_MERGED_COLS}) VALUES ({','.join('?' * 14)})",
                             _merged_row(run))
        except BaseException:
            conn.execute("ROLLBACK TO record_message")
            conn.execute("RELEASE record_message")
            raise
        conn.execute("RELEASE record_message")  # the outermost savepoint: this commits
        assert not own or not conn.in_transaction
        return run

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One transaction around several writes (the writer's batch of queued messages: one commit
        instead of one per message). Rolled back if the block raises."""
        conn = self.db.conn
        conn.execute("BEGIN")
        try:
            yield
        except BaseException:
            conn.rollback()
            raise
        conn.commit()

    def orphan_messages(self) -> list[Message]:
        """Messages that belong to no merged run (left by a crash of an older version between its two
        commits, or a half-finished repair), in pipeline order."""
        rows = self.db.conn.execute(
            f"SELECT {_MESSAGE_COLS} FROM messages WHERE key NOT IN "
            "(SELECT j.value FROM merged, json_each(merged.message_ids) AS j) "
            "ORDER BY platform, group_id, timestamp, rowid").fetchall()
        return [_message(r) for r in rows]

    def iter_messages(self, platform: str | None = None, group: str | None = None) -> Iterator[Message]:
        """Messages in pipeline order: by platform, group, then time (ties by arrival)."""
        where, args = _group_filter(platform, group)
        sql = f"SELECT {_MESSAGE_COLS} FROM messages {where} ORDER BY platform, group_id, timestamp, rowid"
        for row in self.db.conn.execute(sql, args):
            yield _message(row)

    def count(self, table: str) -> int:
        return self.db.conn.execute(f"SELECT count(*) FROM [{table}]").fetchone()[0]

    # ---- merged queries ----
    def upsert_merged(self, merged: Sequence[Merged]) -> None:
        with self.db.conn:
            self.db.conn.executemany(
                f"INSERT OR REPLACE INTO merged ({_MERGED_COLS}) VALUES ({','.join('?' * 14)})",
                [_merged_row(m) for m in merged],
            )

    def replace_merged(self, merged: Sequence[Merged], platform: str | None = None, group: str | None = None) -> None:
        """Replace every merged row (of one group, or all) by ``merged``, in one transaction."""
        where, args = _group_filter(platform, group)
        with self.db.conn:
            self.db.conn.execute(f"DELETE FROM merged {where}", args)
            self.db.conn.executemany(
                f"INSERT INTO merged ({_MERGED_COLS}) VALUES ({','.join('?' * 14)})",
                [_merged_row(m) for m in merged],
            )

    def get_merged(self, merged_id: str) -> Merged | None:
        row = self.db.conn.execute(f"SELECT {_MERGED_COLS} FROM merged WHERE id = ?", (merged_id,)).fetchone()
        return _merged(row) if row else None

    def iter_merged(self, platform: str | None = None, group: str | None = None) -> Iterator[Merged]:
        where, args = _group_filter(platform, group)
        sql = f"SELECT {_MERGED_COLS} FROM merged {where} ORDER BY platform, group_id, timestamp, rowid"
        for row in self.db.conn.execute(sql, args):
            yield _merged(row)

    def last_merged(self, platform: str, group: str) -> Merged | None:
        row = self.db.conn.execute(
            f"SELECT {_MERGED_COLS} FROM merged WHERE platform = ? AND group_id = ? "
            "ORDER BY timestamp DESC, rowid DESC LIMIT 1",
            (platform, group),
        ).fetchone()
        return _merged(row) if row else None

    def window_before(self, merged: Merged, size: int) -> list[Merged]:
        """The ``size`` merged messages of the same group just before ``merged``, oldest first."""
        rows = self.db.conn.execute(
            f"SELECT {_MERGED_COLS} FROM merged WHERE platform = ? AND group_id = ? "
            "AND timestamp < ? ORDER BY timestamp DESC, rowid DESC LIMIT ?",
            (merged.platform, merged.group, merged.timestamp, size),
        ).fetchall()
        return [_merged(r) for r in reversed(rows)]

    # ---- members who opted out ----
    def opt_out(self, platform: str, sender: str) -> None:
        with self.db.conn:
            self.db.conn.execute(
                "INSERT OR REPLACE INTO optout (platform, sender, at) VALUES (?, ?, ?)",
                (platform, sender, time.time()),
            )

    def opt_in(self, platform: str, sender: str) -> None:
        with self.db.conn:
            self.db.conn.execute("DELETE FROM optout WHERE platform = ? AND sender = ?", (platform, sender))

    def is_opted_out(self, platform: str, sender: str) -> bool:
        return self.db.conn.execute(
            "SELECT 1 FROM optout WHERE platform = ? AND sender = ?", (platform, sender)).fetchone() is not None

    def opted_out(self) -> set[tuple[str, str]]:
        return {(p, s) for p, s in self.db.conn.execute("SELECT platform, sender FROM optout")}

    def delete_merged(self, merged_ids: Iterable[str]) -> dict[str, int]:
        """Delete merged runs and every row keyed by them (any table with a ``merged_id`` column:
        labels, audit, decisions, outbox, prompts…). Returns the rows deleted per table."""
        doomed = [(i,) for i in set(merged_ids)]
        rows: dict[str, int] = {}
        with self.db.conn:
            for table in self.db.table_names():
                if table != "merged" and "merged_id" in {c.name for c in self.db[table].columns}:
                    n = sum(self.db.conn.execute(f"DELETE FROM [{table}] WHERE merged_id = ?", d).rowcount
                            for d in doomed)
                    if n:
                        rows[table] = n
            self.db.conn.executemany("DELETE FROM merged WHERE id = ?", doomed)
        return rows

    # ---- deployment metadata ----
    def meta(self, key: str) -> str | None:
        row = self.db.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self.db.conn:
            self.db.conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def salt(self) -> str:
        """The deployment's pseudonymisation salt, made once and kept in the database."""
        salt = self.meta("salt")
        if salt is None:
            salt = secrets.token_hex(16)
            self.set_meta("salt", salt)
        return salt


def pseudonym(salt: str, platform: str, sender: str) -> str:
    """A stable, salted pseudonym: the same member gets the same id in every export of a deployment."""
    return "u" + hashlib.sha256(f"{salt}\x00{platform}\x00{sender}".encode()).hexdigest()[:12]


def _group_filter(platform: str | None, group: str | None) -> tuple[str, tuple]:
    if group is not None:
        return "WHERE platform = ? AND group_id = ?", (platform or "", group)
    if platform is not None:
        return "WHERE platform = ?", (platform,)
    return "", ()
