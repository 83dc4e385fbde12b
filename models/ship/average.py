"""Average the LoRA adapters of several runs of one base into one run folder (a "model soup").

Sittings that continue each other (``corefbot seed --init-adapter PREVIOUS``) end on nearby points of one
trajectory; their average often generalises better than the last one alone (weight averaging, as in
stochastic weight averaging). Averaging LoRA factors A and B one by one is not averaging the adapters
(the mean of products is not the product of means), so the average is taken of the updates themselves:

    ΔW = mean_i (alpha_i / r_i) · B_i A_i

which is exactly a LoRA of rank Σ r_i (the factors stacked). Serving cost grows with the rank, so by default
the update is cut back to the runs' own rank by a truncated SVD, computed on the small factors (QR of the
stacked B and Aᵀ, then the SVD of a Σr × Σr core) and never on the full out × in matrix. The share of the
update's squared norm kept is recorded in the new folder (``average.json``) so the cut can be judged.

The new folder is the last run's folder with the averaged adapter: its config, tokenizer and manifest (so its
test split is the last run's; earlier runs may have trained on some of those questions, so judge the average on
held-out sets none of them saw, such as a seed recipe's ``heldout-*.jsonl``). ``corefbot export-lora`` then
converts, checks and decides it as it does any run.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from corefbot.models.serve.llama import DECIDE_FILE, RUN_ADAPTER

ADAPTER = "adapter"
RECORD = "average.json"
# The last run's own outputs (its adapter, its training figures, its export): they describe it, not the average.
_NOT_COPIED = (ADAPTER, RUN_ADAPTER, DECIDE_FILE, "export-lora.json", "metrics.json", "loss.csv", "loss.png",
               "selection")


@dataclass(frozen=True)
class AverageResult:
    out: Path
    runs: list[str]
    rank: int
    stacked_rank: int
    kept_energy_min: float   # the worst layer's share of ‖ΔW‖² kept by the rank cut (1.0 without a cut)
    kept_energy_mean: float


def _low_rank(bs: list, as_: list, rank: int) -> tuple:
    """(B, A, share of ‖ΔW‖² kept): the best rank-``rank`` factors of ΔW = Σ B_i A_i (B_i already scaled),
    computed from the factors alone."""
    import torch

    b = torch.cat([x.double() for x in bs], dim=1)      # out × R
    a = torch.cat([x.double() for x in as_], dim=0)     # R × in
    qb, rb = torch.linalg.qr(b)                          # b = qb rb
    qa, ra = torch.linalg.qr(a.T)                        # a = ra.T qa.T
    u, s, vh = torch.linalg.svd(rb @ ra.T)               # ΔW = qb u diag(s) vh qa.T
    total = float((s ** 2).sum())
    kept = float((s[:rank] ** 2).sum()) / total if total > 0 else 1.0
    root = s[:rank].sqrt()
    new_b = (qb @ u[:, :rank]) * root                    # out × rank
    new_a = root[:, None] * (vh[:rank] @ qa.T)           # rank × in
    return new_b.float().contiguous(), new_a.float().contiguous(), kept


def average_runs(runs: Sequence[str | Path], out: str | Path, *, rank: int | None = None) -> AverageResult:
    """Write ``out``: the last run's folder with the average of the runs' adapters.

    ``rank``: the averaged adapter's rank (default the largest of the runs' ranks; ``0`` keeps the exact stacked
    average, of rank Σ r_i). All runs must share a base, the adapted modules and layers.
    """
    import torch
    from safetensors.torch import load_file, save_file

    paths = [Path(r) for r in runs]
    if len(paths) < 2:
        raise ValueError("averaging needs at least two runs")
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out}: already exists (averaging writes a new run folder)")

    from corefbot.models.train.finetune import adapter_folder
    from corefbot.models.train.run import read_run

    dirs = [adapter_folder(p) for p in paths]
    cfgs = [json.loads((d / "adapter_config.json").read_text()) for d in dirs]
    run_cfgs = [read_run(p)[0] for p in paths]  # finished run folders: the last one is copied as the new run
    bases = {c.get("base_gguf_sha256") or c.get("base") for c in run_cfgs}
    if len(bases) > 1:
        raise ValueError(f"runs {', '.join(map(str, paths))} were trained from different bases ({sorted(map(str, bases))})")
    # Which layers are adapted is compared by the tensors below, not by layers_to_transform: a run that listed
    # all 24 layers (`--lora-layers 24`) and one that left it unset (every layer) are the same adapter.
    for key in ("target_modules", "peft_type"):
        values = [sorted(c.get(key) or []) if isinstance(c.get(key), list) else c.get(key) for c in cfgs]
        if any(v != values[0] for v in values):
            raise ValueError(f"runs differ in the adapter's {key} ({values}); only adapters of the same kind average")
    for p, c in zip(paths, cfgs):
        if c.get("use_dora") or c.get("use_rslora"):
            raise ValueError(f"{p}: only plain LoRA adapters average (DoRA / rsLoRA scale differently)")
    tensors = [load_file(str(d / "adapter_model.safetensors")) for d in dirs]
    names = set(tensors[0])
    for p, t in zip(paths[1:], tensors[1:]):
        if set(t) != names:
            odd = sorted(set(t) - names) or sorted(names - set(t))
            raise ValueError(f"{p}: its adapter adapts other modules or layers than {paths[0]}'s (e.g. {odd[0]})")

    stacked = sum(int(c["r"]) for c in cfgs)
    keep = stacked if rank == 0 else (rank or max(int(c["r"]) for c in cfgs))
    if not 0 < keep <= stacked:
        raise ValueError(f"rank {rank}: must be between 1 and {stacked} (the stacked rank), or 0 to keep it")

    # The average keeps the last run's scaling (alpha / r), so a preset that trained the runs can continue it
    # (``corefbot seed --init-adapter``): its B carries the rest.
    scale = float(cfgs[-1]["lora_alpha"]) / int(cfgs[-1]["r"])
    alpha = scale * keep
    averaged: dict[str, torch.Tensor] = {}
    kept: list[float] = []
    for name in sorted(n for n in names if ".lora_A." in n):
        b_name = name.replace(".lora_A.", ".lora_B.")
        if b_name not in names:
            raise ValueError(f"{paths[0]}: {name} has no lora_B partner")
        # Fold each run's peft scaling (alpha / r) and its 1/n share into its B, less the scaling the average keeps.
        bs = [t[b_name] * (float(c["lora_alpha"]) / int(c["r"]) / len(paths) / scale) for t, c in zip(tensors, cfgs)]
        as_ = [t[name] for t in tensors]
        if keep > min(bs[0].shape[0], as_[0].shape[1]):  # an SVD has no more directions than that
            raise ValueError(f"rank {keep}: above {name}'s smaller side ({bs[0].shape[0]} × {as_[0].shape[1]})")
        new_b, new_a, k = _low_rank(bs, as_, keep)
        averaged[name], averaged[b_name] = new_a, new_b
        kept.append(k)
    extra = names - set(averaged)
    if extra:
        raise ValueError(f"{paths[0]}: adapter tensors other than LoRA factors ({sorted(extra)[:3]}) cannot be averaged")

    shutil.copytree(paths[-1], out, ignore=shutil.ignore_patterns(*_NOT_COPIED))
    (out / ADAPTER).mkdir()
    cfg = dict(cfgs[-1], r=keep, lora_alpha=int(alpha) if alpha.is_integer() else alpha)
    (out / ADAPTER / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    save_file(averaged, str(out / ADAPTER / "adapter_model.safetensors"), metadata={"format": "pt"})
    result = AverageResult(out=out, runs=[str(p.resolve()) for p in paths], rank=keep, stacked_rank=stacked,
                           kept_energy_min=min(kept), kept_energy_mean=sum(kept) / len(kept))
    record = {**asdict(result), "out": str(out)}
    (out / RECORD).write_text(json.dumps(record, indent=2))
    # read_run needs a metrics file; this one says what the folder is and that it has not been evaluated.
    (out / "metrics.json").write_text(json.dumps({"average": record}, indent=2))
    return result
