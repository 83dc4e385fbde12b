"""Labels in the chat: bot messages per 1,000 group messages, and moderator review latency.

1. Share of voice: a realistic-shaped chat (``corefbot.bench.pipeline.generate``: bursts, ~15% questions, bilingual)
   is replayed in time order through the bot's own decision path, in process — the concat rule and question
   filter as the chatlog applies them, the rules resolver on every question update, the labels plugin's
   confirmation policy at its default limits judged at each message's time (quiet hours in UTC). Every prompt
   counts as a bot message (the resolver's answers only go to questions that @ the bot: none in this chat).
   In process because the real bot's resolver service lags minutes behind a replay at full speed.
2. Moderator review: a group admin labels 20 questions with ``/label next`` then a bare letter per item, through
   the real bot over a OneBot v11 websocket, on a database holding an imported chat with the serving model's
   decisions: client round trip per item and the server-side handler time (event in → reply sent).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import re
import tempfile
import time
from pathlib import Path

from corefbot.pipeline.metrics import percentile
from corefbot.pipeline.store import Store

REVIEW_GROUP = 1000


def bench_share(workdir: Path, n: int, groups: int) -> dict:
    """Replay the chat through the bot's own decision path, in process: the chatlog's concat rule and question
    filter, the rules resolver (the bot's default without a model) on every question update, and the labels
    plugin's confirmation policy at its default limits, judged at each message's time."""
    from collections import Counter
    from datetime import timezone

    from corefbot.bench.pipeline import generate
    from corefbot.models.serve.resolver import load_resolver
    from corefbot.pipeline.build import score_run
    from corefbot.pipeline.labels.limits import ConfirmLimits, wants_confirmation
    from corefbot.pipeline.labels.prompts import prompt_sent, reserve_prompt
    from corefbot.pipeline.merge import Merger
    from corefbot.pipeline.question import QuestionFilter
    from corefbot.pipeline.records import Message
    from corefbot.pipeline.window import turn

    logging.getLogger("corefbot.models.serve.resolver").setLevel(logging.ERROR)  # rejected rewrites are expected here; figures only
    rows = sorted(generate(n, seed=3, groups=groups), key=lambda r: r["timestamp"])
    store = Store(workdir / "share.db")
    merger, question_filter = Merger(18.0, load_open=store.last_merged), QuestionFilter()
    resolver = load_resolver("rules")
    limits = ConfirmLimits(tz=timezone.utc)  # the defaults; quiet hours read in UTC for a reproducible figure
    reasons: Counter[str] = Counter()
    resolutions = prompts = 0
    per_group: Counter[str] = Counter()
    t0 = time.perf_counter()
    for i, row in enumerate(rows):
        message = Message("onebotv11", row["group"], str(i + 1), row["sender"], row["timestamp"], row["text"])
        store.insert_messages([message])
        run, _ = merger.feed(message)
        run = score_run(run, question_filter)
        store.upsert_merged([run])
        if not run.is_question:
            continue
        window = store.window_before(run, 12)
        res = resolver.resolve([turn(w) for w in window], turn(run), group=run.group)
        resolutions += 1
        if not wants_confirmation(res.decision, res.rewrite, res.margin, limits):
            reasons["confident, no rewrite"] += 1
            continue
        reserved = reserve_prompt(store, run, res.decision, res.rewrite, message.timestamp, limits)
        if isinstance(reserved, str):
            reasons[reserved] += 1
            continue
        prompt_sent(store, reserved.id, f"p{prompts}")
        prompts += 1
        per_group[run.group] += 1
    elapsed = time.perf_counter() - t0
    store.close()
    per_group_rate = {g: 1000 * per_group[g] / sum(r["group"] == g for r in rows) for g in sorted({r["group"] for r in rows})}
    return {"share_messages": n, "share_groups": groups, "share_days": (rows[-1]["timestamp"] - rows[0]["timestamp"]) / 86_400,
            "share_resolutions": resolutions, "share_bot_messages": prompts, "share_not_asked": dict(reasons),
            "bot_messages_per_1000": 1000 * prompts / n, "share_per_group_per_1000": per_group_rate,
            "share_wall_s": elapsed}


def _seed_review_db(db: Path, n: int) -> int:
    from corefbot.bench.pipeline import generate
    from corefbot.pipeline.build import build
    from corefbot.pipeline.records import Message

    # One group, on the platform and with the numeric id the moderator's OneBot group has.
    store = Store(db)
    store.insert_messages(Message("onebotv11", str(REVIEW_GROUP), r["id"], r["sender"], r["timestamp"], r["text"])
                          for r in generate(n, seed=4, groups=1))
    build(store)
    rng = random.Random(4)
    ids = [r[0] for r in store.db.conn.execute("SELECT id FROM merged WHERE is_question")]
    # The serving model decided most questions; its margins spread over [0, 1].
    store.db["decisions"].insert_all(
        {"merged_id": i, "backend": "bench", "decision": "needs", "margin": rng.random(), "at": 0.0}
        for i in ids if rng.random() < 0.8)
    store.close()
    return len(ids)


async def _review(url: str, group: int, items: int) -> list[float]:
    from corefbot.demo.peer import OneBotPeer

    peer = OneBotPeer(url)
    await peer.connect()
    round_trips: list[float] = []
    try:
        text = "/label next"
        for k in range(items + 1):
            n = len(peer.calls)
            t0 = time.perf_counter()
            await peer.group_message(group, 39999, text, role="admin")
            shown = (await peer.wait_for_calls(n + 1))[n]
            if k:
                round_trips.append((time.perf_counter() - t0) * 1000)
                if not shown.text.startswith("✓ #"):
                    raise RuntimeError(f"unexpected reply to {text!r}: {shown.text[:200]}")
            if not re.search(r"#\d+ · group", shown.text):
                raise RuntimeError(f"no item shown: {shown.text[:200]}")
            text = "abc"[k % 3]
    finally:
        await peer.close()
    return round_trips


def bench_review(workdir: Path, n: int, items: int) -> dict:
    from corefbot.demo.process import BotProcess

    db, timings = workdir / "review.db", workdir / "label_timings.json"
    questions = _seed_review_db(db, n)
    env = {"COREFBOT_LABELS_TIMINGS_FILE": str(timings), "LOG_LEVEL": "WARNING"}
    with BotProcess(db, env=env) as bot:
        t0 = time.perf_counter()
        round_trips = asyncio.run(_review(bot.ws_url, REVIEW_GROUP, items))
        total = time.perf_counter() - t0
    timed = json.loads(timings.read_text())
    handler, db_ms = timed["handler_ms"][1:], timed["db_ms"][1:]  # the answers (the first is /label next)
    store = Store(db)
    labelled = store.db.conn.execute("SELECT count(*) FROM labels WHERE source = 'moderator'").fetchone()[0]
    store.close()
    return {"review_db_messages": n, "review_queue_questions": questions, "review_items": items,
            "review_labelled": labelled, "review_total_s": total,
            "review_round_trip_ms_p50": percentile(round_trips, 50), "review_round_trip_ms_p95": percentile(round_trips, 95),
            "review_server_ms_p50": percentile(handler, 50), "review_server_ms_p95": percentile(handler, 95),
            "review_server_ms_max": max(handler), "review_db_ms_p50": percentile(db_ms, 50)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--messages", type=int, default=20_000, help="chat messages replayed through the bot")
    parser.add_argument("--groups", type=int, default=5, help="groups the replayed chat is spread over")
    parser.add_argument("--review-db", type=int, default=58_000, help="messages in the moderator's database")
    parser.add_argument("--items", type=int, default=20, help="items the moderator labels")
    parser.add_argument("--report", help="write the figures as JSON here")


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="corefbot-bench-labels-") as tmp:
        figures = bench_share(Path(tmp), args.messages, args.groups)
        figures.update(bench_review(Path(tmp), args.review_db, args.items))
    print(f"bot share of voice  {figures['share_bot_messages']} bot messages for {figures['share_messages']:,} group "
          f"messages ({figures['share_groups']} groups, {figures['share_days']:.1f} days, "
          f"{figures['share_resolutions']:,} question updates resolved) = "
          f"{figures['bot_messages_per_1000']:.2f} per 1,000   (target ≤ 10)")
    print(f"                    per group: " + ", ".join(f"{g} {v:.1f}" for g, v in figures["share_per_group_per_1000"].items())
          + f"; not asked: {figures['share_not_asked']}")
    print(f"moderator review    {figures['review_labelled']} items labelled with /label next + a letter in "
          f"{figures['review_total_s']:.2f}s (queue of {figures['review_queue_questions']:,} questions in "
          f"{figures['review_db_messages']:,} messages); per item: server p50 {figures['review_server_ms_p50']:.1f} ms, "
          f"p95 {figures['review_server_ms_p95']:.1f} ms, max {figures['review_server_ms_max']:.1f} ms   (target ≤ 100 ms; "
          f"database part p50 {figures['review_db_ms_p50']:.1f} ms); "
          f"round trip p50 {figures['review_round_trip_ms_p50']:.1f} ms, p95 {figures['review_round_trip_ms_p95']:.1f} ms")
    if args.report:
        Path(args.report).write_text(json.dumps(figures, indent=2) + "\n")
    return 0
