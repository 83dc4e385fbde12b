"""``corefbot eval-questions``: recall (and precision, with labels) of the question filter on a file."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval-questions", help="measure the question filter: recall, precision, the misses")
    p.add_argument("file", nargs="?", metavar="FILE",
                   help="one message per line (all questions), or JSONL with 'text' and a boolean 'question'")
    p.add_argument("--own", choices=["dev", "test"],
                   help="instead of FILE: corefbot's own hand-written chat lines (shipped with the package)")
    p.add_argument("--part", choices=["all", "dev", "test"], default="all",
                   help="deterministic split of FILE by a hash of each line: dev ≈ 2/3, test ≈ 1/3 (default all)")
    p.add_argument("--threshold", type=float, default=5.0, help="question score needed (default 5)")
    p.add_argument("--min-chars", type=int, default=7, help="shorter messages are not counted (default 7)")
    p.add_argument("--second", choices=["off", "local", "http"], default="off",
                   help="second stage for rule scores in --band: the local GGUF or an OpenAI-compatible URL")
    p.add_argument("--band", default="3-5", help="rule scores LOW-HIGH (low inclusive) sent to the second stage")
    p.add_argument("--model", default=os.environ.get("COREFBOT_MODEL_PATH"),
                   help="GGUF for --second local (default COREFBOT_MODEL_PATH)")
    p.add_argument("--threads", type=int, help="llama.cpp threads")
    p.add_argument("--url", default=os.environ.get("COREFBOT_QUESTION_LLM_URL"), help="endpoint for --second http")
    p.add_argument("--llm-model", default="default", help="model name for --second http")
    p.add_argument("--show", type=int, default=50, metavar="N", help="list at most N misses and N false keeps")
    p.add_argument("--report", metavar="OUT.json", help="write the figures, the misses and the false keeps as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from corefbot.cli import CliError
    from corefbot.pipeline.question import QuestionFilter
    from corefbot.pipeline.question_eval import evaluate, read_lines, select, shipped_lines

    if (args.file is None) == (args.own is None):
        raise CliError("give FILE or --own dev|test (one of them)")
    rows = shipped_lines(args.own) if args.own else select(read_lines(args.file), args.part)
    source = f"own:{args.own}" if args.own else f"{args.file} (part {args.part})"
    question_filter = QuestionFilter(args.threshold, args.min_chars)
    second, band, backend = None, None, None
    if args.second != "off":
        from corefbot.models.serve.question_llm import SecondStage, make_scorer, parse_band

        band = parse_band(args.band)
        if args.second == "local":
            if not args.model:
                raise CliError("--second local needs --model GGUF (or COREFBOT_MODEL_PATH)")
            from corefbot.models.serve.llama import LlamaBackend

            backend = LlamaBackend(args.model, n_threads=args.threads, timeout_s=120.0)
        scorer = make_scorer(args.second, backend=backend, url=args.url, model=args.llm_model,
                             api_key=os.environ.get("COREFBOT_QUESTION_LLM_KEY"), timeout_s=120.0)
        if hasattr(scorer, "warm"):
            scorer.warm()  # the instruction prefix once, not billed to the first line
        second = SecondStage(scorer, *band)  # type: ignore[arg-type]  # what the bot serves, fallbacks included
    try:
        result = evaluate(rows, question_filter, second)
    finally:
        if backend is not None:
            backend.close()
    for line in summary(source, result, args.second, band):
        print(line)
    for title, items in (("misses", result.misses), ("non-questions kept", result.false_keeps)):
        if items and args.show:
            print(f"{title} ({len(items)}{', first ' + str(args.show) if len(items) > args.show else ''}):")
            for text in items[: args.show]:
                print(f"  {text}")
    if args.report:
        report = {"source": source, "threshold": args.threshold, "min_chars": args.min_chars,
                  "second_stage": args.second, "band": band, "model": args.model if args.second == "local" else None,
                  **result.as_dict()}
        Path(args.report).write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")
    return 0


def summary(source: str, r, second: str, band: tuple[float, float] | None) -> list[str]:
    def fmt(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    lines = [f"{source}: {r.n} messages of >= min chars ({r.too_short} shorter, not counted): "
             f"{r.positives} questions, {r.negatives} non-questions"]
    if r.positives:
        lines.append(f"recall {fmt(r.recall)} ({r.positives - len(r.misses)}/{r.positives})")
    if r.negatives:
        lines.append(f"precision {fmt(r.precision)}; non-questions kept {fmt(r.keep_rate_negatives)} "
                     f"({len(r.false_keeps)}/{r.negatives})")
    if second != "off" and band is not None:
        per = "n/a" if r.ms_per_second_stage is None else f"{r.ms_per_second_stage:.0f} ms each"
        fell_back = (f"; {r.second_stage_fallbacks} fell back to the rule score (model busy, late or failing)"
                     if r.second_stage_fallbacks else "")
        lines.append(f"second stage ({second}, rule scores {band[0]:g}-{band[1]:g}): "
                     f"{r.second_stage_share:.1%} of messages, {per}{fell_back}")
    lines.append(f"cost {r.ms_per_message:.3f} ms per message (all stages, averaged over every message)")
    return lines
