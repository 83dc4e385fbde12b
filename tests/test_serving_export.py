"""The model registry on real SQLite, and the whole way on CPU: labels → finetune a few steps →
evaluate → merge → GGUF → quantize → load in llama.cpp → decide, with the agreement check."""
from __future__ import annotations

from pathlib import Path

import pytest

from corefbot.models.ship import registry
from corefbot.models.ship.registry import RegistryError
from corefbot.pipeline.store import Store


def _gguf(tmp_path: Path, name: str) -> Path:
    p = tmp_path / name
    p.write_bytes(b"GGUF" + b"\0" * 16)
    return p


def test_registry_promote_history_rollback(store: Store, tmp_path: Path) -> None:
    assert registry.serving(store) is None
    with pytest.raises(RegistryError, match="nothing to roll back"):
        registry.rollback(store)
    v1 = registry.register(store, gguf_path=_gguf(tmp_path, "a.gguf"), metrics={"test_f1": 0.5}, quant="q4_k_m")
    assert v1.status == "candidate" and v1.f1 == 0.5 and v1.quant == "q4_k_m"
    assert registry.promote(store, v1.id).status == "serving"
    with pytest.raises(RegistryError, match="only one that ever served"):
        registry.rollback(store)
    v2 = registry.register(store, gguf_path=_gguf(tmp_path, "b.gguf"), metrics={"test_f1": 0.6}, status="serving")
    assert registry.serving(store).id == v2.id
    assert registry.get(store, v1.id).status == "retired"
    v3 = registry.register(store, gguf_path=_gguf(tmp_path, "c.gguf"))
    assert registry.set_status(store, v3.id, "rejected", note="F1 fell").status == "rejected"
    with pytest.raises(RegistryError, match="is serving"):
        registry.set_status(store, v2.id, "rejected")
    back = registry.rollback(store)
    assert back.id == v1.id and back.status == "serving"
    assert registry.get(store, v2.id).status == "rolled_back"
    assert [v.id for v in registry.history(store)] == [v3.id, v2.id, v1.id]
    assert sum(v.status == "serving" for v in registry.history(store)) == 1
    # A version whose file is gone cannot be promoted; the serving one stays.
    v4 = registry.register(store, gguf_path=tmp_path / "missing.gguf")
    with pytest.raises(RegistryError, match="missing"):
        registry.promote(store, v4.id)
    assert registry.serving(store).id == v1.id
    with pytest.raises(RegistryError, match="no model version 999"):
        registry.get(store, 999)


@pytest.mark.slow
def test_end_to_end_finetune_export_quantize_decide(tiny_hf: Path, tmp_path: Path, store: Store) -> None:
    from corefbot.models.train.finetune import load_preset
    from corefbot.models.train.run import run, run_split
    from corefbot.models.serve.llama import LlamaBackend
    from corefbot.models.ship.export import decision_agreement, export_gguf
    from tests.test_finetune import chat_examples, write_unified

    data = write_unified(tmp_path / "labels.jsonl", chat_examples(90, seed=3))
    config = load_preset("tiny", max_steps=4, eval_max_examples=12, eval_rewrites=False)
    result = run(tiny_hf, data, tmp_path / "run", config, progress=False)
    exported = export_gguf(result.out, "q4_k_m", store=store, max_examples=12, keep_intermediate=True)
    assert exported.gguf_path.is_file() and exported.gguf_path.read_bytes()[:4] == b"GGUF"
    assert exported.size_bytes < (tmp_path / "run" / "model-f16.gguf").stat().st_size
    a = exported.agreement
    split, _ = run_split(result.out)
    assert a.examples == min(12, len(split.test)) and 0.0 <= a.agreement <= 1.0 and 0.0 <= a.mean_abs_p_needs_diff <= 1.0
    # The unquantized GGUF decides as the merged HF model does: conversion and prompts line up.
    from corefbot.models.train.finetune import subset

    f16 = decision_agreement(result.out / "merged", result.out / "model-f16.gguf", subset(split.test, 12))
    assert f16.agreement >= (f16.examples - 1) / f16.examples and f16.mean_abs_p_needs_diff < 0.05
    # Registered as a candidate with the run's test metrics.
    version = registry.get(store, exported.version_id)
    assert version.status == "candidate" and version.quant == "q4_k_m"
    assert version.f1 == pytest.approx(result.metrics["test"]["decision"]["f1"]["mean"])
    assert version.metrics["agreement"] == a.agreement
    # Served by llama.cpp: a decision and per-option probabilities.
    ex = split.test[0]
    with LlamaBackend(exported.gguf_path, n_ctx=1024) as backend:
        res = backend.resolve(ex.window, ex.question, rewrite="never")
    assert res.decision in ("needs", "not_needed", "unknown")
    assert sum(res.probs.values()) == pytest.approx(1.0)
    assert (result.out / "export-q4_k_m.json").is_file()
