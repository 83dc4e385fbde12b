"""pipeline/labels.py: short ids, the review queue, undo, stats, member prompts with their limits, forgetting."""
from __future__ import annotations

import json
import random
from dataclasses import replace
from datetime import datetime, timezone

import pytest

from corefbot.pipeline.export import iter_records, write_alpaca
from corefbot.pipeline.labels.forget import forget_member
from corefbot.pipeline.labels.limits import ConfirmLimits, ask_refusal, in_quiet_hours, parse_quiet_hours
from corefbot.pipeline.labels.prompts import answer_prompt, parse_answer, prompt_sent, reserve_prompt
from corefbot.pipeline.labels.review import review_next
from corefbot.pipeline.labels.rows import effective_labels, item_id, labels_of, merged_of_item, set_label
from corefbot.pipeline.labels.stats import label_stats
from corefbot.pipeline.labels.undo import UndoConflict, undo_last
from corefbot.pipeline.records import Merged, Message
from corefbot.pipeline.store import Store, pseudonym

UTC = timezone.utc
# A Wednesday, 12:00 UTC: outside the default quiet hours when the clock's zone is UTC.
NOON = datetime(2026, 11, 18, 12, 0, tzinfo=UTC).timestamp()
NO_LIMITS = ConfirmLimits(per_group_day=1000, per_member_day=1000, per_1000=1000.0, group_gap_s=0, quiet=None, tz=UTC)


def message(i: int, sender: str, text: str, t: float, group: str = "g1", **kw) -> Message:
    return Message("onebotv11", group, str(i), sender, t, text, **kw)


def question(store: Store, i: int, sender: str, text: str, t: float, group: str = "g1",
             margin: float | None = None, **kw) -> Merged:
    m = message(i, sender, text, t, group, **kw)
    store.insert_messages([m])
    merged = Merged(id=m.key, platform=m.platform, group=group, sender=sender, text=text, timestamp=t,
                    end_timestamp=t, message_ids=[m.key], reply_to=m.reply_to, mentions=m.mentions,
                    from_self=m.from_self, question_score=8.0, is_question=not m.from_self)
    store.upsert_merged([merged])
    if margin is not None:
        store.db["decisions"].insert({"merged_id": merged.id, "decision": "needs", "margin": margin, "at": t})
    return merged


def chatter(store: Store, n: int, t: float, group: str = "g1", start: int = 10_000) -> None:
    store.insert_messages([message(start + k, f"c{k % 7}", "哈哈", t - 60 * k, group) for k in range(n)])


def test_item_ids_are_short_and_stable(store: Store) -> None:
    q = question(store, 1, "u1", "how to deploy it on TX2?", NOON)
    first = item_id(store, q.id)
    store.upsert_merged([replace(q, text=q.text + "\nplease")])  # an upsert changes the merged rowid
    assert item_id(store, q.id) == first and first < 100
    assert merged_of_item(store, first) == q.id and merged_of_item(store, first + 99) is None
    forget_member(store, "onebotv11", "u1")
    other = question(store, 2, "u2", "and on Jetson Nano?", NOON + 5)
    assert merged_of_item(store, first) is None and item_id(store, other.id) != first  # numbers are never reused


def test_queue_smallest_margin_first_moderated_never_back_random_share(store: Store) -> None:
    qs = [question(store, i, f"u{i}", f"question number {i}?", NOON + i, margin=m)
          for i, m in enumerate([0.9, 0.05, 0.5, None, 0.2])]
    rng = random.Random(0)
    order = []
    exclude: list[str] = []
    for _ in range(5):
        nxt = review_next(store, rng=rng, random_share=0.0, exclude=exclude)
        order.append(nxt)
        exclude.append(nxt)
    assert order == [qs[i].id for i in (1, 4, 2, 0, 3)]  # undecided questions last
    set_label(store, qs[1].id, "needs", "moderator", labeler="m")
    set_label(store, qs[4].id, "needs", "member", labeler="u4")  # a member label does not take it off the queue
    assert review_next(store, rng=rng, random_share=0.0) == qs[4].id
    # With a random share, other questions show up too, but never a moderator-labelled one.
    picks = {review_next(store, rng=random.Random(s), random_share=0.5) for s in range(60)}
    assert qs[1].id not in picks and len(picks) >= 3
    store.opt_out("onebotv11", "u4")
    assert review_next(store, rng=rng, random_share=0.0) == qs[2].id
    assert review_next(store, rng=rng, random_share=0.0, group="other") is None


