"""The http backend against real servers on loopback: an aiohttp server speaking the OpenAI
chat-completions wire format (every failure mode), and llama-cpp-python's own server on the tiny GGUF."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Awaitable, Callable

import pytest
from aiohttp import web

from corefbot.models.serve.http import HttpBackend, HttpBackendError, chat_completions_url
from corefbot.models.serve.resolver import load_resolver
from corefbot.pipeline.prompt import DECISIONS, SYSTEM, build_prompt
from corefbot.pipeline.records import Turn

WINDOW = (Turn("u1", "有人用过 mmpose 吗？", 1.0), Turn("u2", "用过，x86 上跑 RTMPose 挺快的", 2.0))
QUESTION = Turn("u3", "BTW, how to deploy it on TX2?", 3.0)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class LoopbackServer:
    """An aiohttp app on 127.0.0.1 in its own thread (the backend under test blocks)."""

    def __init__(self, handler: Handler) -> None:
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self._handler = handler
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "loopback server did not start"

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def record(request: web.Request) -> web.StreamResponse:
            self.requests.append(await request.json())
            self.headers.append(dict(request.headers))
            return await self._handler(request)

        app = web.Application()
        app.router.add_post("/v1/chat/completions", record)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._ready.set()
        self._loop.run_forever()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture
def serve():
    servers: list[LoopbackServer] = []

    def start(handler: Handler) -> LoopbackServer:
        servers.append(LoopbackServer(handler))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def completion(content: str, top: dict[str, float] | None = None) -> dict:
    choice: dict = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
    if top is not None:
        first = content[:1]
        choice["logprobs"] = {"content": [{"token": first, "logprob": top.get(first, -9.0),
                                           "top_logprobs": [{"token": t, "logprob": lp} for t, lp in top.items()]}]}
    return {"id": "x", "object": "chat.completion", "model": "m", "choices": [choice]}


def test_url_forms() -> None:
    assert chat_completions_url("http://h:1") == "http://h:1/v1/chat/completions"
    assert chat_completions_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    assert chat_completions_url("http://h:1/v1/chat/completions") == "http://h:1/v1/chat/completions"
    with pytest.raises(ValueError, match="http://"):
        HttpBackend("localhost:8080")


def test_decision_from_logprobs_and_rewrite(serve) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response(completion("A\nBTW, how to deploy mmpose on TX2?", {"A": -0.2, " B": -2.0, "C": -3.5}))

    server = serve(handler)
    backend = HttpBackend(server.url, model="qwen-coref", api_key="sekret")
    res = backend.resolve(WINDOW, QUESTION)
    assert res.decision == "needs" and res.rewrite == "BTW, how to deploy mmpose on TX2?"
    assert sum(res.probs.values()) == pytest.approx(1.0)
    assert res.probs["needs"] > res.probs["not_needed"] > res.probs["unknown"] > 0
    # The request carries the one prompt builder's text, the model name and the key.
    body, headers = server.requests[0], server.headers[0]
    assert body["messages"] == [{"role": "system", "content": SYSTEM},
                                {"role": "user", "content": build_prompt(WINDOW, QUESTION).instruction}]
    assert body["model"] == "qwen-coref" and body["logprobs"] is True and body["temperature"] == 0
    assert headers["Authorization"] == "Bearer sekret"


def test_logprobs_outrank_the_written_letter(serve) -> None:
    # The decision follows the probabilities; a rewrite written after another letter is not used.
    async def handler(request: web.Request) -> web.Response:
        return web.json_response(completion("A\nsomething", {"A": -1.5, "B": -0.3}))

    res = HttpBackend(serve(handler).url).resolve(WINDOW, QUESTION)
    assert res.decision == "not_needed" and res.rewrite is None
    assert res.probs["unknown"] == 0.0


def test_decision_from_the_letter_without_logprobs(serve) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response(completion("B"))

    res = HttpBackend(serve(handler).url).resolve(WINDOW, QUESTION)
    assert res.decision == "not_needed" and res.probs == {"needs": 0.0, "not_needed": 1.0, "unknown": 0.0}


def test_unreadable_answer_is_unknown_not_not_needed(serve, caplog: pytest.LogCaptureFixture) -> None:
    async def handler(request: web.Request) -> web.Response:
        # An empty token among the alternatives is no letter (it is a substring of "ABC", though).
        return web.json_response(completion("I think it does need it.", {"I": -0.1, "": -0.5, "Sure": -2.0}))

    with caplog.at_level(logging.WARNING, logger="corefbot.models.serve.http"):
        res = HttpBackend(serve(handler).url).resolve(WINDOW, QUESTION)
    assert res.decision == "unknown" and res.rewrite is None
    assert "unreadable answer" in caplog.text


def test_server_refusing_logprobs_is_asked_again_without(serve) -> None:
    async def handler(request: web.Request) -> web.Response:
        body = await request.json()
        if "logprobs" in body:
            return web.json_response({"error": "logprobs not supported"}, status=400)
        return web.json_response(completion("A\nBTW, how to deploy mmpose on TX2?"))

    server = serve(handler)
    backend = HttpBackend(server.url)
    assert backend.resolve(WINDOW, QUESTION).decision == "needs"
    assert backend.resolve(WINDOW, QUESTION).decision == "needs"
    assert ["logprobs" in r for r in server.requests] == [True, False, False]  # remembered after the refusal


def test_slow_server_times_out(serve) -> None:
    async def handler(request: web.Request) -> web.Response:
        await asyncio.sleep(2)
        return web.json_response(completion("A"))

    backend = HttpBackend(serve(handler).url, timeout_s=0.3)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="0.3 s"):
        backend.resolve(WINDOW, QUESTION)
    assert time.monotonic() - start < 1.5


@pytest.mark.parametrize("status, body, match", [
    (200, "not json at all", "not JSON"),
    (200, json.dumps({"object": "error"}), "no 'choices'"),
    (500, json.dumps({"error": "boom"}), "HTTP 500"),
    (200, json.dumps({"choices": [{"index": 0}]}), "no message content"),
])
def test_bad_answers_raise_naming_the_url(serve, status: int, body: str, match: str) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=status, text=body, content_type="application/json")

    server = serve(handler)
    with pytest.raises(HttpBackendError, match=match) as info:
        HttpBackend(server.url).resolve(WINDOW, QUESTION)
    assert str(server.port) in str(info.value)


def test_unreachable_server_raises() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(HttpBackendError, match="unreachable"):
        HttpBackend(f"http://127.0.0.1:{port}", timeout_s=2).resolve(WINDOW, QUESTION)


def test_served_composition_gates_and_validates(serve) -> None:
    # Through load_resolver: the gate answers a self-contained question without a request, and a
    # rewrite naming something the chat never mentioned is not forwarded.
    async def handler(request: web.Request) -> web.Response:
        return web.json_response(completion("A\nBTW, how to deploy YOLOv8 on TX2?", {"A": -0.1, "B": -3.0}))

    server = serve(handler)
    resolver = load_resolver("http", url=server.url)
    plain = resolver.resolve(WINDOW, Turn("u3", "How do I install CUDA 11.8 on Ubuntu 22.04?", 3.0))
    assert plain.gated and plain.decision == "not_needed" and not server.requests
    res = resolver.resolve(WINDOW, QUESTION)
    assert res.decision == "needs" and res.rewrite is None and "yolov8" in res.reject_reason.lower()
    assert res.query(QUESTION.text) == QUESTION.text and len(server.requests) == 1


def test_where_the_gate_is_sure_it_decides_and_the_rewrite_goes_on(serve) -> None:
    """The server writes "needs" and a rewrite while its logprobs lean to "not needed": served as not needed, unless
    the gate is sure the question needs resolution; then it is needed, and the server's rewrite is forwarded."""
    from dataclasses import replace

    async def handler(request: web.Request) -> web.Response:
        # A letter sure enough that the gate's probability weighed with it does not turn it (see the next test).
        return web.json_response(completion("A\nBTW, how to deploy mmpose on TX2?", {"A": -6.0, "B": -0.01}))

    resolver = load_resolver("http", url=serve(handler).url)
    asked = resolver.resolve(WINDOW, QUESTION)
    assert asked.decision == "not_needed" and asked.rewrite is None and not asked.gate_sure and not asked.gate_swayed
    resolver.gate = replace(resolver.gate, sure_threshold=0.0)
    sure = resolver.resolve(WINDOW, QUESTION)
    assert sure.decision == "needs" and sure.gate_sure
    assert sure.query(QUESTION.text) == "BTW, how to deploy mmpose on TX2?"
    resolver.gate = replace(resolver.gate, sure_threshold=None)
    assert resolver.resolve(WINDOW, QUESTION).decision == "not_needed"


