"""Fault injection at the writer: one transaction per message and run, orphan repair at start, lone
surrogates, oversized messages, a corrupt database file. Real SQLite files, the real Recorder."""
from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from corefbot.pipeline.records import Message
from corefbot.pipeline.sanitize import bounded, clean, is_bounded_copy
from corefbot.pipeline.store import Store, quick_check


def _recorder_module():
    """Imported inside the tests: plugins.chatlog needs NoneBot initialised (nonebug does it first)."""
    import corefbot.plugins.chatlog.recorder as rec

    return rec


def msg(mid: str, text: str, *, t: float, sender: str = "7", name: str = "Lin", group: str = "1") -> Message:
    return Message("onebotv11", group, mid, sender, t, text, sender_name=name)


async def started(db: Path, **kw):
    recorder = _recorder_module().Recorder(db, **kw)
    recorder.start(asyncio.get_running_loop())
    return recorder


def runs_of(db: Path) -> list[tuple[str, list[str], str]]:
    store = Store(db)
    try:
        return [(m.id, m.message_ids, m.text) for m in store.iter_merged()]
    finally:
        store.close()


async def test_a_failed_run_write_stores_neither_and_a_resend_repairs(tmp_path: Path, monkeypatch) -> None:
    db = tmp_path / "b.db"
    recorder = await started(db)
    rec = _recorder_module()
    real = rec.score_run

    def crash(run, qf):  # the process "dies" after the message row is written, before its run is
        raise OSError("injected: killed between the message and its run")

    monkeypatch.setattr(rec, "score_run", crash)
    recorder.submit(msg("1", "Can mmpose be deployed on mobile phones?", t=100.0))
    await recorder.flush()
    assert recorder.health().failed == 1
    monkeypatch.setattr(rec, "score_run", real)
    recorder.submit(msg("1", "Can mmpose be deployed on mobile phones?", t=100.0))  # the chat app re-sends it
    recorder.submit(msg("2", "and on TX2?", t=105.0))
    await recorder.flush()
    recorder.stop()
    # Nothing half-written: the re-sent message was new to the database and joined a run with the next line.
    assert runs_of(db) == [("onebotv11:1:1", ["onebotv11:1:1", "onebotv11:1:2"],
                            "Can mmpose be deployed on mobile phones?\nand on TX2?")]


async def test_orphaned_messages_are_attached_at_start_and_other_runs_keep_their_ids(tmp_path: Path) -> None:
    db = tmp_path / "b.db"
    recorder = await started(db)
    for i, (sender, t, text) in enumerate([("7", 0, "大家好"), ("8", 30, "How do I install mmpose on Windows?"),
                                           ("8", 35, "with CUDA 12")]):
        recorder.submit(msg(str(i), text, t=1000.0 + t, sender=sender))
    await recorder.flush()
    recorder.stop()
    store = Store(db)
    store.db.conn.execute("INSERT INTO labels (merged_id, source, label, labeler, at) "
                          "VALUES ('onebotv11:1:1', 'moderator', 'not_needed', 'm', 1)")
    store.db.conn.commit()
    # An older version's crash: the message row committed, its run never was (two transactions).
    store.insert_messages([msg("3", "any idea why it fails?", t=1040.0, sender="8")])
    assert [m.key for m in store.orphan_messages()] == ["onebotv11:1:3"]
    store.close()

    recorder = await started(db)
    assert recorder.health().orphans_repaired == 1
    recorder.stop()
    runs = runs_of(db)
    assert [r[1] for r in runs] == [["onebotv11:1:0"], ["onebotv11:1:1", "onebotv11:1:2", "onebotv11:1:3"]]
    store = Store(db)
    assert store.orphan_messages() == []
    assert store.get_merged("onebotv11:1:1").is_question  # scored like live capture
    assert store.db.conn.execute("SELECT label FROM labels").fetchall() == [("not_needed",)]
    store.close()


