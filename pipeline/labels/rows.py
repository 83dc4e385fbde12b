"""Label rows: one per (question, source), every change in the audit trail, and short item ids.

The effective label of a question is the moderator's if there is one, else the member's (when
member labels are used), else an imported one.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import get_args

from corefbot.pipeline.records import Label, LabelSource
from corefbot.pipeline.store import Store


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
