"""A tiny upstream assistant on loopback (aiohttp) for ``corefbot demo``, the tests and the benchmarks.

It answers both APIs the resolver plugin speaks — ``POST /ask`` (``{query, group, history}`` →
``{answer}``) and ``POST /v1/chat/completions`` (OpenAI-style) — by echoing the query, and keeps every
request it received. ``script`` makes it misbehave on the next requests, one entry per request:
``"slow"`` (waits ``slow_s`` before answering), ``"bad_json"``, ``"no_answer"``, ``"500"``, ``"400"``.
:meth:`stop` then :meth:`start` brings it down and back up on the same port (connection refused meanwhile).
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class ReceivedRequest:
    path: str
    body: dict[str, Any]
    headers: dict[str, str]
    at: float

    @property
    def query(self) -> str:
        if "query" in self.body:
            return self.body["query"]
        return self.body["messages"][-1]["content"]


@dataclass
class EchoAssistant:
    host: str = "127.0.0.1"
    port: int = 0
    slow_s: float = 5.0
    script: list[str] = field(default_factory=list)
    requests: list[ReceivedRequest] = field(default_factory=list)
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """The plain-JSON endpoint (COREFBOT_ASSISTANT_API=json)."""
        return f"http://{self.host}:{self.port}/ask"

    @property
    def openai_url(self) -> str:
        """The OpenAI-compatible base URL (COREFBOT_ASSISTANT_API=openai)."""
        return f"http://{self.host}:{self.port}/v1"

    async def start(self) -> "EchoAssistant":
        app = web.Application()
        app.router.add_post("/ask", self._handle)
        app.router.add_post("/v1/chat/completions", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        if self.port == 0:
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> "EchoAssistant":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        received = ReceivedRequest(request.path, body, dict(request.headers), time.time())
        self.requests.append(received)
        action = self.script.pop(0) if self.script else "ok"
        if action == "slow":
            await asyncio.sleep(self.slow_s)
        elif action == "bad_json":
            return web.Response(text="<html>502 Bad Gateway</html>", content_type="application/json")
        elif action == "no_answer":
            return web.json_response({"result": "nothing here"})
        elif action.isdigit():
            return web.json_response({"error": "scripted failure"}, status=int(action))
        answer = f"(echo) {received.query}"
        if request.path.endswith("/chat/completions"):
            return web.json_response({"id": "echo", "object": "chat.completion", "model": body.get("model"),
                                      "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                                                   "finish_reason": "stop"}]})
        return web.Response(text=json.dumps({"answer": answer}, ensure_ascii=False), content_type="application/json")
