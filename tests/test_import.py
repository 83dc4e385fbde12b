"""Importing chat logs and labelled data: validation with line numbers, strictness, idempotence."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from corefbot.pipeline.build import build
from corefbot.pipeline.examples import DataError
from corefbot.pipeline.export import store_examples
from corefbot.pipeline.importer import import_jsonl
from corefbot.pipeline.store import Store


def write(path: Path, lines: list) -> Path:
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l, ensure_ascii=False)) + "\n" for l in lines),
                    encoding="utf-8")
    return path


GOOD = [
    {"group": "g", "sender": "b", "text": "BTW, how to deploy it on TX2?", "timestamp": 1030, "id": "m2"},
    {"group": "g", "sender": "a", "text": "Can mmpose be deployed on mobile phones?", "timestamp": 1000, "id": "m1"},
    {"group": "g", "sender": 7, "text": "yes", "timestamp": 1040.5, "reply_to": "m2"},
]


def test_lines_in_any_order_are_sorted_on_build(store: Store, tmp_path: Path) -> None:
    report = import_jsonl(store, write(tmp_path / "log.jsonl", GOOD))
    assert (report.lines, report.added, report.errors) == (3, 3, [])
    build(store)
    assert [m.text for m in store.iter_merged()] == [GOOD[1]["text"], GOOD[0]["text"], "yes"]
    assert list(store.iter_merged())[2].reply_to == "m2"


def test_reimport_is_idempotent_with_and_without_ids(store: Store, tmp_path: Path) -> None:
    path = write(tmp_path / "log.jsonl", GOOD)
    import_jsonl(store, path)
    again = import_jsonl(store, path)
    assert (again.added, again.duplicates) == (0, 3)
    assert store.count("messages") == 3


BAD = [
    "{not json",
    {"group": "g", "text": "no sender", "timestamp": 1},
    {"group": "g", "sender": "a", "text": "time as text", "timestamp": "1700000000"},
    {"group": "g", "sender": "a", "text": ["not", "a", "string"], "timestamp": 1},
    {"group": "g", "sender": "a", "text": "bool time", "timestamp": True},
    ["an", "array"],
]


def test_bad_lines_are_reported_with_line_numbers_and_skipped(store: Store, tmp_path: Path) -> None:
    path = write(tmp_path / "log.jsonl", [GOOD[0], *BAD, GOOD[1]])
    report = import_jsonl(store, path)
    assert report.added == 2 and len(report.errors) == len(BAD)
    expected = ["not valid JSON", "missing field 'sender'", "'timestamp' must be Unix seconds",
                "'text' must be a string", "'timestamp' must be Unix seconds", "expected a JSON object"]
    for lineno, (error, fragment) in enumerate(zip(report.errors, expected), start=2):
        assert error.startswith(f"{path}:{lineno}: ") and fragment in error, error


def test_strict_import_rejects_the_file_and_writes_nothing(store: Store, tmp_path: Path) -> None:
    path = write(tmp_path / "log.jsonl", [GOOD[0], BAD[2], GOOD[1]])
    with pytest.raises(DataError, match=r"log.jsonl:2: .*timestamp"):
        import_jsonl(store, path, strict=True)
    assert store.count("messages") == 0


def test_missing_file_is_named(store: Store, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        import_jsonl(store, tmp_path / "nope.jsonl")


UNIFIED = [
    {"source": "demo", "id": "d1t1_coref", "lang": "en", "split": "train", "needs_rewrite": True,
     "context": ["Can mmpose be deployed on mobile phones?", "Yes, with ncnn."],
     "query": "How to deploy it on TX2?", "rewrite": "How to deploy mmpose on TX2?"},
    {"source": "demo", "id": "d1t1_complete", "lang": "en", "split": "train", "needs_rewrite": False,
     "context": ["Can mmpose be deployed on mobile phones?", "Yes, with ncnn."],
     "query": "How to deploy mmpose on TX2?", "rewrite": "How to deploy mmpose on TX2?"},
]


def test_unified_labelled_rows_become_labelled_questions(store: Store, tmp_path: Path) -> None:
    path = write(tmp_path / "labelled.jsonl", UNIFIED)
    report = import_jsonl(store, path)
    assert report.format == "unified" and report.labels == 2 and report.added == 6
    build(store)
    examples = {e.question.text: e for e in store_examples(store)}
    coref = examples["How to deploy it on TX2?"]
    assert coref.label == "needs" and coref.rewrite == "How to deploy mmpose on TX2?"
    assert [t.text for t in coref.window] == UNIFIED[0]["context"]
    # both rows of one dialogue are one conversation, so a split keeps them together
    assert coref.conversation == examples["How to deploy mmpose on TX2?"].conversation
    assert import_jsonl(store, path).labels == 0  # re-import: nothing changes, no new audit rows