def test_between_the_sure_sides_the_gates_probability_is_weighed_with_the_letter(serve) -> None:
    """The letter leans to "not needed" (p 0.23) where the gate gives 0.96: the log-odds add up to "needs", and the
    rewrite is asked for; a question the gate finds plainly self-contained is turned the other way."""
    from dataclasses import replace

    letters = {"A": -1.5, "B": -0.3}

    async def handler(request: web.Request) -> web.Response:
        return web.json_response(completion("A\nBTW, how to deploy mmpose on TX2?", letters))

    server = serve(handler)
    resolver = load_resolver("http", url=server.url)
    res = resolver.resolve(WINDOW, QUESTION)
    assert res.probs["needs"] < 0.5 < res.gate_p and res.decision == "needs" and res.gate_swayed
    assert res.query(QUESTION.text) == "BTW, how to deploy mmpose on TX2?" and len(server.requests) == 2
    alone = replace(resolver, weigh_gate=False).resolve(WINDOW, QUESTION)
    assert alone.decision == "not_needed" and not alone.gate_swayed and alone.gate_p == res.gate_p
    # A letter leaning to "needs" (p 0.62) on a question the gate scores near 0, sent to the model anyway.
    letters.update(A=-0.5, B=-1.0)
    plain = Turn("u3", "How do I install CUDA 11.8 on Ubuntu 22.04?", 3.0)
    resolver.gate = replace(resolver.gate, threshold=0.0, thresholds={})
    turned = resolver.resolve(WINDOW, plain)
    assert turned.probs["needs"] > 0.5 and turned.decision == "not_needed" and turned.gate_swayed
    assert turned.rewrite is None and turned.query(plain.text) == plain.text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_real_llama_cpp_server(tiny_gguf: Path) -> None:
    """llama-cpp-python's OpenAI-compatible server (``llama-cpp-python[server]``) on the tiny GGUF."""
    for module in ("uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings"):
        pytest.importorskip(module, reason="the llama.cpp server needs llama-cpp-python[server]")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(tiny_gguf), "--host", "127.0.0.1",
         "--port", str(port), "--n_ctx", "2048", "--n_threads", "2", "--model_alias", "tiny"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                    pytest.fail(f"llama.cpp server did not start: {out[-2000:]}")
                time.sleep(0.3)
        backend = HttpBackend(f"http://127.0.0.1:{port}/v1", model="tiny", timeout_s=60, max_tokens=24)
        for question in (QUESTION, Turn("u3", "那个怎么装？", 3.0)):
            res = backend.resolve(WINDOW, question)
            # A random tiny model writes anything; the decision must still be one of the options,
            # with probabilities that sum to one, and a rewrite (if any) on one line.
            assert res.decision in DECISIONS
            assert sum(res.probs.values()) == pytest.approx(1.0)
            assert res.rewrite is None or "\n" not in res.rewrite
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
