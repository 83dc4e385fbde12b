"""corefbot.models.ship.gguf: HF Qwen2 → GGUF conversion and llama.cpp quantization, checked against transformers."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

llama_cpp = pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")
np = pytest.importorskip("numpy")

from corefbot.models.ship.gguf import convert_hf_to_gguf, quantize  # noqa: E402
from corefbot.pipeline.prompt import build_prompt  # noqa: E402
from corefbot.pipeline.records import Turn  # noqa: E402

WINDOW = [
    Turn("u1", "mmpose 能部署到手机上吗？", 0.0),
    Turn("u2", "Can mmpose be deployed on mobile phones? I want to try it.", 10.0),
    Turn("u1", "试过了，安卓上可以", 20.0),
]
QUESTION = Turn("u3", "顺便问一下，它怎么部署到 TX2 上？", 30.0)


def _prompt() -> str:
    return build_prompt(WINDOW, QUESTION).chatml()


def _field(path: Path, key: str):
    return gguf.GGUFReader(path).fields[key].contents()


def _llama(path: Path, **kw):
    return llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_threads=2, verbose=False, **kw)


def _hf_last_logits(hf_dir: Path, ids: list[int]):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].numpy()


def _llama_last_logits(path: Path, ids: list[int]):
    llm = _llama(path, logits_all=True)
    try:
        llm.eval(ids)
        return np.array(llm.scores[len(ids) - 1])
    finally:
        llm.close()


@pytest.mark.parametrize("name,quant,ftype,weight_type", [
    ("tiny-q4_k_m.gguf", "q4_k_m", 15, "Q4_K"),
    ("tiny-q8_0.gguf", "q8_0", 7, "Q8_0"),
])
def test_quantized_ggufs_load_and_tokenize_chatml_like_hf(tiny_gguf: Path, tiny_hf: Path, name, quant, ftype,
                                                           weight_type):
    from transformers import AutoTokenizer

    path = tiny_gguf.parent / name
    assert path.is_file()
    assert _field(path, "general.architecture") == "qwen2"
    assert _field(path, "tokenizer.ggml.pre") == "qwen2"
    assert _field(path, "general.file_type") == ftype
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == weight_type

    hf_ids = AutoTokenizer.from_pretrained(tiny_hf)(_prompt())["input_ids"]
    llm = _llama(path)
    try:
        ids = llm.tokenize(_prompt().encode(), add_bos=False, special=True)
        assert ids == hf_ids  # same BPE, same pre-tokenizer split, ChatML markers as single tokens
        for marker in ("<|im_start|>", "<|im_end|>"):
            assert len(llm.tokenize(marker.encode(), add_bos=False, special=True)) == 1
        assert llm.detokenize(ids).decode() == _prompt().replace("<|im_start|>", "").replace("<|im_end|>", "")
        llm.eval(ids)  # the quantized weights run
    finally:
        llm.close()


def test_f32_conversion_matches_transformers(tiny_hf: Path, tmp_path: Path):
    path = convert_hf_to_gguf(tiny_hf, tmp_path / "tiny-f32.gguf", outtype="f32")
    assert _field(path, "general.file_type") == 0
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny_hf)(_prompt())["input_ids"]
    ref = _hf_last_logits(tiny_hf, ids)
    got = _llama_last_logits(path, ids)
    assert got.shape == ref.shape
    # llama.cpp keeps its KV cache in f16, hence not bit-exact
    assert np.abs(got - ref).max() < 0.02 * np.abs(ref).max()
    assert int(got.argmax()) == int(ref.argmax())


@pytest.mark.slow
def test_bf16_untied_checkpoint_converts(tiny_hf: Path, tmp_path: Path):
    """What real Qwen2.5 checkpoints look like: bf16 safetensors; the larger ones have an untied lm_head."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_hf)
    config.tie_word_embeddings = False
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config)
    base = AutoModelForCausalLM.from_pretrained(tiny_hf)
    state = {k: v for k, v in base.state_dict().items() if k != "lm_head.weight"}
    model.load_state_dict(state, strict=False)  # lm_head stays random: it must be read from lm_head.weight
    hf = tmp_path / "bf16"
    model.to(torch.bfloat16).save_pretrained(hf)
    for f in tiny_hf.iterdir():
        if f.name.startswith("tokenizer") or f.suffix == ".jinja":
            shutil.copy(f, hf / f.name)
    raw = (hf / "model.safetensors").read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}

    path = convert_hf_to_gguf(hf, tmp_path / "bf16.gguf", outtype="f32")
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert "output.weight" in names
    ids = AutoTokenizer.from_pretrained(hf)(_prompt())["input_ids"]
    ref, got = _hf_last_logits(hf, ids), _llama_last_logits(path, ids)
    assert np.abs(got - ref).max() < 0.02 * np.abs(ref).max()
    assert int(got.argmax()) == int(ref.argmax())


def test_refuses_a_tokenizer_that_is_not_qwen2(tiny_hf: Path, tmp_path: Path):
    hf = tmp_path / "other"
    shutil.copytree(tiny_hf, hf)
    tok_path = hf / "tokenizer.json"
    tok = json.loads(tok_path.read_text())
    tok["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\s+|\S+"
    tok_path.write_text(json.dumps(tok))
    with pytest.raises(ValueError, match=str(tok_path).replace("\\", "\\\\")):
        convert_hf_to_gguf(hf, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_conversion_errors_name_the_path(tiny_hf: Path, tmp_path: Path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        convert_hf_to_gguf(missing, tmp_path / "x.gguf")
    llama_like = tmp_path / "llama"
    shutil.copytree(tiny_hf, llama_like)
    cfg = json.loads((llama_like / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (llama_like / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"llama.*config\.json.*LlamaForCausalLM"):
        convert_hf_to_gguf(llama_like, tmp_path / "x.gguf")
    no_weights = tmp_path / "noweights"
    shutil.copytree(tiny_hf, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="noweights"):
        convert_hf_to_gguf(no_weights, tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="outtype"):
        convert_hf_to_gguf(tiny_hf, tmp_path / "x.gguf", outtype="q4")  # type: ignore[arg-type]


def test_quantize_errors_name_the_path(tiny_gguf: Path, tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        quantize(tmp_path / "missing.gguf", tmp_path / "out.gguf", "q8_0")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(ValueError, match="junk.gguf"):
        quantize(junk, tmp_path / "out.gguf", "q8_0")
    with pytest.raises(ValueError, match="q3_k"):
        quantize(tiny_gguf.parent / "tiny-f16.gguf", tmp_path / "out.gguf", "q3_k")  # type: ignore[arg-type]
    assert not (tmp_path / "out.gguf").exists()
