"""train, seed, average, export-gguf, export-lora, scaling-check: LoRA fine-tuning, export for serving, and the
scaling-law check."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import get_args

from corefbot.models.serve.types import DecideBy, DecideSetting
from corefbot.models.train.seed import SEED_SETS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="LoRA fine-tune a base model on labelled examples; evaluate on the test split")
    p.add_argument("--base", required=True, metavar="HF_DIR|GGUF",
                   help="base model: a Hugging Face folder, or a GGUF file (dequantized once, cached)")
    p.add_argument("--data", required=True, action="append", metavar="FILE",
                   help="corefbot alpaca export (.json) or unified labelled .jsonl; repeat for several files")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder to write")
    p.add_argument("--preset", default="paper", help="paper, paper-7b, tiny, or a YAML file (default paper)")
    p.add_argument("--select", choices=["lobass", "ifd"], help="train on the top share by a learnability score")
    p.add_argument("--keep", type=float, default=0.3, help="share kept by --select (default 0.3)")
    p.add_argument("--max-steps", type=int, help="optimizer steps (overrides the preset's epochs)")
    p.add_argument("--max-minutes", type=float,
                   help="wall-clock budget for training: stop at a step boundary, still write the run folder")
    p.add_argument("--sequence-len", dest="sequence_len", type=int, help="drop longer training sequences")
    p.add_argument("--epochs", type=float)
    p.add_argument("--lr", dest="learning_rate", type=float)
    p.add_argument("--lora-r", type=int)
    p.add_argument("--decision-weight", dest="decision_weight", type=float,
                   help="how many times the decision letter counts in the loss (default: the preset's)")
    p.add_argument("--init-adapter", metavar="RUN_DIR",
                   help="continue training this run's adapter (its r and alpha; its layers or more) instead of a fresh one")
    p.add_argument("--copy-unneeded", dest="copy_unneeded", action="store_true", default=None,
                   help="also train the question itself as the rewrite of each question that needs nothing "
                        "(what deciding by the rewrite reads)")
    _option_orders_option(p)
    _lora_layers_option(p)
    p.add_argument("--loraplus-ratio", dest="loraplus_lr_ratio", type=float, help="LoRA+: B-matrix lr multiple (e.g. 16)")
    p.add_argument("--micro-batch-size", type=int)
    p.add_argument("--grad-accum", dest="gradient_accumulation_steps", type=int)
    p.add_argument("--eval-max-examples", type=int, help="cap the evaluated validation/test examples")
    p.add_argument("--eval-base", action="store_true", default=None, help="also evaluate the base model on the test split")
    p.add_argument("--no-rewrites", dest="eval_rewrites", action="store_false", default=None,
                   help="skip the rewrite evaluation (decisions only)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda when present)")
    p.add_argument("--seed", type=int)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("seed", help="the seed recipe: fine-tune a base on the public labelled sets, print held-out figures")
    p.add_argument("--base", required=True, metavar="HF_DIR|GGUF", help="base model (a GGUF is dequantized once, cached)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder to write (seed-data/ and figures.json inside)")
    p.add_argument("--data-dir", default="../shared/data", metavar="DIR",
                   help="the public sets (task_gecor, canard_dev, rewrite_zh_train .jsonl; default ../shared/data)")
    p.add_argument("--max-minutes", type=float, default=60.0, help="training budget in minutes (default 60)")
    p.add_argument("--preset", default="seed-cpu", help="finetune preset (default seed-cpu)")
    p.add_argument("--max-steps", type=int, help="optimizer steps (a smaller run)")
    p.add_argument("--per-set", type=int, default=60,
                   help="held-out examples evaluated per set (a deterministic subset; default 60)")
    p.add_argument("--no-figures", action="store_true",
                   help="train only (no export, no figures): from a GGUF base, run export-lora before serving or seed-eval")
    p.add_argument("--sample", type=int, default=0,
                   help="which successive sample of the large sets to train on (default 0; 1, 2 … are fresh "
                        "pairs for a further sitting; the held-out parts never change)")
    p.add_argument("--cap", action="append", default=[], metavar="SET=ROWS",
                   help="train on ROWS rows of SET instead of the recipe's cap (repeatable; e.g. rewrite_zh=2000; "
                        f"the sets: {', '.join(s.name for s in SEED_SETS)})")
    p.add_argument("--data-only", action="store_true",
                   help="write seed-data/ and stop (then train on it with corefbot train)")
    p.add_argument("--init-adapter", metavar="RUN_DIR",
                   help="a further sitting: continue this seed run's adapter (use with --sample 1, 2 …)")
    p.add_argument("--lr", dest="learning_rate", type=float,
                   help="peak learning rate (default: the preset's; the README's further sittings used half)")
    _option_orders_option(p)
    _lora_layers_option(p)
    p.add_argument("--decide-examples", type=int, default=40,
                   help="from a GGUF base: test questions on which export-lora checks the adapter against the HF "
                        "model and picks the decide mode (default 40)")
    p.add_argument("--threads", type=int, help="llama.cpp threads (from a GGUF base: export and figures as served)")
    p.add_argument("--device", help="cpu, cuda … (default: cuda when present)")
    p.set_defaults(func=cmd_seed)

    p = sub.add_parser("seed-eval", help="the seed recipe's held-out figures for any model (run folder, HF folder, GGUF)")
    p.add_argument("--model", required=True, metavar="MODEL")
    p.add_argument("--heldout", required=True, metavar="DIR", help="a seed run's seed-data/ folder")
    p.add_argument("--per-set", type=int, default=60, help="held-out examples per set (default 60)")
    p.add_argument("--sets", nargs="+", help="only these sets (task, canard, rewrite_zh, cases_en, …)")
    p.add_argument("--no-rewrites", action="store_true", help="decisions only")
    p.add_argument("--report", metavar="OUT.json")
    _engine_options(p)
    p.add_argument("--decide-by", choices=get_args(DecideBy), default="letter",
                   help="rewrite: needs resolution when the served model's rewrite adds a word the question lacks "
                        "(COREFBOT_DECIDE_BY; with --engine llama)")
    p.add_argument("--served", action="store_true",
                   help="also the bot's whole resolver with its default settings (gate, the run's measured decide "
                        "mode, rewrite validation): the decision and the question forwarded, as the group sees them")
    p.add_argument("--served-decide-by", choices=get_args(DecideSetting), default="auto",
                   help="how the served resolver decides: auto (default) as the bot does by default, the run's "
                        "measured mode; letter or rewrite as COREFBOT_DECIDE_BY sets it")
    p.set_defaults(func=cmd_seed_eval)

    p = sub.add_parser("export-gguf", help="merge a run's adapter, convert to GGUF, quantize, check, register")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--quant", choices=["q4_k_m", "q8_0"], default="q4_k_m")
    p.add_argument("--max-examples", type=int, default=200,
                   help="test examples for the HF-vs-GGUF agreement check (default 200; 0 = all)")
    p.add_argument("--keep-intermediate", action="store_true", help="keep merged/ and model-f16.gguf")
    p.add_argument("--no-register", action="store_true", help="do not add the version to the database")
    p.add_argument("--threads", type=int, help="llama.cpp threads")
    p.add_argument("--note", default="", help="note stored with the registered version")
    p.set_defaults(func=cmd_export_gguf)

    p = sub.add_parser("export-lora", help="the adapter route: the run's LoRA as a GGUF LoRA for its base GGUF, checked")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run trained from a GGUF base (train --base X.gguf)")
    p.add_argument("--max-examples", type=int, default=200,
                   help="test examples for the HF-vs-llama.cpp agreement check (default 200; 0 = skip)")
    p.add_argument("--threads", type=int, help="llama.cpp threads")
    p.set_defaults(func=cmd_export_lora)

    p = sub.add_parser("average", help="average the LoRA adapters of several runs of one base into a new run folder")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="finished runs of the same base (the last one's "
                   "config, tokenizer and test split are kept)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder to write (must not exist)")
    p.add_argument("--rank", type=int, help="rank of the averaged adapter (default the runs' own; 0 = the exact "
                   "average, of rank the sum of theirs, slower to serve)")
    p.set_defaults(func=cmd_average)

    p = sub.add_parser("scaling-check", help="evaluate a ladder of models: does the metric rise with size?")
    p.add_argument("--models", nargs="+", required=True, metavar="MODEL",
                   help="GGUF files (dequantized once, cached), HF model folders and/or finetune run folders")
    p.add_argument("--data", required=True, metavar="FILE", help="unified labelled .jsonl or alpaca export")
    p.add_argument("--report", metavar="OUT.json", help="write the report as JSON")
    p.add_argument("--plot", metavar="OUT.png", help="write metric vs parameter count")
    p.add_argument("--metric", choices=["precision", "f1", "recall"], default="precision",
                   help="metric the verdict is about (the paper's: precision)")
    p.add_argument("--split", choices=["all", "test"], default="all",
                   help="all labelled examples (base ladders) or only the test split (fine-tuned models)")
    p.add_argument("--max-examples", type=int, help="evaluate a deterministic subset of this size")
    p.add_argument("--device", default="auto")
    _engine_options(p)
    p.set_defaults(func=cmd_scaling_check)


def _engine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=["auto", "hf", "llama"], default="auto",
                   help="llama: as served, through llama.cpp (fast on a CPU; a run folder with its adapter.gguf); "
                        "hf: PyTorch (a GGUF through its float conversion); auto: llama for a GGUF file, else hf")
    p.add_argument("--threads", type=int, help="llama.cpp threads")


def _pct(stat: dict) -> str:
    mean, std = stat.get("mean"), stat.get("std")
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    return f"{100 * mean:.1f}% ± {100 * std:.1f}"


def _option_orders_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--option-orders", choices=["balanced", "serve"],
                   help="option order of the training prompts: balanced over the letters, or the serving order "
                        "only (default: the preset's)")


def _lora_layers_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lora-layers", type=int, metavar="N",
                   help="LoRA on the top N decoder layers (default: the preset's; with --init-adapter, more layers "
                        "than the adapter had widen it)")


def cmd_train(args: argparse.Namespace) -> int:
    from corefbot.models.train.finetune import load_preset
    from corefbot.models.train.run import run

    overrides = {k: getattr(args, k) for k in (
        "max_steps", "max_minutes", "sequence_len", "epochs", "learning_rate", "lora_r", "decision_weight", "init_adapter", "copy_unneeded", "option_orders", "lora_layers", "loraplus_lr_ratio", "micro_batch_size",
        "gradient_accumulation_steps", "eval_max_examples", "eval_base", "eval_rewrites", "device", "seed")}
    config = load_preset(args.preset, **overrides)
    result = run(args.base, args.data, args.out, config, select=args.select, keep=args.keep)
    m = result.metrics
    tr = m["train"]
    print(f"run folder   {result.out}")
    print(f"trained      {tr['steps']} steps, {tr['sequences']} sequences, {tr['tokens']:,} tokens in "
          f"{tr['wall_s']:.1f} s ({tr['tokens_per_s']:,.0f} tokens/s, padding {100 * tr['padding_share']:.1f}%), "
          f"final loss {tr['final_loss']:.3f}, peak memory {tr['peak_memory_bytes'] / 2**30:.2f} GiB")
    if tr.get("stopped_on_budget"):
        print(f"budget       stopped after {tr['steps']} of {tr['planned_steps']} planned steps "
              f"(--max-minutes {args.max_minutes:g})")
    if "validation" in m:
        print(f"validation   loss {m['validation']['loss']:.3f}, F1 {_pct(m['validation']['decision']['f1'])}")
    d = m["test"]["decision"]
    print(f"test         {d['examples']} examples x {d['orders']} option orders: precision {_pct(d['precision'])}, "
          f"recall {_pct(d['recall'])}, F1 {_pct(d['f1'])}")
    if "rewrite" in m["test"]:
        r = m["test"]["rewrite"]
        if r["examples"]:
            print(f"rewrites     {r['examples']} needs cases: exact match {100 * r['exact_match']:.1f}%, "
                  f"token F1 {100 * r['token_f1']:.1f}%")
    if "base_test" in m:
        b = m["base_test"]["decision"]
        print(f"base (test)  precision {_pct(b['precision'])}, F1 {_pct(b['f1'])}")
    if "selection" in m:
        s = m["selection"]
        print(f"selection    {s['method']} kept {s['kept']} of {s['candidates']}: test F1 {100 * s['selected_f1']:.1f}% "
              f"vs {100 * s['full_f1']:.1f}% on the full split ({'helped' if s['helped'] else 'did not help'})")
    return 0


def _caps(pairs: list[str]) -> dict[str, int]:
    caps: dict[str, int] = {}
    for pair in pairs:
        name, sep, rows = pair.partition("=")
        if not sep or not rows.strip().isdigit():
            raise ValueError(f"--cap {pair!r}: expected SET=ROWS, e.g. rewrite_zh=2000")
        caps[name.strip()] = int(rows)
    return caps


def cmd_seed(args: argparse.Namespace) -> int:
    from corefbot.models.train.finetune import load_preset
    from corefbot.models.serve.llama import served_model
    from corefbot.models.train.run import read_run, run
    from corefbot.models.train.seed import build_seed_data, with_caps

    out = Path(args.out)
    data = build_seed_data(args.data_dir, out / "seed-data", sample=args.sample, sets=with_caps(_caps(args.cap)))
    for name, c in data.counts.items():
        print(f"seed set     {name}: train {c['train']} of {c['train_available']}, held out {c['heldout']}")
    if args.data_only:
        print(f"seed data    {data.train}")
        return 0
    config = load_preset(args.preset, max_minutes=args.max_minutes, max_steps=args.max_steps, device=args.device,
                         init_adapter=args.init_adapter, learning_rate=args.learning_rate,
                         option_orders=args.option_orders, lora_layers=args.lora_layers)
    result = run(args.base, [data.train], out, config)
    tr = result.metrics["train"]
    print(f"trained      {tr['steps']} steps ({tr['planned_steps']} planned{', stopped on the budget' if tr['stopped_on_budget'] else ''}), "
          f"{tr['sequences']} sequences, {tr['tokens']:,} tokens in {tr['wall_s'] / 60:.1f} min "
          f"({tr['tokens_per_s']:,.0f} tokens/s), final loss {tr['final_loss']:.3f}, "
          f"peak memory {tr['peak_memory_bytes'] / 2**30:.2f} GiB")
    from_gguf = bool(read_run(out)[0].get("base_gguf"))
    if args.no_figures:
        if from_gguf:
            print(f"next         corefbot export-lora {out}   (makes the run servable; then seed-eval)")
        return 0
    if from_gguf:
        # Trained from the GGUF the bot serves: make the run folder servable (adapter.gguf, and decide.json from
        # its test split) and report the held-out figures as the group will get them, through llama.cpp.
        args.run_dir, args.max_examples = out, args.decide_examples
        cmd_export_lora(args)
        decide_by = served_model(out).decide_mode()
        return _print_figures(out, data.heldout, args.per_set, rewrites=decide_by == "letter",
                              report=out / "figures.json", engine="llama", n_threads=args.threads,
                              decide_by=decide_by, served=True)
    return _print_figures(out, data.heldout, args.per_set, rewrites=True, report=out / "figures.json")


def cmd_seed_eval(args: argparse.Namespace) -> int:
    heldout = {p.stem.removeprefix("heldout-"): p for p in sorted(Path(args.heldout).glob("heldout-*.jsonl"))}
    if not heldout:
        raise FileNotFoundError(f"{args.heldout}: no heldout-*.jsonl (not a seed run's seed-data/ folder)")
    if args.sets:
        unknown = sorted(set(args.sets) - set(heldout))
        if unknown:
            raise ValueError(f"unknown held-out set(s) {', '.join(unknown)}; known: {', '.join(heldout)}")
        heldout = {k: v for k, v in heldout.items() if k in args.sets}
    return _print_figures(Path(args.model), heldout, args.per_set, rewrites=not args.no_rewrites,
                          report=Path(args.report) if args.report else None, engine=args.engine,
                          n_threads=args.threads, decide_by=args.decide_by, served=args.served,
                          served_decide_by=args.served_decide_by)


def _print_figures(model: Path, heldout: dict, per_set: int, *, rewrites: bool, report: Path | None,
                   engine: str = "auto", n_threads: int | None = None, decide_by: str = "letter",
                   served: bool = False, served_decide_by: str = "auto") -> int:
    import time

    from corefbot.models.train.seed import format_figures, format_served, heldout_figures

    start = time.perf_counter()
    rows = heldout_figures(model, heldout, per_set=per_set, rewrites=rewrites, progress=True,
                           engine=engine, n_threads=n_threads, decide_by=decide_by, served=served,  # type: ignore[arg-type]
                           served_decide_by=served_decide_by)  # type: ignore[arg-type]
    print(format_figures(rows, model.name))
    if served:
        print("\nserved (the bot's resolver, default settings: what the group sees)")
        print(format_served(rows))
    print(f"evaluated    {sum(r.examples for r in rows)} held-out examples (decided by the {decide_by}) in "
          f"{time.perf_counter() - start:.0f} s")
    if report is not None:
        from corefbot.models.train.evaluate_gguf import pick_engine

        report.write_text(json.dumps({"model": str(model), "engine": pick_engine(model, engine),  # type: ignore[arg-type]
                                      "decide_by": decide_by,
                                      "per_set": per_set, "sets": [r.to_dict() for r in rows]},
                                     indent=2, ensure_ascii=False, default=str))
        print(f"report       {report}")
    return 0


def cmd_average(args: argparse.Namespace) -> int:
    from corefbot.models.ship.average import average_runs

    r = average_runs(args.runs, args.out, rank=args.rank)
    cut = (f"cut from rank {r.stacked_rank} to {r.rank}: {100 * r.kept_energy_mean:.2f}% of the update's squared "
           f"norm kept (worst layer {100 * r.kept_energy_min:.2f}%)" if r.rank < r.stacked_rank
           else f"exact, rank {r.rank}")
    print(f"averaged     {len(r.runs)} runs into {r.out} ({cut})")
    print(f"next         corefbot export-lora {r.out}   (converts, checks against the HF model, picks the decide mode)")
    return 0


def cmd_export_gguf(args: argparse.Namespace) -> int:
    from corefbot.models.ship.export import export_gguf

    store = None
    if not args.no_register:
        from corefbot.commands.data import open_store

        store = open_store(args)
    try:
        r = export_gguf(args.run_dir, args.quant, store=store, max_examples=args.max_examples or None,
                        keep_intermediate=args.keep_intermediate, n_threads=args.threads, note=args.note,
                        progress=True)
    finally:
        if store is not None:
            store.close()
    a = r.agreement
    print(f"gguf         {r.gguf_path} ({r.quant}, {r.size_bytes / 1e6:.1f} MB)")
    print(f"agreement    {100 * a.agreement:.1f}% of {a.examples} test decisions match the merged HF model "
          f"(mean |Δp(needs)| {a.mean_abs_p_needs_diff:.3f}; serve-order F1 HF {100 * a.hf_f1:.1f}% vs GGUF {100 * a.gguf_f1:.1f}%)")
    print("timings      " + ", ".join(f"{k} {v:.1f} s" for k, v in r.seconds.items()))
    if r.version_id is not None:
        print(f"registered   model version {r.version_id} (candidate)")
    return 0


def cmd_export_lora(args: argparse.Namespace) -> int:
    from corefbot.models.ship.lora import export_lora

    out, a = export_lora(args.run_dir, max_examples=args.max_examples or None, n_threads=args.threads, progress=True)
    print(f"adapter      {out} ({out.stat().st_size / 1e6:.1f} MB); serve with --model {args.run_dir} "
          f"(or COREFBOT_MODEL_PATH={args.run_dir})")
    if a is not None:
        print(f"agreement    {100 * a.agreement:.1f}% of {a.examples} test decisions match the HF model "
              f"(mean |Δp(needs)| {a.mean_abs_p_needs_diff:.3f}; serve-order F1 HF {100 * a.hf_f1:.1f}% "
              f"vs llama.cpp {100 * a.gguf_f1:.1f}%)")
        d = json.loads((Path(args.run_dir) / "decide.json").read_text())
        cut = d.get("letter_threshold")
        letters = (f"letters {d['letter_argmax']['mcc']:.3f}, with needs at p >= {cut:.3g} {d['letter']['mcc']:.3f} "
                   "(leave-one-out)" if cut is not None else f"letters {d['letter']['mcc']:.3f}")
        m = d["mcnemar"]
        print(f"decide by    the {d['decide_by']} (served order, {d['examples']} test questions: Matthews {letters}, "
              f"rewrite {d['rewrite']['mcc']:.3f}; only the rewrite right on {m['only_rewrite_right']}, only the "
              f"letter on {m['only_letter_right']}, McNemar p {m['p']:.2g}; COREFBOT_DECIDE_BY=auto serves it)")
    return 0


def cmd_scaling_check(args: argparse.Namespace) -> int:
    from corefbot.models.train.finetune import subset
    from corefbot.models.train.scaling import format_table, plot, scaling_check
    from corefbot.models.train.split import split_examples
    from corefbot.pipeline.examples import load_examples

    examples = load_examples(args.data)
    if args.split == "test":
        examples = list(split_examples(examples).test)
    examples = subset(examples, args.max_examples)
    report = scaling_check(args.models, examples, metric=args.metric, device=args.device, engine=args.engine,
                           n_threads=args.threads)
    print(format_table(report))
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
        print(f"report       {args.report}")
    if args.plot:
        print(f"plot         {plot(report, args.plot)}")
    return 0
