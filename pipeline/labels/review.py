"""The moderators' review queue (active learning): which question to show next."""
from __future__ import annotations

import random
from typing import Iterable

from corefbot.pipeline.store import Store


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
