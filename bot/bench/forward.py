"""Resolver plugin latency through the real bot: question arrival → forward → reply, and a burst.

The real bot process (any backend: rules by default, ``--model`` for llama-cpp), a scripted OneBot v11
client on loopback and a loopback echo assistant. For each of ``--questions`` groups the paper's exchange
is played, the TX2 question @-mentioning the bot, one question at a time; the clock runs in this process
from just before the question's event is written to the websocket to (a) the assistant receiving the
forwarded query and (b) the bot's reply reaching the client. Then ``--burst`` questions are sent at once
across groups and the time until every reply is back is measured (the resolver is one thread, so a
burst queues).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from corefbot.pipeline.metrics import percentile

SELF_ID = "10000"


async def _measure(workdir: Path, questions: int, burst: int, model: str | None) -> dict:
    from corefbot.demo.assistant import EchoAssistant
    from corefbot.demo.peer import OneBotPeer
    from corefbot.demo.process import BotProcess

    env = {"COREFBOT_ASSISTANT_API": "json", "COREFBOT_REPLY_MODE": "mention", "COREFBOT_RATE_LIMIT": "0",
           "LOG_LEVEL": "WARNING"}
    if model:
        env["COREFBOT_MODEL_PATH"] = model
    forward_ms: list[float] = []
    reply_ms: list[float] = []
    async with EchoAssistant() as assistant:
        env["COREFBOT_ASSISTANT_URL"] = assistant.url
        with BotProcess(workdir / "bench.db", env=env) as bot:
            peer = OneBotPeer(bot.ws_url, self_id=SELF_ID)
            await peer.connect()
            start = time.time() - 10_000
            for i in range(questions + 1):  # the first round warms the bot up and is not counted
                group = 880000 + i
                await peer.group_message(group, 50001, "Can mmpose be deployed on mobile phones?", timestamp=start)
                await peer.group_message(group, 50002, "Yes, through ncnn or mmdeploy, it runs on Android.",
                                         timestamp=start + 30)
                await asyncio.sleep(0.2)  # the context lands first, as in a real chat
                n_calls, n_requests = len(peer.calls), len(assistant.requests)
                t0 = time.time()
                await peer.group_message(group, 50003, [{"type": "at", "data": {"qq": SELF_ID}},
                                                        {"type": "text", "data": {"text": " BTW, how to deploy it on TX2?"}}],
                                         timestamp=start + 60)
                await peer.wait_for_calls(n_calls + 1, timeout=60)
                t2 = time.time()
                if i == 0:
                    continue
                (req,) = assistant.requests[n_requests:]
                forward_ms.append((req.at - t0) * 1000)
                reply_ms.append((t2 - t0) * 1000)
            burst_s = None
            if burst:
                n_calls = len(peer.calls)
                t0 = time.time()
                for i in range(burst):
                    await peer.group_message(890000 + i, 50003, [{"type": "at", "data": {"qq": SELF_ID}},
                                                                 {"type": "text", "data": {"text": f" How do I install mmpose {i} on Windows?"}}],
                                             timestamp=start + 100)
                await peer.wait_for_calls(n_calls + burst, timeout=300)
                burst_s = time.time() - t0
            await peer.close()
    return {"backend": "llama-cpp" if model else "rules", "questions": questions,
            "forward_ms_p50": percentile(forward_ms, 50), "forward_ms_p95": percentile(forward_ms, 95),
            "reply_ms_p50": percentile(reply_ms, 50), "reply_ms_p95": percentile(reply_ms, 95),
            "burst": burst, "burst_s": burst_s, "burst_per_s": burst / burst_s if burst_s else None}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--questions", type=int, default=30, help="questions timed one at a time")
    parser.add_argument("--burst", type=int, default=100, help="questions sent at once afterwards (0: skip)")
    parser.add_argument("--model", help="a GGUF for the llama-cpp backend (default: the rules backend)")
    parser.add_argument("--report", help="write the figures as JSON here")


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="corefbot-bench-forward-") as tmp:
        figures = asyncio.run(_measure(Path(tmp), args.questions, args.burst, args.model))
    print(f"backend {figures['backend']}, {figures['questions']} questions one at a time over the real websocket")
    print(f"question → assistant request   p50 {figures['forward_ms_p50']:.1f} ms   p95 {figures['forward_ms_p95']:.1f} ms")
    print(f"question → reply in the group  p50 {figures['reply_ms_p50']:.1f} ms   p95 {figures['reply_ms_p95']:.1f} ms")
    if figures["burst_s"]:
        print(f"burst of {figures['burst']} questions: all answered in {figures['burst_s']:.2f} s "
              f"({figures['burst_per_s']:.0f} questions/s)")
    if args.report:
        Path(args.report).write_text(json.dumps(figures, indent=2) + "\n")
    return 0
