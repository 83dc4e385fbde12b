"""Metrics shared by every evaluation: the paper's decision P/R/F1 (positive = needs resolution),
Matthews correlation, Cohen's kappa, and rewrite exact match / token F1 / restoration (characters for Chinese)."""
from __future__ import annotations

import math
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Hashable, Iterable, Sequence

from corefbot.pipeline.text import CJK


@dataclass(frozen=True, slots=True)
class Confusion:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    @classmethod
    def of(cls, gold: Iterable[bool], pred: Iterable[bool]) -> "Confusion":
        c = Counter(zip(gold, pred))
        return cls(tp=c[True, True], fp=c[False, True], fn=c[True, False], tn=c[False, False])

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.fn + self.tn

    @property
    def precision(self) -> float:
        return _div(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float:
        return _div(self.tp, self.tp + self.fn)

    @property
    def specificity(self) -> float:
        return _div(self.tn, self.tn + self.fp)

    @property
    def f1(self) -> float:
        return _div(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    @property
    def accuracy(self) -> float:
        return _div(self.tp + self.tn, self.n)

    @property
    def mcc(self) -> float:
        denom = math.sqrt((self.tp + self.fp) * (self.tp + self.fn) * (self.tn + self.fp) * (self.tn + self.fn))
        return (self.tp * self.tn - self.fp * self.fn) / denom if denom else 0.0

    def report(self) -> dict[str, float | int]:
        return {"precision": self.precision, "recall": self.recall, "f1": self.f1, "mcc": self.mcc,
                "accuracy": self.accuracy, **asdict(self)}


def _div(a: float, b: float) -> float:
    return a / b if b else 0.0


def cohen_kappa(a: Sequence[Hashable], b: Sequence[Hashable]) -> float:
    """Agreement between two labelers beyond chance; 1.0 when both are constant and agree."""
    if len(a) != len(b):
        raise ValueError(f"kappa needs paired labels, got {len(a)} and {len(b)}")
    n = len(a)
    if n == 0:
        return 0.0
    observed = sum(x == y for x, y in zip(a, b)) / n
    ca, cb = Counter(a), Counter(b)
    expected = sum(ca[k] * cb[k] for k in ca) / (n * n)
    return 1.0 if expected == 1 else (observed - expected) / (1 - expected)


_TOKEN = re.compile(rf"[{CJK}]|[^\s{CJK}\W]+|[^\s\w]", re.UNICODE)


def tokens(text: str) -> list[str]:
    """Lower-cased words for Latin text, single characters for Chinese, punctuation dropped."""
    return [t for t in _TOKEN.findall(text.lower()) if t.isalnum() or re.match(rf"[{CJK}]", t)]


def token_f1(pred: str, gold: str) -> float:
    p, g = Counter(tokens(pred)), Counter(tokens(gold))
    if not p and not g:
        return 1.0
    common = sum((p & g).values())
    if not common:
        return 0.0
    precision, recall = common / sum(p.values()), common / sum(g.values())
    return 2 * precision * recall / (precision + recall)


def exact_match(pred: str, gold: str) -> bool:
    return tokens(pred) == tokens(gold)


def restoration(pairs: Iterable[tuple[str, str, str]]) -> dict[str, float]:
    """Restoration precision/recall/F1 (Pan et al. 2019) over ``(question, forwarded, gold rewrite)``: the tokens
    a rewrite adds to the question, against those the gold adds, summed over the pairs. Token F1 of the whole
    question is mostly the copied question; this scores only what resolves it (the named thing put back), so a
    question forwarded as asked restores nothing and a wrong referent is a false addition."""
    common = added = gold_added = 0
    for question, forwarded, gold in pairs:
        asked = Counter(tokens(question))
        pred, want = Counter(tokens(forwarded)) - asked, Counter(tokens(gold)) - asked
        common += sum((pred & want).values())
        added += sum(pred.values())
        gold_added += sum(want.values())
    precision, recall = _div(common, added), _div(common, gold_added)
    return {"precision": precision, "recall": recall, "f1": _div(2 * precision * recall, precision + recall)}


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0–100); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[k]


def bootstrap_mean_ci(values: Sequence[float], level: float = 0.95, resamples: int = 1000,
                      seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (the same seed gives the same interval). On a set
    of 60 questions a rewrite gain of +0.08 may well be +0.10 or +0.05 on the next 60: this says how far."""
    if not values:
        return (0.0, 0.0)
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(resamples))
    tail = (1 - level) / 2
    return (means[int(tail * (resamples - 1))], means[round((1 - tail) * (resamples - 1))])


def best_mcc_threshold(scored: Sequence[tuple[float, bool]]) -> float:
    """The cut on a score (predict positive when score ≥ cut) with the best Matthews correlation on
    ``scored`` (score, gold) pairs. Candidates are 0.5 and the midpoints between neighbouring scores, so a
    model whose misses sit at p = 0.02 gets a cut there (a fixed grid of round numbers would not reach it);
    among equally good cuts the one nearest 0.5 wins: the smallest departure from the plain argmax."""
    values = sorted({s for s, _ in scored})
    candidates = [0.5] + [(a + b) / 2 for a, b in zip(values, values[1:])]
    gold = [g for _, g in scored]
    best, best_t = -2.0, 0.5
    for t in sorted(candidates, key=lambda c: abs(c - 0.5)):
        mcc = Confusion.of(gold, [s >= t for s, _ in scored]).mcc
        if mcc > best + 1e-12:
            best, best_t = mcc, t
    return best_t


def leave_one_out_cuts(scored: Sequence[tuple[float, bool]]) -> list[bool]:
    """Each example predicted with the :func:`best_mcc_threshold` of all the others: an honest estimate of
    how a cut chosen on these examples will do on new ones (chosen and scored on the same ones, it flatters)."""
    return [s >= best_mcc_threshold([*scored[:i], *scored[i + 1:]]) for i, (s, _) in enumerate(scored)]


def mcnemar_p(only_a_right: int, only_b_right: int) -> float:
    """Two-sided exact McNemar test: the chance that two classifiers which are equally good would split
    their disagreements at least this unevenly (``only_a_right`` questions only A got right, ``only_b_right``
    only B). 1.0 when they never disagree. On a test split of a few hundred questions, two Matthews figures
    0.02 apart usually differ on a handful of questions: this says whether that handful means anything."""
    n = only_a_right + only_b_right
    if n == 0:
        return 1.0
    k = min(only_a_right, only_b_right)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)
