"""nonebug tests of plugins/labels: /label (permission, malformed, next/label/undo/skip/show/stats, bare answers),
member confirmation (prompt, only the author's answer, expiry), /optout /optin /forgetme."""
from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from datetime import datetime, timezone

import pytest
from nonebot.adapters.onebot.v11 import Message, MessageSegment
from nonebug import App

from corefbot.pipeline.labels.limits import ConfirmLimits
from corefbot.pipeline.records import Merged
from tests.onebot_events import Like, db, group_message, make_bot, reply_to

PLATFORM = "onebotv11"
NOON = datetime(2026, 11, 18, 12, 0, tzinfo=timezone.utc).timestamp()
OPEN = ConfirmLimits(per_group_day=1000, per_member_day=1000, per_1000=1e6, group_gap_s=0, quiet=None,
                     tz=timezone.utc, expire_s=600)


async def eventually(fn, timeout: float = 5.0):
    """Poll a database read until it is truthy (listeners run after the writer stored the message)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await db(fn)
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.02)


@pytest.fixture
def clock():
    """The labels plugin's clock, settable by the test; the plugin's limits opened up unless a test narrows them."""
    from corefbot.plugins.labels import runtime

    saved = runtime.clock, runtime.limits, runtime.config.corefbot_labels_random_share
    now = [NOON]
    runtime.clock = lambda: now[0]
    runtime.limits = OPEN
    runtime.config.corefbot_labels_random_share = 0.0  # the queue order is tested here; the random share in pipeline tests
    yield now
    runtime.clock, runtime.limits, runtime.config.corefbot_labels_random_share = saved


def seed(group: int, questions: list[tuple[str, str, float | None]], chat: int = 3) -> list[str]:
    """Store some chat and some questions (sender, text, the model's margin) in a group; returns merged ids."""
    from corefbot.pipeline.records import Message as Msg

    def run(store):
        g = str(group)
        msgs = [Msg(PLATFORM, g, f"c{k}", f"3{k}", NOON - 500 + k, f"chat line {k} about mmpose") for k in range(chat)]
        ids = []
        for i, (sender, text, margin) in enumerate(questions):
            m = Msg(PLATFORM, g, f"q{i}", sender, NOON - 100 + i, text)
            msgs.append(m)
            ids.append(m.key)
            store.upsert_merged([Merged(id=m.key, platform=PLATFORM, group=g, sender=sender, text=text,
                                        timestamp=m.timestamp, end_timestamp=m.timestamp, message_ids=[m.key],
                                        question_score=8.0, is_question=True)])
            if margin is not None:
                store.db["decisions"].insert({"merged_id": m.key, "decision": "needs", "margin": margin,
                                              "rewrite": "How to deploy mmpose on TX2?", "at": NOON})
        store.insert_messages(msgs)
        for m in msgs[:chat]:
            store.upsert_merged([Merged(id=m.key, platform=PLATFORM, group=g, sender=m.sender, text=m.text,
                                        timestamp=m.timestamp, end_timestamp=m.timestamp, message_ids=[m.key])])
        return ids

    return run


def labels(merged_id: str):
    def read(store):
        return dict(store.db.conn.execute("SELECT source, label FROM labels WHERE merged_id = ?", (merged_id,)).fetchall())
    return read


def item_of(merged_id: str):
    from corefbot.pipeline.labels.rows import item_id

    return lambda store: item_id(store, merged_id)


async def test_refused_for_members_and_nothing_changes(app: App, clock) -> None:
    ids = await db(seed(7401, [("40001", "BTW, how to deploy it on TX2?", 0.1)]))
    n = await db(item_of(ids[0]))
    audit_before = await db(lambda s: s.count("label_audit"))
    async with app.test_matcher() as ctx:
        bot = make_bot(ctx)
        for text in ("/label next", f"/label {n} a", "/label undo", "/label stats", "/label skip", f"/label show {n}",
                     "/label a", "/label nonsense"):
            event = group_message(text, group=7401, user=40002, role="member")
            ctx.receive_event(bot, event)
            ctx.should_call_send(event, "Only moderators can label.", result={"message_id": 1})
    assert await db(labels(ids[0])) == {}
    assert await db(lambda s: s.count("label_audit")) == audit_before


async def test_admin_next_label_by_id_and_by_letter_with_audit(app: App, clock) -> None:
    ids = await db(seed(7402, [("40011", "BTW, how to deploy it on TX2?", 0.05),
                              ("40012", "why does it fail with out of memory?", 0.4),
                              ("40013", "在 TX2 上呢？", None)]))
    first = await db(item_of(ids[0]))
    async with app.test_matcher() as ctx:
        bot = make_bot(ctx)
        e1 = group_message("/label next", group=7402, user=40010, role="admin")
        ctx.receive_event(bot, e1)
        ctx.should_call_send(e1, Like(rf"^#{first} · group 7402\n.*A: chat line 0.*▶ .: BTW, how to deploy it on TX2\?"
                                      r".*model: needs \(margin 0\.05\).*a needs resolution / b does not"),
                             result={"message_id": 2})
        e2 = group_message(f"/label {first} a How to deploy   mmpose on TX2?", group=7402, user=40010, role="admin")
        ctx.receive_event(bot, e2)
        ctx.should_call_send(e2, Like(rf"^✓ #{first} needs \(How to deploy mmpose on TX2\?\)\nnext: #\d+ .*out of memory"),
                             result={"message_id": 3})
        e3 = group_message("/label C", group=7402, user=40010, role="owner")
        ctx.receive_event(bot, e3)
        ctx.should_call_send(e3, Like(r"^✓ #\d+ not_question\nnext: .*在 TX2 上呢"), result={"message_id": 4})
    assert await db(labels(ids[0])) == {"moderator": "needs"}
    assert await db(labels(ids[1])) == {"moderator": "not_question"}
    audit = await db(lambda s: s.db.conn.execute(
        "SELECT labeler, old_label, new_label, new_rewrite FROM label_audit WHERE merged_id = ?", (ids[0],)).fetchall())
    assert audit == [("40010", None, "needs", "How to deploy mmpose on TX2?")]
    # Label traffic is not chat: the commands are gone from the log, the other messages stay.
    left = await db(lambda s: [r[0] for r in s.db.conn.execute("SELECT text FROM messages WHERE group_id = '7402'")])
    assert not any(t.startswith("/label") for t in left) and "在 TX2 上呢？" in left


async def test_superuser_and_listed_moderator_allowed_malformed_gets_usage(app: App, clock, monkeypatch) -> None:
    from corefbot.plugins.common import moderators

    monkeypatch.setattr(moderators.config, "corefbot_moderators", {"40021"})
    await db(seed(7403, [("40022", "how to deploy it on TX2?", 0.2)]))
    async with app.test_matcher() as ctx:
        bot = make_bot(ctx)
        for user, text in [("90001", "/label frobnicate"), ("40021", "/label 12 d"), ("40021", "/label show x"),
                           ("90001", "/label 3")]:
            event = group_message(text, group=7403, user=int(user), role="member")
            ctx.receive_event(bot, event)
            ctx.should_call_send(event, Like(r"^usage: /label \[next\]"), result={"message_id": 5})
        event = group_message("/label next", group=7403, user=40021, role="member")
        ctx.receive_event(bot, event)
        ctx.should_call_send(event, Like(r"how to deploy it on TX2"), result={"message_id": 6})


async def test_undo_skip_show_and_scope(app: App, clock) -> None:
    ids = await db(seed(7404, [("40031", "how to deploy it on TX2?", 0.1), ("40032", "那个怎么装？", 0.2)]))
    other = await db(seed(7405, [("40033", "what about Jetson Nano then?", 0.01)]))
    n0, n1, n_other = await db(item_of(ids[0])), await db(item_of(ids[1])), await db(item_of(other[0]))
    async with app.test_matcher() as ctx:
        bot = make_bot(ctx)
        steps = [
            ("/label next", rf"^#{n0} "), ("/label skip", rf"^skipped\. #{n1} .*那个怎么装"),
            (f"/label {n0} b", rf"^✓ #{n0} not_needed\nnext: #{n1}"), (f"/label {n0} a", rf"^✓ #{n0} not_needed → needs"),
            ("/label undo", rf"^undone #{n0}: needs → not_needed"), ("/label undo", rf"^undone #{n0}: not_needed → unlabelled"),
            ("/label undo", r"^nothing to undo"),
            (f"/label show {n0}", rf"^#{n0} · group 7404\n.*how to deploy it on TX2"),
            (f"/label show {n_other}", rf"^no item #{n_other} here"), (f"/label {n_other} a", rf"^no item #{n_other} here"),
        ]
        for text, pattern in steps:
            event = group_message(text, group=7404, user=40030, role="admin")
            ctx.receive_event(bot, event)
            ctx.should_call_send(event, Like(pattern), result={"message_id": 7})
    assert await db(labels(ids[0])) == {} and await db(labels(other[0])) == {}


async def test_bare_letter_answers_the_moderators_item_only(app: App, clock) -> None:
    ids = await db(seed(7406, [("40041", "how to deploy it on TX2?", 0.1), ("40042", "why does it fail?", 0.3)]))
    n0 = await db(item_of(ids[0]))
    async with app.test_matcher() as ctx:
        bot = make_bot(ctx)
        e1 = group_message("/label", group=7406, user=40040, role="admin")
        ctx.receive_event(bot, e1)
        ctx.should_call_send(e1, Like(rf"^#{n0} "), result={"message_id": 8})
        ctx.receive_event(bot, group_message("b", group=7406, user=40049, role="member"))  # someone else's "b"
        ctx.receive_event(bot, group_message("a lot of people ask that", group=7406, user=40040, role="admin"))
        e2 = group_message("B", group=7406, user=40040, role="admin")
        ctx.receive_event(bot, e2)
        ctx.should_call_send(e2, Like(rf"^✓ #{n0} not_needed\nnext: .*why does it fail"), result={"message_id": 9})
    assert await db(labels(ids[0])) == {"moderator": "not_needed"}


async def test_stats_reports_counts_kappa_and_today(app: App, clock) -> None:
    from corefbot.pipeline.labels.rows import set_label

    ids = await db(seed(7407, [("40051", "how to deploy it on TX2?", 0.1), ("40052", "那个怎么装？", 0.2),
                              ("40053", "is it supported on Windows?", 0.3)]))

    def label_all(store):
        for i, (a, b) in enumerate([("needs", "needs"), ("not_needed", "needs"), ("needs", "needs")]):
            set_label(store, ids[i], a, "member", labeler="m", at=NOON - 3600)
            set_label(store, ids[i], b, "moderator", labeler="x", at=NOON - 60)

    await db(label_all)
    async with app.test_matcher() as ctx:
        bot = make_bot(ctx)
        event = group_message("/label stats", group=7407, user=90001)
        ctx.receive_event(bot, event)
        ctx.should_call_send(event, Like(r"^labels: needs 3\nby source: member 3, moderator 3\n"
                                         r"member vs moderator kappa: 0\.00 on 3\ntoday: member 3, moderator 3"),
                             result={"message_id": 10})


def prompt_rows(group: int):
    def read(store):
        return store.db.conn.execute("SELECT author, status, answer, prompt_message_id FROM label_prompts "
                                     "WHERE group_id = ?", (str(group),)).fetchall()
    return read


async def confirm(app: App, group: int, author: int, text: str, message_id: int, bot_message_id: int,
                  decision: str = "needs", rewrite: str | None = "How to deploy mmpose on TX2?") -> str:
    """Run the labels plugin's resolution listener on a stored question; expect the prompt to go out."""
    from corefbot.models.serve.resolver import Resolution
    from corefbot.plugins.chatlog import Update
    from corefbot.plugins.labels.confirm import on_resolution
    from corefbot.plugins.labels.texts import prompt_text
    from corefbot.pipeline.records import Message as Msg

    m = Msg(PLATFORM, str(group), str(message_id), str(author), NOON, text)
    merged = Merged(id=m.key, platform=PLATFORM, group=str(group), sender=str(author), text=text, timestamp=NOON,
                    end_timestamp=NOON, message_ids=[m.key], question_score=8.0, is_question=True)
    await db(lambda s: (s.insert_messages([m]), s.upsert_merged([merged])))
    resolution = Resolution(decision, {"needs": 0.55, "not_needed": 0.45, "unknown": 0.0}, rewrite=rewrite)
    async with app.test_api() as ctx:
        make_bot(ctx)
        expected = MessageSegment.reply(message_id) + MessageSegment.at(author) + \
            MessageSegment.text(" " + prompt_text(decision, rewrite))
        ctx.should_call_api("send_group_msg", {"group_id": group, "message": expected}, {"message_id": bot_message_id})
        await on_resolution(Update(message=m, merged=merged, window=[], new_run=True), resolution)
    return merged.id


async def test_member_confirms_by_reply_only_the_author_counts(app: App, clock) -> None:
    merged_id = await confirm(app, 7408, 40061, "BTW, how to deploy it on TX2?", 6081, 96081)
    assert await db(prompt_rows(7408)) == [("40061", "open", None, "96081")]
    async with app.test_matcher() as ctx:
        bot = make_bot(ctx)
        ctx.receive_event(bot, group_message("1", group=7408, user=40062, reply=reply_to(96081, 10000)))  # not the author
        ctx.receive_event(bot, group_message("3", group=7408, user=40062))
    await asyncio.sleep(0.2)
    assert await db(labels(merged_id)) == {}
    clock[0] += 60
    async with app.test_matcher() as ctx:
        bot = make_bot(ctx)
        ctx.receive_event(bot, group_message("1", group=7408, user=40061, reply=reply_to(96081, 10000)))
    assert await eventually(labels(merged_id)) == {"member": "needs"}
    row = await db(lambda s: s.db.conn.execute("SELECT rewrite, labeler FROM labels WHERE merged_id = ?",
                                               (merged_id,)).fetchone())
    assert row == ("How to deploy mmpose on TX2?", "40061")
    assert (await db(prompt_rows(7408)))[0][1:3] == ("answered", "1")
    # The answer is label traffic, not chat: it leaves the log; the other member's messages stay.
    texts = await eventually(lambda s: [r[0] for r in s.db.conn.execute(
        "SELECT text FROM messages WHERE group_id = '7408' AND sender = '40061'")] == ["BTW, how to deploy it on TX2?"])
    assert texts


async def test_bare_answer_within_expiry_and_never_after(app: App, clock) -> None:
    merged_id = await confirm(app, 7409, 40071, "那个怎么装？", 6091, 96091, decision="not_needed", rewrite=None)
    clock[0] += 601  # past the 600 s expiry
    async with app.test_matcher() as ctx:
        bot = make_bot(ctx)
        ctx.receive_event(bot, group_message("2", group=7409, user=40071))
    assert await eventually(lambda s: (prompt_rows(7409)(s))[0][1] == "expired")
    assert await db(labels(merged_id)) == {}
    other = await confirm(app, 7409, 40072, "why does it fail?", 6092, 96092, decision="not_needed", rewrite=None)
    clock[0] += 30
    async with app.test_matcher() as ctx:
        bot = make_bot(ctx)
        ctx.receive_event(bot, group_message("２", group=7409, user=40072))  # bare, full-width
    assert await eventually(labels(other)) == {"member": "needs"}  # 2 on a "stands on its own" reading


async def test_limits_and_quiet_hours_through_the_plugin(app: App, clock) -> None:
    from corefbot.models.serve.resolver import Resolution
    from corefbot.plugins.chatlog import Update
    from corefbot.plugins.labels import runtime
    from corefbot.plugins.labels.confirm import on_resolution
    from corefbot.pipeline.records import Message as Msg

    runtime.limits = ConfirmLimits(per_group_day=1, per_member_day=1, per_1000=1e6, group_gap_s=0,
                                   quiet=(23 * 60, 8 * 60), tz=timezone.utc)
    await confirm(app, 7410, 40081, "how to deploy it on TX2?", 6101, 96101)
    m = Msg(PLATFORM, "7410", "6102", "40082", NOON + 10, "and on Jetson Nano?")
    merged = Merged(id=m.key, platform=PLATFORM, group="7410", sender="40082", text=m.text, timestamp=m.timestamp,
                    end_timestamp=m.timestamp, message_ids=[m.key], question_score=8.0, is_question=True)
    res = Resolution("needs", {"needs": 0.9, "not_needed": 0.1, "unknown": 0.0}, rewrite="mmpose on Jetson Nano?")
    async with app.test_api() as ctx:  # any send here would fail the test: the group's daily limit is reached
        make_bot(ctx)
        await on_resolution(Update(message=m, merged=merged, window=[], new_run=True), res)
        clock[0] = datetime(2026, 11, 19, 23, 30, tzinfo=timezone.utc).timestamp()  # next day, but quiet hours
        await on_resolution(Update(message=m, merged=merged, window=[], new_run=True), res)
    assert [r[0] for r in await db(prompt_rows(7410))] == ["40081"]
    clock[0] = datetime(2026, 11, 20, 9, 0, tzinfo=timezone.utc).timestamp()
    async with app.test_api() as ctx:
        make_bot(ctx)
        ctx.should_call_api("send_group_msg", {"group_id": 7410, "message": Like("mmpose on Jetson Nano")},
                            {"message_id": 96102})
        await on_resolution(Update(message=m, merged=merged, window=[], new_run=True), res)
    assert [r[0] for r in await db(prompt_rows(7410))] == ["40081", "40082"]


async def test_optout_optin_and_forgetme(app: App, clock) -> None:
    merged_id = await confirm(app, 7411, 40091, "does it run on the Orin board?", 6111, 96111)
    from corefbot.plugins.labels import runtime

    runtime.limits = replace(OPEN, per_group_day=1)  # the resolver sees the questions below: no more prompts
    async with app.test_matcher() as ctx:
        bot = make_bot(ctx)
        event = group_message("/optout", group=7411, user=40091)
        ctx.receive_event(bot, event)
        ctx.should_call_send(event, Like("^OK: I no longer record"), result={"message_id": 96112})
        ctx.receive_event(bot, group_message("1", group=7411, user=40091))  # opted out: not recorded, not an answer
        ctx.receive_event(bot, group_message("still here, not recorded", group=7411, user=40091))
    await asyncio.sleep(0.2)
    assert await db(labels(merged_id)) == {}
    assert (await db(prompt_rows(7411)))[0][1] == "expired"
    assert await db(lambda s: s.is_opted_out(PLATFORM, "40091"))
    async with app.test_matcher() as ctx:
        bot = make_bot(ctx)
        event = group_message("/optin", group=7411, user=40091)
        ctx.receive_event(bot, event)
        ctx.should_call_send(event, "OK: your messages are recorded again.", result={"message_id": 96113})
        ctx.receive_event(bot, group_message("mmpose works now on my TX2", group=7411, user=40091))
        ctx.receive_event(bot, group_message("great, which version?", group=7411, user=40092))
        event = group_message("/forgetme", group=7411, user=40091)
        ctx.receive_event(bot, event)
        ctx.should_call_send(event, Like(r"^Done: deleted 3 of your messages"), result={"message_id": 96114})
        # Their next line starts a fresh run: the open run was theirs and is gone.
        ctx.receive_event(bot, group_message("one more thing", group=7411, user=40091))

    def everything(store):
        return [str(r) for t in store.db.table_names() for r in store.db[t].rows]

    rows = await eventually(lambda s: any("one more thing" in r for r in everything(s)) and everything(s))
    assert [r for r in rows if "40091" in r and "one more thing" not in r] == []
    dump = "\n".join(rows)
    runs = await db(lambda s: [(m.sender, m.text) for m in s.iter_merged(PLATFORM, "7411")])
    assert ("40091", "one more thing") in runs and not any("Orin" in t or "TX2" in t for _, t in runs)
    assert "Orin board" not in dump and "mmpose works now" not in dump
    assert "great, which version?" in dump


async def test_private_chat_superuser_reviews_every_group_others_refused(app: App, clock) -> None:
    from nonebot.adapters.onebot.v11 import PrivateMessageEvent
    from nonebot.adapters.onebot.v11.event import Sender

    ids = await db(seed(7412, [("40101", "does it support the Orin NX?", 0.0)]))
    n = await db(item_of(ids[0]))

    def private(text: str, user: int) -> PrivateMessageEvent:
        message = Message(text)
        return PrivateMessageEvent(time=int(NOON), self_id=10000, post_type="message", sub_type="friend",
                                   user_id=user, message_type="private", message_id=int(time.time_ns() % 1_000_000),
                                   message=message, original_message=message, raw_message=text, font=0,
                                   sender=Sender(user_id=user, nickname="x"), to_me=True)

    async with app.test_matcher() as ctx:
        bot = make_bot(ctx)
        event = private("/label next", 40102)  # a group admin elsewhere has no role in a private chat
        ctx.receive_event(bot, event)
        ctx.should_call_send(event, "Only moderators can label.", result={"message_id": 11})
        event = private(f"/label show {n}", 90001)
        ctx.receive_event(bot, event)
        ctx.should_call_send(event, Like(rf"^#{n} · group 7412\n.*Orin NX"), result={"message_id": 12})
        event = private(f"/label {n} b", 90001)
        ctx.receive_event(bot, event)
        ctx.should_call_send(event, Like(rf"^✓ #{n} not_needed"), result={"message_id": 13})
    assert await db(labels(ids[0])) == {"moderator": "not_needed"}


async def test_item_on_screen_whose_author_forgot_themselves_is_not_labelled(app: App, clock) -> None:
    from corefbot.pipeline.labels.forget import forget_member

    ids = await db(seed(7413, [("40111", "how to flash it onto the board?", 0.0), ("40112", "why does it hang?", 0.5)]))
    n0 = await db(item_of(ids[0]))
    async with app.test_matcher() as ctx:
        bot = make_bot(ctx)
        e1 = group_message("/label next", group=7413, user=40110, role="admin")
        ctx.receive_event(bot, e1)
        ctx.should_call_send(e1, Like(rf"^#{n0} "), result={"message_id": 14})
    await db(lambda s: forget_member(s, PLATFORM, "40111"))
    async with app.test_matcher() as ctx:
        bot = make_bot(ctx)
        e2 = group_message("a", group=7413, user=40110, role="admin")
        ctx.receive_event(bot, e2)
        ctx.should_call_send(e2, Like(r"^that question is no longer stored.*\nnext: .*why does it hang"),
                             result={"message_id": 15})
        e3 = group_message(f"/label {n0} a", group=7413, user=40110, role="admin")
        ctx.receive_event(bot, e3)
        ctx.should_call_send(e3, Like(rf"^no item #{n0} here"), result={"message_id": 16})
    assert await db(lambda s: s.db.conn.execute("SELECT count(*) FROM labels WHERE merged_id = ?",
                                                (ids[0],)).fetchone()[0]) == 0
