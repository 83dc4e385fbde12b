"""Measuring the question filter: recall on real inquiries, precision and keep rate on labelled chat lines.

Input is either plain text (one message per line, every line a question: the shape of the real group
inquiries in ``../shared/data/group_questions_zh.txt``) or JSON lines with ``text`` and a boolean label
(``question``, or ``is_question`` / ``label``). Lines shorter than the filter's minimum are counted
separately: the paper never labels them, so recall is reported on the rest.

Development sets are split deterministically by a hash of the text (:func:`hash_part`), so rules can be
tuned on one part while the other stays unseen; ``pipeline/data/chat_lines_{dev,test}.jsonl`` are
corefbot's own hand-written chat lines, already split the same way by file.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterable, Literal, Protocol, Sequence

from corefbot.pipeline.question import QuestionFilter, text_length

Part = Literal["all", "dev", "test"]
LABEL_KEYS = ("question", "is_question", "label")


@dataclass(frozen=True, slots=True)
class LabelledLine:
    text: str
    question: bool


@dataclass(frozen=True, slots=True)
class Scored:
    text: str
    question: bool
    rule_score: float
    score: float  # after the second stage, when the model answered for this line
    second_stage: bool  # the rule score fell in the second stage's band
    fell_back: bool  # ... and the model did not answer (busy, late, failing): the rule score stood
    kept: bool
    model_ms: float | None = None  # how long the model took to answer (None: it did not)


@dataclass(frozen=True, slots=True)
class QuestionEval:
    """What the filter kept of a labelled set. ``recall`` and ``keep_rate_negatives`` are None when the
    set has no positives / no negatives; ``too_short`` lines are excluded from every figure."""

    n: int
    positives: int
    negatives: int
    too_short: int
    recall: float | None
    precision: float | None
    keep_rate_negatives: float | None
    second_stage_share: float
    second_stage_fallbacks: int  # lines in the band scored by the rules because the model did not answer
    ms_per_message: float
    ms_per_second_stage: float | None
    misses: list[str] = field(default_factory=list)
    false_keeps: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def hash_part(text: str, test_share: int = 3) -> Literal["dev", "test"]:
    """Deterministic split by content: one line in ``test_share`` (by SHA-256 of the text) is held out."""
    return "test" if int(hashlib.sha256(text.encode("utf-8")).hexdigest(), 16) % test_share == 0 else "dev"


def read_lines(path: str | Path) -> list[LabelledLine]:
    """A text file (every non-empty line is a question) or JSONL with a boolean label per row."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"question set not found: {path}")
    rows: list[LabelledLine] = []
    with path.open(encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    is_jsonl = path.suffix == ".jsonl" or any(line.lstrip().startswith("{") for line in lines[:1])
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not is_jsonl:
            rows.append(LabelledLine(line, True))
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not JSON ({exc.msg})") from None
        label = next((row[k] for k in LABEL_KEYS if k in row), None)
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not isinstance(label, bool):
            raise ValueError(f"{path}:{number}: a row needs a string 'text' and a boolean "
                             f"'question' (or 'is_question' / 'label')")
        rows.append(LabelledLine(row["text"], label))
    return rows


def shipped_lines(part: Literal["dev", "test"]) -> list[LabelledLine]:
    """corefbot's own hand-written chat lines (questions and non-questions, zh and en)."""
    ref = resources.files("corefbot.pipeline").joinpath("data", f"chat_lines_{part}.jsonl")
    with resources.as_file(ref) as path:
        return read_lines(path)


def select(rows: Sequence[LabelledLine], part: Part) -> list[LabelledLine]:
    return list(rows) if part == "all" else [r for r in rows if hash_part(r.text) == part]


class StageAnswer(Protocol):
    score: float  # the model's score, or the rule score when it fell back
    used: bool  # the model answered
    ms: float


class SecondStage(Protocol):
    """What the bot serves (:class:`corefbot.models.serve.question_llm.SecondStage`): it decides which rule
    scores are borderline and falls back to the rule score when the model cannot answer, so an evaluation
    through it measures exactly the serving path."""

    def in_band(self, rule_score: float) -> bool: ...

    def score(self, text: str, rule_score: float) -> StageAnswer: ...


def score_lines(rows: Iterable[LabelledLine], question_filter: QuestionFilter = QuestionFilter(),
                second: SecondStage | None = None) -> list[Scored]:
    """Score every line, the borderline ones through ``second``."""
    out = []
    for row in rows:
        rule = question_filter.score(row.text)
        in_band = second is not None and second.in_band(rule)
        answer = second.score(row.text, rule) if in_band else None  # type: ignore[union-attr]
        score = answer.score if answer is not None else rule
        answered = answer is not None and answer.used
        out.append(Scored(row.text, row.question, rule, score, in_band, in_band and not answered,
                          question_filter.passes(score), answer.ms if answered else None))  # type: ignore[union-attr]
    return out


def evaluate(rows: Sequence[LabelledLine], question_filter: QuestionFilter = QuestionFilter(),
             second: SecondStage | None = None) -> QuestionEval:
    counted = [r for r in rows if text_length(r.text) >= question_filter.min_chars]
    start = time.perf_counter()
    scored = score_lines(counted, question_filter, second)
    elapsed_ms = (time.perf_counter() - start) * 1000
    second_ms = [s.model_ms for s in scored if s.model_ms is not None]
    pos = [s for s in scored if s.question]
    neg = [s for s in scored if not s.question]
    kept = [s for s in scored if s.kept]
    true_kept = sum(s.question for s in kept)
    return QuestionEval(
        n=len(scored), positives=len(pos), negatives=len(neg), too_short=len(rows) - len(counted),
        recall=sum(s.kept for s in pos) / len(pos) if pos else None,
        precision=true_kept / len(kept) if kept and neg else None,
        keep_rate_negatives=sum(s.kept for s in neg) / len(neg) if neg else None,
        second_stage_share=sum(s.second_stage for s in scored) / len(scored) if scored else 0.0,
        second_stage_fallbacks=sum(s.fell_back for s in scored),
        ms_per_message=elapsed_ms / len(scored) if scored else 0.0,
        ms_per_second_stage=sum(second_ms) / len(second_ms) if second_ms else None,
        misses=[s.text for s in pos if not s.kept],
        false_keeps=[s.text for s in neg if s.kept],
    )
