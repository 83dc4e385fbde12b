"""The corefbot CLI's data commands, in-process on a real database file."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from corefbot.cli import main

CHAT = [
    {"group": "g", "sender": "a", "text": "大家好，我在看 mmpose 的文档", "timestamp": 1000, "id": "1"},
    {"group": "g", "sender": "a", "text": "Can mmpose be deployed on mobile phones?", "timestamp": 1005, "id": "2"},
    {"group": "g", "sender": "b", "text": "Yes, through ncnn.", "timestamp": 1040, "id": "3"},
    {"group": "g", "sender": "c", "text": "BTW, how to deploy it on TX2?", "timestamp": 1070, "id": "4"},
]


@pytest.fixture
def chat(tmp_path: Path) -> Path:
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in CHAT) + '{"group": "g"}\n')
    return path


def test_import_build_export_stats(tmp_path: Path, chat: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "c.db")
    assert main(["--db", db, "import", str(chat)]) == 0
    out, err = capsys.readouterr()
    assert "4 messages added" in out and "1 bad lines skipped" in out and "chat.jsonl:5: missing field 'sender'" in err
    assert main(["--db", db, "build"]) == 0
    assert "4 messages → 3 merged → 2 questions" in capsys.readouterr().out
    records = tmp_path / "records.jsonl"
    assert main(["--db", db, "export", "records", "-o", str(records)]) == 0
    rows = [json.loads(l) for l in records.read_text().splitlines()]
    assert [r["text"] for r in rows][-1] == "BTW, how to deploy it on TX2?" and len(rows[-1]["cr_window"]) == 2
    alpaca = tmp_path / "alpaca.json"
    assert main(["--db", db, "export", "alpaca", "-o", str(alpaca)]) == 0
    assert json.loads(alpaca.read_text()) == [] and Path(f"{alpaca}.manifest.json").exists()
    capsys.readouterr()
    assert main(["--db", db, "stats", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["messages"], stats["merged"], stats["questions"], stats["members"]) == (4, 3, 2, 3)


def test_errors_are_one_line_and_non_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "c.db")
    assert main(["--db", db, "import", str(tmp_path / "missing.jsonl")]) == 2
    assert "corefbot import: error: no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"group": "g", "sender": "a", "text": 5, "timestamp": 1}\n')
    assert main(["--db", db, "import", "--strict", str(bad)]) == 2
    assert "bad.jsonl:1: field 'text' must be a string" in capsys.readouterr().err


def test_default_database_follows_corefbot_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chat: Path) -> None:
    monkeypatch.setenv("COREFBOT_DB", str(tmp_path / "from-env.db"))
    assert main(["import", str(chat)]) == 0
    assert (tmp_path / "from-env.db").exists()
