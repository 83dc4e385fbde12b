"""A scripted OneBot v11 implementation (the chat-app side) for the demo, end-to-end tests and benchmarks.

It connects to the bot's reverse websocket exactly as NapCat, Lagrange or LLOneBot do, posts group
message events, and answers the bot's API calls (``send_group_msg`` …), keeping them so a caller can
see what the bot said.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any

import websockets


@dataclass
class ApiCall:
    action: str
    params: dict[str, Any]
    message_id: int | None = None

    @property
    def text(self) -> str:
        """The plain text of a sent message (segments joined, non-text as [type])."""
        message = self.params.get("message", "")
        if isinstance(message, str):
            return message
        parts = []
        for seg in message:
            if seg["type"] == "text":
                parts.append(seg["data"]["text"])
            elif seg["type"] == "at":
                parts.append(f"@{seg['data'].get('qq')}")
            elif seg["type"] != "reply":
                parts.append(f"[{seg['type']}]")
        return "".join(parts)

    @property
    def reply_to(self) -> str | None:
        message = self.params.get("message", "")
        if isinstance(message, list):
            for seg in message:
                if seg["type"] == "reply":
                    return str(seg["data"]["id"])
        return None


@dataclass
class OneBotPeer:
    url: str  # ws://127.0.0.1:8080/onebot/v11/ws
    self_id: str = "10000"
    access_token: str | None = None
    calls: list[ApiCall] = field(default_factory=list)
    _ws: Any = None
    _reader: asyncio.Task | None = None
    _ids: itertools.count = field(default_factory=lambda: itertools.count(900_000))
    _call_event: asyncio.Event = field(default_factory=asyncio.Event)
    _sent: dict[int, dict] = field(default_factory=dict)  # message id -> event, to answer get_msg

    async def connect(self, timeout: float = 20.0) -> None:
        headers = {"X-Self-ID": self.self_id, "X-Client-Role": "Universal"}
        if self.access_token:
            headers["Authorization"] = f"Bearer {self.access_token}"
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._ws = await websockets.connect(self.url, additional_headers=headers, max_size=None)
                break
            except (OSError, websockets.InvalidStatus, websockets.InvalidHandshake):
                if time.monotonic() > deadline:
                    raise ConnectionError(f"no OneBot v11 reverse websocket at {self.url} after {timeout:.0f}s")
                await asyncio.sleep(0.2)
        self._reader = asyncio.create_task(self._read())
        await self._send({"time": int(time.time()), "self_id": int(self.self_id), "post_type": "meta_event",
                          "meta_event_type": "lifecycle", "sub_type": "connect"})

    async def close(self) -> None:
        if self._reader:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._ws is not None:
            await self._ws.close()

    async def _send(self, payload: dict) -> None:
        await self._ws.send(json.dumps(payload, ensure_ascii=False))

    async def _read(self) -> None:
        try:
            await self._serve()
        except websockets.ConnectionClosed:
            pass  # the bot went away (shutdown): nothing left to answer

    async def _serve(self) -> None:
        async for raw in self._ws:
            request = json.loads(raw)
            call = ApiCall(request.get("action", ""), request.get("params", {}))
            data: Any = None
            if call.action in ("send_group_msg", "send_msg", "send_private_msg"):
                call.message_id = next(self._ids)
                data = {"message_id": call.message_id}
                self._sent[call.message_id] = {
                    "time": int(time.time()), "message_id": call.message_id, "message": call.params.get("message"),
                    "sender": {"user_id": int(self.self_id), "nickname": "bot"}}
            elif call.action == "get_msg" and int(call.params.get("message_id", -1)) in self._sent:
                event = self._sent[int(call.params["message_id"])]
                data = {"time": event["time"], "message_type": "group", "message_id": event["message_id"],
                        "real_id": event["message_id"], "sender": event["sender"], "message": event["message"]}
            elif call.action == "get_group_member_info":
                data = {"user_id": call.params.get("user_id"), "role": "member"}
            self.calls.append(call)
            self._call_event.set()
            await self._send({"status": "ok", "retcode": 0, "data": data, "echo": request.get("echo")})

    async def group_message(self, group: str | int, user: str | int, text: str | list[dict], *,
                            message_id: int | None = None, timestamp: float | None = None,
                            reply_to: int | None = None, nickname: str = "", role: str = "member") -> int:
        """Post one group message event; returns its message id."""
        mid = message_id if message_id is not None else next(self._ids)
        segments = [{"type": "text", "data": {"text": text}}] if isinstance(text, str) else list(text)
        if reply_to is not None:
            segments.insert(0, {"type": "reply", "data": {"id": str(reply_to)}})
        event = {
            "time": int(timestamp if timestamp is not None else time.time()), "self_id": int(self.self_id),
            "post_type": "message", "message_type": "group", "sub_type": "normal", "message_id": mid,
            "group_id": int(group), "user_id": int(user), "anonymous": None, "message": segments,
            "raw_message": "", "font": 0,
            "sender": {"user_id": int(user), "nickname": nickname or f"user{user}", "card": "", "role": role},
        }
        self._sent[mid] = event
        await self._send(event)
        return mid

    async def wait_for_calls(self, n: int, timeout: float = 10.0) -> list[ApiCall]:
        """Wait until the bot has made at least ``n`` API calls in all."""
        deadline = time.monotonic() + timeout
        while len(self.calls) < n:
            self._call_event.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"the bot made {len(self.calls)} API calls, expected {n}")
            try:
                await asyncio.wait_for(self._call_event.wait(), remaining)
            except asyncio.TimeoutError:
                pass
        return self.calls
