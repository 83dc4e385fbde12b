"""One training run folder: make it (``corefbot train``) and read it back.

load → split → (select) → train → evaluate → save, into a self-describing folder (config, manifest with the
data hash and split ids, metrics, the adapter); :func:`read_run` and :func:`run_split` read a finished one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from corefbot.models.train.finetune import (FinetuneConfig, FitResult, SelectMethod, file_sha256, save, subset,
                                            train_and_eval)
from corefbot.models.train.split import Split, split_examples
from corefbot.pipeline.records import Example


@dataclass(frozen=True)
class RunResult:
    out: Path
    metrics: dict[str, Any]
    fit: FitResult


def _data_list(data: str | Path | Sequence[str | Path]) -> list[Path]:
    paths = [Path(data)] if isinstance(data, (str, Path)) else [Path(d) for d in data]
    if not paths:
        raise ValueError("no data file given")
    return paths


def load_data(paths: Sequence[str | Path]) -> list[Example]:
    """The examples of several data files, in order; an id seen in two files is an error naming both."""
    from corefbot.pipeline.examples import load_examples

    examples: list[Example] = []
    where: dict[str, Path] = {}
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such data file")
        for e in load_examples(path):
            if e.id in where:
                raise ValueError(f"example id {e.id!r} is in both {where[e.id]} and {path}")
            where[e.id] = path
            examples.append(e)
    return examples


def run(base: str | Path, data_path: str | Path | Sequence[str | Path], out: str | Path, config: FinetuneConfig, *,
        select: SelectMethod | None = None, keep: float = 0.3, progress: bool = True) -> RunResult:
    """The whole ``corefbot train``: load → split → (select) → train → evaluate → save.

    ``base`` is a Hugging Face folder or a GGUF file (dequantized once and cached, see
    :mod:`corefbot.models.train.base`); ``data_path`` one data file or several (concatenated in order).
    """
    from corefbot.models.train.base import resolve_base

    out = Path(out)
    paths = _data_list(data_path)
    examples = load_data(paths)
    base_model = resolve_base(base)
    split = split_examples(examples, seed=config.split_seed, fractions=config.split_fractions,
                           unit=config.split_unit)  # type: ignore[arg-type]
    if not split.train:
        raise ValueError(f"{', '.join(map(str, paths))}: the train split is empty ({len(examples)} examples)")
    files = [{"path": str(p.resolve()), "sha256": file_sha256(p)} for p in paths]
    manifest: dict[str, Any] = {
        # "data" stays a single path for a single file (older readers); a list when there are several.
        "data": files[0]["path"] if len(files) == 1 else [f["path"] for f in files],
        "data_sha256": files[0]["sha256"] if len(files) == 1 else
        hashlib.sha256("\n".join(f["sha256"] for f in files).encode()).hexdigest(),
        "data_files": files,
        "examples": len(examples), "split": split.manifest(), "split_ids": split.ids(),
    }
    extra: dict[str, Any] = {"data": manifest["data"]}
    if base_model.gguf is not None:
        extra.update({"base_gguf": str(base_model.gguf), "base_gguf_sha256": base_model.gguf_sha256})
    base_dir = base_model.hf_dir
    selection_report: dict[str, Any] | None = None
    train = list(split.train)
    if select:
        from corefbot.models.train.selection import select_examples

        sel = select_examples(base_dir, split, config, method=select, keep=keep, out=out / "selection",
                              progress=progress)
        train = list(sel.kept)
        selection_report = sel.summary()
        extra.update({"select": select, "keep": keep})
    session, result, metrics, dropped = train_and_eval(base_dir, train, split, config, progress=progress)
    manifest["trained_on"] = {"examples": len(train), "dropped_too_long": dropped,
                              "ids_sha256": hashlib.sha256("\n".join(sorted(e.id for e in train)).encode()).hexdigest()}
    metrics["train"] = result.summary()
    metrics["parameters"] = {"total": session.parameters, "trainable": session.trainable}
    if selection_report is not None:
        from corefbot.models.train.selection import compare_to_full

        metrics["selection"] = compare_to_full(selection_report, metrics)
    if config.eval_base and session.accelerator.is_main_process:
        from corefbot.models.train.evaluate import evaluate, load_model

        bmodel, btok = load_model(base_dir, device=config.device, dtype=config.dtype)
        metrics["base_test"] = evaluate(bmodel, btok, subset(split.test, config.eval_max_examples),
                                        rewrites=config.eval_rewrites,
                                        max_new_tokens=config.rewrite_max_new_tokens, progress=progress)
        del bmodel
    if session.accelerator.is_main_process:
        save(session, out, fit_result=result, manifest=manifest, metrics=metrics, extra_config=extra)
    session.accelerator.wait_for_everyone()
    return RunResult(out, metrics, result)


def read_run(run_dir: str | Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(config, manifest, metrics) of a finished run folder; names the missing file."""
    import yaml

    run_dir = Path(run_dir)
    for name in ("config.yaml", "manifest.json", "metrics.json"):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir / name}: missing (not a finished finetune run folder)")
    return (yaml.safe_load((run_dir / "config.yaml").read_text()),
            json.loads((run_dir / "manifest.json").read_text()),
            json.loads((run_dir / "metrics.json").read_text()))


def run_split(run_dir: str | Path) -> tuple[Split, list[Example]]:
    """Rebuild a run's split from its data file and check it is the one recorded in the manifest."""
    config, manifest, _ = read_run(run_dir)
    cfg = FinetuneConfig.from_dict({k: v for k, v in config.items() if k in {f.name for f in dataclasses.fields(FinetuneConfig)}})
    examples = load_data(_data_list(manifest["data"]))
    split = split_examples(examples, seed=cfg.split_seed, fractions=cfg.split_fractions,
                           unit=cfg.split_unit)  # type: ignore[arg-type]
    if split.ids() != manifest["split_ids"]:
        raise ValueError(f"{manifest['data']}: the data changed since run {run_dir} (its split no longer matches)")
    return split, examples
