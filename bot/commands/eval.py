"""``corefbot eval``: decision/rewrite/gate/latency figures of a resolver backend on labelled data;
``corefbot eval-compare``: two runs' ``--rows`` paired question by question."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import get_args

from corefbot.models.serve.types import DecideSetting


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a resolver backend on labelled data (unified JSONL or alpaca export)")
    p.add_argument("data", metavar="DATA.jsonl", help="unified-format JSONL (../shared/data) or a corefbot alpaca export")
    p.add_argument("--backend", default="rules", choices=["rules", "gate", "pronoun", "llama-cpp", "http"],
                   help="what to evaluate: a served backend, the gate alone, or the pronoun-list baseline (default rules)")
    p.add_argument("--model", metavar="PATH", help="GGUF or finetune run folder for --backend llama-cpp (default COREFBOT_MODEL_PATH)")
    p.add_argument("--url", help="OpenAI-compatible base URL for --backend http (default COREFBOT_RESOLVER_URL)")
    p.add_argument("--http-model", help="model name sent to the http backend (default COREFBOT_RESOLVER_MODEL)")
    p.add_argument("--api-key", help="bearer key for the http backend (default COREFBOT_RESOLVER_KEY)")
    p.add_argument("--gate", metavar="PATH", help="a retrained gate (default COREFBOT_GATE_PATH, else the shipped one)")
    p.add_argument("--split", help="only rows of this split (e.g. dev, test)")
    p.add_argument("--limit", type=int, help="only the first N rows (after --split)")
    p.add_argument("--no-gate", action="store_true", help="llama-cpp/http: send every question to the model")
    p.add_argument("--threads", type=int, help="llama.cpp threads (default COREFBOT_RESOLVER_THREADS)")
    p.add_argument("--decide-by", choices=get_args(DecideSetting),
                   help="how llama-cpp decides (default COREFBOT_DECIDE_BY, else auto: a run folder's measured mode)")
    p.add_argument("--report", metavar="OUT.json", help="write the full report as JSON")
    p.add_argument("--rows", metavar="OUT.jsonl",
                   help="write every question's decision, its probability and forwarded text, one JSON line each as it is answered")
    p.set_defaults(func=run)

    p = sub.add_parser("eval-compare", help="pair two `eval --rows` files: decisions and rewrites only one run got right")
    p.add_argument("a", metavar="A.jsonl")
    p.add_argument("b", metavar="B.jsonl")
    p.add_argument("--report", metavar="OUT.json", help="write the comparison as JSON")
    p.set_defaults(func=run_compare)


def run(args: argparse.Namespace) -> int:
    from corefbot.models.train.eval_resolver import evaluate, load_for_eval, summary_lines
    from corefbot.plugins.common.settings import read_settings
    from corefbot.plugins.common.settings import ResolverSettings

    # Unset options take the bot's own resolver settings (environment or .env), so eval measures what is served.
    cfg = read_settings(ResolverSettings)
    examples = load_for_eval(args.data, args.split)
    if args.limit:
        examples = examples[: args.limit]
    model = args.model or (str(cfg.corefbot_model_path) if cfg.corefbot_model_path else None)
    report = evaluate(examples, args.backend, gate=not args.no_gate, model_path=model,
                      url=args.url or cfg.corefbot_resolver_url, http_model=args.http_model or cfg.corefbot_resolver_model,
                      api_key=args.api_key or cfg.corefbot_resolver_key, n_threads=args.threads or cfg.corefbot_resolver_threads,
                      gate_path=args.gate or cfg.corefbot_gate_path, decide_by=args.decide_by or cfg.corefbot_decide_by,
                      weigh_gate=cfg.corefbot_weigh_gate, rows=args.rows)
    report["data"] = str(args.data)
    report["split"] = args.split
    for line in summary_lines(report):
        print(line)
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"report written to {args.report}")
    if args.rows:
        print(f"rows written to {args.rows}")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from corefbot.models.train.eval_compare import compare, read_rows, summary_lines

    result = compare(read_rows(args.a), read_rows(args.b))
    names = Path(args.a).stem, Path(args.b).stem
    if names[0] == names[1]:  # two runs' rows of one set, in two folders: the paths tell them apart
        names = args.a, args.b
    for line in summary_lines(result, *names):
        print(line)
    if args.report:
        Path(args.report).write_text(json.dumps(asdict(result), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"comparison written to {args.report}")
    return 0
