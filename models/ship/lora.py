"""The adapter route: a run's peft LoRA as a GGUF LoRA that llama.cpp applies to the untouched base GGUF.

Against the merge route (:mod:`corefbot.models.ship.export`: merge → f16 GGUF → quantize) this keeps
the base's own quantized weights (no second quantization of already-quantized weights), and a nightly
swap ships a few-megabyte file instead of a whole model.

The file is what llama.cpp's ``convert_lora_to_gguf.py`` writes, written here with the ``gguf``
package's ``GGUFWriter`` (that script ships in neither wheel and needs the base's HF config and
model classes): ``general.architecture`` = ``qwen2``, ``general.type`` = ``adapter``,
``adapter.type`` = ``lora``, ``adapter.lora.alpha`` (float32); for every adapted linear layer two
tensors named after the base tensor, ``<gguf name>.lora_a`` (numpy shape ``(r, in)``) and
``<gguf name>.lora_b`` (``(out, r)``), float32. llama.cpp scales by alpha / r (peft's scaling) times
the ``lora_scale`` given at load.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from corefbot.models.serve.llama import DECIDE_FILE, RUN_ADAPTER

log = logging.getLogger(__name__)


def _base_layers(adapter_dir: Path, base_config: Path | None) -> int:
    cfg_path = base_config
    if cfg_path is None:
        base = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
        cfg_path = Path(base) / "config.json" if base else None
    if cfg_path is None or not cfg_path.is_file():
        raise FileNotFoundError(f"{adapter_dir}: the base model's config.json is needed to name the layers "
                                f"({cfg_path or 'no base_model_name_or_path in adapter_config.json'})")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("model_type") not in ("qwen2",):
        raise ValueError(f"{cfg_path}: model type {cfg.get('model_type')!r} is not supported (qwen2 only)")
    return int(cfg["num_hidden_layers"])


def convert_lora_to_gguf(adapter_dir: str | Path, out_path: str | Path, *,
                         base_config: str | Path | None = None) -> Path:
    """Write the peft adapter in ``adapter_dir`` as a GGUF LoRA; returns the file."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    adapter_dir, out_path = Path(adapter_dir), Path(out_path)
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing (not a peft LoRA adapter folder)")
    lcfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    if lcfg.get("peft_type", "LORA") != "LORA" or lcfg.get("use_dora"):
        raise ValueError(f"{adapter_dir}: only plain LoRA adapters convert (peft_type {lcfg.get('peft_type')!r})")
    if lcfg.get("use_rslora"):
        raise ValueError(f"{adapter_dir}: rsLoRA scales by alpha/sqrt(r); llama.cpp assumes alpha/r")
    n_layers = _base_layers(adapter_dir, Path(base_config) if base_config else None)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, n_layers)
    tensors = load_file(str(weights))
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for name, value in tensors.items():
        if ".lora_A." in name:
            part = "a"
        elif ".lora_B." in name:
            part = "b"
        else:
            raise ValueError(f"{weights}: unexpected tensor {name!r} (not lora_A / lora_B; embeddings or a "
                             "trained head cannot be applied as a llama.cpp adapter)")
        base_name = (name.replace("base_model.model.", "", 1)
                     .replace(".lora_A.weight", ".weight").replace(".lora_B.weight", ".weight"))
        gguf_name = name_map.get_name(base_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"{weights}: tensor {name!r} has no GGUF name for architecture qwen2")
        pairs.setdefault(gguf_name, {})[part] = value.astype(np.float32)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + f".tmp{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN2])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(lcfg["lora_alpha"]))
    for gguf_name in sorted(pairs):
        pair = pairs[gguf_name]
        if set(pair) != {"a", "b"}:
            raise ValueError(f"{weights}: {gguf_name} has lora_{''.join(pair)} without its partner")
        a, b = pair["a"], pair["b"]
        if a.shape[0] != b.shape[1]:
            raise ValueError(f"{weights}: {gguf_name} ranks differ (A {a.shape}, B {b.shape})")
        writer.add_tensor(f"{gguf_name}.lora_a", np.ascontiguousarray(a))
        writer.add_tensor(f"{gguf_name}.lora_b", np.ascontiguousarray(b))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out_path)
    log.info("wrote GGUF LoRA %s (%d adapted tensors, alpha %s)", out_path, len(pairs), lcfg["lora_alpha"])
    return out_path


def export_lora(run_dir: str | Path, *, max_examples: int | None = 200, n_threads: int | None = None,
                progress: bool = False) -> tuple[Path, Any]:
    """``RUN_DIR/adapter.gguf`` from the run's adapter, and the decision agreement of the served pair
    (base GGUF + adapter in llama.cpp) with the HF model (base + peft adapter) on the run's test split
    (``max_examples`` of it; 0 or None skips the check). On the same examples it measures both ways the
    served pair can decide (letters, its own rewrite) and writes the better to ``RUN_DIR/decide.json``,
    which ``COREFBOT_DECIDE_BY=auto`` serves. Writes ``RUN_DIR/export-lora.json``."""
    import time

    from corefbot.models.ship.export import decision_agreement
    from corefbot.models.train.base import resolve_base
    from corefbot.models.train.finetune import subset
    from corefbot.models.train.run import read_run, run_split

    run_dir = Path(run_dir)
    config, _, _ = read_run(run_dir)
    if not config.get("base_gguf"):
        raise ValueError(f"{run_dir}: trained from a Hugging Face folder ({config['base']}), not a GGUF: the adapter "
                         "route needs the base GGUF it will be applied to; use export-gguf (merge) instead")
    base_cfg = Path(config["base"]) / "config.json"
    if not base_cfg.is_file():  # the cached conversion was deleted: its config comes back with it
        base_cfg = resolve_base(config["base_gguf"]).hf_dir / "config.json"
    start = time.perf_counter()
    out = convert_lora_to_gguf(run_dir / "adapter", run_dir / RUN_ADAPTER, base_config=base_cfg)
    seconds = {"convert": time.perf_counter() - start}
    agreement, decide = None, None
    (run_dir / DECIDE_FILE).unlink(missing_ok=True)  # measured for the adapter this replaces
    if max_examples:
        from corefbot.models.serve.llama import served_model
        from corefbot.models.train.evaluate_gguf import measure_decide_modes

        served = served_model(run_dir, "adapter")  # what the bot will load for this run folder
        split, _ = run_split(run_dir)
        test = subset(split.test, max_examples)
        start = time.perf_counter()
        agreement = decision_agreement(run_dir, served.gguf, test,
                                       lora_path=served.lora, n_threads=n_threads, progress=progress)
        seconds["agreement"] = time.perf_counter() - start
        start = time.perf_counter()
        decide = measure_decide_modes(run_dir, test, route="adapter", n_threads=n_threads, progress=progress)
        seconds["decide"] = time.perf_counter() - start
        (run_dir / DECIDE_FILE).write_text(json.dumps(decide, indent=2))
    (run_dir / "export-lora.json").write_text(json.dumps(
        {"adapter": str(out), "base_gguf": config["base_gguf"], "size_bytes": out.stat().st_size,
         "agreement": agreement.summary() if agreement else None, "decide": decide, "seconds": seconds}, indent=2))
    return out, agreement
