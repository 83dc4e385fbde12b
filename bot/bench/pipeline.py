"""Data pipeline: bulk import, the batch pipeline, live capture through the real websocket."""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from pathlib import Path

from corefbot.pipeline.build import build
from corefbot.pipeline.export import iter_records, write_alpaca, write_records
from corefbot.pipeline.importer import import_jsonl
from corefbot.pipeline.labels.rows import set_label
from corefbot.pipeline.metrics import percentile
from corefbot.pipeline.store import Store

TOPICS = ["mmpose", "mmdeploy", "TensorRT", "TX2", "Jetson Nano", "CUDA 12", "PyTorch 2.3", "onnxruntime",
          "ncnn", "RTMPose", "YOLOX", "显卡驱动", "docker 镜像", "conda 环境"]
QUESTIONS = ["Can {t} be deployed on mobile phones?", "BTW, how to deploy it on TX2?", "{t} 怎么安装？",
             "有人用过 {t} 吗", "why does {t} fail with out of memory?", "这个报错怎么解决？",
             "在 {t} 上呢？", "为什么不好用？", "which version of {t} do you use?", "{t} 支持 Windows 吗？"]
CHATTER = ["哈哈哈", "[face]", "ok", "thanks!", "收到", "{t} works for me now", "我也遇到过", "+1",
           "[image]", "今天好忙", "you need to rebuild {t} first", "试试重新编译 {t}", "done"]


def generate(n: int, seed: int = 0, groups: int = 20, members: int = 300) -> list[dict]:
    """A realistic-shaped chat log: bursts of lines by one member, ~15% questions, bilingual."""
    rng = random.Random(seed)
    rows: list[dict] = []
    clock = {g: 1_700_000_000.0 + rng.random() * 1000 for g in range(groups)}
    while len(rows) < n:
        g = rng.randrange(groups)
        sender = rng.randrange(members)
        for _ in range(rng.choice([1, 1, 1, 2, 2, 3, 4])):  # a burst the concat rule merges
            clock[g] += rng.choice([2, 5, 9, 15, 18, 30, 120, 600])
            template = rng.choice(QUESTIONS if rng.random() < 0.15 else CHATTER)
            rows.append({"id": f"m{len(rows)}", "group": f"g{g}", "sender": f"s{sender}",
                         "text": template.format(t=rng.choice(TOPICS)), "timestamp": clock[g]})
            if len(rows) >= n:
                break
    rng.shuffle(rows)  # imports take lines in any order
    return rows


def bench_batch(workdir: Path, n: int) -> dict:
    log = workdir / "chat.jsonl"
    log.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in generate(n)), encoding="utf-8")
    store = Store(workdir / "batch.db")
    t0 = time.perf_counter()
    report = import_jsonl(store, log)
    t_import = time.perf_counter() - t0
    assert report.added == n, report
    # Label one question in ten so the alpaca export has work to do, as it would in a labelled group.
    build(store)
    ids = [r[0] for r in store.db.conn.execute("SELECT id FROM merged WHERE is_question")]
    for i, merged_id in enumerate(ids[::10]):
        set_label(store, merged_id, "needs" if i % 2 else "not_needed", "moderator", labeler="bench")
    t0 = time.perf_counter()
    stats = build(store)
    t_build = time.perf_counter() - t0
    records = write_records(iter_records(store), workdir / "records.jsonl")
    t_records = time.perf_counter() - t0 - t_build
    manifest = write_alpaca(store, workdir / "alpaca.json")
    t_total = time.perf_counter() - t0
    store.close()
    return {
        "messages": n, "import_s": t_import, "import_msgs_per_s": n / t_import,
        "merged": stats.merged, "questions": stats.questions, "records": records, "alpaca_rows": manifest.rows,
        "build_s": t_build, "export_records_s": t_records, "export_alpaca_s": t_total - t_build - t_records,
        "pipeline_total_s": t_total,
    }


async def _play_live(url: str, n: int) -> None:
    from corefbot.demo.peer import OneBotPeer

    peer = OneBotPeer(url)
    await peer.connect()
    rows = sorted(generate(n, seed=1, groups=5), key=lambda r: r["timestamp"])
    for i, row in enumerate(rows):
        await peer.group_message(int(row["group"][1:]) + 1000, int(row["sender"][1:]) + 30000, row["text"],
                                 message_id=i + 1, timestamp=row["timestamp"])
        if i % 50 == 0:
            await asyncio.sleep(0)  # let the socket drain, as a chat app's event stream would
    await asyncio.sleep(0.5)
    await peer.close()


def bench_live(workdir: Path, n: int) -> dict:
    from corefbot.demo import wait_for_messages
    from corefbot.demo.process import BotProcess

    db, timings = workdir / "live.db", workdir / "timings.json"
    bot = BotProcess(db, env={"COREFBOT_TIMINGS_FILE": str(timings), "LOG_LEVEL": "WARNING"}).start()
    try:
        t0 = time.perf_counter()
        asyncio.run(_play_live(bot.ws_url, n))
        try:
            wait_for_messages(db, n, timeout=60)
        except TimeoutError:
            pass
        elapsed = time.perf_counter() - t0
    finally:
        # NoneBot still runs every matcher's rules over the flood after capture has stored it
        # (about 15 ms an event with all plugins loaded): give it time to drain before shutdown.
        t_stop = time.perf_counter()
        bot.stop(timeout=300)
        drain = time.perf_counter() - t_stop
    store = Store(db)
    stored = store.count("messages")
    store.close()
    handler = json.loads(timings.read_text())["handler_ms"]
    return {"live_messages": n, "live_stored": stored, "live_lost": n - stored, "live_wall_s": elapsed,
            "live_drain_s": drain,
            "handler_ms_p50": percentile(handler, 50), "handler_ms_p99": percentile(handler, 99),
            "handler_ms_max": max(handler)}


