"""``corefbot demo``: start the real bot, play a bilingual sample chat into it over a real OneBot v11
websocket on loopback, and show what corefbot did with it. No chat account needed."""
from __future__ import annotations

import asyncio
import json
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import TextIO

from bot.onebot_peer import OneBotPeer
from bot.process import BotProcess
from pipeline.store import Store
from pipeline.window import DEFAULT_WINDOW

DEMO_GROUP = 777000


def demo_lines() -> list[dict]:
    text = resources.files("bot").joinpath("demo_chat.jsonl").read_text(encoding="utf-8")
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
    db = workdir / "demo.db"
    lines = demo_lines()
    with BotProcess(db, env=env) as bot:
        peer = OneBotPeer(bot.ws_url)
        await peer.connect()
        await play(peer, lines)
        await stored(db, len(lines))
        await asyncio.sleep(settle_s)  # later capabilities answer after the message is stored
        await peer.close()
    return db, peer.calls


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
    if calls:
        w("\nwhat the bot said in the group:\n")
        for call in calls:
            if call.action in ("send_group_msg", "send_msg"):
                w(f"  🤖 {call.text}\n")
    store.close()


def main(keep: str | None, out: TextIO) -> int:
    if keep:
        workdir = Path(keep)
        workdir.mkdir(parents=True, exist_ok=True)
        db, calls = asyncio.run(run_demo(workdir))
        report(db, calls, out)
        return 0
    with tempfile.TemporaryDirectory(prefix="corefbot-demo-") as tmp:
        db, calls = asyncio.run(run_demo(Path(tmp)))
        report(db, calls, out)
    return 0
