"""Averaging runs' LoRA adapters (``corefbot average``): the average is of the updates B·A, cut to a rank by SVD."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import load_file, save_file  # noqa: E402

from corefbot.models.ship.average import average_runs  # noqa: E402

LAYERS = ("base_model.model.model.layers.0.self_attn.q_proj", "base_model.model.model.layers.0.mlp.down_proj")
SHAPES = {LAYERS[0]: (12, 12), LAYERS[1]: (12, 20)}  # (out, in)


def fake_run(path: Path, *, r: int, alpha: float, seed: int, base: str = "sha-of-base",
             a_from: dict[str, torch.Tensor] | None = None) -> Path:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer, (out, inn) in SHAPES.items():
        a = a_from[layer] if a_from else torch.randn(r, inn, generator=g)
        tensors[f"{layer}.lora_A.weight"] = a
        tensors[f"{layer}.lora_B.weight"] = torch.randn(out, r, generator=g)
    (path / "adapter").mkdir(parents=True)
    save_file(tensors, str(path / "adapter" / "adapter_model.safetensors"))
    (path / "adapter" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["q_proj", "down_proj"],
         "layers_to_transform": [0]}))
    (path / "config.yaml").write_text(f"base_gguf_sha256: {base}\nlora_r: {r}\n")
    (path / "manifest.json").write_text(json.dumps({"from": path.name}))
    (path / "metrics.json").write_text(json.dumps({"test": "of this run only"}))
    return path


def delta(run: Path, layer: str) -> torch.Tensor:
    cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    t = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    return cfg["lora_alpha"] / cfg["r"] * t[f"{layer}.lora_B.weight"].double() @ t[f"{layer}.lora_A.weight"].double()


def test_exact_average_is_the_mean_of_the_updates(tmp_path: Path) -> None:
    a = fake_run(tmp_path / "a", r=4, alpha=8, seed=1)
    b = fake_run(tmp_path / "b", r=4, alpha=4, seed=2)  # another scaling: folded into B, not averaged as factors
    res = average_runs([a, b], tmp_path / "avg", rank=0)
    assert (res.rank, res.stacked_rank, res.kept_energy_min) == (8, 8, 1.0)
    for layer in LAYERS:
        want = (delta(a, layer) + delta(b, layer)) / 2
        assert torch.allclose(delta(tmp_path / "avg", layer), want, atol=1e-4)
        # Averaging the factors one by one would be a different (wrong) adapter.
        ta, tb = (load_file(str(p / "adapter" / "adapter_model.safetensors")) for p in (a, b))
        naive = ((ta[f"{layer}.lora_B.weight"] * 2 + tb[f"{layer}.lora_B.weight"]) / 2).double() @ \
            ((ta[f"{layer}.lora_A.weight"] + tb[f"{layer}.lora_A.weight"]) / 2).double()
        assert not torch.allclose(naive, want, atol=1e-2)
    # The average keeps the last run's scaling (alpha / r = 2 for a), so at the runs' rank the preset that
    # trained them can continue it; the update is the same.
    average_runs([b, a], tmp_path / "avg2", rank=0)
    cfg = json.loads((tmp_path / "avg2" / "adapter" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"]) == (8, 16)
    for layer in LAYERS:
        assert torch.allclose(delta(tmp_path / "avg2", layer), (delta(a, layer) + delta(b, layer)) / 2, atol=1e-4)
    # The last run's folder, its own figures left out; the record names the runs.
    assert json.loads((tmp_path / "avg" / "manifest.json").read_text()) == {"from": "b"}
    metrics = json.loads((tmp_path / "avg" / "metrics.json").read_text())
    assert "test" not in metrics and metrics["average"]["runs"] == [str(a.resolve()), str(b.resolve())]


def test_the_rank_cut_is_the_best_approximation_and_lossless_when_it_can_be(tmp_path: Path) -> None:
    a = fake_run(tmp_path / "a", r=4, alpha=4, seed=1)
    b = fake_run(tmp_path / "b", r=4, alpha=4, seed=2)
    res = average_runs([a, b], tmp_path / "avg")  # default: the runs' rank, 4 of the stacked 8
    assert (res.rank, res.stacked_rank) == (4, 8) and res.kept_energy_min < 1.0
    for layer in LAYERS:
        full = (delta(a, layer) + delta(b, layer)) / 2
        u, s, vh = torch.linalg.svd(full)
        best = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]
        assert torch.allclose(delta(tmp_path / "avg", layer), best, atol=1e-4)
    assert json.loads((tmp_path / "avg" / "adapter" / "adapter_config.json").read_text())["r"] == 4

    # Two sittings that only moved B share their A: the average has their rank, and the cut loses nothing.
    shared = load_file(str(a / "adapter" / "adapter_model.safetensors"))
    a_of = {layer: shared[f"{layer}.lora_A.weight"] for layer in LAYERS}
    c = fake_run(tmp_path / "c", r=4, alpha=4, seed=3, a_from=a_of)
    res = average_runs([a, c], tmp_path / "avg2")
    assert res.kept_energy_min == pytest.approx(1.0)
    for layer in LAYERS:
        assert torch.allclose(delta(tmp_path / "avg2", layer), (delta(a, layer) + delta(c, layer)) / 2, atol=1e-4)


def test_runs_that_cannot_be_averaged_are_named(tmp_path: Path) -> None:
    a = fake_run(tmp_path / "a", r=4, alpha=4, seed=1)
    other_base = fake_run(tmp_path / "b", r=4, alpha=4, seed=2, base="another-base")
    with pytest.raises(ValueError, match="different bases"):
        average_runs([a, other_base], tmp_path / "x")
    with pytest.raises(ValueError, match="at least two"):
        average_runs([a], tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        average_runs([a, tmp_path], tmp_path / "x")
    c = fake_run(tmp_path / "c", r=4, alpha=4, seed=3)
    weights = c / "adapter" / "adapter_model.safetensors"
    save_file({k.replace("layers.0.", "layers.1."): v for k, v in load_file(str(weights)).items()}, str(weights))
    with pytest.raises(ValueError, match="other modules or layers .*layers.1"):
        average_runs([a, c], tmp_path / "x")
    with pytest.raises(ValueError, match="rank 9"):
        average_runs([a, fake_run(tmp_path / "d", r=4, alpha=4, seed=4)], tmp_path / "x", rank=9)
    with pytest.raises(ValueError, match="above .*smaller side"):  # the exact average of 4 rank-4 runs, 12 rows
        average_runs([a, tmp_path / "d", fake_run(tmp_path / "e", r=4, alpha=4, seed=5),
                      fake_run(tmp_path / "f", r=4, alpha=4, seed=6)], tmp_path / "x", rank=0)
    with pytest.raises(ValueError, match="already exists"):
        average_runs([a, tmp_path / "d"], tmp_path / "a")
    assert not (tmp_path / "x").exists()  # nothing half-written


def test_layers_listed_one_by_one_and_every_layer_are_the_same_adapter(tmp_path: Path) -> None:
    # `--lora-layers 24` on a 24-layer model saved [0 … 23]; the preset saves None (every layer): the same tensors.
    listed = fake_run(tmp_path / "listed", r=4, alpha=8, seed=1)
    every = fake_run(tmp_path / "every", r=4, alpha=8, seed=2)
    cfg = json.loads((every / "adapter" / "adapter_config.json").read_text())
    (every / "adapter" / "adapter_config.json").write_text(json.dumps(dict(cfg, layers_to_transform=None)))
    out = average_runs([listed, every], tmp_path / "avg", rank=0).out
    for layer in LAYERS:
        want = (delta(listed, layer) + delta(every, layer)) / 2
        assert torch.allclose(delta(out, layer), want, atol=1e-5)
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["layers_to_transform"] is None
