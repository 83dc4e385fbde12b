"""From a finetune run to a served model: merge the adapter → GGUF → quantize → check → register.

The check asks the quantized GGUF (through the serving backend, :class:`corefbot.models.serve.llama.LlamaBackend`)
and the merged HF model (through :mod:`corefbot.models.train.evaluate`) for the decision on the run's test split, in
the serving option order, and reports how often they agree: quantization that flips decisions shows
here before the version can be promoted. The version is registered as a ``candidate`` with the run's
test metrics; promotion is the nightly job's (or a moderator's) call.
"""
from __future__ import annotations

import gc
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from corefbot.models.ship.gguf import Quant, QUANTS
from corefbot.pipeline.prompt import SERVE_ORDER, build_prompt
from corefbot.pipeline.records import Decision, Example

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Agreement:
    examples: int
    agreement: float  # share of examples where both models decide the same
    needs_agreement: float  # among examples the HF model calls "needs"
    mean_abs_p_needs_diff: float
    hf_f1: float  # serving-order decision F1 of each model on these examples
    gguf_f1: float

    def summary(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ExportResult:
    run_dir: Path
    gguf_path: Path
    quant: Quant
    agreement: Agreement
    version_id: int | None
    seconds: dict[str, float]
    size_bytes: int


def merge_adapter(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Fold the run's LoRA adapter into its base weights (float32) and save an HF folder."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from corefbot.models.train.run import read_run

    run_dir = Path(run_dir)
    config, _, _ = read_run(run_dir)
    base = Path(config["base"])
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"{base}: the run's base model is missing (named in {run_dir / 'config.yaml'})")
    out = Path(out_dir) if out_dir else run_dir / "merged"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(run_dir / "adapter")).merge_and_unload()
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(run_dir / "tokenizer").save_pretrained(out)
    del model
    gc.collect()
    return out


def decision_agreement(hf_dir: str | Path, gguf_path: str | Path, examples: Sequence[Example], *,
                       n_threads: int | None = None, progress: bool = False,
                       lora_path: str | Path | None = None) -> Agreement:
    """Serving-order decisions of the HF model (a folder, or a run folder: base + adapter) and the GGUF
    (with ``lora_path``, a GGUF LoRA applied to it: the adapter route) on the same examples."""
    import math

    from tqdm import tqdm

    from corefbot.models.train.evaluate import decide, load_model, option_logprobs
    from corefbot.models.serve.llama import LlamaBackend
    from corefbot.pipeline.metrics import Confusion

    if not examples:
        raise ValueError("no examples to compare the quantized model on")
    model, tok = load_model(hf_dir, device="cpu")
    prompts = [build_prompt(e.window, e.question, SERVE_ORDER) for e in examples]
    logps = option_logprobs(model, tok, prompts)
    hf_dec: list[Decision] = [decide(p, lp) for p, lp in zip(prompts, logps)]
    hf_p = []
    for lp in logps:
        z = [math.exp(v - max(lp)) for v in lp]
        hf_p.append(z[SERVE_ORDER.index("needs")] / sum(z))
    del model
    gc.collect()
    gg_dec: list[Decision] = []
    gg_p: list[float] = []
    backend = LlamaBackend(gguf_path, n_threads=n_threads, lora_path=lora_path, timeout_s=None)
    try:
        for e in tqdm(examples, desc="gguf decisions", unit="q", disable=not progress, leave=False):
            res = backend.resolve(e.window, e.question, rewrite="never")
            gg_dec.append(res.decision)
            gg_p.append(float(res.probs["needs"]))
    finally:
        backend.close()
    same = [a == b for a, b in zip(hf_dec, gg_dec)]
    needs_idx = [i for i, d in enumerate(hf_dec) if d == "needs"]
    gold = [e.label == "needs" for e in examples]
    return Agreement(
        examples=len(examples), agreement=sum(same) / len(same),
        needs_agreement=(sum(same[i] for i in needs_idx) / len(needs_idx)) if needs_idx else math.nan,
        mean_abs_p_needs_diff=sum(abs(a - b) for a, b in zip(hf_p, gg_p)) / len(examples),
        hf_f1=Confusion.of(gold, [d == "needs" for d in hf_dec]).f1,
        gguf_f1=Confusion.of(gold, [d == "needs" for d in gg_dec]).f1,
    )


def export_gguf(run_dir: str | Path, quant: Quant = "q4_k_m", *, store: Any | None = None,
                max_examples: int | None = 200, keep_intermediate: bool = False,
                n_threads: int | None = None, note: str = "", progress: bool = False) -> ExportResult:
    """merge → convert (f16) → quantize → agreement on the test split → register (when ``store``).

    Writes ``RUN_DIR/model-<quant>.gguf`` and ``RUN_DIR/export-<quant>.json``; the merged HF folder and
    the f16 GGUF are removed unless ``keep_intermediate``.
    """
    import json

    from corefbot.models.train.finetune import subset
    from corefbot.models.train.run import read_run, run_split
    from corefbot.models.ship.gguf import convert_hf_to_gguf, quantize

    if quant not in QUANTS:
        raise ValueError(f"unknown quantization {quant!r}; choose one of {', '.join(QUANTS)}")
    run_dir = Path(run_dir)
    config, _, metrics = read_run(run_dir)
    split, _ = run_split(run_dir)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    merged = merge_adapter(run_dir)
    seconds["merge"] = time.perf_counter() - t
    t = time.perf_counter()
    f16 = convert_hf_to_gguf(merged, run_dir / "model-f16.gguf", outtype="f16")
    seconds["convert"] = time.perf_counter() - t
    t = time.perf_counter()
    out = quantize(f16, run_dir / f"model-{quant}.gguf", quant, n_threads=n_threads)
    seconds["quantize"] = time.perf_counter() - t
    t = time.perf_counter()
    agreement = decision_agreement(merged, out, subset(split.test, max_examples), n_threads=n_threads,
                                   progress=progress)
    seconds["agreement"] = time.perf_counter() - t
    if not keep_intermediate:
        shutil.rmtree(merged, ignore_errors=True)
        f16.unlink(missing_ok=True)
    decision = metrics.get("test", {}).get("decision", {})
    record = {
        "test_f1": decision.get("f1", {}).get("mean"), "test_f1_std": decision.get("f1", {}).get("std"),
        "test_precision": decision.get("precision", {}).get("mean"),
        "test_recall": decision.get("recall", {}).get("mean"),
        "rewrite_token_f1": metrics.get("test", {}).get("rewrite", {}).get("token_f1"),
        "agreement": agreement.agreement, "agreement_examples": agreement.examples,
        "gguf_serve_f1": agreement.gguf_f1, "hf_serve_f1": agreement.hf_f1,
    }
    version_id = None
    if store is not None:
        from corefbot.models.ship.registry import register

        version_id = register(store, gguf_path=out.resolve(), run_dir=run_dir.resolve(), base=config["base"],
                              metrics=record, quant=quant, note=note).id
    result = ExportResult(run_dir, out, quant, agreement, version_id, seconds, out.stat().st_size)
    (run_dir / f"export-{quant}.json").write_text(json.dumps(
        {"gguf": str(out), "quant": quant, "size_bytes": result.size_bytes, "agreement": agreement.summary(),
         "registry_id": version_id, "seconds": seconds, "metrics": record}, indent=2))
    log.info("exported %s (%s, %.1f MB): decisions agree with the merged model on %.1f%% of %d test examples",
             out, quant, result.size_bytes / 1e6, 100 * agreement.agreement, agreement.examples)
    return result
