"""Exports: the paper's records (JSON lines) and alpaca training data (JSON list + manifest).

Sender ids never leave the database as they are: every export carries salted pseudonyms, stable
within a deployment, for senders and for @-mentions in the text; members who opted out appear in neither the questions nor the windows.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import orjson

from corefbot.pipeline.labels.rows import PRIORITY, LabelRow, effective_labels
from corefbot.pipeline.prompt import balanced_orders, build_prompt, target
from corefbot.pipeline.records import AlpacaRow, Example, Merged, Record, Turn, WindowItem
from corefbot.pipeline.store import Store, pseudonym
from corefbot.pipeline.window import DEFAULT_WINDOW, with_windows

NEEDS_GT = {"needs": True, "not_needed": False}


def conversation_of(merged: Merged) -> str:
    # Imported labelled rows live in one group per row, named "<dialogue>#<row>": the dialogue
    # is the conversation, so a train/test split never separates rows that share their context.
    return f"{merged.platform}:{merged.group.split('#', 1)[0]}"


class _Pseudonyms:
    def __init__(self, store: Store) -> None:
        self.salt = store.salt()
        self.cache: dict[tuple[str, str], str] = {}

    def of(self, platform: str, member: str) -> str:
        key = (platform, member)
        if key not in self.cache:
            self.cache[key] = pseudonym(self.salt, *key)
        return self.cache[key]

    def __call__(self, merged: Merged) -> str:
        return self.of(merged.platform, merged.sender)

    def text(self, merged: Merged) -> str:
        """The text with each @-mention of a member id replaced by that member's pseudonym."""
        text = merged.text
        for member in merged.mentions:
            if member and member != "all":
                text = text.replace(f"@{member}", f"@{self.of(merged.platform, member)}")
        return text


def _visible(store: Store) -> Iterator[Merged]:
    opted_out = store.opted_out()
    return (m for m in store.iter_merged() if (m.platform, m.sender) not in opted_out)


def iter_records(store: Store, window: int = DEFAULT_WINDOW) -> Iterator[Record]:
    """One record per merged question (or labelled message), in group and time order."""
    labels = effective_labels(store)
    name = _Pseudonyms(store)
    for merged, previous in with_windows(_visible(store), window):
        label = labels.get(merged.id)
        if merged.from_self or (label and label.label == "not_question"):
            continue
        if not merged.is_question and label is None:
            continue
        yield Record(
            id=merged.id, sender=name(merged), text=name.text(merged), timestamp=merged.timestamp,
            question_score=merged.question_score, is_question=merged.is_question,
            cr_window=[WindowItem(sender=name(p), text=name.text(p), timestamp=p.timestamp) for p in previous],
            cr_need_gt=NEEDS_GT[label.label] if label else None,
        )


def store_examples(store: Store, window: int = DEFAULT_WINDOW, *, use_member: bool = True) -> list[Example]:
    """The labelled questions (needs / not needed) with their windows, senders pseudonymised."""
    labels = effective_labels(store, use_member=use_member)
    rewrites = _needs_rewrites(store, use_member=use_member)
    name = _Pseudonyms(store)
    examples = []
    for merged, previous in with_windows(_visible(store), window):
        label = labels.get(merged.id)
        if label is None or label.label not in NEEDS_GT:
            continue
        examples.append(Example(
            id=merged.id, conversation=conversation_of(merged),
            window=tuple(Turn(name(p), name.text(p), p.timestamp) for p in previous),
            question=Turn(name(merged), name.text(merged), merged.timestamp),
            label=label.label, rewrite=_rewrite(label, rewrites) if label.label == "needs" else None,  # type: ignore[arg-type]
        ))
    return examples


def _needs_rewrites(store: Store, *, use_member: bool) -> dict[str, str]:
    """A rewrite some source gave with "needs", per question, by priority: a moderator who confirms "needs"
    without typing a rewrite keeps the one a member confirmed (or an import carried)."""
    out: dict[str, str] = {}
    for source in PRIORITY:
        if source == "member" and not use_member:
            continue
        for merged_id, rewrite in store.db.conn.execute(
                "SELECT merged_id, rewrite FROM labels WHERE source = ? AND label = 'needs' AND rewrite IS NOT NULL "
                "AND rewrite != ''", (source,)):
            out.setdefault(merged_id, rewrite)
    return out


def _rewrite(label: LabelRow, rewrites: dict[str, str]) -> str | None:
    return label.rewrite or rewrites.get(label.merged_id)


def alpaca_rows(examples: Sequence[Example], seed: int = 0) -> list[dict]:
    """Alpaca rows (instruction, input, output) with the structured example under ``meta``.

    Option orders are balanced so the correct letter is A, B and C equally often.
    """
    rows = []
    for example, order in zip(examples, balanced_orders([e.label for e in examples], seed)):
        prompt = build_prompt(example.window, example.question, order)
        row: AlpacaRow = {"instruction": prompt.instruction, "input": "",
                          "output": target(prompt, example.label, example.rewrite)}
        meta = asdict(example)
        meta["window"] = [asdict(t) for t in example.window]
        meta["question"] = asdict(example.question)
        meta["order"] = list(order)
        rows.append({**row, "meta": meta})
    return rows


@dataclass(frozen=True, slots=True)
class Manifest:
    path: str
    rows: int
    labels: dict[str, int]
    sources: dict[str, int]
    sha256: str
    seed: int
    window: int
    member_labels: bool
    created_at: float


def write_records(records: Iterable[Record], out: str | Path) -> int:
    n = 0
    with open(out, "wb") as f:
        for record in records:
            f.write(orjson.dumps(record) + b"\n")  # UTF-8, not \u-escaped: Chinese stays readable
            n += 1
    return n


def write_alpaca(store: Store, out: str | Path, *, window: int = DEFAULT_WINDOW, seed: int = 0,
                 use_member: bool = True) -> Manifest:
    """Write the alpaca file and ``<out>.manifest.json`` beside it (counts, sources, data hash)."""
    examples = store_examples(store, window, use_member=use_member)
    sources = {k: v.source for k, v in effective_labels(store, use_member=use_member).items()}
    data = orjson.dumps(alpaca_rows(examples, seed), option=orjson.OPT_INDENT_2)
    Path(out).write_bytes(data)
    manifest = Manifest(
        path=str(out), rows=len(examples), labels=dict(Counter(e.label for e in examples)),
        sources=dict(Counter(sources[e.id] for e in examples)),
        sha256=hashlib.sha256(data).hexdigest(), seed=seed, window=window, member_labels=use_member,
        created_at=time.time(),
    )
    manifest_path(out).write_text(json.dumps(asdict(manifest), indent=2) + "\n", encoding="utf-8")
    return manifest


def manifest_path(out: str | Path) -> Path:
    return Path(f"{out}.manifest.json")
