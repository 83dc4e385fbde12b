"""nightly: run the nightly retraining job once (``--now``), as the bot's scheduler does, or list recent runs.

Settings not given as options come from the nightly plugin's settings model
(:class:`corefbot.plugins.common.settings.NightlySettings`), read from the same ``COREFBOT_*`` keys the bot reads
(environment or ``.env``); its defaults are the job's.

Exit status of ``--now``: 0 the job ran (promoted, kept the serving model, or skipped), 1 it failed
(the serving model is unchanged), 3 another run holds the lock.
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from corefbot.models.ship.gguf import QUANTS

EXIT = {"promoted": 0, "rejected": 0, "skipped": 0, "failed": 1, "busy": 3}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("nightly", help="run the nightly retraining job now (--now), or list recent runs")
    p.add_argument("--now", action="store_true", help="run the job once: export → train → evaluate → promotion check → GGUF")
    p.add_argument("--base", metavar="HF_DIR", help="base model folder (default COREFBOT_BASE_MODEL)")
    p.add_argument("--preset", help="finetune preset or YAML (default COREFBOT_NIGHTLY_PRESET)")
    p.add_argument("--model", metavar="MODEL",
                   help="what the bot serves while the registry has none: the baseline, and the run whose adapter "
                        "the candidate continues (default COREFBOT_MODEL_PATH when the resolver is llama-cpp)")
    p.add_argument("--from-base", action="store_true",
                   help="train the candidate from the bare base, not on from the served run's adapter "
                        "(default: COREFBOT_NIGHTLY_CONTINUE)")
    p.add_argument("--work-dir", metavar="DIR",
                   help="run folders and the lock (default COREFBOT_NIGHTLY_DIR or 'nightly' beside the database)")
    p.add_argument("--min-new-labels", type=int,
                   help="skip with fewer new labels since the last run (default COREFBOT_NIGHTLY_MIN_NEW_LABELS)")
    p.add_argument("--margin", type=float,
                   help="F1 gain (fraction) the candidate needs to be promoted (default COREFBOT_NIGHTLY_MARGIN)")
    p.add_argument("--quant", choices=list(QUANTS), help="serving quantization (default COREFBOT_NIGHTLY_QUANT)")
    p.add_argument("--min-agreement", type=float, help="quantized-vs-merged decision agreement needed to promote "
                                                       "(default COREFBOT_NIGHTLY_MIN_AGREEMENT)")
    p.add_argument("--max-steps", type=int, help="optimizer steps (overrides the preset)")
    p.add_argument("--max-minutes", type=float,
                   help="training budget in minutes (default COREFBOT_NIGHTLY_MAX_MINUTES; 0: none)")
    p.add_argument("--eval-max-examples", type=int, help="cap on evaluated test examples (overrides the preset)")
    p.add_argument("--keep-runs", type=int, help="run folders kept (default COREFBOT_NIGHTLY_KEEP_RUNS; older ones go "
                                                  "unless the registry still serves or may roll back to them)")
    p.add_argument("--force", action="store_true", help="train even with too few new labels")
    p.add_argument("--no-member-labels", action="store_true", help="train on moderator and imported labels only")
    p.add_argument("--threads", type=int, help="llama.cpp threads for the agreement check")
    p.add_argument("--trigger", default="cli", help=argparse.SUPPRESS)  # set by the bot's scheduler/commands
    p.add_argument("--json", action="store_true", help="print the report as one JSON line (for the bot)")
    p.add_argument("--history", type=int, default=10, metavar="N", help="without --now: list the last N runs")
    p.set_defaults(func=cmd_nightly)


def config_from(args: argparse.Namespace) -> Any:
    """The job's configuration: options first, then the bot's settings (``COREFBOT_*`` in the environment or
    ``.env``, read through the nightly plugin's settings model, which holds the defaults)."""
    from corefbot.models.ship.nightly import NightlyConfig
    from corefbot.plugins.common.settings import read_settings
    from corefbot.plugins.common.settings import NightlySettings, ResolverSettings

    settings = read_settings(NightlySettings)
    resolver = read_settings(ResolverSettings)
    # The model the bot loads at start (COREFBOT_MODEL_PATH) serves only with the local backend.
    served = resolver.corefbot_model_path if resolver.corefbot_resolver in (None, "llama-cpp") else None

    def pick(option: Any, setting: Any) -> Any:
        return setting if option is None else option

    minutes = pick(args.max_minutes, settings.corefbot_nightly_max_minutes) or None
    overrides = {k: v for k, v in (("max_steps", args.max_steps), ("eval_max_examples", args.eval_max_examples),
                                   ("max_minutes", minutes)) if v is not None}
    base, work = pick(args.base, settings.corefbot_base_model), pick(args.work_dir, settings.corefbot_nightly_dir)
    return NightlyConfig(
        base_model=Path(base).expanduser() if base else None, work_dir=Path(work).expanduser() if work else None,
        preset=pick(args.preset, settings.corefbot_nightly_preset),
        model_path=Path(model).expanduser() if (model := pick(args.model, served)) else None,
        continue_served=settings.corefbot_nightly_continue and not args.from_base,
        min_new_labels=pick(args.min_new_labels, settings.corefbot_nightly_min_new_labels),
        margin=pick(args.margin, settings.corefbot_nightly_margin),
        quant=pick(args.quant, settings.corefbot_nightly_quant),
        min_agreement=pick(args.min_agreement, settings.corefbot_nightly_min_agreement),
        keep_runs=pick(args.keep_runs, settings.corefbot_nightly_keep_runs),
        finetune_overrides=overrides, force=args.force, use_member_labels=not args.no_member_labels,
        n_threads=args.threads, trigger=args.trigger, progress=sys.stderr.isatty() and not args.json)


def cmd_nightly(args: argparse.Namespace) -> int:
    from corefbot.plugins.common.settings import default_db_path

    db_path = Path(args.db).expanduser() if args.db else default_db_path()
    if not args.now:
        return _history(db_path, args.history)
    from corefbot.models.ship.nightly import run_nightly

    report = run_nightly(db_path, config_from(args))
    if args.json:
        print(json.dumps(report.to_dict(), ensure_ascii=False))
    else:
        print(report.summary)
        if report.run_dir:
            print(f"run folder   {report.run_dir}")
        if report.error:
            print(f"error        {report.error}", file=sys.stderr)
    return EXIT[report.status]


def _history(db_path: Path, limit: int) -> int:
    from corefbot.models.ship.nightly import recent_runs
    from corefbot.pipeline.store import Store

    if not db_path.is_file():
        raise FileNotFoundError(f"{db_path}: no corefbot database there")
    store = Store(db_path)
    try:
        runs = recent_runs(store, limit)
    finally:
        store.close()
    if not runs:
        print(f"no nightly runs recorded in {db_path} (run one: corefbot nightly --now)")
        return 0
    for r in runs:
        when = datetime.fromtimestamp(r.started_at).strftime("%Y-%m-%d %H:%M")
        version = f" v{r.version_id}" if r.version_id else ""
        print(f"#{r.id:<4} {when}  {r.status:<11} {r.trigger:<14}{version}")
        if r.summary:
            print(f"      {r.summary}")
    return 0
