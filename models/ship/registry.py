"""The model registry: every exported model version, which one serves, and how it got there.

Rows live in the ``model_versions`` table (pipeline/store.py migrations 2 and 3). A version is
``candidate`` when registered, ``serving`` once promoted (exactly one at a time), ``retired`` when a
newer one replaced it, ``rolled_back`` when it was withdrawn, ``rejected`` when the promotion gate
refused it. Every change happens in one transaction, so a crash never leaves two serving versions
or none where there was one.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from corefbot.pipeline.store import Store

Status = Literal["candidate", "serving", "retired", "rolled_back", "rejected"]
STATUSES: tuple[Status, ...] = ("candidate", "serving", "retired", "rolled_back", "rejected")
_COLS = "id, created_at, status, gguf_path, run_dir, base, metrics, note, promoted_at, quant"


class RegistryError(ValueError):
    """A registry action that cannot be done (unknown version, nothing to roll back to)."""


@dataclass(frozen=True, slots=True)
class ModelVersion:
    id: int
    created_at: float
    status: Status
    gguf_path: str
    run_dir: str
    base: str
    metrics: dict[str, Any]
    note: str
    promoted_at: float | None
    quant: str | None

    @property
    def f1(self) -> float | None:
        """The test-split decision F1 (mean over option orders) recorded at registration."""
        value = self.metrics.get("test_f1")
        return float(value) if value is not None else None


def _version(row: tuple) -> ModelVersion:
    return ModelVersion(id=row[0], created_at=row[1], status=row[2], gguf_path=row[3] or "",
                        run_dir=row[4] or "", base=row[5] or "", metrics=json.loads(row[6] or "{}"),
                        note=row[7] or "", promoted_at=row[8], quant=row[9])


def register(store: Store, *, gguf_path: str | Path, run_dir: str | Path = "", base: str | Path = "",
             metrics: dict[str, Any] | None = None, quant: str | None = None, note: str = "",
             status: Status = "candidate") -> ModelVersion:
    """Add a version (a candidate unless told otherwise; ``serving`` promotes it at once)."""
    if status not in STATUSES:
        raise RegistryError(f"unknown model status {status!r}; choose one of {', '.join(STATUSES)}")
    with store.db.conn:
        cur = store.db.conn.execute(
            "INSERT INTO model_versions (created_at, status, gguf_path, run_dir, base, metrics, note, quant) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (time.time(), "candidate" if status == "serving" else status, str(gguf_path), str(run_dir),
             str(base), json.dumps(metrics or {}, ensure_ascii=False), note, quant),
        )
        vid = int(cur.lastrowid)
    if status == "serving":
        return promote(store, vid)
    return get(store, vid)


def _check_servable(version: ModelVersion) -> None:
    """A version's model (a GGUF, or a run folder with its adapter or merged GGUF) must be loadable."""
    from corefbot.models.serve.llama import served_model

    if not version.gguf_path:
        raise RegistryError(f"model version {version.id}: no model path recorded")
    try:
        served_model(version.gguf_path)
    except (FileNotFoundError, ValueError) as exc:
        raise RegistryError(f"model version {version.id}: {exc}") from None


def get(store: Store, version_id: int) -> ModelVersion:
    row = store.db.conn.execute(f"SELECT {_COLS} FROM model_versions WHERE id = ?", (version_id,)).fetchone()
    if row is None:
        raise RegistryError(f"no model version {version_id}")
    return _version(row)


def serving(store: Store) -> ModelVersion | None:
    row = store.db.conn.execute(
        f"SELECT {_COLS} FROM model_versions WHERE status = 'serving' ORDER BY promoted_at DESC, id DESC LIMIT 1"
    ).fetchone()
    return _version(row) if row else None


def history(store: Store, limit: int = 20) -> list[ModelVersion]:
    """Newest first."""
    rows = store.db.conn.execute(f"SELECT {_COLS} FROM model_versions ORDER BY id DESC LIMIT ?", (limit,))
    return [_version(r) for r in rows]


def set_status(store: Store, version_id: int, status: Status, note: str | None = None) -> ModelVersion:
    """Mark a non-serving version (``rejected`` by the promotion gate, for instance)."""
    if status == "serving":
        return promote(store, version_id)
    if status not in STATUSES:
        raise RegistryError(f"unknown model status {status!r}; choose one of {', '.join(STATUSES)}")
    current = get(store, version_id)
    if current.status == "serving":
        raise RegistryError(f"model version {version_id} is serving: promote another or roll back first")
    with store.db.conn:
        store.db.conn.execute("UPDATE model_versions SET status = ?, note = ? WHERE id = ?",
                              (status, current.note if note is None else note, version_id))
    return get(store, version_id)


def promote(store: Store, version_id: int) -> ModelVersion:
    """Make ``version_id`` the serving version; the one serving before is retired."""
    target = get(store, version_id)
    _check_servable(target)
    with store.db.conn:
        store.db.conn.execute("UPDATE model_versions SET status = 'retired' WHERE status = 'serving' AND id != ?",
                              (version_id,))
        store.db.conn.execute("UPDATE model_versions SET status = 'serving', promoted_at = ? WHERE id = ?",
                              (time.time(), version_id))
    return get(store, version_id)


def rollback(store: Store) -> ModelVersion:
    """Withdraw the serving version and serve again the one it replaced (the most recently retired)."""
    current = serving(store)
    if current is None:
        raise RegistryError("no model version is serving: nothing to roll back")
    row = store.db.conn.execute(
        f"SELECT {_COLS} FROM model_versions WHERE status = 'retired' AND id != ? "
        "ORDER BY promoted_at DESC, id DESC LIMIT 1", (current.id,)
    ).fetchone()
    if row is None:
        raise RegistryError(f"model version {current.id} is the only one that ever served: nothing to roll back to")
    previous = _version(row)
    _check_servable(previous)
    with store.db.conn:
        store.db.conn.execute("UPDATE model_versions SET status = 'rolled_back' WHERE id = ?", (current.id,))
        store.db.conn.execute("UPDATE model_versions SET status = 'serving', promoted_at = ? WHERE id = ?",
                              (time.time(), previous.id))
    return get(store, previous.id)
