"""Windows and exports on real SQLite: the paper's record schema, alpaca balance, pseudonyms, opt-out."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from corefbot.pipeline.build import build
from corefbot.pipeline.export import alpaca_rows, iter_records, manifest_path, store_examples, write_alpaca
from corefbot.pipeline.labels.rows import set_label
from corefbot.pipeline.prompt import LETTERS, build_prompt
from corefbot.pipeline.records import Example, Message, Turn
from corefbot.pipeline.store import Store, pseudonym
from corefbot.pipeline.window import with_windows

PAPER_CHAT = [  # (sender, seconds, text)
    ("u_lin", 0, "大家好，我在看 mmpose 的文档"),
    ("u_lin", 5, "Can mmpose be deployed on mobile phones?"),
    ("u_sam", 40, "Yes, through ncnn or mmdeploy, it runs on Android."),
    ("u_chen", 70, "BTW, how to deploy it on TX2?"),
]


def fill(store: Store, chat: list[tuple[str, float, str]], group: str = "g1") -> list[Message]:
    messages = [Message("qq", group, str(i), s, 1000 + dt, t) for i, (s, dt, t) in enumerate(chat)]
    store.insert_messages(messages)
    build(store)
    return messages


def test_windows_hold_at_most_n_previous_messages_of_the_same_group(store: Store) -> None:
    fill(store, [(f"s{i % 3}", i * 30, f"message {i}") for i in range(20)], group="a")
    fill(store, [("x", 0, "other group")], group="b")
    pairs = list(with_windows(store.iter_merged(), size=12))
    for merged, window in pairs:
        assert len(window) <= 12
        assert all(w.group == merged.group and w.timestamp < merged.timestamp for w in window)
        assert merged not in window
    last = [w for m, w in pairs if m.text == "message 19"][0]
    assert [w.text for w in last] == [f"message {i}" for i in range(7, 19)]
    assert [w for m, w in pairs if m.group == "b"][0] == []


def test_records_follow_the_paper_schema_with_pseudonymous_senders(store: Store) -> None:
    fill(store, PAPER_CHAT)
    records = list(iter_records(store))
    assert [r["text"] for r in records] == [
        "大家好，我在看 mmpose 的文档\nCan mmpose be deployed on mobile phones?", "BTW, how to deploy it on TX2?"]
    tx2 = records[1]
    assert set(tx2) == {"id", "sender", "text", "timestamp", "question_score", "is_question", "cr_window", "cr_need_gt"}
    assert tx2["cr_need_gt"] is None and tx2["is_question"] is True and 0 <= tx2["question_score"] <= 10
    assert [set(w) for w in tx2["cr_window"]] == [{"sender", "text", "timestamp"}] * 2
    salt = store.salt()
    assert tx2["sender"] == pseudonym(salt, "qq", "u_chen")
    assert tx2["cr_window"][1]["sender"] == pseudonym(salt, "qq", "u_sam")
    dump = json.dumps(records)
    assert "u_chen" not in dump and "u_sam" not in dump and "u_lin" not in dump
    set_label(store, tx2["id"], "needs", "moderator", labeler="m", rewrite="How to deploy mmpose on TX2?")
    assert list(iter_records(store))[1]["cr_need_gt"] is True


def test_mentions_in_text_are_pseudonymised_too(store: Store) -> None:
    store.insert_messages([
        Message("qq", "g1", "1", "u_lin", 1000, "Can mmpose be deployed on mobile phones?"),
        Message("qq", "g1", "2", "u_sam", 1040, "@u_lin yes, with ncnn", mentions=("u_lin",)),
        Message("qq", "g1", "3", "u_lin", 1080, "@u_sam how to deploy it on TX2?", mentions=("u_sam",)),
    ])
    build(store)
    records = list(iter_records(store))
    dump = json.dumps(records)
    assert "u_lin" not in dump and "u_sam" not in dump
    assert records[-1]["text"] == f"@{pseudonym(store.salt(), 'qq', 'u_sam')} how to deploy it on TX2?"
    assert records[-1]["cr_window"][1]["text"].startswith(f"@{pseudonym(store.salt(), 'qq', 'u_lin')} ")


def test_pseudonyms_are_stable_per_deployment_and_differ_across_deployments(tmp_path: Path) -> None:
    a, b = Store(tmp_path / "a.db"), Store(tmp_path / "b.db")
    for s in (a, b):
        fill(s, PAPER_CHAT)
    first = [r["sender"] for r in iter_records(a)]
    assert first == [r["sender"] for r in iter_records(a)]
    assert first != [r["sender"] for r in iter_records(b)]


def test_opted_out_members_vanish_from_questions_and_windows(store: Store) -> None:
    fill(store, PAPER_CHAT)
    store.opt_out("qq", "u_sam")
    records = list(iter_records(store))
    name = pseudonym(store.salt(), "qq", "u_sam")
    assert name not in json.dumps(records)
    assert [w["text"] for w in records[1]["cr_window"]] == [
        "大家好，我在看 mmpose 的文档\nCan mmpose be deployed on mobile phones?"]


def example(i: int, label: str) -> Example:
    return Example(id=str(i), conversation="c", window=(Turn("a", "mmpose on phones?", 0.0),),
                   question=Turn("b", "and on TX2?", 1.0), label=label)  # type: ignore[arg-type]


def test_alpaca_option_letters_are_balanced_and_outputs_match() -> None:
    examples = [example(i, "needs" if i % 3 else "not_needed") for i in range(300)]
    rows = alpaca_rows(examples, seed=7)
    letters = Counter(row["output"][0] for row in rows)
    assert set(letters) == set(LETTERS) and max(letters.values()) - min(letters.values()) <= 1
    for row, ex in zip(rows, examples):
        prompt = build_prompt(ex.window, ex.question, tuple(row["meta"]["order"]))
        assert row["instruction"] == prompt.instruction and row["input"] == ""
        assert prompt.decision(row["output"][0]) == ex.label
    assert alpaca_rows(examples, seed=7) == rows and alpaca_rows(examples, seed=8) != rows


def test_alpaca_export_prefers_moderator_labels_and_writes_a_manifest(store: Store, tmp_path: Path) -> None:
    fill(store, PAPER_CHAT)
    q1, q2 = [r["id"] for r in iter_records(store)]
    set_label(store, q2, "not_needed", "member", labeler="u_chen")
    set_label(store, q2, "needs", "moderator", labeler="mod", rewrite="How to deploy mmpose on TX2?")
    set_label(store, q1, "not_needed", "member", labeler="u_lin")
    out = tmp_path / "alpaca.json"
    manifest = write_alpaca(store, out)
    rows = json.loads(out.read_text())
    by_id = {r["meta"]["id"]: r for r in rows}
    assert by_id[q2]["meta"]["label"] == "needs"
    assert by_id[q2]["output"].endswith("\nHow to deploy mmpose on TX2?")
    assert manifest.sources == {"moderator": 1, "member": 1} and manifest.rows == 2
    assert json.loads(manifest_path(out).read_text())["sha256"] == manifest.sha256
    without_members = write_alpaca(store, out, use_member=False)
    assert without_members.rows == 1 and without_members.sources == {"moderator": 1}
    assert [e.id for e in store_examples(store, use_member=False)] == [q2]
    assert "u_chen" not in out.read_text()
