"""``corefbot bench NAME``: benchmark scripts that print figures (and write a JSON report).

The benchmarks live in the source checkout (``bot/bench``) and are left out of the wheel: from an
installed wheel, ``corefbot bench`` says where to get them.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util

# name -> module with ``add_arguments(parser)`` and ``run(args) -> int``
BENCHES = {
    "pipeline": "corefbot.bench.pipeline",  # import, batch pipeline, live capture (issue 2)
    "nightly": "corefbot.bench.nightly",  # wall time of the nightly retraining job on N labels (issue 5)
    "labels": "corefbot.bench.labels",  # bot messages per 1,000 group messages, /label review latency (issue 4)
    "training": "corefbot.bench.training",  # LoRA tokens/s: corefbot.models.train.finetune vs Trainer+peft, peak memory (issue 5)
    "resolver": "corefbot.bench.resolver",  # llama-cpp resolver latency: naive vs per-group prefill, RSS (issue 3)
    "figures": "corefbot.bench.figures",  # held-out figures of several models side by side (issue 10)
    "prompt": "corefbot.bench.prompt",  # the served prompt's tokens with a real tokenizer (issue 10)
    "validate": "corefbot.bench.validate",  # gold rewrites accepted against their own window and another's (issue 10)
    "forward": "corefbot.bench.forward",  # resolver plugin: question -> assistant -> reply through the real bot (issue 3)
}


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("bench", help="run a benchmark and print its figures (source checkout only)")
    if importlib.util.find_spec("corefbot.bench") is None:
        parser.add_argument("name", nargs="?", help=argparse.SUPPRESS)
        parser.set_defaults(func=_not_installed)
        return
    benches = parser.add_subparsers(dest="bench", required=True, metavar="NAME")
    for name, module in BENCHES.items():
        mod = importlib.import_module(module)
        p = benches.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0])
        mod.add_arguments(p)
        p.set_defaults(func=mod.run)


def _not_installed(args: argparse.Namespace) -> int:
    from corefbot.cli import CliError

    raise CliError("the benchmarks are not part of the installed package; run `corefbot bench` from a source "
                   "checkout installed with `pip install -e '.[ml,dev]'`")
