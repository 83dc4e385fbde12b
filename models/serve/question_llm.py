"""The question filter's second stage on the local model: the paper's 0–10 score from llama.cpp.

The paper had an LLM score every message 0–10 ("a question with a topic, or a question to other
members") and kept ≥ 5. Running a model on every chat line is what corefbot avoids: the rules
(:mod:`corefbot.pipeline.question`) decide the clear cases and only a line whose rule score falls in a
borderline band (:class:`SecondStage`) is scored by a model — the resolver's own ``llama_cpp.Llama``
(one model per process: :class:`LlamaQuestionScorer` runs on the :class:`~corefbot.models.serve.llama.LlamaBackend`'s
worker thread through :meth:`~corefbot.models.serve.llama.LlamaBackend.call`, in the same bounded queue as the
questions it resolves) or any OpenAI-compatible endpoint (:class:`OpenAIScorer`, also ``corefbot build --llm-url``).

The local score always parses: it is the expectation of the score under the model's next-token
distribution over the digits 0–9 (a "1" that the model would continue with "0" counts as 10), so there
is no answer to misread. The fixed instruction prefix is evaluated once and its KV state kept in the
backend's state cache under its own key, so a line costs only its own tokens.
"""
from __future__ import annotations

import json
import logging
import math
import time
import urllib.request
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Sequence

from corefbot.models.serve.http import chat_completions_url
from corefbot.pipeline.prompt import QUESTION_SCORE_PROMPT
from corefbot.pipeline.question import THRESHOLD, LLMScorer, parse_score, rule_score
from corefbot.pipeline.records import Turn

if TYPE_CHECKING:
    from corefbot.models.serve.llama import LlamaBackend, _Job

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

#: The key of the instruction prefix's KV state in the backend's cache (no group is named like this).
STATE_KEY = "\x00question-score"
SYSTEM = "You are a careful assistant for a technical community's group chat."
MAX_CHARS = 400  # a longer line (a pasted log) is cut: its first part says whether it asks
_SPLIT = "{text}"

Mode = Literal["off", "local", "http"]


# Worked examples before the line to score, written for this prompt (none is taken from any evaluation
# set): a 0.5B model zero-shot answers ~5 for everything; shown the scale on group-chat shapes — a bare
# 啊 ending that asks and one that does not, a proposal ending in 吧, a paste — it separates them.
EXAMPLES: tuple[tuple[str, int], ...] = (
    ("mmdet 训练到一半显存炸了啊", 7),
    ("哈哈哈哈太真实了", 0),
    ("这个接口现在还能用啊", 7),
    ("我先去吃饭了，回来再看", 0),
    ("what's the difference between fp16 and bf16 for training", 9),
    ("thanks, it works now", 0),
    ("那个数据集是公开的吧", 7),
    ("你先重启试试吧", 1),
    ("大佬们这个报错有人见过嘛[捂脸]", 10),
    ("Traceback (most recent call last): File \"train.py\", line 3", 0),
    ("新版本下周发布，大家注意升级", 1),
    ("anyone running vllm on a T4", 8),
)


def _turn(text: str) -> str:
    return f"<|im_start|>user\n{QUESTION_SCORE_PROMPT.format(text=text)}<|im_end|>\n<|im_start|>assistant\n"


def _chatml(text: str) -> str:
    shots = "".join(_turn(t) + f"{s}<|im_end|>\n" for t, s in EXAMPLES)
    return f"<|im_start|>system\n{SYSTEM}<|im_end|>\n{shots}{_turn(text)}"


