"""Nightly job: wall time of one full run (export → train → evaluate → promotion check → GGUF → register) on N labels.

By default: the tiny random Qwen2 model (built locally), the ``tiny`` preset and the project's own
zh/en cases (516 labelled questions, cut to ``--labels``) imported into a fresh bot database. The
promotion margin is -1 so the run always goes all the way through the GGUF export and the registry
(the path a real promotion takes); a second run right after measures the "nothing new: skip" path.
Figures: wall time per step and in all, the child-free peak RSS of this process, and the outcome.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

CASES = Path(__file__).resolve().parents[2] / "models" / "train" / "cases"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--labels", type=int, default=500, help="labelled questions to train on (default 500)")
    p.add_argument("--data", metavar="JSONL", help="unified labelled data instead of models/train/cases/{zh,en}_cases.jsonl")
    p.add_argument("--base", metavar="HF_DIR", help="base model (default: a tiny random Qwen2 built here)")
    p.add_argument("--preset", default="tiny", help="finetune preset (default tiny)")
    p.add_argument("--max-steps", type=int, help="override the preset's optimizer steps")
    p.add_argument("--quant", choices=["q4_k_m", "q8_0"], default="q4_k_m")
    p.add_argument("--device", help="cpu, cuda … (default: cuda when present)")
    p.add_argument("--workdir", metavar="DIR", help="keep the database and run folders here (default: a temp dir)")
    p.add_argument("--report", metavar="OUT.json", help="write the figures as JSON")


def _rows(args: argparse.Namespace) -> list[str]:
    if args.data:
        lines = [line for line in Path(args.data).read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        zh, en = ((CASES / f"{lang}_cases.jsonl").read_text(encoding="utf-8").splitlines() for lang in ("zh", "en"))
        # Interleave so any cut keeps both languages.
        lines = [line for pair in zip(zh, en) for line in pair] + zh[len(en):] + en[len(zh):]
    if len(lines) < args.labels:
        print(f"note: only {len(lines)} labelled rows available (asked for {args.labels})", file=sys.stderr)
    return lines[: args.labels]


def run(args: argparse.Namespace) -> int:
    from corefbot.models.ship.nightly import NightlyConfig, run_nightly
    from corefbot.pipeline.build import build
    from corefbot.pipeline.importer import import_jsonl
    from corefbot.pipeline.store import Store

    tmp = tempfile.TemporaryDirectory(prefix="corefbot-bench-nightly-") if not args.workdir else None
    work = Path(args.workdir or tmp.name)  # type: ignore[union-attr]
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.base:
        base = Path(args.base)
        model_s = 0.0
    else:
        from corefbot.models.train.tiny import make_model

        base = make_model("tiny", work / "tiny-base")
        model_s = time.perf_counter() - t0
    db = work / "corefbot.db"
    data = work / "labels.jsonl"
    data.write_text("\n".join(_rows(args)) + "\n", encoding="utf-8")
    t0 = time.perf_counter()
    store = Store(db)
    try:
        imported = import_jsonl(store, data)
        build(store)
    finally:
        store.close()
    setup_s = time.perf_counter() - t0

    overrides = {k: v for k, v in (("max_steps", args.max_steps), ("device", args.device)) if v is not None}
    config = NightlyConfig(base_model=base, preset=args.preset, finetune_overrides=overrides, margin=-1.0,
                           min_agreement=0.0, quant=args.quant, min_new_labels=1, trigger="bench",
                           progress=sys.stderr.isatty())
    t0 = time.perf_counter()
    report = run_nightly(db, config)
    full_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = run_nightly(db, config)
    skip_s = time.perf_counter() - t0
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    print(f"data         {imported.labels} labelled rows imported → {report.labels} labelled questions "
          f"({report.needs} need resolution); split {report.train}/{report.validation}/{report.test} "
          f"(setup {setup_s:.1f} s{f', tiny model built in {model_s:.1f} s' if model_s else ''})")
    print(f"base         {base} · preset {args.preset}" + (f" · max_steps {args.max_steps}" if args.max_steps else ""))
    print(f"outcome      {report.status}" + (f" ({report.error})" if report.error else "")
          + (f": F1 {100 * report.f1_before:.1f}% → {100 * report.f1_after:.1f}%"
             if report.f1_before is not None and report.f1_after is not None else ""))
    steps = ", ".join(f"{k} {v:.1f} s" for k, v in report.seconds.items())
    print(f"steps        {steps}")
    print(f"nightly job  {full_s:.1f} s wall for one full run on {report.labels} labels")
    print(f"skip path    {skip_s:.2f} s (second run, no new labels: {again.status})")
    print(f"peak RSS     {peak_rss / 2**20:.0f} MiB (this process: the job ran in-process here)")
    figures = {"labels": report.labels, "status": report.status, "wall_s": full_s, "skip_wall_s": skip_s,
               "steps_s": dict(report.seconds), "f1_before": report.f1_before, "f1_after": report.f1_after,
               "split": [report.train, report.validation, report.test], "peak_rss_bytes": peak_rss,
               "preset": args.preset, "base": str(base), "setup_s": setup_s, "model_build_s": model_s}
    if args.report:
        Path(args.report).write_text(json.dumps(figures, indent=2))
        print(f"report       {args.report}")
    if tmp is not None:
        tmp.cleanup()
    return 0 if report.status == "promoted" else 1
