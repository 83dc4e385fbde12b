"""Training throughput: corefbot.models.train.finetune vs a plain transformers Trainer + peft, same model/data/settings.

Each trainer runs in its own process (so peak memory is its own): the same base model (by default the
~13M-parameter ``small`` shape of models/tiny.py, random weights), the same examples rendered by the
one prompt builder, the same LoRA and optimizer settings (the paper preset: r 64, alpha 16, dropout
0.05, all linear layers, lr 2e-4, cosine, 10 warm-up steps), the same number of optimizer steps and
sequences. Throughput counts non-padding tokens per second of training (model loading excluded).
With the defaults, examples = steps x micro-batch x accumulation: every trainer trains exactly one
epoch, so all of them process the same sequences (only their order and batching differ). The machine
this runs on may be shared: use --repeat and read the per-round ratios as well as the best figures.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("deploy install model error version driver build mmpose TensorRT CUDA docker config export "
         "train dataset batch memory GPU phone it that this they the a to on with for how why what "
         "works fails again now still").split()


def synthetic_unified(n: int, seed: int = 0) -> list[dict]:
    """Unified-format rows with windows of 0–12 turns, so lengths vary as in real chats."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        turns = rng.randint(0, 12)
        context = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 25))) for _ in range(turns)]
        needs = rng.random() < 0.45
        topic = rng.choice(WORDS[:13])
        query = f"how to {rng.choice(['fix', 'use'])} it?" if needs else f"how to install {topic} on TX2?"
        rows.append({"source": "bench", "id": f"d{i // 4}t{i % 4}", "lang": "en", "split": "train",
                     "context": context, "query": query, "needs_rewrite": needs,
                     "rewrite": f"how to fix {topic}?" if needs else query})
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", help="HF model folder (default: build the 'small' shape in a temp folder)")
    parser.add_argument("--shape", default="small", help="models/tiny.py shape to build when --base is absent")
    parser.add_argument("--data", help="labelled data (unified .jsonl or alpaca); default: synthetic chats")
    parser.add_argument("--examples", type=int, default=200, help="synthetic examples (default 200)")
    parser.add_argument("--steps", type=int, default=25,
                        help="optimizer steps per trainer (default 25: one epoch of 200 at 4 x 2)")
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--trainers", default="ours,trainer,trainer-grouped",
                        help="comma list of: ours, ours-ungrouped, ours-unshared (each sequence computes its own "
                             "copy of the prompt's common opening), trainer, trainer-grouped")
    parser.add_argument("--preset", default="paper",
                        help="finetune preset for every trainer (default paper; seed-cpu: the CPU seed recipe; the Trainer "
                             "baselines put LoRA on every layer whatever the preset says)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of all trainers, interleaved; best and per-round ratios reported (default 1)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--report", help="write the figures as JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)


def _config(args: argparse.Namespace):
    from corefbot.models.train.finetune import load_preset

    return load_preset(args.preset, max_steps=args.steps, micro_batch_size=args.micro_batch_size,
                       gradient_accumulation_steps=args.grad_accum, device=args.device,
                       group_by_length=args.worker != "ours-ungrouped", share_prefix=args.worker != "ours-unshared")


def _worker(args: argparse.Namespace) -> dict:
    """One trainer, in this process; returns its figures."""
    import resource

    from corefbot.models.train.finetune import encode_examples, fit, setup
    from corefbot.pipeline.examples import load_examples

    config = _config(args)
    examples = load_examples(args.data)
    if args.worker in ("ours", "ours-ungrouped", "ours-unshared"):
        session = setup(args.base, config)
        _materialize(session.model)
        data, _ = encode_examples(examples, session.tokenizer, seed=config.seed, sequence_len=config.sequence_len,
                                  copy_unneeded=config.copy_unneeded, option_orders=config.option_orders)
        r = fit(session, data, progress=False)
        out = {"tokens": r.tokens, "padded_tokens": r.padded_tokens, "wall_s": r.wall_s,
               "final_loss": r.losses[-1].loss, "sequences": r.sequences, "device": session.device}
    else:
        out = _trainer_baseline(args, config, examples, grouped=args.worker == "trainer-grouped")
    import torch

    if out["device"].startswith("cuda"):
        out["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated())
    else:
        out["peak_memory_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out["tokens_per_s"] = out["tokens"] / out["wall_s"]
    return out


def _materialize(model) -> None:
    """Touch every weight so pages of the memory-mapped checkpoint are read before the clock starts
    (otherwise the first training step of whichever trainer runs first pays for the disk)."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.sum()


def _trainer_baseline(args: argparse.Namespace, config, examples, *, grouped: bool) -> dict:
    """The reference: transformers.Trainer on a peft model, labels masked to the response."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainingArguments)

    from corefbot.models.train.finetune import encode_examples
    from corefbot.models.train.evaluate import pick_device, torch_dtype_for

    device = pick_device(config.device)
    dtype = torch_dtype_for(config.dtype, device)
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=dtype)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                                             lora_dropout=config.lora_dropout, target_modules="all-linear",
                                             bias="none", task_type="CAUSAL_LM"))
    data, _ = encode_examples(examples, tokenizer, seed=config.seed, sequence_len=config.sequence_len,
                              copy_unneeded=config.copy_unneeded, option_orders=config.option_orders)
    rows = [{"input_ids": list(d.ids), "attention_mask": [1] * len(d.ids),
             "labels": [-100] * d.n_prompt + list(d.ids[d.n_prompt:])} for d in data]
    batches: list[tuple[int, int, int]] = []  # (tokens, padded, sequences) per collated batch
    collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)

    def counting_collator(features):
        batch = collate(features)
        batches.append((int(batch["attention_mask"].sum()), batch["input_ids"].numel(), len(features)))
        return batch

    targs = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="corefbot-trainer-"), per_device_train_batch_size=config.micro_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps, learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler, warmup_steps=config.warmup_steps, max_steps=config.max_steps,
        weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm, optim="adamw_torch",
        logging_steps=1, save_strategy="no", report_to=[], seed=config.seed, train_sampling_strategy="group_by_length" if grouped else "random",
        bf16=dtype == torch.bfloat16, use_cpu=device == "cpu", dataloader_num_workers=0,
        remove_unused_columns=False, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=rows, data_collator=counting_collator)
    _materialize(model)
    start = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    # The dataloader may collate a batch ahead of the last step: count only the batches trained on.
    used = batches[: config.max_steps * config.gradient_accumulation_steps]
    counted = {"tokens": sum(b[0] for b in used), "padded": sum(b[1] for b in used),
               "sequences": sum(b[2] for b in used)}
    return {"tokens": counted["tokens"], "padded_tokens": counted["padded"], "wall_s": wall,
            "final_loss": losses[-1] if losses else math.nan, "sequences": counted["sequences"],
            "device": device, "train_loss": result.training_loss}


