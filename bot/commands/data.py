"""import, build, export, stats: the paper's data pipeline over the bot's database."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from corefbot.plugins.common.settings import default_db_path
from corefbot.pipeline.build import build
from corefbot.pipeline.export import iter_records, write_alpaca, write_records
from corefbot.pipeline.importer import import_jsonl
from corefbot.pipeline.question import QuestionFilter
from corefbot.pipeline.store import Store
from corefbot.pipeline.window import DEFAULT_WINDOW

MAX_ERRORS_SHOWN = 20


def open_store(args: argparse.Namespace) -> Store:
    return Store(args.db or default_db_path())


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="import a chat log (JSONL) or labelled data in the unified format")
    p.add_argument("file", help="JSONL: {group, sender, text, timestamp[, id, reply_to]} per line, "
                                "or {id, context, query, rewrite, needs_rewrite, ...}")
    p.add_argument("--strict", action="store_true", help="reject the whole file on the first bad line")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("build", help="concat rule + question filter over everything imported or captured")
    p.add_argument("--gap", type=float, default=18.0, help="concat gap in seconds (default 18)")
    p.add_argument("--threshold", type=float, default=5.0, help="question score threshold 0–10 (default 5)")
    p.add_argument("--min-chars", type=int, default=7, help="shorter texts are not questions (default 7)")
    p.add_argument("--llm-url", metavar="URL", help="second stage: re-score rule candidates with the paper's 0–10 "
                   "prompt on this OpenAI-compatible endpoint (e.g. http://127.0.0.1:8000/v1)")
    p.add_argument("--llm-model", default="default", help="model name for --llm-url")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("export", help="write the paper's records (JSONL) or alpaca training data (JSON)")
    p.add_argument("kind", choices=["records", "alpaca"])
    p.add_argument("-o", "--output", required=True, help="output file")
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="context window size (default 12)")
    p.add_argument("--seed", type=int, default=0, help="option-order shuffle seed (alpaca)")
    p.add_argument("--no-member-labels", action="store_true", help="alpaca: use moderator and imported labels only")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("stats", help="what the database holds")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_stats)


def cmd_import(args: argparse.Namespace) -> int:
    store = open_store(args)
    start = time.perf_counter()
    report = import_jsonl(store, args.file, strict=args.strict, progress=sys.stderr.isatty())
    elapsed = time.perf_counter() - start
    for error in report.errors[:MAX_ERRORS_SHOWN]:
        print(f"skipped {error}", file=sys.stderr)
    if len(report.errors) > MAX_ERRORS_SHOWN:
        print(f"… and {len(report.errors) - MAX_ERRORS_SHOWN} more bad lines", file=sys.stderr)
    print(f"{report.path} ({report.format}): {report.lines} lines, {report.added} messages added, "
          f"{report.duplicates} already stored, {len(report.errors)} bad lines skipped"
          + (f", {report.labels} labels" if report.format == "unified" else "")
          + f" in {elapsed:.2f}s → {store.path}")
    print("next: corefbot build")
    return 1 if report.errors and not report.added else 0


def cmd_build(args: argparse.Namespace) -> int:
    store = open_store(args)
    start = time.perf_counter()
    scorer = None
    if args.llm_url:
        from corefbot.models.serve.question_llm import OpenAIScorer

        scorer = OpenAIScorer(args.llm_url, args.llm_model, os.environ.get("COREFBOT_LLM_KEY"))
    stats = build(store, gap_s=args.gap, question_filter=QuestionFilter(args.threshold, args.min_chars),
                  scorer=scorer, progress=sys.stderr.isatty())
    print(f"{stats.messages} messages → {stats.merged} merged → {stats.questions} questions "
          f"in {time.perf_counter() - start:.2f}s")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    store = open_store(args)
    if store.count("merged") == 0 and store.count("messages"):
        print("note: nothing built yet; run `corefbot build` first", file=sys.stderr)
    if args.kind == "records":
        n = write_records(iter_records(store, args.window), args.output)
        print(f"{n} records → {args.output}")
    else:
        m = write_alpaca(store, args.output, window=args.window, seed=args.seed,
                         use_member=not args.no_member_labels)
        print(f"{m.rows} alpaca rows {m.labels} from {m.sources} → {args.output} (+ manifest, sha256 {m.sha256[:12]})")
    return 0


def collect_stats(store: Store) -> dict:
    conn = store.db.conn
    per_group = conn.execute(
        "SELECT platform, group_id, count(*), sum(is_question) FROM merged GROUP BY platform, group_id "
        "ORDER BY count(*) DESC LIMIT 20").fetchall()
    labels = dict(conn.execute("SELECT label, count(*) FROM labels GROUP BY label").fetchall())
    return {
        "db": store.path, "messages": store.count("messages"), "merged": store.count("merged"),
        "questions": conn.execute("SELECT count(*) FROM merged WHERE is_question").fetchone()[0],
        "groups": conn.execute("SELECT count(DISTINCT platform || ':' || group_id) FROM messages").fetchone()[0],
        "members": conn.execute("SELECT count(DISTINCT platform || ':' || sender) FROM messages").fetchone()[0],
        "opted_out": store.count("optout"), "labels": labels,
        "top_groups": [{"group": f"{p}:{g}", "merged": n, "questions": q or 0} for p, g, n, q in per_group],
    }


def cmd_stats(args: argparse.Namespace) -> int:
    stats = collect_stats(open_store(args))
    if args.json:
        print(json.dumps(stats, ensure_ascii=False, indent=2))
        return 0
    print(f"database   {stats['db']}")
    for key in ("messages", "merged", "questions", "groups", "members", "opted_out"):
        print(f"{key:<10} {stats[key]}")
    print(f"labels     {stats['labels'] or '-'}")
    for g in stats["top_groups"]:
        print(f"  {g['group']}: {g['merged']} merged, {g['questions']} questions")
    return 0
