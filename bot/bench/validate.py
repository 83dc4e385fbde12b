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


def run(args: argparse.Namespace) -> int:
    from corefbot.models.serve.validate import validate_rewrite
    from corefbot.pipeline.examples import read_jsonl

    figures: dict[str, dict[str, float | int]] = {}
    for name in SETS:
        path = Path(args.data_dir) / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: public set missing (see shared/data/README.md)")
        rows = [r for _, r in read_jsonl(path) if r["needs_rewrite"]][: args.n]
        half = len(rows) // 2
        pairs = [(r, o) for r, o in zip(rows, rows[half:] + rows[:half]) if r["rewrite"] != o["rewrite"]]
        own = sum(validate_rewrite(r["query"], r["rewrite"], r["context"])[0] for r in rows)
        other = sum(validate_rewrite(r["query"], r["rewrite"], o["context"])[0] for r, o in pairs)
        figures[name] = {"golds": len(rows), "accepted_own_window": round(own / len(rows), 4),
                         "accepted_another_window": round(other / len(pairs), 4)}
        print(f"{name:24s} {len(rows):5d} golds   accepted: own window {own / len(rows):.3f}, "
              f"another conversation's {other / len(pairs):.3f}")
    if args.report:
        Path(args.report).write_text(json.dumps(figures, indent=2))
    return 0