async def test_lone_surrogates_in_text_and_nickname_do_not_lose_the_message(tmp_path: Path) -> None:
    db = tmp_path / "b.db"
    recorder = await started(db)
    recorder.submit(msg("1", "how to fix this \ud83d error?", t=1.0, name="Li\udc00n"))
    recorder.submit(msg("2", "emoji ok \U0001F600", t=2.0, sender="9"))
    await recorder.flush()
    assert recorder.health().sanitized == 1 and recorder.health().failed == 0
    recorder.stop()
    store = Store(db)
    rows = store.db.conn.execute("SELECT text, sender_name FROM messages ORDER BY timestamp").fetchall()
    store.close()
    assert rows == [("how to fix this \ufffd error?", "Li\ufffdn"), ("emoji ok \U0001F600", "Lin")]
    assert runs_of(db)[0][2] == "how to fix this \ufffd error?"


def test_clean_joins_escaped_pairs_and_replaces_halves() -> None:
    assert clean("\ud83d\ude00") == "\U0001F600"  # a pair that arrived as two JSON escapes
    assert clean("a\ude00\ud83d") == "a\ufffd\ufffd"
    assert clean("plain 中文") == "plain 中文"


async def test_an_oversized_message_is_kept_whole_once_and_bounded_elsewhere(tmp_path: Path) -> None:
    db = tmp_path / "b.db"
    huge = "How do I parse this log? " + "x" * 950_000
    recorder = await started(db, max_text_chars=4000)
    recorder.submit(msg("1", huge, t=1.0))
    await recorder.flush()
    assert recorder.health().truncated == 1
    recorder.stop()
    store = Store(db)
    (raw,), = store.db.conn.execute("SELECT text FROM messages").fetchall()
    (run,), = store.db.conn.execute("SELECT text FROM merged").fetchall()
    store.close()
    assert raw == huge
    assert len(run) <= 4000 and is_bounded_copy(run) and run.startswith("How do I parse this log?")
    assert run == bounded(huge, 4000)


def test_bounded_is_within_the_limit_and_says_how_much_was_cut() -> None:
    for n in (10, 999, 1000, 1001, 123_456):
        for limit in (40, 100, 1000):
            out = bounded("y" * n, limit)
            assert len(out) <= limit and (out == "y" * n) == (n <= limit)
            if n > limit:
                kept = out.index(" […")
                assert f"{n - kept:,} characters cut" in out


def test_log_lines_keep_head_and_tail_within_the_limit() -> None:
    from corefbot.pipeline.sanitize import bounded_middle

    text = "Traceback (most recent call last):" + "x" * 5000 + "CorruptDatabase: the database is corrupt"
    out = bounded_middle(text, 200)
    assert len(out) <= 200 and out.startswith("Traceback") and out.endswith("is corrupt") and "characters cut" in out
    assert bounded_middle("short", 200) == "short"


