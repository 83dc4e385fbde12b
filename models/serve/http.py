"""The ``http`` resolver backend: the same decision and rewrite over any OpenAI-compatible
chat-completions endpoint (llama.cpp's server, ``python -m llama_cpp.server``, vLLM, Ollama).

The prompt is the one prompt builder's (:func:`corefbot.pipeline.prompt.build_prompt` with
:data:`~corefbot.pipeline.prompt.SERVE_ORDER`): :data:`~corefbot.pipeline.prompt.SYSTEM` as the system message and the
instruction as the user message, which the server's ChatML template turns into exactly the text the
local backend and training see.

Decision: when the server returns ``logprobs``/``top_logprobs`` for the first generated token, the
option letters' log-probabilities are soft-maxed into ``Resolution.probs`` and the decision is their
argmax; otherwise the answer's first letter is parsed. An answer that yields neither is "unknown"
with a logged warning — never silently "not needed". The rewrite is the line after the letter.

``resolve`` blocks (stdlib ``urllib``, so it needs no event loop); the bot runs it in a thread.
Network failures, timeouts, HTTP errors and malformed JSON raise :class:`HttpBackendError` naming the URL.
"""
from __future__ import annotations

import json
import logging
import math
import socket
import time
import urllib.error
import urllib.request
from typing import Any, Mapping, Sequence

from corefbot.models.serve.types import Resolution, RewriteMode
from corefbot.pipeline.prompt import LETTERS, SERVE_ORDER, SYSTEM, Prompt, build_prompt, parse_response
from corefbot.pipeline.records import Decision, Turn

log = logging.getLogger(__name__)


class HttpBackendError(RuntimeError):
    """The endpoint could not be reached or answered something that is not a chat completion."""


def chat_completions_url(url: str) -> str:
    """The one rule for every OpenAI-compatible URL corefbot is given (resolver, question scorer, assistant):
    the full endpoint is kept, a base with a path (``…/v1``, ``…/api``) gets ``/chat/completions``, a bare
    server root gets ``/v1/chat/completions``."""
    from urllib.parse import urlsplit

    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    if urlsplit(url).path:
        return url + "/chat/completions"
    return url + "/v1/chat/completions"


def letter_probs(top_logprobs: Sequence[Mapping[str, Any]]) -> dict[str, float] | None:
    """Softmax over the option letters among a token's alternatives; None when no letter is there.

    Tokens are compared stripped (" A" and "A" are the same answer); a letter the server did not list
    gets no mass, which is what its absence from the top alternatives means at this precision.
    """
    best: dict[str, float] = {}
    for alt in top_logprobs:
        token = str(alt.get("token", "")).strip()
        lp = alt.get("logprob")
        if len(token) == 1 and token in LETTERS and isinstance(lp, (int, float)) and math.isfinite(lp):
            best[token] = max(best.get(token, -math.inf), float(lp))
    if not best:
        return None
    top = max(best.values())
    exp = {k: math.exp(v - top) for k, v in best.items()}
    total = sum(exp.values())
    return {k: exp.get(k, 0.0) / total for k in LETTERS}


