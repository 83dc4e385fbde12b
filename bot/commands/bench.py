"""``corefbot bench NAME``: benchmark scripts that print figures (and write a JSON report)."""
from __future__ import annotations

import argparse
import importlib

# name -> module with ``add_arguments(parser)`` and ``run(args) -> int``
BENCHES = {
    "pipeline": "bot.bench.pipeline",  # import, batch pipeline, live capture (issue 2)
    "nightly": "bot.bench.nightly",  # wall time of the nightly retraining job on N labels (issue 5)
    "labels": "bot.bench.labels",  # bot messages per 1,000 group messages, /label review latency (issue 4)
    "training": "bot.bench.training",  # LoRA tokens/s: models.finetune vs Trainer+peft, peak memory (issue 5)
    "resolver": "bot.bench.resolver",  # llama-cpp resolver latency: naive vs per-group prefill, RSS (issue 3)
    "forward": "bot.bench.forward",  # resolver plugin: question -> assistant -> reply through the real bot (issue 3)
}


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("bench", help="run a benchmark and print its figures")
    benches = parser.add_subparsers(dest="bench", required=True, metavar="NAME")
    for name, module in BENCHES.items():
        mod = importlib.import_module(module)
        p = benches.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0])
        mod.add_arguments(p)
        p.set_defaults(func=mod.run)
