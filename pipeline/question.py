"""The question filter: a bilingual rule scorer (0–10) and a pluggable second-stage LLM scorer.

The paper had an LLM score "is this a question with a topic, or a question to other members" from 0
to 10 and kept scores ≥ 5; texts shorter than 7 characters were never labelled. The rule scorer gives
the same scale without a model, so capture and import work before any model exists; an
:class:`LLMScorer` can re-score what the rules pass (:mod:`corefbot.models.serve.question_llm`: any
OpenAI-compatible endpoint).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Protocol, Sequence

from corefbot.pipeline.records import Turn

log = logging.getLogger(__name__)

THRESHOLD = 5.0
MIN_CHARS = 7

_PLACEHOLDER = re.compile(r"\[(?:image|face|record|video|file|sticker|forward|json|xml|share|location|music|poke|dice|rps|[a-z_]+)\]")
_QMARK = re.compile(r"[?？]")
_ZH_PARTICLE_END = re.compile(r"[吗嘛呢么][\s?？。!！~～]*$")
_ZH_WORDS = re.compile(
    r"怎么|怎样|怎麼|如何|为什么|为啥|為什麼|什么|啥|哪|多少|几[个种版]|是否|是不是|能不能|可不可以|有没有|"
    r"会不会|要不要|行不行|对不对"
)
_ZH_HELP = re.compile(r"求助|请教|请问|求教|求问|有人知道|谁知道|有没有人|大佬|帮忙|帮我看|报错|出错|不好用|失败")
_CLAUSE_END = re.compile(r"[，,。.!！;；]")
_EN_START = re.compile(
    r"^\s*(?:(?:btw|so|and|but|also|hi|hello|hey|guys|all|everyone)[,\s]+)*"
    r"(?:what|how|why|when|where|which|who|whom|whose|is|are|am|was|were|do|does|did|can|could|"
    r"should|would|will|shall|may|might|has|have|had|any(?:one|body)?|is there|are there)\b",
    re.IGNORECASE,
)
_EN_WORDS = re.compile(
    r"\b(?:how to|how do|how can|what is|what's|why does|why is|any idea|anyone know|does anyone|"
    r"help|error|fails?|failed|doesn'?t work|not working|issue|problem|wonder(?:ing)?|"
    r"is it possible|possible to)\b",
    re.IGNORECASE,
)
_ENTITY = re.compile(r"[A-Za-z][A-Za-z0-9_.+-]{1,}|\d+")


def text_length(text: str) -> int:
    """Characters that count toward the 7-character rule: placeholders and spaces do not."""
    return len(re.sub(r"\s+", "", _PLACEHOLDER.sub("", text)))


def rule_score(text: str, min_chars: int = MIN_CHARS) -> float:
    """A 0–10 question score from surface cues, Chinese and English alike."""
    body = _PLACEHOLDER.sub("", text).strip()
    if text_length(body) < min_chars:
        return 0.0
    score = 0.0
    if _QMARK.search(body):
        score += 5.0
    if _ZH_PARTICLE_END.search(body) or re.search(r"[吗呢][?？\s]", body):
        score += 5.0  # a sentence-final 吗/呢 is as good as a question mark
    if _ZH_WORDS.search(body):
        score += 4.0
        if _ZH_WORDS.search(_CLAUSE_END.split(body.rstrip("，,。.!！;；"))[-1]):
            score += 1.0  # the interrogative sits in the last clause, where a question asks it
    if _ZH_HELP.search(body):
        score += 2.0
    if _EN_START.search(body):
        score += 3.0
    if _EN_WORDS.search(body):
        score += 2.0
    if not _QMARK.search(body) and re.search(r"我也?不知道|不清楚是", body):
        score -= 2.0  # "I don't know what…" reports, it does not ask
    if score > 0 and _ENTITY.search(body):
        score += 1.0  # a topic: a named thing (mmpose, TX2, CUDA 12…)
    return max(0.0, min(score, 10.0))


@dataclass(frozen=True, slots=True)
class QuestionFilter:
    threshold: float = THRESHOLD
    min_chars: int = MIN_CHARS

    def score(self, text: str) -> float:
        return rule_score(text, self.min_chars)

    def passes(self, score: float) -> bool:
        return score >= self.threshold


class LLMScorer(Protocol):
    """A second-stage scorer: the paper's 0–10 prompt answered by a language model."""

    def score(self, text: str, window: Sequence[Turn] = ()) -> float: ...


def parse_score(answer: str) -> float | None:
    match = re.search(r"\d+(?:\.\d+)?", answer)
    if not match:
        return None
    return max(0.0, min(10.0, float(match.group())))