class HttpBackend:
    """A resolver backend over an OpenAI-compatible ``/v1/chat/completions`` endpoint."""

    name = "http"

    def __init__(self, url: str, *, model: str = "default", api_key: str | None = None, timeout_s: float = 30.0,
                 max_tokens: int = 96, top_logprobs: int = 5, extra_body: Mapping[str, Any] | None = None) -> None:
        if not url or not url.startswith(("http://", "https://")):
            raise ValueError(f"http resolver: URL must start with http:// or https://, got {url!r}")
        self.url = chat_completions_url(url)
        self.model = model
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.max_tokens = max_tokens
        self.top_logprobs = top_logprobs
        self.extra_body = dict(extra_body or {})
        self._logprobs = top_logprobs > 0  # turned off if the server rejects the fields

    # -- the Backend protocol --------------------------------------------------------------------

    def resolve(self, window: Sequence[Turn], question: Turn, *, group: str | None = None,
                rewrite: RewriteMode = "auto") -> Resolution:
        start = time.perf_counter()
        prompt = build_prompt(window, question, SERVE_ORDER)
        choice = self._complete(prompt)
        text = _message_text(choice, self.url)
        written, line = parse_response(prompt, text)
        decision = written
        probs = self._probs(prompt, choice)
        if probs is not None:
            decision = max(probs, key=probs.__getitem__)
        elif decision is not None:
            probs = {d: float(d == decision) for d in SERVE_ORDER}
        else:
            log.warning("http resolver %s: unreadable answer %r; deciding 'unknown'", self.url, text[:200])
            decision, probs = "unknown", {"needs": 0.0, "not_needed": 0.0, "unknown": 1.0}
        # The line belongs to the letter the server wrote, which the logprobs may have overruled: kept for a "needs"
        # decision only where the server wrote "needs" too, or where it is asked for whatever the decision.
        keep = written == "needs" and (rewrite == "always" or (rewrite == "auto" and decision == "needs"))
        return Resolution(decision, probs, line if keep else None, backend=self.name,
                          latency_ms=(time.perf_counter() - start) * 1000)

    def observe(self, group: str, window: Sequence[Turn]) -> None:
        """Nothing to prefill from here: servers keep their own prompt caches (llama.cpp's ``cache_prompt``)."""

    def close(self) -> None:
        """Stateless: each request opens its own connection."""

    # -- internals -------------------------------------------------------------------------------

    def _probs(self, prompt: Prompt, choice: Mapping[str, Any]) -> dict[Decision, float] | None:
        content = (choice.get("logprobs") or {}).get("content") if isinstance(choice.get("logprobs"), dict) else None
        if not content:
            return None
        # The first token that is not whitespace carries the letter.
        for entry in content:
            if str(entry.get("token", "")).strip():
                alts = list(entry.get("top_logprobs") or []) + [entry]
                by_letter = letter_probs(alts)
                if by_letter is None:
                    return None
                return {prompt.decision(k): v for k, v in by_letter.items()}
        return None

    def _body(self, prompt: Prompt) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt.instruction}],
            "temperature": 0.0,
            "max_tokens": self.max_tokens,
            **self.extra_body,
        }
        if self._logprobs:
            body |= {"logprobs": True, "top_logprobs": self.top_logprobs}
        return body

    def _complete(self, prompt: Prompt) -> Mapping[str, Any]:
        try:
            doc = self._post(self._body(prompt))
        except _BadRequest as exc:
            if not self._logprobs:
                raise HttpBackendError(str(exc)) from None
            # Some servers reject logprobs on chat completions: ask once more without, and remember.
            log.warning("http resolver %s refused logprobs (%s); parsing answers only from now on", self.url, exc)
            self._logprobs = False
            try:
                doc = self._post(self._body(prompt))
            except _BadRequest as exc2:
                raise HttpBackendError(str(exc2)) from None
        choices = doc.get("choices") if isinstance(doc, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise HttpBackendError(f"http resolver {self.url}: the answer has no 'choices' ({_snippet(doc)})")
        return choices[0]

    def _post(self, body: Mapping[str, Any]) -> Any:
        data = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:300].decode("utf-8", "replace")
            message = f"http resolver {self.url}: HTTP {exc.code} {exc.reason}: {detail}"
            if exc.code in (400, 422):
                raise _BadRequest(message) from None
            raise HttpBackendError(message) from None
        except (TimeoutError, socket.timeout):
            raise TimeoutError(f"http resolver {self.url} gave no answer within {self.timeout_s:g} s") from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, (TimeoutError, socket.timeout)):
                raise TimeoutError(f"http resolver {self.url} gave no answer within {self.timeout_s:g} s") from None
            raise HttpBackendError(f"http resolver {self.url} is unreachable: {exc.reason}") from None
        except (ConnectionError, OSError) as exc:
            raise HttpBackendError(f"http resolver {self.url}: connection failed: {exc}") from None
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HttpBackendError(f"http resolver {self.url}: the answer is not JSON ({exc}): "
                                   f"{raw[:200].decode('utf-8', 'replace')!r}") from None


class _BadRequest(HttpBackendError):
    pass


def _message_text(choice: Mapping[str, Any], url: str) -> str:
    message = choice.get("message")
    if isinstance(message, dict):
        content = message.get("content")
        if isinstance(content, str):
            return content
        if content is None:
            return ""
    if isinstance(choice.get("text"), str):  # a server answering in the completions shape
        return choice["text"]
    raise HttpBackendError(f"http resolver {url}: the choice has no message content ({_snippet(choice)})")


def _snippet(obj: Any) -> str:
    text = json.dumps(obj, ensure_ascii=False) if not isinstance(obj, str) else obj
    return text[:200]