def test_undo_walks_back_and_refuses_when_overwritten(store: Store) -> None:
    q = question(store, 1, "u1", "how to deploy it on TX2?", NOON)
    set_label(store, q.id, "needs", "moderator", labeler="m1", rewrite="How to deploy mmpose on TX2?")
    set_label(store, q.id, "not_needed", "moderator", labeler="m1")
    undone = undo_last(store, "m1")
    assert (undone.undone, undone.restored) == ("not_needed", "needs")
    assert labels_of(store, q.id)["moderator"].rewrite == "How to deploy mmpose on TX2?"
    assert undo_last(store, "m1").restored is None and "moderator" not in labels_of(store, q.id)
    assert undo_last(store, "m1") is None
    audit = store.db.conn.execute("SELECT old_label, new_label FROM label_audit ORDER BY id").fetchall()
    assert audit == [(None, "needs"), ("needs", "not_needed"), ("not_needed", "needs"), ("needs", None)]
    set_label(store, q.id, "needs", "moderator", labeler="m1")
    set_label(store, q.id, "not_question", "moderator", labeler="m2")
    with pytest.raises(UndoConflict):
        undo_last(store, "m1")


def test_stats_kappa_and_calendar_windows(store: Store) -> None:
    monday = datetime(2026, 11, 16, 9, 0, tzinfo=UTC).timestamp()
    qs = [question(store, i, f"u{i}", f"question number {i}?", monday) for i in range(6)]
    member = ["needs", "needs", "not_needed", "not_needed", "needs", "not_question"]
    moderator = ["needs", "needs", "not_needed", "needs", None, "not_question"]
    for q, a, b in zip(qs, member, moderator):
        set_label(store, q.id, a, "member", labeler="x", at=monday)
        if b:
            set_label(store, q.id, b, "moderator", labeler="m", at=NOON)
    stats = label_stats(store, now=NOON, tz=UTC)
    assert stats.by_source == {"member": 6, "moderator": 5}
    assert stats.by_label == {"needs": 4, "not_needed": 1, "not_question": 1}
    assert stats.kappa_n == 5
    from corefbot.pipeline.metrics import cohen_kappa
    assert stats.kappa == pytest.approx(cohen_kappa(member[:4] + member[5:], moderator[:4] + moderator[5:]))
    assert 0 < stats.kappa < 1
    assert stats.today == {"moderator": 5} and stats.week == {"member": 6, "moderator": 5}


def test_quiet_hours_parse_and_wrap() -> None:
    assert parse_quiet_hours("23:00-08:00") == (1380, 480) and parse_quiet_hours("") is None
    assert parse_quiet_hours("1-5") == (60, 300)
    with pytest.raises(ValueError, match="HH:MM"):
        parse_quiet_hours("late")
    limits = ConfirmLimits(tz=UTC)
    at = lambda h, m=0: datetime(2026, 11, 18, h, m, tzinfo=UTC).timestamp()  # noqa: E731
    assert [in_quiet_hours(at(h, m), limits) for h, m in [(22, 59), (23, 0), (3, 0), (7, 59), (8, 0), (12, 0)]] == \
        [False, True, True, True, False, False]


