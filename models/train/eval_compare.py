"""``corefbot eval-compare``: two ``corefbot eval --rows`` files of the same questions, paired question by question.

Two runs' Matthews or token F1 a few hundredths apart on a hundred questions may differ by chance. Paired on the
same questions, the figures that say whether they do: the decisions only one run got right (with the exact McNemar
p), and the rewrites one run forwarded closer to the gold than the other (with the exact sign test, the same
binomial), beside each run's mean token F1 and exact match over the questions both scored.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corefbot.pipeline.metrics import mcnemar_p


@dataclass(frozen=True, slots=True)
class Comparison:
    """Run A against run B on the questions both files hold."""

    paired: int  # questions in both files
    only_a_decided_right: int
    only_b_decided_right: int
    decision_p: float  # exact McNemar
    rewrites: int  # paired questions that both scored (gold needs, with a gold rewrite)
    a_token_f1: float
    b_token_f1: float
    a_exact_match: float
    b_exact_match: float
    a_closer: int  # rewrites with a higher token F1 in A than in B
    b_closer: int
    rewrite_p: float  # exact sign test over a_closer/b_closer (ties left out)
    a_only_ids: list[str]  # decisions only A got right, for reading
    b_only_ids: list[str]


def read_rows(path: str | Path) -> dict[str, dict[str, Any]]:
    """An ``eval --rows`` file by question id."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"rows file not found: {path}")
    rows: dict[str, dict[str, Any]] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows[row["id"]] = row
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{n}: not a `corefbot eval --rows` line ({exc})") from exc
    return rows


def compare(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> Comparison:
    """Pair ``a`` and ``b`` by question id (see the module docstring)."""
    ids = [i for i in a if i in b]
    if not ids:
        raise ValueError("the two rows files share no question id: were they made on the same data?")

    def right(row: dict[str, Any]) -> bool:
        return (row["decision"] == "needs") == (row["gold"] == "needs")

    a_only = [i for i in ids if right(a[i]) and not right(b[i])]
    b_only = [i for i in ids if right(b[i]) and not right(a[i])]
    scored = [i for i in ids if a[i]["token_f1"] is not None and b[i]["token_f1"] is not None]

    def mean(rows: dict[str, dict[str, Any]], key: str) -> float:
        return statistics.fmean(rows[i][key] for i in scored) if scored else 0.0

    a_closer = sum(a[i]["token_f1"] > b[i]["token_f1"] for i in scored)
    b_closer = sum(b[i]["token_f1"] > a[i]["token_f1"] for i in scored)
    return Comparison(len(ids), len(a_only), len(b_only), mcnemar_p(len(a_only), len(b_only)), len(scored),
                      mean(a, "token_f1"), mean(b, "token_f1"), mean(a, "exact_match"), mean(b, "exact_match"),
                      a_closer, b_closer, mcnemar_p(a_closer, b_closer), a_only, b_only)


def summary_lines(c: Comparison, a_name: str = "A", b_name: str = "B") -> list[str]:
    return [
        f"paired    {c.paired} questions",
        f"decision  right only in {a_name}: {c.only_a_decided_right}, only in {b_name}: {c.only_b_decided_right}"
        f"  (McNemar p {c.decision_p:.2g})",
        f"rewrite   {c.rewrites} scored: token F1 {c.a_token_f1:.3f} vs {c.b_token_f1:.3f} "
        f"({c.a_token_f1 - c.b_token_f1:+.3f}), EM {c.a_exact_match:.3f} vs {c.b_exact_match:.3f}",
        f"          closer to the gold in {a_name}: {c.a_closer}, in {b_name}: {c.b_closer}  (sign test p {c.rewrite_p:.2g})",
    ]
