"""Ask the group's upstream assistant: OpenAI-compatible chat completions, or a plain JSON POST.

``json``:   POST URL ``{"query", "group", "history": [{"sender", "text", "timestamp"}], "id"}`` → ``{"answer": str}``
``openai``: POST to the chat-completions endpoint of URL (:func:`~corefbot.models.serve.http.chat_completions_url`)
            ``{"model", "messages": [system?, {"role": "user", "content": query}]}`` → ``choices[0].message.content``

Every request carries an ``Idempotency-Key`` header (the outbox item's question id), so an assistant that
saw a request whose answer never reached us (our timeout, a broken link) can recognise the retry.
Failures raise :class:`AssistantError`; ``retryable`` says whether the outbox should try again:
connection errors, timeouts, 5xx, 408/429 and malformed answers (a proxy's HTML error page, a half
deployed service) are retried; other 4xx mean the request itself is wrong and are not.
"""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp

from corefbot.models.serve.http import chat_completions_url

log = logging.getLogger("corefbot.resolver")

AssistantApi = Literal["openai", "json"]


class AssistantError(Exception):
    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass
class AssistantClient:
    url: str
    api: AssistantApi = "openai"
    model: str = "default"
    key: str | None = None
    system: str | None = None
    timeout_s: float = 60.0
    _session: aiohttp.ClientSession | None = None

    def __post_init__(self) -> None:
        if self.api not in ("openai", "json"):
            raise ValueError(f"COREFBOT_ASSISTANT_API must be 'openai' or 'json', not {self.api!r}")
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"COREFBOT_ASSISTANT_URL must be an http(s) URL, not {self.url!r}")

    @property
    def endpoint(self) -> str:
        return chat_completions_url(self.url) if self.api == "openai" else self.url

    async def ask(self, query: str, *, group: str, history: list[dict] | None = None,
                  request_id: str | None = None) -> str:
        """The assistant's answer to ``query`` (non-empty text), or :class:`AssistantError`."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        if request_id:
            headers["Idempotency-Key"] = request_id
        if self.api == "json":
            payload: dict[str, Any] = {"query": query, "group": group, "history": history or [], "id": request_id}
        else:
            messages = [{"role": "system", "content": self.system}] if self.system else []
            payload = {"model": self.model, "messages": [*messages, {"role": "user", "content": query}]}
        url = self.endpoint
        try:
            async with self._session.post(url, json=payload, headers=headers,
                                          timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as resp:
                body = await resp.text()
                if resp.status >= 400:
                    retryable = resp.status >= 500 or resp.status in (408, 425, 429)
                    raise AssistantError(f"assistant at {url} answered HTTP {resp.status}: {_snippet(body)}",
                                         retryable=retryable)
        except asyncio.TimeoutError:
            raise AssistantError(f"assistant at {url} gave no answer within {self.timeout_s:g} s",
                                 retryable=True) from None
        except aiohttp.ClientError as exc:
            raise AssistantError(f"assistant at {url} unreachable: {exc}", retryable=True) from None
        return self._parse(url, body)

    def _parse(self, url: str, body: str) -> str:
        try:
            data = json.loads(body)
        except json.JSONDecodeError as exc:
            raise AssistantError(f"assistant at {url} returned invalid JSON ({exc.msg} at char {exc.pos}): "
                                 f"{_snippet(body)}", retryable=True) from None
        try:
            answer = data["answer"] if self.api == "json" else data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            where = '"answer"' if self.api == "json" else "choices[0].message.content"
            raise AssistantError(f"assistant at {url} returned JSON without {where}: {_snippet(body)}",
                                 retryable=True) from None
        if not isinstance(answer, str) or not answer.strip():
            raise AssistantError(f"assistant at {url} returned an empty or non-text answer: {_snippet(body)}",
                                 retryable=True)
        return answer.strip()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _snippet(body: str, n: int = 200) -> str:
    body = " ".join(body.split())
    return repr(body[:n] + ("…" if len(body) > n else ""))