class LlamaQuestionScorer:
    """The paper's 0–10 question score from the local llama.cpp model (see the module docstring).

    ``score`` raises :class:`~models.llama_backend.BackendBusy` when the backend's queue is full and
    ``TimeoutError`` when it is late; :class:`SecondStage` turns both into "use the rule score"."""

    name = "llama-cpp"

    def __init__(self, backend: "LlamaBackend", *, timeout_s: float | None = None) -> None:
        self.backend = backend
        self.timeout_s = timeout_s
        llm = backend._llm
        digits = []
        for d in "0123456789":
            toks = llm.tokenize(d.encode(), add_bos=False, special=False)
            if len(toks) != 1:
                raise ValueError(f"{backend.model_path}: the digit {d!r} is not a single token ({toks}); "
                                 "the question scorer reads the score from single-digit tokens")
            digits.append(toks[0])
        self._digits = digits
        self._ends = [t for t in (backend._single_token("<|im_end|>", special=True), backend._nl)]
        self._prefix = llm.tokenize(_chatml(_SPLIT).split(_SPLIT)[0].encode(), add_bos=False, special=True)
        self.last_eval_tokens = 0

    def warm(self, timeout_s: float = 300.0) -> None:
        """Evaluate and keep the instruction prefix now (the bot does it at start), so that the first
        borderline line does not pay for it and time out."""
        self.backend.call(lambda job: self._score(job, "ok"), timeout_s=timeout_s)

    def score(self, text: str, window: Sequence[Turn] = ()) -> float:
        text = " ".join(text.split())[:MAX_CHARS]
        return self.backend.call(lambda job: self._score(job, text), timeout_s=self.timeout_s)

    # -- on the backend's worker thread ------------------------------------------------------------

    def _probs(self, ids: Sequence[int]) -> list[float]:
        b = self.backend
        ptr = b._lc.llama_get_logits_ith(b._llm.ctx, -1)
        logits = [float(ptr[t]) for t in ids]
        top = max(logits)
        exps = [math.exp(x - top) for x in logits]
        total = sum(exps)
        return [e / total for e in exps]

    def _score(self, job: "_Job", text: str) -> float:
        b = self.backend
        full = b._tokenize(_chatml(text))
        boundary = min(len(self._prefix), len(full) - 1)
        while boundary and full[boundary - 1] != self._prefix[boundary - 1]:
            boundary -= 1  # BPE may merge across the seam: keep only the shared part
        n = b._reuse(STATE_KEY, full)
        if b.reuse and n < boundary:
            b._decode(full[n:boundary], job)
            b._save(STATE_KEY)  # the instruction prefix, kept for every later line
            n = boundary
        b._decode(full[n:], job)
        self.last_eval_tokens = len(full) - n
        p = self._probs(self._digits)
        ten = 0.0
        if p[1] >= 0.1:
            # "1" may be the start of "10": look one token further.
            b._decode([self._digits[1]], job)
            q = self._probs([self._digits[0], *self._ends])
            ten = p[1] * q[0]
        expected = sum(d * pd for d, pd in enumerate(p)) + 9.0 * ten  # 10·p10 + 1·(p1 − p10)
        return max(0.0, min(10.0, expected))


@dataclass(frozen=True, slots=True)
class StageResult:
    score: float  # the second stage's score, or the rule score when it fell back
    used: bool  # the model answered
    ms: float
    reason: str | None = None  # why it fell back


@dataclass
class SecondStage:
    """Rule scores in ``[low, high)`` are re-scored by ``scorer``; anything else keeps its rule score.

    A busy, late or failing model never loses a message and never blocks: the rule score stands."""

    scorer: LLMScorer
    low: float = 3.0
    high: float = THRESHOLD

    def in_band(self, rule_score: float) -> bool:
        return self.low <= rule_score < self.high

    def score(self, text: str, rule_score: float) -> StageResult:
        if not self.in_band(rule_score):
            return StageResult(rule_score, False, 0.0, "outside the band")
        start = time.perf_counter()
        try:
            value = self.scorer.score(text)
        except Exception as exc:  # noqa: BLE001 - BackendBusy, TimeoutError, a dead endpoint: rules decide
            ms = (time.perf_counter() - start) * 1000
            log.info("question second stage fell back to rules (%s)", exc)
            return StageResult(rule_score, False, ms, f"{type(exc).__name__}: {exc}")
        return StageResult(value, True, (time.perf_counter() - start) * 1000)


def parse_band(text: str) -> tuple[float, float]:
    """``"3-5"`` → (3.0, 5.0): the rule scores, low inclusive, high exclusive, that go to the model."""
    try:
        low, high = (float(x) for x in text.replace("–", "-").split("-", 1))
    except ValueError:
        raise ValueError(f"question band {text!r}: expected LOW-HIGH, e.g. 3-5") from None
    if not 0.0 <= low < high <= 10.0:
        raise ValueError(f"question band {text!r}: need 0 <= LOW < HIGH <= 10")
    return low, high


def make_scorer(mode: Mode, *, backend: object | None = None, url: str | None = None, model: str = "default",
                api_key: str | None = None, timeout_s: float = 30.0) -> LLMScorer | None:
    """The second-stage scorer for ``mode``: ``local`` needs a :class:`LlamaBackend`, ``http`` a URL."""
    if mode == "off":
        return None
    if mode == "local":
        from corefbot.models.serve.llama import LlamaBackend

        if not isinstance(backend, LlamaBackend):
            raise ValueError("the local question scorer needs the llama-cpp resolver backend "
                             f"(COREFBOT_MODEL_PATH), not {getattr(backend, 'name', type(backend).__name__)}")
        return LlamaQuestionScorer(backend, timeout_s=timeout_s)
    if mode == "http":
        if not url:
            raise ValueError("the http question scorer needs a URL (COREFBOT_QUESTION_LLM_URL)")
        return OpenAIScorer(url, model, api_key, timeout_s=timeout_s)
    raise ValueError(f"question second stage must be 'off', 'local' or 'http', not {mode!r}")
