"""``corefbot demo``: start the real bot, play a bilingual sample chat into it over a real OneBot v11
websocket on loopback, and show what corefbot did with it. No chat account needed.

The harness is shared with the end-to-end tests and the benchmarks: :mod:`.peer` (a scripted OneBot v11
client), :mod:`.process` (the bot as a child process), :mod:`.assistant` (a loopback assistant);
``chat.jsonl`` is the sample chat."""
from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import TextIO

from corefbot.demo.assistant import EchoAssistant
from corefbot.demo.peer import OneBotPeer
from corefbot.demo.process import BotProcess
from corefbot.pipeline.store import Store
from corefbot.pipeline.window import DEFAULT_WINDOW

DEMO_GROUP = 777000


def demo_lines() -> list[dict]:
    text = resources.files("corefbot.demo").joinpath("chat.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


async def play(peer: OneBotPeer, lines: list[dict], *, group: int = DEMO_GROUP, start: float | None = None,
               pause_s: float = 0.05) -> list[int]:
    """Post the sample chat; message times keep the script's spacing so the concat rule applies."""
    start = start if start is not None else time.time() - (lines[-1]["dt"] + 60)
    ids: list[int] = []
    for line in lines:
        reply = ids[line["reply_to"] - 1] if line.get("reply_to") else None
        ids.append(await peer.group_message(group, line["user"], line["text"], timestamp=start + line["dt"],
                                            nickname=line.get("name", ""), reply_to=reply))
        await asyncio.sleep(pause_s)
    return ids


async def stored(db: Path, n: int, timeout: float = 15.0) -> None:
    """Wait (without blocking the loop, so the peer keeps answering API calls) until ``n`` messages are stored."""
    await asyncio.to_thread(wait_for_messages, db, n, timeout)


def wait_for_messages(db: Path, n: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if db.exists():
            store = Store(db)
            count = store.count("messages")
            store.close()
            if count >= n:
                return
        time.sleep(0.1)
    raise TimeoutError(f"the bot stored fewer than {n} messages in {timeout:.0f}s")


async def run_demo(workdir: Path, *, env: dict[str, str] | None = None, settle_s: float = 1.0) -> tuple[Path, list]:
    """Play the sample chat into the real bot. Unless COREFBOT_ASSISTANT_URL is configured, a loopback echo
    assistant stands in for the group's assistant and the bot answers every question (reply mode ``all``),
    so the demo shows the whole path: decision, rewrite, forwarded query, answer."""
    db = workdir / "demo.db"
    lines = demo_lines()
    env = dict(env or {})
    echo = None
    if not (env.get("COREFBOT_ASSISTANT_URL") or os.environ.get("COREFBOT_ASSISTANT_URL")):
        echo = await EchoAssistant().start()
        env.update({"COREFBOT_ASSISTANT_URL": echo.url, "COREFBOT_ASSISTANT_API": "json"})
        env.setdefault("COREFBOT_REPLY_MODE", os.environ.get("COREFBOT_REPLY_MODE", "all"))
        env.setdefault("COREFBOT_RATE_LIMIT", os.environ.get("COREFBOT_RATE_LIMIT", "0"))  # the script is fast
    try:
        with BotProcess(db, env=env) as bot:
            peer = OneBotPeer(bot.ws_url)
            await peer.connect()
            await play(peer, lines)
            await stored(db, len(lines))
            await asyncio.sleep(settle_s)  # later capabilities answer after the message is stored
            await asyncio.to_thread(wait_for_outbox, db)
            await peer.close()
    finally:
        if echo is not None:
            await echo.stop()
    return db, peer.calls


def wait_for_outbox(db: Path, timeout: float = 30.0) -> None:
    """Wait until the resolver's outbox has nothing left in flight (answers posted, or failed/expired)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        store = Store(db)
        busy = store.db.conn.execute(
            "SELECT count(*) FROM outbox WHERE status IN ('pending', 'answered', 'replying')").fetchone()[0]
        store.close()
        if not busy:
            return
        time.sleep(0.1)


def report(db: Path, calls: list, out: TextIO) -> None:
    store = Store(db)
    names = {r[0]: r[1] for r in store.db.conn.execute("SELECT sender, sender_name FROM messages")}
    merged = list(store.iter_merged())
    w = out.write
    w(f"stored {store.count('messages')} messages → {len(merged)} merged "
      f"→ {sum(m.is_question for m in merged)} questions   (database: {db})\n\n")
    w("merged messages (concat rule: same sender, ≤18 s apart, not a reply):\n")
    for m in merged:
        flag = f"Q {m.question_score:>4.1f}" if m.is_question else f"  {m.question_score:>4.1f}"
        text = m.text.replace("\n", " ⏎ ")
        w(f"  {flag}  {names.get(m.sender, m.sender):<6} ({len(m.message_ids)} msg) {text}\n")
    w("\nquestions with their context windows:\n")
    for m in merged:
        if not m.is_question:
            continue
        w(f"\n  ❓ {names.get(m.sender, m.sender)}: {m.text.replace(chr(10), ' ⏎ ')}\n")
        for p in store.window_before(m, DEFAULT_WINDOW)[-4:]:
            w(f"       ↳ {names.get(p.sender, p.sender)}: {p.text.replace(chr(10), ' ⏎ ')}\n")
    resolver_report(store, names, w)
    if calls:
        w("\nwhat the bot said in the group:\n")
        for call in calls:
            if call.action in ("send_group_msg", "send_msg"):
                w(f"  🤖 {call.text}\n")
    store.close()


def resolver_report(store: Store, names: dict[str, str], w) -> None:
    """What the resolver decided for each question, what it forwarded, and what came back."""
    rows = store.db.conn.execute(
        "SELECT m.sender, d.question, d.backend, d.decision, d.p_needs, d.gated, d.rewrite, d.rejected_rewrite, "
        "d.reject_reason, d.forwarded, o.status, o.answer, o.error FROM decisions d "
        "JOIN merged m ON m.id = d.merged_id LEFT JOIN outbox o ON o.merged_id = d.merged_id "
        "ORDER BY m.timestamp").fetchall()
    if not rows:
        return
    w("\nresolver (decision → forwarded query → assistant):\n")
    for sender, question, backend, decision, p_needs, gated, rewrite, rejected, reason, forwarded, status, answer, \
            error in rows:
        how = "gate" if gated else backend
        w(f"\n  ❓ {names.get(sender, sender)}: {question.replace(chr(10), ' ⏎ ')}\n")
        w(f"     decision: {decision} (p_needs {p_needs or 0:.2f}, {how})\n")
        if rewrite:
            w(f"     rewrite:  {rewrite}\n")
        if rejected:
            w(f"     rejected rewrite: {rejected.replace(chr(10), ' ⏎ ')} ({reason})\n")
        if forwarded is None:
            w("     not forwarded (not addressed to the bot, rate limit, or no assistant configured)\n")
        else:
            w(f"     forwarded: {forwarded.replace(chr(10), ' ⏎ ')}\n")
            w(f"     answer [{status}]: {(answer or error or '').replace(chr(10), ' ⏎ ')}\n")


def main(keep: str | None, out: TextIO, model: str | None = None) -> int:
    env: dict[str, str] = {}
    if model:
        from corefbot.models.serve.llama import served_model

        served_model(model)  # a GGUF or a run folder: fail here, naming it, rather than fall back to rules
        env = {"COREFBOT_MODEL_PATH": str(Path(model).resolve()), "COREFBOT_RESOLVER": "llama-cpp"}
    if keep:
        workdir = Path(keep)
        workdir.mkdir(parents=True, exist_ok=True)
        db, calls = asyncio.run(run_demo(workdir, env=env))
        report(db, calls, out)
        return 0
    with tempfile.TemporaryDirectory(prefix="corefbot-demo-") as tmp:
        db, calls = asyncio.run(run_demo(Path(tmp), env=env))
        report(db, calls, out)
    return 0
