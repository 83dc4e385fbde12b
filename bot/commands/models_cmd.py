"""make-model: build a local random-weight Qwen2 model (tests, demo, benchmarks) and optionally its GGUF."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from corefbot.models.train.tiny import SHAPES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-model", help="build a random-weight Qwen2 model with a local tokenizer (+ GGUF)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder for the HF model (and the GGUF files)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny",
                   help="tiny (tests, demo) or qwen2.5-0.5b (Qwen2.5-0.5B-Instruct's shape; ~1 min, ~4 GB RAM)")
    p.add_argument("--gguf", choices=["q4_k_m", "q8_0"], help="also convert to GGUF and quantize")
    p.add_argument("--keep-f16", action="store_true", help="keep the unquantized F16 GGUF next to the quantized one")
    p.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default 0)")
    p.set_defaults(func=cmd_make_model)


def cmd_make_model(args: argparse.Namespace) -> int:
    from corefbot.models.train.tiny import make_model

    out = Path(args.out_dir)
    start = time.perf_counter()
    hf = make_model(args.shape, out, seed=args.seed)
    print(f"HF model ({args.shape}): {hf}  [{time.perf_counter() - start:.1f} s]")
    if args.gguf:
        from corefbot.models.ship.gguf import convert_hf_to_gguf, quantize

        t0 = time.perf_counter()
        f16 = convert_hf_to_gguf(hf, out / "model-f16.gguf")
        t1 = time.perf_counter()
        quant = quantize(f16, out / f"model-{args.gguf}.gguf", args.gguf)
        t2 = time.perf_counter()
        if not args.keep_f16:
            f16.unlink()
        print(f"GGUF: converted in {t1 - t0:.1f} s, quantized to {args.gguf} in {t2 - t1:.1f} s")
        print(f"GGUF ({args.gguf}, {quant.stat().st_size / 1e6:.1f} MB): {quant}")
        if args.keep_f16:
            print(f"GGUF (f16): {f16}")
    return 0