async def _play_burst(url: str, n: int, superuser: int) -> dict:
    """Send ``n`` group messages at once, then ask ``/corefbot health``: NoneBot answers it after every
    event before it (one event loop, first in first out), so its reply times the whole bot."""
    from corefbot.demo.peer import OneBotPeer

    peer = OneBotPeer(url)
    await peer.connect()
    rows = sorted(generate(n, seed=2, groups=20), key=lambda r: r["timestamp"])
    t0 = time.perf_counter()
    for i, row in enumerate(rows):
        await peer.group_message(int(row["group"][1:]) + 1000, int(row["sender"][1:]) + 30000, row["text"],
                                 message_id=i + 1, timestamp=row["timestamp"])
    sent_s = time.perf_counter() - t0
    await peer.group_message(1000, superuser, "/corefbot health", message_id=n + 1)
    calls = await peer.wait_for_calls(1, timeout=900)
    replied_s = time.perf_counter() - t0
    closed = peer._ws.close_code is not None
    await peer.close()
    return {"sent_s": sent_s, "replied_s": replied_s, "health": calls[0].text, "closed_during_burst": closed}


def bench_burst(workdir: Path, n: int, env: dict[str, str] | None = None) -> dict:
    """``n`` messages sent as fast as one websocket takes them, through the real bot with its default
    log level: all stored and merged? connection up? events per second through the whole bot."""
    from corefbot.demo import wait_for_messages
    from corefbot.demo.process import BotProcess

    db, superuser = workdir / "burst.db", 1
    bot = BotProcess(db, env={"SUPERUSERS": f'["{superuser}"]', **(env or {})},
                     log_path=workdir / "burst.bot.log").start()
    try:
        cpu0 = _cpu_s(bot.proc.pid)
        t0 = time.perf_counter()
        played = asyncio.run(_play_burst(bot.ws_url, n, superuser))
        try:
            wait_for_messages(db, n + 1, timeout=300)  # and the health command
        except TimeoutError:
            pass
        stored_s = time.perf_counter() - t0
        cpu = _cpu_s(bot.proc.pid) - cpu0
        log = bot.log()
    finally:
        bot.stop(timeout=300)
    store = Store(db)
    stored = store.db.conn.execute("SELECT count(*) FROM messages WHERE sender != ? AND from_self = 0",
                                   (str(superuser),)).fetchone()[0]
    orphans = len(store.orphan_messages())
    merged = store.count("merged")
    store.close()
    done_s = max(stored_s, played["replied_s"])
    return {"burst_messages": n, "burst_stored": stored, "burst_lost": n - stored, "burst_unmerged": orphans,
            "burst_merged_runs": merged, "burst_sent_s": played["sent_s"], "burst_done_s": done_s,
            "burst_events_per_s": n / done_s, "burst_bot_cpu_ms_per_event": 1000 * cpu / n,
            "burst_connection_closed": played["closed_during_burst"] or "0 disconnect(s)" not in played["health"],
            "burst_shed_errors": log.count("capture queue full"), "burst_health": played["health"]}


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--messages", type=int, default=58_000, help="messages to import (paper's corpus: 58,000)")
    parser.add_argument("--live", type=int, default=1_000, help="messages through the websocket (0: skip)")
    parser.add_argument("--burst", type=int, default=10_000,
                        help="messages sent at once through the websocket, default log level (0: skip)")
    parser.add_argument("--report", help="write the figures as JSON here")


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="corefbot-bench-") as tmp:
        figures = bench_batch(Path(tmp), args.messages)
        if args.live:
            figures.update(bench_live(Path(tmp), args.live))
        if args.burst:
            figures.update(bench_burst(Path(tmp), args.burst))
    print(f"bulk import        {figures['messages']:,} messages in {figures['import_s']:.2f}s = "
          f"{figures['import_msgs_per_s']:,.0f} msg/s   (target ≥ 50,000/s)")
    print(f"batch pipeline     build {figures['build_s']:.2f}s + records {figures['export_records_s']:.2f}s + "
          f"alpaca {figures['export_alpaca_s']:.2f}s = {figures['pipeline_total_s']:.2f}s   (target ≤ 3 s)")
    print(f"                   {figures['merged']:,} merged, {figures['questions']:,} questions, "
          f"{figures['records']:,} records, {figures['alpaca_rows']:,} alpaca rows")
    if args.live:
        print(f"live capture       {figures['live_stored']}/{figures['live_messages']} stored, "
              f"{figures['live_lost']} lost, handler p50 {figures['handler_ms_p50']:.3f} ms, "
              f"p99 {figures['handler_ms_p99']:.3f} ms   (target: 0 lost, p99 ≤ 5 ms)")
        print(f"                   stored in {figures['live_wall_s']:.1f}s; NoneBot's matchers finished the burst "
              f"{figures['live_drain_s']:.1f}s later")
    if args.burst:
        f = figures
        print(f"burst              {f['burst_stored']:,}/{f['burst_messages']:,} stored, {f['burst_lost']} lost, "
              f"{f['burst_unmerged']} in no run; connection "
              f"{'CLOSED' if f['burst_connection_closed'] else 'stayed up'}; {f['burst_shed_errors']} shed")
        print(f"                   sent in {f['burst_sent_s']:.1f}s, whole bot done in {f['burst_done_s']:.1f}s = "
              f"{f['burst_events_per_s']:,.0f} events/s (target ≥ 1,000); bot CPU "
              f"{f['burst_bot_cpu_ms_per_event']:.2f} ms/event")
    if args.report:
        Path(args.report).write_text(json.dumps(figures, indent=2) + "\n")
    return 0
