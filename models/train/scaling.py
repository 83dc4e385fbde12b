"""The paper's scaling-law check: does the decision metric rise with model size on these labels?

A ladder of models (base checkpoints, or finetune run folders) is evaluated on the labelled set with
all six option orders (:mod:`corefbot.models.train.evaluate`). The report has the paper's layout — parameters,
precision, recall, F1, and for fine-tuned models the improvement over their base — a plot of the
metric against parameter count, and a verdict: the Spearman rank correlation of the metric with size
and the steps where a larger model scores lower. Falling steps (beyond the spread over option orders)
are the signal that the labels or the prompt need another pass.
"""
from __future__ import annotations

import json
import logging
import math
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

from corefbot.models.train.evaluate import Metric, Stat
from corefbot.pipeline.records import Example

if TYPE_CHECKING:
    from corefbot.models.train.evaluate_gguf import Engine

log = logging.getLogger(__name__)

Kind = Literal["base", "fine-tuned"]


# ---- statistics -----------------------------------------------------------------------------

def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank (as Spearman's rho needs)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson's r of the ranks); NaN when undefined (n < 2 or a
    constant series)."""
    if len(x) != len(y):
        raise ValueError(f"spearman needs paired values, got {len(x)} and {len(y)}")
    if len(x) < 2:
        return math.nan
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx and vy else math.nan


@dataclass(frozen=True, slots=True)
class Break:
    """A step up the ladder where the metric fell."""

    smaller: str
    larger: str
    drop: float  # metric(smaller) − metric(larger), > 0
    within_noise: bool  # the drop is smaller than the larger of the two spreads over option orders


def monotonicity_breaks(names: Sequence[str], sizes: Sequence[int], values: Sequence[float],
                        spreads: Sequence[float] | None = None, tol: float = 0.0) -> list[Break]:
    """Consecutive steps (by size) where the metric drops by more than ``tol``."""
    spreads = spreads or [0.0] * len(values)
    order = sorted(range(len(sizes)), key=lambda i: (sizes[i], names[i]))
    out = []
    for a, b in zip(order, order[1:]):
        drop = values[a] - values[b]
        if drop > tol:
            out.append(Break(names[a], names[b], drop, drop <= max(spreads[a], spreads[b])))
    return out


# ---- models ---------------------------------------------------------------------------------

def count_parameters(model_dir: str | Path) -> int:
    """Parameters of an HF model folder, from its safetensors headers (no weights loaded), or of a GGUF
    file, from its tensor shapes; a finetune run folder counts its base. Tied embeddings are stored, and
    counted, once."""
    path = Path(model_dir)
    if path.is_file():  # a GGUF: its tensors' shapes (quantized or not, one weight is one parameter)
        import gguf

        return sum(int(math.prod(int(d) for d in t.shape)) for t in gguf.GGUFReader(path).tensors)
    if (path / "adapter").is_dir() and (path / "config.yaml").is_file():
        import yaml

        path = Path(yaml.safe_load((path / "config.yaml").read_text())["base"])
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights to count parameters from")
    total = 0
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name != "__metadata__":
                total += math.prod(info["shape"])
    return total


def _base_of(model_dir: Path, gguf: bool = False) -> Path | None:
    """A run folder's base: its float folder, or with ``gguf`` the GGUF it was trained from (when it was)."""
    if (model_dir / "adapter").is_dir() and (model_dir / "config.yaml").is_file():
        import yaml

        config = yaml.safe_load((model_dir / "config.yaml").read_text())
        return Path(config["base_gguf"] if gguf and config.get("base_gguf") else config["base"])
    return None


@dataclass(frozen=True)
class ScalingRow:
    name: str
    path: str
    kind: Kind
    parameters: int
    stats: dict[str, Stat]  # precision, recall, f1: mean and spread over option orders
    base: str | None = None  # for fine-tuned rows: the base's name
    improvement: dict[str, float] = field(default_factory=dict)  # metric − base metric (fine-tuned rows)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "kind": self.kind, "parameters": self.parameters,
                **{m: asdict(s) for m, s in self.stats.items()}, "base": self.base,
                "improvement": self.improvement}


@dataclass(frozen=True)
class Verdict:
    kind: Kind
    metric: Metric
    models: int
    spearman: float
    breaks: tuple[Break, ...]

    @property
    def consistent(self) -> bool | None:
        """True when the metric rises with size: rho > 0 and no break beyond the order spread;
        None when the ladder has fewer than two sizes (nothing to judge)."""
        if self.models < 2 or math.isnan(self.spearman):
            return None
        return self.spearman > 0 and not any(not b.within_noise for b in self.breaks)

    def text(self) -> str:
        rho = "n/a" if math.isnan(self.spearman) else f"{self.spearman:+.2f}"
        head = f"{self.kind} ladder ({self.models} models): Spearman rho({self.metric}, size) = {rho}"
        if not self.breaks:
            tail = "; rises with size at every step" if self.models > 1 else ""
        else:
            tail = "; falls at " + ", ".join(
                f"{b.smaller} → {b.larger} (−{100 * b.drop:.1f} pts{', within order spread' if b.within_noise else ''})"
                for b in self.breaks)
        if self.consistent is None:
            advice = "needs at least two models of different sizes to judge"
        elif self.consistent:
            advice = "consistent with the scaling law"
        else:
            advice = "NOT consistent with the scaling law: check the labels and the prompt"
        return f"{head}{tail} — {advice}"