def _corrupt(db: Path) -> None:
    """Overwrite pages in the middle of the file with garbage, as a failing disk or a torn copy would."""
    data = bytearray(db.read_bytes())
    page = 4096
    for p in range(2, len(data) // page - 1):
        data[p * page + 100: p * page + 900] = b"\xa5" * 800
    db.write_bytes(bytes(data))


async def test_a_corrupt_database_refuses_to_start_naming_the_file_and_the_recovery(tmp_path: Path) -> None:
    db = tmp_path / "b.db"
    store = Store(db)
    store.insert_messages([msg(str(i), f"line {i} " + "z" * 200, t=float(i)) for i in range(2000)])
    store.db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    assert quick_check(db) == []
    _corrupt(db)
    assert quick_check(db) != []
    with pytest.raises(_recorder_module().CorruptDatabase) as err:
        await started(db)
    text = str(err.value)
    assert str(db) in text and ".recover" in text and "backup" in text


async def test_a_fresh_database_passes_the_check(tmp_path: Path) -> None:
    recorder = await started(tmp_path / "new" / "b.db")
    recorder.stop()
    assert quick_check(tmp_path / "new" / "b.db") == []
    with pytest.raises(sqlite3.Error):
        sqlite3.connect(f"file:{tmp_path / 'none.db'}?mode=ro", uri=True).execute("SELECT 1")


async def test_a_full_queue_sheds_loudly_and_counts(tmp_path: Path, caplog) -> None:
    import threading

    recorder = await started(tmp_path / "b.db", queue_size=2)
    gate = threading.Event()
    blocked = recorder.call(lambda store: gate.wait(10))  # the writer is busy: nothing drains the queue
    await asyncio.sleep(0.1)
    with caplog.at_level("ERROR", logger="corefbot.chatlog"):
        accepted = [recorder.submit(msg(str(i), f"line {i}", t=float(i), sender=str(i))) for i in range(5)]
    gate.set()
    await blocked
    await recorder.flush()
    recorder.stop()
    assert accepted == [True, True, False, False, False] and recorder.health().dropped == 3
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 3 and all("NOT recorded" in e for e in errors)
    from corefbot.plugins.chatlog.health import health_text

    assert "LOSING MESSAGES" in health_text(recorder, {}, {}, 0.0) and "3 shed" in health_text(recorder, {}, {}, 0.0)


def test_the_outbox_retries_until_the_age_limit_not_an_attempt_count(tmp_path: Path) -> None:
    from corefbot.plugins.resolver import outbox

    store = Store(tmp_path / "b.db")
    policy = outbox.RetryPolicy(base_s=2, max_s=300, max_age_s=3600)  # the defaults
    now = 1_000_000.0
    item = outbox.enqueue(store, merged_id="m", platform="onebotv11", group="1", self_id="10000", reply_to="5",
                          asker="7", question="q?", query="q?", history=[], now=now)
    statuses = []
    t = now
    while not statuses or statuses[-1] == "pending":
        statuses.append(outbox.record_failure(store, item, "unreachable", retryable=True, policy=policy, now=t))
        t = outbox.get(store, item).next_at
    row = outbox.get(store, item)
    store.close()
    assert len(statuses) > 8 and statuses[-1] == "expired"  # the old limit gave up at 8 attempts (~4.5 min)
    assert 3600 - 330 <= t - now <= 3600 + 330  # retried for (almost) the whole hour
    assert "expired" in row.error


def test_bare_answer_rule_is_quiet_for_events_without_a_message() -> None:
    import asyncio as aio

    from corefbot.plugins.labels import commands

    class NoMessage:
        def get_type(self) -> str:
            return "message"

        def get_plaintext(self) -> str:
            raise ValueError("Event has no message!")

        def get_user_id(self) -> str:
            return "1"

    saved = dict(commands._sessions)
    commands._sessions[("onebotv11", "1", "1")] = commands.Session(rng=__import__("random").Random(0))
    try:
        assert aio.run(commands._bare_answer_rule(None, NoMessage())) is False  # type: ignore[arg-type]
    finally:
        commands._sessions.clear()
        commands._sessions.update(saved)


def test_the_matcher_shortcut_only_skips_what_no_loaded_matcher_can_take() -> None:
    from nonebot import on_message
    from nonebot.adapters.onebot.v11 import Message as V11Message, MessageSegment

    from corefbot.plugins.chatlog import fastpath
    from corefbot.plugins.labels import commands
    from tests.onebot_events import group_message

    saved = dict(commands._sessions)
    commands._sessions.clear()
    try:
        assert fastpath.can_skip(group_message("哈哈哈 thanks!"), 1)
        assert not fastpath.can_skip(group_message("/label next"), 1)  # a registered command
        assert not fastpath.can_skip(group_message("  /forgetme"), 1)
        assert not fastpath.can_skip(group_message("thanks!"), 2)  # another plugin's preprocessor
        assert fastpath.can_skip(group_message(V11Message([MessageSegment.image("http://x/y.png")])), 1)
        commands._sessions[("onebotv11", "1", "1")] = commands.Session(rng=__import__("random").Random(0))
        assert not fastpath.can_skip(group_message("a"), 1)  # a moderator may be answering a review item
        commands._sessions.clear()
        other = on_message()  # any other plugin's matcher: NoneBot decides, as always
        try:
            assert not fastpath.can_skip(group_message("哈哈哈 thanks!"), 1)
        finally:
            other.destroy()
        assert fastpath.can_skip(group_message("哈哈哈 thanks!"), 1)
    finally:
        commands._sessions.clear()
        commands._sessions.update(saved)
