"""The gate: a cheap detector that lets self-contained questions skip the model.

A logistic regression over the rule cues of :mod:`corefbot.models.serve.cues`, character 1–3-grams of the question
(Chinese needs characters, not words) and its first words, trained in pure Python (no numpy, so the
rules-only path installs nothing heavy) with AdaGrad and L2. It ships as ``models/serve/gate_model.json``
and retrains from any labelled examples (:meth:`Gate.train`).

Two thresholds come out of training, both chosen on out-of-fold predictions over the training rows
(conversation-grouped folds), never on evaluation rows:
- ``threshold`` (the gate): the highest one keeping out-of-fold recall of needs-resolution ≥
  ``target_recall`` (0.99 by default, a margin over the 0.98 the issue asks for on unseen data), and the
  same per language (``thresholds``: Chinese, other) where a language has enough positives — the two
  score on different scales (Chinese has no capitals or spaces to mark a name), so one pooled cut is
  too low for Chinese;
- ``decision_threshold`` (the ``rules`` backend's decision): the one with the best out-of-fold Matthews correlation;
- ``sure_threshold`` (the gate's other side): the lowest one whose out-of-fold precision is ≥ ``target_precision``
  (0.99) on the classifier's own score, strong cues not counted (an anaphor alone is often wrong). A question scored
  there needs resolution whatever a model's letter says; the model still writes its rewrite
  (:class:`~corefbot.models.serve.resolver.Resolver`). The gate then decides where it is sure either way and the
  model decides between, with the gate's probability weighed in.

Rebuild the shipped model: ``python -m corefbot.models.train.gate`` (:mod:`corefbot.models.train.gate`).
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Sequence

from corefbot.models.serve.cues import STRONG_CUES, cues
from corefbot.pipeline.records import Example, Turn
from corefbot.pipeline.text import language

log = logging.getLogger(__name__)

DEFAULT_PATH = Path(__file__).with_name("gate_model.json")
GateSide = Literal["skip", "model", "sure"]
FORMAT = "corefbot-gate/1"


def _normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower().strip()
    return re.sub(r"\d", "0", re.sub(r"\s+", " ", text))


_SHAPE = ("content_", "overlap_", "term_", "no_term", "full_name", "partial_name", "window_empty", "lang_zh")


def features(window: Sequence[Turn], question: Turn) -> list[str]:
    """Sparse binary features of one question (its window only enters through the rule cues)."""
    text = _normalize(question.text)
    found = cues(window, question)
    feats = ["bias"] + [f"r:{c}" for c in found]
    # How the question relates to its window only shows in combination: a short question sharing nothing
    # with the window leans on it, unless it brings a name of its own ("Who created Kotlin?").
    shape = [c for c in found if c.startswith(_SHAPE)]
    feats += [f"x:{a}&{b}" for i, a in enumerate(shape) for b in shape[i + 1:]]
    padded = f"^{text}$"
    for n in (1, 2, 3):
        feats += [f"c{n}:{padded[i:i + n]}" for i in range(len(padded) - n + 1)]
    words = re.findall(r"[a-z0-9']+|[\u3400-\u9fff]", text)
    feats += [f"w:{w}" for w in words]
    if words:
        feats.append(f"w0:{words[0]}")
        feats.append(f"w01:{' '.join(words[:2])}")
    return list(dict.fromkeys(feats))


def _cue_fires(feats: Iterable[str], override: frozenset[str]) -> bool:
    """Whether one of ``override``'s cues is among a question's features (its ``r:`` ones)."""
    return any(f.startswith("r:") and f[2:] in override for f in feats)


def _sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z))


def _fit(rows: list[tuple[list[str], int, float]], *, epochs: int, lr: float, l2: float, seed: int,
         min_count: int) -> dict[str, float]:
    counts = Counter(f for feats, _, _ in rows for f in feats)
    vocab = {f for f, c in counts.items() if c >= min_count}
    data = [([f for f in feats if f in vocab], y, sw) for feats, y, sw in rows]
    w: dict[str, float] = defaultdict(float)
    g2: dict[str, float] = defaultdict(lambda: 1e-8)
    rng = random.Random(seed)
    pos = sum(y for _, y, _ in data)
    # Balance the classes: each side weighs as much in the loss.
    cw = {1: len(data) / (2 * max(pos, 1)), 0: len(data) / (2 * max(len(data) - pos, 1))}
    for _ in range(epochs):
        rng.shuffle(data)
        for feats, y, sw in data:
            p = _sigmoid(sum(w[f] for f in feats))
            grad = (p - y) * cw[y] * sw
            for f in feats:
                g = grad + l2 * w[f]
                g2[f] += g * g
                w[f] -= lr * g / math.sqrt(g2[f])
    return {f: round(v, 4) for f, v in w.items() if abs(v) >= 5e-4}


def _source(example: Example) -> str:
    return example.id.split(":", 1)[0]


def _score(weights: dict[str, float], feats: Iterable[str]) -> float:
    return _sigmoid(sum(weights.get(f, 0.0) for f in feats))


def _recall_threshold(scored: list[tuple[float, int]], target: float) -> float:
    """The highest threshold whose recall of the positives is ≥ target."""
    pos = sorted((p for p, y in scored if y), reverse=True)
    if not pos:
        return 0.5
    k = max(0, math.ceil(target * len(pos)) - 1)
    return pos[k] - 1e-9


def _precision_threshold(scored: list[tuple[float, int]], target: float, min_selected: int = 20) -> float | None:
    """The lowest threshold whose selection (score ≥ it, at least ``min_selected`` rows) has precision ≥ target;
    None where no such threshold exists."""
    ranked = sorted(scored, key=lambda s: -s[0])
    best, tp = None, 0
    for n, (p, y) in enumerate(ranked, start=1):
        tp += y
        tie_ends = n == len(ranked) or ranked[n][0] != p  # a cut selects a tie whole
        if tie_ends and n >= min_selected and tp >= target * n:
            best = p - 1e-9
    return best


def _mcc_threshold(scored: list[tuple[float, int]]) -> float:
    from corefbot.pipeline.metrics import Confusion

    best, best_t = -2.0, 0.5
    for t in [i / 100 for i in range(5, 96)]:
        c = Confusion.of([bool(y) for _, y in scored], [p >= t for p, _ in scored])
        if c.mcc > best:
            best, best_t = c.mcc, t
    return best_t


@dataclass
class Gate:
    """Rules + a character n-gram logistic regression. ``side`` is the gate's one question."""

    weights: dict[str, float]
    threshold: float
    decision_threshold: float = 0.5
    thresholds: dict[str, float] = field(default_factory=dict)  # per language() where trained; else ``threshold``
    sure_threshold: float | None = None  # "needs" whatever the model says from this probability on; None: never
    meta: dict = field(default_factory=dict)
    override: frozenset[str] = STRONG_CUES

    def evidence(self, window: Sequence[Turn], question: Turn) -> tuple[float, bool]:
        """From one feature pass: the classifier's probability that the question needs resolution, and whether a
        rule that alone sends the question on (an explicit anaphor, clear ellipsis) fires."""
        feats = features(window, question)
        return _score(self.weights, feats), _cue_fires(feats, self.override)

    def assess(self, window: Sequence[Turn], question: Turn) -> tuple[GateSide, float]:
        """Where the question falls, and the classifier's probability behind it: "skip" (no sign it needs
        resolution: no model runs), "sure" (it needs resolution whatever a model says, see ``sure_threshold``) or
        "model" (the model decides, the probability weighed with its letter: see
        :class:`~corefbot.models.serve.resolver.Resolver`)."""
        p, strong = self.evidence(window, question)
        cut = self.thresholds.get(language(question.text), self.threshold)
        if not (strong or p >= cut):
            return "skip", p
        return ("sure" if self.sure_threshold is not None and p >= self.sure_threshold else "model"), p

    def side(self, window: Sequence[Turn], question: Turn) -> GateSide:
        """Where the question falls (see :meth:`assess`)."""
        return self.assess(window, question)[0]

    def needs_model(self, window: Sequence[Turn], question: Turn) -> bool:
        return self.side(window, question) != "skip"

    @classmethod
    def train(cls, examples: Sequence[Example], *, target_recall: float = 0.99, folds: int = 5,
              epochs: int = 10, lr: float = 0.05, l2: float = 1e-3, min_count: int = 2, seed: int = 0,
              max_source_weight: float = 4.0, min_language_positives: int = 100,
              target_precision: float = 0.99) -> "Gate":
        """Fit on labelled examples ("unknown"/"not_question" rows are skipped); thresholds from out-of-fold scores."""
        from tqdm import tqdm

        usable = [e for e in examples if e.label in ("needs", "not_needed")]
        if not usable or len({e.label for e in usable}) < 2:
            raise ValueError(f"gate training needs examples of both classes, got {Counter(e.label for e in usable)}")
        # Each source weighs about as much as the others (capped), so a few hundred hand-written Chinese
        # cases are not drowned by thousands of English restaurant dialogues.
        per_source = Counter(_source(e) for e in usable)
        share = len(usable) / len(per_source)
        rows = [(features(e.window, e.question), int(e.label == "needs"),
                 min(max_source_weight, share / per_source[_source(e)])) for e in usable]
        convs = sorted({e.conversation for e in usable})
        random.Random(seed).shuffle(convs)
        fold_of = {c: i % folds for i, c in enumerate(convs)}
        scored: list[tuple[float, int]] = []
        kw = dict(epochs=epochs, lr=lr, l2=l2, seed=seed, min_count=min_count)
        for k in tqdm(range(folds), desc="gate folds", unit="fold", leave=False):
            train = [r for r, e in zip(rows, usable) if fold_of[e.conversation] != k]
            held = [r for r, e in zip(rows, usable) if fold_of[e.conversation] == k]
            w = _fit(train, **kw)
            scored += [(_score(w, f), y) for f, y, _ in held]
        weights = _fit(rows, **kw)
        override = STRONG_CUES
        # A row a strong cue already sends on counts as sent whatever its score: score it 1.
        strong = [_cue_fires(feats, override) for feats, _, _ in rows]
        held_order = [i for k in range(folds) for i, e in enumerate(usable) if fold_of[e.conversation] == k]
        sure = _precision_threshold(scored, target_precision)
        scored = [(1.0 if strong[i] else p, y) for i, (p, y) in zip(held_order, scored)]
        threshold = _recall_threshold(scored, target_recall)
        decision = max(_mcc_threshold(scored), threshold)
        langs = [language(usable[i].question.text) for i in held_order]
        thresholds = {}
        for lang in sorted(set(langs)):
            mine = [sy for sy, l in zip(scored, langs) if l == lang]
            if sum(y for _, y in mine) >= min_language_positives:
                thresholds[lang] = _recall_threshold(mine, target_recall)
        from corefbot.pipeline.metrics import Confusion

        oof = Confusion.of([bool(y) for _, y in scored],
                           [p >= thresholds.get(l, threshold) for (p, _), l in zip(scored, langs)])
        meta = {"n": len(usable), "positives": sum(y for _, y, _ in rows), "sources": dict(per_source),
                "target_recall": target_recall, "target_precision": target_precision, "oof_recall": oof.recall,
                "oof_specificity": oof.specificity,
                "hyper": {"epochs": epochs, "lr": lr, "l2": l2, "min_count": min_count, "folds": folds, "seed": seed,
                          "max_source_weight": max_source_weight, "min_language_positives": min_language_positives}}
        log.info("gate trained on %d examples: threshold %.4f, per language %s (oof recall %.3f, specificity %.3f), "
                 "decision %.2f, sure %s", len(usable), threshold, {k: round(v, 4) for k, v in thresholds.items()},
                 oof.recall, oof.specificity, decision, "never" if sure is None else f"{sure:.4f}")
        return cls(weights=weights, threshold=threshold, decision_threshold=decision, thresholds=thresholds,
                   sure_threshold=sure, meta=meta, override=override)

    def save(self, path: str | Path) -> None:
        doc = {"format": FORMAT, "threshold": self.threshold, "thresholds": self.thresholds,
               "decision_threshold": self.decision_threshold, "sure_threshold": self.sure_threshold,
               "override": sorted(self.override), "meta": self.meta, "weights": dict(sorted(self.weights.items()))}
        Path(path).write_text(json.dumps(doc, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path | None = None) -> "Gate":
        """The gate at ``path``; by default ``COREFBOT_GATE_PATH`` from the environment (a retrained gate; the bot
        passes its setting explicitly) or the shipped model."""
        path = Path(path or os.environ.get("COREFBOT_GATE_PATH") or DEFAULT_PATH)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"gate model {path} does not exist (rebuild it with `python -m corefbot.models.train.gate`)") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"gate model {path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError(f"gate model {path}: expected format {FORMAT!r}, got {doc.get('format') if isinstance(doc, dict) else type(doc).__name__!r}")
        for key in ("threshold", "weights"):
            if key not in doc:
                raise ValueError(f"gate model {path}: missing key {key!r}")
        return cls(weights={str(k): float(v) for k, v in doc["weights"].items()}, threshold=float(doc["threshold"]),
                   decision_threshold=float(doc.get("decision_threshold", 0.5)),
                   thresholds={str(k): float(v) for k, v in doc.get("thresholds", {}).items()},
                   sure_threshold=None if doc.get("sure_threshold") is None else float(doc["sure_threshold"]),
                   meta=doc.get("meta", {}),
                   override=frozenset(doc["override"]) if "override" in doc else STRONG_CUES)