@dataclass(frozen=True)
class ScalingReport:
    metric: Metric
    examples: int
    rows: tuple[ScalingRow, ...]
    verdicts: tuple[Verdict, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "examples": self.examples, "rows": [r.to_dict() for r in self.rows],
                "verdicts": [{"kind": v.kind, "metric": v.metric, "models": v.models,
                              "spearman": None if math.isnan(v.spearman) else v.spearman,
                              "breaks": [asdict(b) for b in v.breaks], "consistent": v.consistent,
                              "text": v.text()} for v in self.verdicts]}


def verdicts_for(rows: Sequence[ScalingRow], metric: Metric) -> tuple[Verdict, ...]:
    out = []
    for kind in ("base", "fine-tuned"):
        ladder = [r for r in rows if r.kind == kind]
        if not ladder:
            continue
        names = [r.name for r in ladder]
        sizes = [r.parameters for r in ladder]
        values = [r.stats[metric].mean for r in ladder]
        spreads = [r.stats[metric].std for r in ladder]
        out.append(Verdict(kind, metric, len(ladder), spearman(sizes, values),  # type: ignore[arg-type]
                           tuple(monotonicity_breaks(names, sizes, values, spreads))))
    return tuple(out)


def scaling_check(models: Sequence[str | Path], examples: Sequence[Example], *, metric: Metric = "precision",
                  device: str = "auto", progress: bool = True, engine: "Engine" = "auto",
                  n_threads: int | None = None) -> ScalingReport:
    """Evaluate each model (and each fine-tuned model's base) on ``examples``, all option orders; a GGUF
    under llama.cpp unless ``engine`` says otherwise (see :func:`corefbot.models.train.evaluate_gguf.pick_engine`)."""
    import gc

    from corefbot.models.train.evaluate import evaluate_decisions, load_model
    from corefbot.models.train.evaluate_gguf import evaluate_decisions_gguf, open_backend, pick_engine

    if not models:
        raise ValueError("scaling-check needs at least one model folder")
    if not examples:
        raise ValueError("scaling-check needs labelled examples")
    cache: dict[str, dict[str, Stat]] = {}

    def stats_of(path: Path) -> dict[str, Stat]:
        key = str(path.resolve())
        if key not in cache:
            log.info("evaluating %s on %d examples x 6 option orders", path, len(examples))
            if pick_engine(path, engine) == "llama":
                with open_backend(path, n_threads) as backend:
                    ev = evaluate_decisions_gguf(backend, examples, progress=progress)
            else:
                model, tok = load_model(path, device=device)
                ev = evaluate_decisions(model, tok, examples, progress=progress)
                del model
                gc.collect()
            cache[key] = {m: ev.stat(m) for m in ("precision", "recall", "f1")}
        return cache[key]

    rows = []
    for m in models:
        path = Path(m)
        base = _base_of(path, gguf=pick_engine(path, engine) == "llama")
        stats = stats_of(path)
        if base is None:
            rows.append(ScalingRow(path.name, str(path), "base", count_parameters(path), stats))
        else:
            bstats = stats_of(base)
            rows.append(ScalingRow(path.name, str(path), "fine-tuned", count_parameters(path), stats,
                                   base=base.name,
                                   improvement={k: stats[k].mean - bstats[k].mean for k in stats}))
    rows.sort(key=lambda r: (r.kind != "base", r.parameters, r.name))
    return ScalingReport(metric, len(examples), tuple(rows), verdicts_for(rows, metric))


def format_table(report: ScalingReport) -> str:
    """The paper's layout: one line per model, percentages, mean ± spread over option orders."""
    def pct(s: Stat) -> str:
        return f"{100 * s.mean:5.1f} ±{100 * s.std:4.1f}"

    lines = [f"{'model':<28} {'params':>10}  {'precision':>11}  {'recall':>11}  {'F1':>11}  {'ΔP':>6} {'ΔF1':>6}"]
    for r in report.rows:
        dp = f"{100 * r.improvement['precision']:+6.1f}" if r.improvement else f"{'':>6}"
        df = f"{100 * r.improvement['f1']:+6.1f}" if r.improvement else f"{'':>6}"
        lines.append(f"{r.name[:28]:<28} {_human(r.parameters):>10}  {pct(r.stats['precision'])}  "
                     f"{pct(r.stats['recall'])}  {pct(r.stats['f1'])}  {dp} {df}")
    lines.append(f"({report.examples} examples, each in all 6 option orders; ± is the spread over orders; "
                 "Δ is the improvement of a fine-tuned model over its base, in points)")
    lines += [v.text() for v in report.verdicts]
    return "\n".join(lines)


def _human(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def plot(report: ScalingReport, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, marker in (("base", "o"), ("fine-tuned", "s")):
        rows = sorted((r for r in report.rows if r.kind == kind), key=lambda r: r.parameters)
        if not rows:
            continue
        xs = [r.parameters for r in rows]
        ys = [100 * r.stats[report.metric].mean for r in rows]
        es = [100 * r.stats[report.metric].std for r in rows]
        ax.errorbar(xs, ys, yerr=es, marker=marker, capsize=3, label=kind)
        for r, x, y in zip(rows, xs, ys):
            ax.annotate(r.name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel(f"{report.metric} (%) — mean ± spread over option orders")
    ax.set_title("scaling-law check")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
