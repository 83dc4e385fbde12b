"""The adapter route: a run trained from a GGUF base, its LoRA written as a GGUF LoRA, loaded by llama.cpp on
the untouched base GGUF; a run folder as the model name everywhere."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_finetune import chat_examples, write_unified

pytest.importorskip("peft")
pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def gguf_run(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short run from the tiny Q4_K_M GGUF, with a learning rate high enough to move the decisions."""
    import os

    from corefbot.models.train.finetune import load_preset
    from corefbot.models.train.run import run

    tmp = tmp_path_factory.mktemp("gguf_run")
    old = os.environ.get("COREFBOT_CACHE_DIR")
    os.environ["COREFBOT_CACHE_DIR"] = str(tmp / "cache")
    try:
        data = write_unified(tmp / "labels.jsonl", chat_examples(90, seed=3))
        config = load_preset("tiny", max_steps=6, learning_rate=5e-3, eval_max_examples=6, eval_rewrites=False)
        return run(tiny_gguf, data, tmp / "run", config, progress=False).out
    finally:
        if old is None:
            os.environ.pop("COREFBOT_CACHE_DIR", None)
        else:
            os.environ["COREFBOT_CACHE_DIR"] = old


def test_adapter_gguf_has_llama_cpp_names_and_metadata(gguf_run: Path) -> None:
    import gguf
    from safetensors.numpy import load_file

    from corefbot.models.ship.lora import convert_lora_to_gguf
    from corefbot.models.train.run import read_run

    cfg, _, _ = read_run(gguf_run)
    out = convert_lora_to_gguf(gguf_run / "adapter", gguf_run / "check.gguf", base_config=Path(cfg["base"]) / "config.json")
    reader = gguf.GGUFReader(out)
    fields = {k: reader.fields[k] for k in ("general.architecture", "general.type", "adapter.type", "adapter.lora.alpha")}
    text = {k: bytes(f.parts[f.data[0]]).decode() for k, f in fields.items() if k != "adapter.lora.alpha"}
    assert text == {"general.architecture": "qwen2", "general.type": "adapter", "adapter.type": "lora"}
    assert float(fields["adapter.lora.alpha"].parts[-1][0]) == cfg["lora_alpha"]
    names = {t.name: t for t in reader.tensors}
    # Every adapted linear layer of both blocks, under llama.cpp's base tensor names.
    for blk in (0, 1):
        for base in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            assert f"blk.{blk}.{base}.weight.lora_a" in names and f"blk.{blk}.{base}.weight.lora_b" in names
    peft = load_file(str(gguf_run / "adapter" / "adapter_model.safetensors"))
    a = peft["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = peft["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    # ggml's shapes are numpy's reversed: lora_a is [in, r], lora_b [r, out].
    assert list(names["blk.0.attn_q.weight.lora_a"].shape) == [a.shape[1], a.shape[0]]
    assert list(names["blk.0.attn_q.weight.lora_b"].shape) == [b.shape[1], b.shape[0]]
    assert len(names) == 2 * len([k for k in peft if ".lora_A." in k])


def test_adapter_in_llama_cpp_decides_like_the_hf_model(gguf_run: Path) -> None:
    """The served pair (base GGUF + GGUF LoRA) against the HF model (the same dequantized base + the peft
    adapter): the adapter must be applied (the decisions' probabilities move toward the HF model's)."""
    from corefbot.models.ship.export import decision_agreement
    from corefbot.models.ship.lora import export_lora
    from corefbot.models.train.finetune import subset
    from corefbot.models.train.run import read_run, run_split

    out, agreement = export_lora(gguf_run, max_examples=12)
    cfg, _, _ = read_run(gguf_run)
    split, _ = run_split(gguf_run)
    assert out == gguf_run / "adapter.gguf" and agreement is not None
    assert agreement.examples == min(12, len(split.test)) >= 8
    without = decision_agreement(gguf_run, cfg["base_gguf"], subset(split.test, 12))  # adapter not applied
    assert agreement.mean_abs_p_needs_diff < without.mean_abs_p_needs_diff
    assert agreement.agreement >= 0.75
    assert (gguf_run / "export-lora.json").is_file()


def test_a_run_folder_decides_as_measured(gguf_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """export-lora measures both decide modes of the served pair on the test split and writes the one to serve
    to decide.json (the letters unless the rewrite is better beyond chance); COREFBOT_DECIDE_BY=auto (the
    backend's default) serves it, an explicit mode overrides it, and a measurement of another route or an
    unreadable file leaves the letters."""
    import json

    from corefbot.cli import main
    from corefbot.models.serve.llama import LlamaBackend, served_model
    from corefbot.pipeline.records import Turn

    path = gguf_run / "decide.json"
    assert main(["export-lora", str(gguf_run), "--max-examples", "12", "--threads", "2"]) == 0
    measured = json.loads(path.read_text())
    printed = capsys.readouterr().out
    assert f"decide by    the {measured['decide_by']} (" in printed
    assert f"McNemar p {measured['mcnemar']['p']:.2g}" in printed
    assert measured["route"] == "adapter" and measured["examples"] >= 8  # the test split, up to 12
    # The rewrite is served only where it decides better and not by chance (McNemar on the disagreements).
    p = measured["mcnemar"]["p"]
    assert 0 < p <= 1
    assert measured["decide_by"] == ("rewrite" if measured["rewrite"]["mcc"] > measured["letter"]["mcc"] and p < 0.05
                                     else "letter")
    assert served_model(gguf_run).decide_by == measured["decide_by"]
    # A cut on p(needs) is kept only where it beat the likeliest letter out of sample.
    cut = measured["letter_threshold"]
    assert (cut is None and measured["letter"] == measured["letter_argmax"]) or (
        0 < cut < 1 and measured["letter"]["mcc"] > measured["letter_argmax"]["mcc"])
    assert served_model(gguf_run).needs_threshold == cut
    try:
        path.write_text(json.dumps({**measured, "decide_by": "rewrite"}))
        assert served_model(gguf_run).decide_mode() == "rewrite"
        with LlamaBackend(gguf_run, n_threads=1) as backend:
            assert backend.decide_by == "rewrite"
        with LlamaBackend(gguf_run, n_threads=1, decide_by="letter") as backend:
            assert backend.decide_by == "letter"
        # The letter with the run's cut: "needs" exactly when p(needs) reaches it.
        window = [Turn("a", "mmpose is great", 1.0), Turn("b", "which version?", 2.0)]
        question = Turn("c", "how to deploy it?", 3.0)
        for cut, needs in ((1e-9, True), (1 - 1e-9, False)):  # below the cut: the likelier of the other two
            path.write_text(json.dumps({**measured, "decide_by": "letter", "letter_threshold": cut}))
            with LlamaBackend(gguf_run, n_threads=1) as backend:
                assert backend.needs_threshold == cut
                assert (backend.resolve(window, question, rewrite="never").decision == "needs") == needs
        path.write_text(json.dumps({**measured, "decide_by": "letter", "letter_threshold": 2}))
        assert served_model(gguf_run).needs_threshold is None  # not a probability: the likeliest letter
        path.write_text(json.dumps({**measured, "decide_by": "rewrite", "route": "merged"}))
        assert served_model(gguf_run).decide_by is None
        path.write_text("{not json")
        assert served_model(gguf_run).decide_by is None
        assert served_model(gguf_run).decide_mode() == "letter"  # nothing measured: the letter
        assert served_model(gguf_run).decide_mode("rewrite") == "rewrite"
    finally:
        path.write_text(json.dumps(measured))


def test_run_folder_is_a_model_name_everywhere(gguf_run: Path, tiny_gguf: Path, store) -> None:
    from corefbot.models.serve.llama import LlamaBackend, served_model
    from corefbot.models.serve.resolver import load_resolver
    from corefbot.models.ship import registry
    from corefbot.models.ship.lora import export_lora
    from corefbot.pipeline.records import Turn

    if not (gguf_run / "adapter.gguf").is_file():
        export_lora(gguf_run, max_examples=0)
    served = served_model(gguf_run)
    assert served.route == "adapter" and served.lora == gguf_run / "adapter.gguf"
    assert served.gguf == tiny_gguf.resolve()
    assert served_model(tiny_gguf).lora is None
    with pytest.raises(FileNotFoundError, match="export-gguf"):
        served_model(gguf_run, "merged")
    with LlamaBackend(gguf_run, n_threads=1) as backend:
        assert backend.lora_path == gguf_run / "adapter.gguf" and backend.model_path == gguf_run
        res = backend.resolve([Turn("a", "mmpose on TX2?", 0.0)], Turn("b", "how to deploy it?", 1.0))
        assert res.decision in ("needs", "not_needed", "unknown")
    resolver = load_resolver("llama-cpp", model_path=str(gguf_run), gate=False)
    try:
        assert resolver.backend.lora_path == gguf_run / "adapter.gguf"
    finally:
        resolver.close()
    version = registry.register(store, gguf_path=gguf_run, status="serving")
    assert version.status == "serving"
    bare = gguf_run.parent / "not-a-run"
    bare.mkdir()
    with pytest.raises(FileNotFoundError, match="not a finetune run folder"):
        served_model(bare)
    bad = registry.register(store, gguf_path=bare)
    with pytest.raises(registry.RegistryError, match="not a finetune run folder"):
        registry.promote(store, bad.id)


def test_a_run_folder_in_a_llama_ladder_is_measured_as_served(gguf_run: Path, tiny_gguf: Path) -> None:
    """scaling-check --engine llama: the run folder is its base GGUF + adapter.gguf, its improvement is over
    that base GGUF (not the float folder it was trained on)."""
    from corefbot.models.ship.lora import export_lora
    from corefbot.models.train.scaling import scaling_check
    from tests.test_finetune import chat_examples

    if not (gguf_run / "adapter.gguf").is_file():
        export_lora(gguf_run, max_examples=0)
    report = scaling_check([tiny_gguf, gguf_run], chat_examples(4), engine="llama", n_threads=1, progress=False)
    base, tuned = report.rows
    assert (base.kind, base.path, tuned.kind, tuned.base) == ("base", str(tiny_gguf), "fine-tuned", tiny_gguf.name)
    assert tuned.improvement["f1"] == pytest.approx(tuned.stats["f1"].mean - base.stats["f1"].mean)


def test_an_averaged_run_serves_like_its_runs(gguf_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`corefbot average` of a run with itself is that run again, through the whole route: the new folder
    converts with export-lora and llama.cpp decides every test question with the same probabilities."""
    from corefbot.cli import main
    from corefbot.models.serve.llama import LlamaBackend
    from corefbot.models.ship.lora import export_lora
    from corefbot.models.train.finetune import subset
    from corefbot.models.train.run import run_split

    out = tmp_path / "avg"
    assert main(["average", str(gguf_run), str(gguf_run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"averaged     2 runs into {out} (cut from rank" in printed and f"export-lora {out}" in printed
    assert main(["average", str(gguf_run), str(gguf_run), "--out", str(out)]) == 2  # never overwrites
    assert "already exists" in capsys.readouterr().err
    if not (gguf_run / "adapter.gguf").is_file():
        export_lora(gguf_run, max_examples=0)
    _, agreement = export_lora(out, max_examples=8)
    assert agreement is not None and agreement.agreement >= 0.75
    split, _ = run_split(out)  # the last run's split, still matching its data
    questions = subset(split.test, 8)
    with LlamaBackend(gguf_run, n_threads=1, decide_by="letter") as original, \
            LlamaBackend(out, n_threads=1, decide_by="letter") as averaged:
        for e in questions:
            a = original.resolve(e.window, e.question, rewrite="never")
            b = averaged.resolve(e.window, e.question, rewrite="never")
            assert b.probs == pytest.approx(a.probs, abs=2e-3)
