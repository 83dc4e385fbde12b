"""The issue-10 figures side by side: held-out sets × models (zero-shot, fine-tuned), rules, the question as asked.

    corefbot seed-eval --model BASE.gguf --heldout RUN/seed-data --report zs.json
    corefbot seed-eval --model RUN --heldout RUN/seed-data --report ft.json
    corefbot bench figures --reports zs.json ft.json [--names zero-shot fine-tuned]

Decision figures are mean ± spread (population std) over the six option orders; rewrite figures are the
model's greedy rewrite after the "needs" letter on the gold-needs questions (characters for Chinese);
``rules`` and "as asked" are what the rules backend forwards and the question unchanged.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reports", nargs="+", required=True, metavar="REPORT.json", help="seed-eval / seed reports")
    p.add_argument("--names", nargs="+", help="a column name per report (default: the model's file name)")


def run(args: argparse.Namespace) -> int:
    reports = [json.loads(Path(r).read_text()) for r in args.reports]
    names = args.names or [Path(r["model"]).name for r in reports]
    if len(names) != len(reports):
        raise ValueError(f"{len(names)} names for {len(reports)} reports")
    sets: dict[str, dict[str, dict]] = {}
    for name, rep in zip(names, reports):
        for row in rep["sets"]:
            sets.setdefault(row["name"], {})[name] = row

    def ms(stat: dict) -> str:
        return f"{stat['mean']:.3f} ± {stat['std']:.3f}"

    def f(x) -> str:
        return "n/a" if x is None or x != x else f"{x:.3f}"

    print("| set | n (needs) | model | P | R | F1 | Matthews | rewrite EM | rewrite token F1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for set_name, by_model in sets.items():
        any_row = next(iter(by_model.values()))
        label = f"{set_name} ({any_row['lang']})"
        n = f"{any_row['examples']} ({any_row['needs']})"
        for name, row in by_model.items():
            d, rw = row["model"]["decision"], row["model"].get("rewrite", {})
            print(f"| {label} | {n} | {name} | {ms(d['precision'])} | {ms(d['recall'])} | {ms(d['f1'])} | "
                  f"{ms(d['mcc'])} | {f(rw.get('exact_match'))} | {f(rw.get('token_f1'))} |")
            label, n = "", ""
        rd, rr, aa = any_row["rules"]["decision"], any_row["rules"]["rewrite"], any_row["as_asked"]
        print(f"| | | rules | {f(rd['precision'])} | {f(rd['recall'])} | {f(rd['f1'])} | {f(rd['mcc'])} | "
              f"{f(rr['exact_match'])} | {f(rr['token_f1'])} |")
        print(f"| | | as asked | | | | | {f(aa['exact_match'])} | {f(aa['token_f1'])} |")
    return 0
