"""Undoing a moderator's last label, unless someone changed it since."""
from __future__ import annotations

import time
from dataclasses import dataclass

from corefbot.pipeline.records import Label, LabelSource
from corefbot.pipeline.store import Store


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
