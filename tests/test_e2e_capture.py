"""End to end: the real bot process, a scripted OneBot v11 client over a real websocket on loopback."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from corefbot.demo import stored
from corefbot.demo.peer import OneBotPeer
from corefbot.demo.process import BotProcess
from corefbot.pipeline.store import Store

pytestmark = pytest.mark.slow

GROUP = 424242
# (user, seconds, text or segments, reply to line index) — the paper's exchange in a bilingual group
CHAT = [
    (1, 0, "大家好，我在看 mmpose 的文档", None),
    (1, 6, "Can mmpose be deployed on mobile phones?", None),
    (2, 40, "Yes, through ncnn or mmdeploy, it runs on Android.", None),
    (3, 70, "BTW, how to deploy it on TX2?", None),
    (2, 100, [{"type": "image", "data": {"file": "a.png"}}, {"type": "text", "data": {"text": "看这个图"}}], None),
    (4, 130, "哈哈哈", None),
    (4, 131, [{"type": "face", "data": {"id": "178"}}], None),
    (5, 170, [{"type": "at", "data": {"qq": "3"}}, {"type": "text", "data": {"text": " TX2 用 TensorRT 就行"}}], 3),
    (3, 200, "为什么我的 TX2 上跑不起来？", None),
]


async def play(peer: OneBotPeer, start: float) -> list[int]:
    ids: list[int] = []
    for user, dt, text, reply in CHAT:
        ids.append(await peer.group_message(GROUP, 50000 + user, text, timestamp=start + dt,
                                            reply_to=ids[reply] if reply is not None else None))
    return ids


async def test_a_bilingual_conversation_lands_in_sqlite_merged_and_filtered(tmp_path: Path) -> None:
    db = tmp_path / "corefbot.db"
    with BotProcess(db, access_token="s3cret") as bot:
        intruder = OneBotPeer(bot.ws_url, access_token="wrong")
        with pytest.raises(ConnectionError):
            await intruder.connect(timeout=1.5)
        peer = OneBotPeer(bot.ws_url, access_token="s3cret")
        await peer.connect()
        ids = await play(peer, time.time() - 300)
        await stored(db, len(CHAT))
        await peer.close()
    store = Store(db)
    messages = list(store.iter_messages())
    assert [m.text for m in messages][4:8] == ["[image]看这个图", "哈哈哈", "[face]", "@3 TX2 用 TensorRT 就行"]
    assert messages[7].reply_to == str(ids[3]) and messages[7].mentions == ("3",)
    assert {m.platform for m in messages} == {"onebotv11"}
    merged = list(store.iter_merged())
    assert [len(m.message_ids) for m in merged] == [2, 1, 1, 1, 2, 1, 1]
    questions = [m for m in merged if m.is_question]
    assert [q.text for q in questions] == [
        "大家好，我在看 mmpose 的文档\nCan mmpose be deployed on mobile phones?",
        "BTW, how to deploy it on TX2?", "为什么我的 TX2 上跑不起来？"]
    window = store.window_before(questions[1], 12)
    assert [w.text for w in window] == [questions[0].text, "Yes, through ncnn or mmdeploy, it runs on Android."]
    store.close()
