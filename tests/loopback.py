"""A loopback OpenAI-compatible chat-completions endpoint for the second-stage scorer tests."""
from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Callable, Iterator


@contextmanager
def chat_endpoint(answer: Callable[[str], str]) -> Iterator[tuple[str, list[str]]]:
    """Serve ``POST …/chat/completions`` on 127.0.0.1, answering each prompt with ``answer(prompt)``.
    Yields the base URL and the list of prompts received."""
    prompts: list[str] = []

    class Endpoint(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            prompt = body["messages"][-1]["content"]
            prompts.append(prompt)
            payload = json.dumps({"choices": [{"message": {"content": answer(prompt)}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Endpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/v1", prompts
    finally:
        server.shutdown()
        server.server_close()