def test_limits_with_a_controllable_clock(store: Store) -> None:
    limits = ConfirmLimits(tz=UTC)  # the defaults
    chatter(store, 1000, NOON)  # a busy group: share of voice allows 8 prompts this week
    now = NOON
    a1 = question(store, 1, "alice", "how to deploy it on TX2?", now)
    p = reserve_prompt(store, a1, "needs", "How to deploy mmpose on TX2?", now, limits)
    assert not isinstance(p, str)
    prompt_sent(store, p.id, "777")
    assert ask_refusal(store, a1, now + 86_400 * 3, limits) == "asked before"  # never the same message twice
    a2 = question(store, 2, "alice", "and what about Jetson Nano?", now + 1000)
    assert ask_refusal(store, a2, now + 1000, limits) == "member's daily limit"
    b1 = question(store, 3, "bob", "why does it fail?", now + 60)
    assert ask_refusal(store, b1, now + 60, limits) == "too soon after the last prompt in this group"
    assert ask_refusal(store, b1, now + 900, limits) is None
    assert ask_refusal(store, a2, now + 86_401, limits) is None  # a day later alice may be asked again
    for k, who in enumerate(["bob", "carol"]):
        q = question(store, 4 + k, who, "is this supported?", now + 1000 * (k + 1))
        assert not isinstance(reserve_prompt(store, q, "needs", None, now + 1000 * (k + 1), limits), str)
    d1 = question(store, 6, "dave", "how about that one?", now + 5000)
    assert ask_refusal(store, d1, now + 5000, limits) == "group's daily limit"
    night = datetime(2026, 11, 19, 23, 30, tzinfo=UTC).timestamp()
    assert ask_refusal(store, d1, night, limits) == "quiet hours"
    assert ask_refusal(store, d1, night + 9 * 3600, limits) is None
    quiet_group = question(store, 7, "erin", "does it work on TX2?", now, group="small")
    chatter(store, 50, now, group="small", start=50_000)
    assert ask_refusal(store, quiet_group, now, limits) == "group's share of bot messages"
    store.opt_out("onebotv11", "dave")
    assert ask_refusal(store, d1, night + 9 * 3600, limits) == "member opted out"


def test_answers_only_from_the_author_reply_or_bare_until_expiry(store: Store) -> None:
    q = question(store, 1, "alice", "how to deploy it on TX2?", NOON)
    p = reserve_prompt(store, q, "needs", "How to deploy mmpose on TX2?", NOON, NO_LIMITS)
    prompt_sent(store, p.id, "555")
    kw = dict(platform="onebotv11", group="g1")
    assert answer_prompt(store, sender="bob", text="1", reply_to="555", now=NOON + 5, **kw) is None
    assert answer_prompt(store, sender="bob", text="1", reply_to=None, now=NOON + 5, **kw) is None
    assert answer_prompt(store, sender="alice", text="thanks", reply_to="555", now=NOON + 5, **kw) is None
    assert labels_of(store, q.id) == {}
    got = answer_prompt(store, sender="alice", text="@bot 1", reply_to="555", now=NOON + 10, **kw)
    assert got.label == "needs" and got.row.rewrite == "How to deploy mmpose on TX2?"
    got = answer_prompt(store, sender="alice", text="２", reply_to=None, now=NOON + 20, **kw)  # changed her mind
    assert got.label == "not_needed" and labels_of(store, q.id)["member"].label == "not_needed"
    assert answer_prompt(store, sender="alice", text="3", reply_to=None, now=NOON + 1801, **kw) is None
    q2 = question(store, 2, "carol", "那个怎么装？", NOON)
    p2 = reserve_prompt(store, q2, "not_needed", None, NOON, NO_LIMITS)
    prompt_sent(store, p2.id, "556")
    assert answer_prompt(store, sender="carol", text="1", reply_to="556", now=NOON + 1801, **kw) is None
    assert store.db.conn.execute("SELECT status FROM label_prompts WHERE id = ?", (p2.id,)).fetchone()[0] == "expired"
    assert [parse_answer(t) for t in ["1", " 3。", "１", "12", "1 thanks", "@Bot 2"]] == ["1", "3", "1", None, None, "2"]


