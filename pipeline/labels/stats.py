"""Label statistics for ``/label stats``: counts per label and source, member–moderator agreement."""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from typing import Iterable

from corefbot.pipeline.store import Store
from corefbot.pipeline.labels.rows import PRIORITY


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
    from corefbot.pipeline.metrics import cohen_kappa

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
