"""The concat rule on real SQLite: boundaries, runs' last messages, replies, interleaving, live == batch."""
from __future__ import annotations

import random

from corefbot.pipeline.build import build, score_run
from corefbot.pipeline.merge import Merger, merge_all
from corefbot.pipeline.question import QuestionFilter
from corefbot.pipeline.records import Message
from corefbot.pipeline.store import Store


def msg(i: int, sender: str, t: float, text: str = "", group: str = "g", reply_to: str | None = None) -> Message:
    return Message(platform="p", group=group, message_id=str(i), sender=sender, timestamp=t,
                   text=text or f"line {i}", reply_to=reply_to)


def runs(messages: list[Message], gap: float = 18.0) -> list[list[str]]:
    merged = sorted(merge_all(messages, gap), key=lambda m: (m.group, m.timestamp))
    return [[k.rsplit(":", 1)[1] for k in m.message_ids] for m in merged]


def test_a_run_keeps_its_last_message() -> None:
    # The reference code dropped the message that ends a run; every message must be in exactly one run.
    messages = [msg(1, "a", 0), msg(2, "a", 5), msg(3, "a", 10), msg(4, "b", 12)]
    assert runs(messages) == [["1", "2", "3"], ["4"]]


def test_exact_18s_boundary_joins_and_a_longer_gap_splits() -> None:
    assert runs([msg(1, "a", 0), msg(2, "a", 18.0)]) == [["1", "2"]]
    assert runs([msg(1, "a", 0), msg(2, "a", 18.001)]) == [["1"], ["2"]]
    # each line is measured from the previous one, not from the run's start
    assert runs([msg(1, "a", 0), msg(2, "a", 18), msg(3, "a", 36)]) == [["1", "2", "3"]]


def test_interleaved_senders_end_runs() -> None:
    messages = [msg(1, "a", 0), msg(2, "b", 1), msg(3, "a", 2), msg(4, "a", 3)]
    assert runs(messages) == [["1"], ["2"], ["3", "4"]]


def test_a_reply_starts_its_own_run_and_keeps_its_target() -> None:
    messages = [msg(1, "a", 0), msg(2, "a", 3, reply_to="99"), msg(3, "a", 6)]
    merged = sorted(merge_all(messages), key=lambda m: m.timestamp)
    assert [[k.rsplit(":", 1)[1] for k in m.message_ids] for m in merged] == [["1"], ["2", "3"]]
    assert merged[1].reply_to == "99"


def test_groups_are_independent() -> None:
    messages = [msg(1, "a", 0, group="g1"), msg(2, "a", 1, group="g2"), msg(3, "a", 2, group="g1")]
    assert sorted(runs(sorted(messages, key=lambda m: (m.group, m.timestamp)))) == [["1", "3"], ["2"]]


def test_merged_text_joins_lines_and_mentions() -> None:
    m1 = Message("p", "g", "1", "a", 0.0, "mmdeploy 转 TensorRT 报错", mentions=("x",))
    m2 = Message("p", "g", "2", "a", 4.0, "这个怎么解决？", mentions=("y", "x"))
    (run,) = merge_all([m1, m2])
    assert run.text == "mmdeploy 转 TensorRT 报错\n这个怎么解决？"
    assert run.mentions == ("x", "y") and run.id == m1.key and run.end_timestamp == 4.0


def random_chat(n: int, seed: int) -> list[Message]:
    rng = random.Random(seed)
    t = {g: 0.0 for g in ("g1", "g2", "g3")}
    out = []
    for i in range(n):
        g = rng.choice(list(t))
        t[g] += rng.choice([0, 1, 5, 17, 18, 19, 60])
        out.append(msg(i, rng.choice("abc"), t[g], group=g,
                       reply_to=str(rng.randrange(i)) if i and rng.random() < 0.1 else None))
    return out


def test_incremental_and_batch_give_identical_runs(store: Store) -> None:
    messages = random_chat(600, seed=3)
    qf = QuestionFilter()
    # live: messages arrive one at a time, in time order, each run upserted as it grows
    merger = Merger(load_open=store.last_merged)
    for m in messages:
        store.insert_messages([m])
        run, _ = merger.feed(m)
        store.upsert_merged([score_run(run, qf)])
    live = sorted((m.id, tuple(m.message_ids), m.text, m.is_question) for m in store.iter_merged())
    build(store)  # batch over the same stored messages
    batch = sorted((m.id, tuple(m.message_ids), m.text, m.is_question) for m in store.iter_merged())
    assert live == batch
    assert sum(len(ids) for _, ids, _, _ in batch) == len(messages)


def test_a_restarted_merger_continues_the_open_run(store: Store) -> None:
    first, second = msg(1, "a", 0), msg(2, "a", 10)
    store.insert_messages([first])
    run, _ = Merger(load_open=store.last_merged).feed(first)
    store.upsert_merged([run])
    run, closed = Merger(load_open=store.last_merged).feed(second)  # a new process
    assert closed is None and run.message_ids == [first.key, second.key]
