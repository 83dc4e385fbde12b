"""``corefbot import``: a historical chat log, or labelled data in the unified format.

Chat log: JSON lines, one raw message each — ``group, sender, text, timestamp`` (Unix seconds)
required, ``id``, ``reply_to``, ``sender_name`` optional — in any order (``build`` sorts them).
Labelled data: the unified format of ``shared/data`` (``needs_rewrite`` tells them apart); each row
becomes a tiny group (its context, then the query) with an ``import`` label on the query.

A bad line is reported with its line number and skipped; with ``strict`` the whole file is rejected
and nothing is written. Re-importing is idempotent: messages are keyed by id (or, without one, by a
hash of group, sender, time and text).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corefbot.pipeline.examples import DataError, iter_jsonl, unified_example
from corefbot.pipeline.labels.rows import set_label
from corefbot.pipeline.records import Message
from corefbot.pipeline.store import Store

IMPORT_PLATFORM = "import"
_UNIFIED_TURN_GAP_S = 60.0  # turns of an imported dialogue never merge


@dataclass
class ImportReport:
    path: str
    format: str = "chatlog"
    lines: int = 0
    added: int = 0
    duplicates: int = 0
    labels: int = 0
    errors: list[str] = field(default_factory=list)


def _field_str(obj: dict, key: str, where: str, *, required: bool = True) -> str | None:
    value = obj.get(key)
    if type(value) is str:  # the common case first: imports run at tens of thousands of lines a second
        return value
    if value is None:
        if required:
            raise DataError(f"{where}: missing field {key!r}")
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return str(value)


def chatlog_message(obj: dict, where: str, platform: str = IMPORT_PLATFORM) -> Message:
    """Validate one chat-log line; raises :class:`DataError` naming the line and field."""
    group = _field_str(obj, "group", where)
    sender = _field_str(obj, "sender", where)
    text = obj.get("text")
    if type(text) is not str:
        if "text" not in obj:
            raise DataError(f"{where}: missing field 'text'")
        raise DataError(f"{where}: field 'text' must be a string, got {type(text).__name__}")
    ts = obj.get("timestamp")
    if type(ts) not in (int, float) or not math.isfinite(ts) or ts < 0:
        if "timestamp" not in obj:
            raise DataError(f"{where}: missing field 'timestamp'")
        raise DataError(f"{where}: field 'timestamp' must be Unix seconds (a number), got {ts!r}")
    mid = _field_str(obj, "id", where, required=False)
    if mid is None:
        digest = hashlib.sha1(f"{group}\x00{sender}\x00{ts!r}\x00{text}".encode()).hexdigest()[:16]
        mid = f"h{digest}"
    return Message(
        platform=platform, group=group, message_id=mid, sender=sender, timestamp=float(ts), text=text,  # type: ignore[arg-type]
        sender_name=str(obj.get("sender_name") or ""), reply_to=_field_str(obj, "reply_to", where, required=False),
    )


def import_jsonl(store: Store, path: str | Path, *, strict: bool = False, progress: bool = False,
                 batch: int = 20_000) -> ImportReport:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    report = ImportReport(path=str(path))
    lines: Any = iter_jsonl(path)
    if progress:
        from tqdm import tqdm

        lines = tqdm(lines, desc=f"import {path.name}", unit="line", leave=False)
    name = str(path)
    messages: list[Message] = []
    labels: list[tuple[str, str, str | None]] = []
    for lineno, obj in lines:
        report.lines += 1
        where = f"{name}:{lineno}"
        try:
            if isinstance(obj, DataError):
                raise obj
            if report.lines == 1 and "needs_rewrite" in obj:
                report.format = "unified"
            if report.format == "unified":
                row_messages, label = _unified_messages(obj, where)
                messages.extend(row_messages)
                labels.append(label)
            else:
                messages.append(chatlog_message(obj, where))
        except DataError as exc:
            if strict:
                raise DataError(f"{exc} (nothing imported: --strict)") from None
            report.errors.append(str(exc))
            continue
        if not strict and len(messages) >= batch:
            _flush(store, messages, report)
    _flush(store, messages, report)
    for merged_id, label, rewrite in labels:
        if _label_changed(store, merged_id, label, rewrite):
            set_label(store, merged_id, label, "import", labeler="import", rewrite=rewrite)  # type: ignore[arg-type]
            report.labels += 1
    return report


def _flush(store: Store, messages: list[Message], report: ImportReport) -> None:
    added = store.insert_messages(messages)
    report.added += added
    report.duplicates += len(messages) - added
    messages.clear()


def _unified_messages(obj: dict, where: str) -> tuple[list[Message], tuple[str, str, str | None]]:
    example = unified_example(obj, where)
    group = f"{example.conversation.split(':', 1)[1]}#{obj['id']}"
    source = example.id.split(":", 1)[0]
    turns = [*example.window, example.question]
    messages = [
        Message(platform=IMPORT_PLATFORM, group=f"{source}:{group}", message_id=str(i), sender=t.sender,
                timestamp=i * _UNIFIED_TURN_GAP_S, text=t.text)
        for i, t in enumerate(turns)
    ]
    return messages, (messages[-1].key, example.label, example.rewrite)


def _label_changed(store: Store, merged_id: str, label: str, rewrite: str | None) -> bool:
    row = store.db.conn.execute(
        "SELECT label, rewrite FROM labels WHERE merged_id = ? AND source = 'import'", (merged_id,)).fetchone()
    return row is None or tuple(row) != (label, rewrite)


