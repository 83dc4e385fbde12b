"""The question filter's second stage: the paper's 0–10 "is this a question" prompt answered by a model
(:class:`~corefbot.pipeline.question.LLMScorer`), used by ``corefbot build --llm-url``."""
from __future__ import annotations

import json
import logging
import urllib.request
from typing import Sequence

from corefbot.models.serve.http import chat_completions_url
from corefbot.pipeline.prompt import QUESTION_SCORE_PROMPT
from corefbot.pipeline.question import parse_score, rule_score
from corefbot.pipeline.records import Turn

log = logging.getLogger(__name__)


class OpenAIScorer:
    """The paper's scoring prompt over any OpenAI-compatible chat-completions endpoint."""

    def __init__(self, base_url: str, model: str = "default", api_key: str | None = None,
                 timeout_s: float = 30.0) -> None:
        self.url = chat_completions_url(base_url)
        self.model, self.api_key, self.timeout_s = model, api_key, timeout_s

    def score(self, text: str, window: Sequence[Turn] = ()) -> float:
        body = json.dumps({
            "model": self.model, "temperature": 0, "max_tokens": 4,
            "messages": [{"role": "user", "content": QUESTION_SCORE_PROMPT.format(text=text)}],
        }).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers)
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            answer = json.load(response)["choices"][0]["message"]["content"]
        score = parse_score(answer)
        if score is None:
            # An unreadable score must not silently count as "not a question": fall back to rules.
            log.warning("LLM question scorer gave no number (%r); using the rule score", answer)
            return rule_score(text)
        return score