def test_forget_member_leaves_nothing_in_database_or_exports(store: Store, tmp_path) -> None:
    chatter(store, 300, NOON)
    q = question(store, 1, "alice", "Can mmpose be deployed on mobile phones?", NOON - 100)
    other = question(store, 2, "bob", "BTW, how to deploy it on TX2?", NOON)
    store.insert_messages([message(3, "10000", "@alice I read this as…", NOON + 1, from_self=True,
                                   reply_to="1", mentions=("alice",))])
    store.upsert_merged([Merged(id="onebotv11:g1:3", platform="onebotv11", group="g1", sender="10000",
                                text="@alice I read this as…", timestamp=NOON + 1, end_timestamp=NOON + 1,
                                message_ids=["onebotv11:g1:3"], from_self=True)])
    p = reserve_prompt(store, q, "needs", "Can mmpose be deployed on mobile phones?", NOON, NO_LIMITS)
    prompt_sent(store, p.id, "3")
    answer_prompt(store, platform="onebotv11", group="g1", sender="alice", text="1", reply_to="3", now=NOON + 2)
    set_label(store, q.id, "not_needed", "moderator", labeler="m")
    set_label(store, other.id, "needs", "moderator", labeler="alice", rewrite="How to deploy mmpose on TX2?")
    store.db["decisions"].insert({"merged_id": q.id, "decision": "needs", "margin": 0.1})
    item_id(store, q.id)
    salt = store.salt()
    done = forget_member(store, "onebotv11", "alice")
    assert done.messages == 1 and done.bot_messages == 1
    dump = "\n".join(str(row) for table in store.db.table_names() for row in store.db[table].rows)
    assert "alice" not in dump and "mobile phones" not in dump and "I read this as" not in dump
    assert effective_labels(store)[other.id].labeler == "forgotten"
    records = json.dumps(list(iter_records(store)), ensure_ascii=False)
    write_alpaca(store, tmp_path / "a.json")
    alpaca = (tmp_path / "a.json").read_text(encoding="utf-8")
    for text in (records, alpaca):
        assert pseudonym(salt, "onebotv11", "alice") not in text and "mobile phones" not in text
    assert "TX2" in records and "TX2" in alpaca  # the others' data is still there


def test_alpaca_export_moderator_first_member_optional_rewrite_kept(store: Store, tmp_path) -> None:
    chatter(store, 3, NOON)
    q1 = question(store, 1, "alice", "BTW, how to deploy it on TX2?", NOON + 1)
    q2 = question(store, 2, "bob", "is it fast?", NOON + 2)
    q3 = question(store, 3, "carol", "那个怎么装？", NOON + 3)
    set_label(store, q1.id, "needs", "member", labeler="alice", rewrite="How to deploy mmpose on TX2?")
    set_label(store, q1.id, "needs", "moderator", labeler="m")  # confirms without typing a rewrite
    set_label(store, q2.id, "needs", "member", labeler="bob", rewrite="is mmpose fast?")
    set_label(store, q2.id, "not_needed", "moderator", labeler="m")  # overrides the member
    set_label(store, q3.id, "needs", "member", labeler="carol", rewrite="mmpose 怎么装？")

    def export(use_member: bool):
        out = tmp_path / f"a-{use_member}.json"
        manifest = write_alpaca(store, out, use_member=use_member)
        rows = {r["meta"]["id"]: r for r in json.loads(out.read_text(encoding="utf-8"))}
        return manifest, rows

    manifest, rows = export(True)
    assert {k: (r["meta"]["label"], r["meta"]["rewrite"]) for k, r in rows.items()} == {
        q1.id: ("needs", "How to deploy mmpose on TX2?"), q2.id: ("not_needed", None),
        q3.id: ("needs", "mmpose 怎么装？")}
    assert rows[q1.id]["output"].endswith("\nHow to deploy mmpose on TX2?")
    assert manifest.sources == {"moderator": 2, "member": 1} and manifest.labels == {"needs": 2, "not_needed": 1}
    assert json.loads((tmp_path / "a-True.json.manifest.json").read_text())["member_labels"] is True
    manifest, rows = export(False)
    assert {k: (r["meta"]["label"], r["meta"]["rewrite"]) for k, r in rows.items()} == {
        q1.id: ("needs", None), q2.id: ("not_needed", None)}
    assert manifest.sources == {"moderator": 2} and manifest.member_labels is False


def test_forget_member_also_clears_the_outbox(store: Store) -> None:
    from corefbot.pipeline.build import build

    store.insert_messages([Message("onebotv11", "g", "1", "carol", 100.0, "How to deploy mmpose on TX2?")])
    build(store)
    (merged,) = list(store.iter_merged())
    with store.db.conn:
        store.db.conn.execute(
            "INSERT INTO outbox (merged_id, platform, group_id, query, status, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            (merged.id, "onebotv11", "g", merged.text, "pending", 100.0))
    forget_member(store, "onebotv11", "carol")
    assert store.count("outbox") == 0 and store.count("messages") == 0
