"""Labels: one row per (question, source), every change in the audit trail.

The effective label of a question is the moderator's if there is one, else the member's (when
member labels are used), else an imported one.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import get_args

from pipeline.records import Label, LabelSource
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
