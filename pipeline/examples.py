"""Load labelled examples from the two formats corefbot reads and writes.

- the unified format of ``shared/data`` (one JSON object per line: ``source, id, lang, split,
  context, query, rewrite, needs_rewrite``), for public sets and hand-written cases;
- corefbot's alpaca export, whose rows carry the structured example next to the rendered prompt.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from corefbot.pipeline.records import Example, Turn

UNIFIED_FIELDS = ("id", "context", "query", "needs_rewrite")


class DataError(ValueError):
    """A data file is malformed; the message names the file and line."""


def unified_example(row: dict, where: str = "row") -> Example:
    """One unified-format row as an :class:`Example`.

    The format has no senders, so turns alternate between two speakers counted back from the
    question: the turn just before it is the other party's (an answer), the one before that the
    asker's, as in the two-party dialogues these sets come from.
    """
    for key in UNIFIED_FIELDS:
        if key not in row:
            raise DataError(f"{where}: missing field {key!r}")
    context, query = row["context"], row["query"]
    if not isinstance(context, list) or not all(isinstance(t, str) for t in context):
        raise DataError(f"{where}: 'context' must be a list of strings")
    if not isinstance(query, str) or not query.strip():
        raise DataError(f"{where}: 'query' must be a non-empty string")
    if not isinstance(row["needs_rewrite"], bool):
        raise DataError(f"{where}: 'needs_rewrite' must be true or false")
    n = len(context)
    window = tuple(Turn(sender="asker" if (n - i) % 2 == 0 else "other", text=t, timestamp=float(i))
                   for i, t in enumerate(context))
    rid = str(row["id"])
    source = str(row.get("source", "data"))
    return Example(
        id=f"{source}:{rid}", conversation=f"{source}:{_dialogue_of(rid)}", window=window,
        question=Turn(sender="asker", text=query, timestamp=float(n)),
        label="needs" if row["needs_rewrite"] else "not_needed",
        rewrite=row.get("rewrite") if row["needs_rewrite"] else None,
        split=row.get("split"), lang=row.get("lang"),
    )


# Suffixes that mark two versions of one case: REWRITE's negative ("rw7_neg" is rw7's gold rewrite asked
# as the query) and our cases' pairs ("p000_coref" / "p000_complete"). Both versions are one conversation,
# or a split could train on the rewrite of a test question.
_PAIR_SUFFIXES = ("_neg", "_coref", "_complete")


def _dialogue_of(row_id: str) -> str:
    # Ids in the shared sets name their dialogue: "d12t3_coref" (TASK), "C_<hash>_0_q4" (CANARD).
    if row_id.startswith("d") and "t" in row_id:
        return row_id.split("t", 1)[0]
    if "_q" in row_id:
        return row_id.rsplit("_q", 1)[0]
    for suffix in _PAIR_SUFFIXES:
        if row_id.endswith(suffix):
            return row_id[: -len(suffix)]
    return row_id


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict | DataError]]:
    """(line number, object) for each non-empty line, or a :class:`DataError` naming the file and line
    for a line that is not a JSON object (callers decide whether to skip it or stop)."""
    import orjson  # 3–4× faster than json: imports parse tens of thousands of lines a second

    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                yield lineno, DataError(f"{path}:{lineno}: not valid JSON ({str(exc).split(':', 1)[0]})")
                continue
            yield lineno, obj if isinstance(obj, dict) else DataError(f"{path}:{lineno}: expected a JSON object")


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-empty line; a malformed line raises naming file and line."""
    for lineno, obj in iter_jsonl(path):
        if isinstance(obj, DataError):
            raise obj
        yield lineno, obj


def load_unified(path: str | Path, split: str | None = None) -> list[Example]:
    """All examples of a unified-format file (optionally one split: rows whose split matches)."""
    examples = [unified_example(obj, f"{path}:{lineno}") for lineno, obj in read_jsonl(path)]
    return [e for e in examples if split is None or e.split == split]


def load_alpaca(path: str | Path) -> list[Example]:
    """The structured examples inside a corefbot alpaca export (``corefbot export alpaca``)."""
    with open(path, encoding="utf-8") as f:
        rows = json.load(f)
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of alpaca rows")
    out = []
    for i, row in enumerate(rows):
        meta = row.get("meta") if isinstance(row, dict) else None
        if not meta:
            raise DataError(f"{path}: row {i} has no 'meta' (not a corefbot alpaca export)")
        out.append(Example(
            id=meta["id"], conversation=meta["conversation"],
            window=tuple(Turn(**t) for t in meta["window"]), question=Turn(**meta["question"]),
            label=meta["label"], rewrite=meta.get("rewrite"), split=meta.get("split"), lang=meta.get("lang"),
        ))
    return out


def load_examples(path: str | Path) -> list[Example]:
    """Either format, told apart by the file: a JSON list is alpaca, JSON lines are unified."""
    head = ""
    with open(path, encoding="utf-8") as f:
        for char in iter(lambda: f.read(1), ""):
            if not char.isspace():
                head = char
                break
    return load_alpaca(path) if head == "[" else load_unified(path)
