"""Rewrite validation on the public sets' gold rewrites: accepted against their own window, and against another's.

    corefbot bench validate --n 4000

Model-free. A gold rewrite is what a perfect model would forward, so the share validation accepts against the
gold's own window is the ceiling it puts on the forwarded exact match; the same rewrite checked against the window
of another conversation (the list rotated by half) names things that chat never had, the stand-in for a
hallucinated antecedent, so the share accepted there should be near zero.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

SETS = ("rewrite_zh_train.jsonl", "task_gecor.jsonl", "canard_dev.jsonl")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default="../shared/data", metavar="DIR", help="the public sets (default ../shared/data)")
    p.add_argument("--n", type=int, default=4000, help="gold rewrites per set, the first ones that need resolution")
    p.add_argument("--report", metavar="OUT.json")


def gold_rewrites(path: Path, n: int | None = None) -> list[dict]:
    """The first ``n`` rows of a public set whose question needs resolution (each has its gold ``rewrite``)."""
    from corefbot.pipeline.examples import read_jsonl

    if not path.is_file():
        raise FileNotFoundError(f"{path}: public set missing (see shared/data/README.md)")
    return [r for _, r in read_jsonl(path) if r["needs_rewrite"]][:n]


def accepted_own_window(rows: list[dict]) -> float:
    """Share of the gold rewrites validation accepts against their own window."""
    from corefbot.models.serve.validate import validate_rewrite

    return sum(validate_rewrite(r["query"], r["rewrite"], r["context"])[0] for r in rows) / len(rows)


def accepted_another_window(rows: list[dict]) -> float:
    """Share accepted against the window of another conversation: the list rotated by half (pairs whose two
    gold rewrites are the same text are left out)."""
    from corefbot.models.serve.validate import validate_rewrite

    half = len(rows) // 2
    pairs = [(r, o) for r, o in zip(rows, rows[half:] + rows[:half]) if r["rewrite"] != o["rewrite"]]
    return sum(validate_rewrite(r["query"], r["rewrite"], o["context"])[0] for r, o in pairs) / len(pairs)


def run(args: argparse.Namespace) -> int:
    figures: dict[str, dict[str, float | int]] = {}
    for name in SETS:
        rows = gold_rewrites(Path(args.data_dir) / name, args.n)
        own, other = accepted_own_window(rows), accepted_another_window(rows)
        figures[name] = {"golds": len(rows), "accepted_own_window": round(own, 4),
                         "accepted_another_window": round(other, 4)}
        print(f"{name:24s} {len(rows):5d} golds   accepted: own window {own:.3f}, another conversation's {other:.3f}")
    if args.report:
        Path(args.report).write_text(json.dumps(figures, indent=2))
    return 0