def run(args: argparse.Namespace) -> int:
    if args.worker:
        Path(args.result).write_text(json.dumps(_worker(args)))
        return 0
    work = Path(tempfile.mkdtemp(prefix="corefbot-bench-training-"))
    base = args.base
    if not base:
        from corefbot.models.train.tiny import make_model

        base = str(make_model(args.shape, work / args.shape))
    from corefbot.models.train.scaling import count_parameters

    data = args.data
    if not data:
        data = str(work / "data.jsonl")
        Path(data).write_text("".join(json.dumps(r) + "\n" for r in synthetic_unified(args.examples)))
    trainers = [t.strip() for t in args.trainers.split(",") if t.strip()]
    for f in Path(base).glob("*.safetensors"):  # same page-cache state for every trainer
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    figures: dict = {"base": base, "parameters": count_parameters(base), "data": data, "steps": args.steps,
                     "micro_batch_size": args.micro_batch_size, "grad_accum": args.grad_accum, "trainers": {}}
    config = _config(args)
    print(f"model {base} ({figures['parameters']:,} parameters), {args.steps} steps x "
          f"{args.micro_batch_size} x {args.grad_accum} sequences, preset {args.preset}: LoRA r {config.lora_r} "
          f"on {config.lora_layers or 'all'} layers")
    rounds: list[dict] = []
    for rnd in range(args.repeat):
        results: dict = {}
        for name in trainers:
            result = work / f"{name}-{rnd}.json"
            cmd = [sys.executable, "-m", "corefbot.cli", "bench", "training", "--worker", name, "--base", base,
                   "--data", data, "--steps", str(args.steps), "--micro-batch-size", str(args.micro_batch_size),
                   "--grad-accum", str(args.grad_accum), "--device", args.device, "--preset", args.preset,
                   "--result", str(result)]
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise RuntimeError(f"trainer {name!r} failed (exit {proc.returncode})")
            r = json.loads(result.read_text())
            results[name] = r
            pad = 1 - r["tokens"] / r["padded_tokens"] if r["padded_tokens"] else 0.0
            print(f"[{rnd + 1}/{args.repeat}] {name:<16} {r['tokens_per_s']:>9,.0f} tokens/s  {r['wall_s']:7.1f} s  "
                  f"{r['tokens']:>8,} tokens (padding {100 * pad:4.1f}%)  peak memory "
                  f"{r['peak_memory_bytes'] / 2**20:,.0f} MiB  final loss {r['final_loss']:.3f}  [{r['device']}]",
                  flush=True)
        rounds.append(results)
    figures["rounds"] = rounds
    for name in trainers:
        runs = [r[name] for r in rounds]
        best = max(runs, key=lambda r: r["tokens_per_s"])
        figures["trainers"][name] = {**best, "tokens_per_s_all": [r["tokens_per_s"] for r in runs],
                                     "peak_memory_bytes_max": max(r["peak_memory_bytes"] for r in runs)}
    t = figures["trainers"]
    print("best of", args.repeat, "round(s):")
    for name, r in t.items():
        print(f"  {name:<16} {r['tokens_per_s']:>9,.0f} tokens/s, peak memory {r['peak_memory_bytes_max'] / 2**20:,.0f} MiB")
    if "ours" in t:
        for ref in ("trainer", "trainer-grouped", "ours-unshared"):
            if ref in t:
                per_round = sorted(r["ours"]["tokens_per_s"] / r[ref]["tokens_per_s"] for r in rounds)
                figures[f"speedup_vs_{ref}"] = t["ours"]["tokens_per_s"] / t[ref]["tokens_per_s"]
                figures[f"speedup_vs_{ref}_per_round"] = per_round
                print(f"corefbot.models.train.finetune vs {ref}: {figures[f'speedup_vs_{ref}']:.2f}x tokens/s (best vs best); "
                      f"per round {', '.join(f'{x:.2f}x' for x in per_round)}")
    if args.report:
        Path(args.report).write_text(json.dumps(figures, indent=2) + "\n")
    return 0
