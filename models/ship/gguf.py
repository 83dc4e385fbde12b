"""HF Qwen2 checkpoint → GGUF, and GGUF quantization with llama.cpp's own quantizer.

Why a writer of our own rather than llama.cpp's ``convert_hf_to_gguf.py``: that script ships in neither
the ``gguf`` nor the ``llama-cpp-python`` wheel, the copy in the sdist expects a newer ``gguf`` than the
one we pin, and it refuses any tokenizer whose pre-tokenizer hash it has not seen (every locally trained
test tokenizer). For the one architecture corefbot serves (Qwen2 / Qwen2.5, ``Qwen2ForCausalLM``) the
conversion is small and is done here the way the reference converter does it: tensor names from
``gguf``'s own ``TensorNameMap``, 2-D weights in F16 and 1-D tensors (norms, q/k/v biases) in F32, a
``gpt2`` BPE vocabulary with ``[PADn]`` filler up to ``vocab_size``, merges, special tokens and the chat
template via ``gguf.SpecialVocab``. The pre-tokenizer is declared ``qwen2`` only after checking that the
tokenizer's split regex *is* Qwen2's; anything else is refused with the path and the regex.

Safetensors are read with a small reader of our own (memory-mapped, F32/F16/BF16) so that neither
torch nor a full copy of the weights is needed, and tensors are streamed to the output one at a time.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

OutType = Literal["f16", "f32"]
Quant = Literal["q4_k_m", "q8_0"]
QUANTS: tuple[Quant, ...] = ("q4_k_m", "q8_0")

# Qwen2's pre-tokenizer split (tokenizer.json of every Qwen2/Qwen2.5 checkpoint, and corefbot.models.train.tiny's).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM",)

_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "uint16"}  # numpy dtype names


@dataclass(frozen=True, slots=True)
class _StTensor:
    file: Path
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


def _safetensors_index(hf_dir: Path) -> dict[str, _StTensor]:
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        if list(hf_dir.glob("*.bin")):
            raise ValueError(f"{hf_dir}: only PyTorch .bin weights found; re-save the model with safetensors")
        raise FileNotFoundError(f"{hf_dir}: no *.safetensors weights")
    index: dict[str, _StTensor] = {}
    for path in files:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError(f"{path}: truncated safetensors file")
            (n,) = struct.unpack("<Q", raw)
            try:
                header = json.loads(f.read(n))
            except ValueError as exc:
                raise ValueError(f"{path}: corrupt safetensors header ({exc})") from exc
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in _ST_DTYPES:
                raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
            b, e = info["data_offsets"]
            index[name] = _StTensor(path, name, info["dtype"], tuple(info["shape"]), 8 + n + b, 8 + n + e)
    return index


def _load_f32(t: _StTensor) -> "np.ndarray":
    import numpy as np

    count = int(np.prod(t.shape)) if t.shape else 1
    raw = np.memmap(t.file, dtype=_ST_DTYPES[t.dtype], mode="r", offset=t.begin, shape=(count,))
    if t.dtype == "BF16":  # bf16 is the top half of an f32
        out = (raw.astype(np.uint32) << 16).view(np.float32)
    else:
        out = np.asarray(raw, dtype=np.float32)
    return out.reshape(t.shape)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


def _check_pre_tokenizer(tok_path: Path, tokenizer: dict[str, Any]) -> None:
    """Refuse a tokenizer whose split is not Qwen2's: llama.cpp would silently tokenize it differently."""
    pre = tokenizer.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    splits = [p.get("pattern", {}).get("Regex") for p in parts if p.get("type") == "Split"]
    byte_level = [p for p in parts if p.get("type") == "ByteLevel"]
    if splits != [QWEN2_SPLIT] or not byte_level:
        raise ValueError(
            f"{tok_path}: pre-tokenizer is not Qwen2's byte-level split (found split regex {splits!r}); "
            "only Qwen2-style tokenizers can be declared 'qwen2' to llama.cpp"
        )


def _vocab(hf_dir: Path, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and types, as llama.cpp's converter builds them for a gpt2-style BPE."""
    import gguf

    tok_path = hf_dir / "tokenizer.json"
    tokenizer = _read_json(tok_path)
    model = tokenizer.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"{tok_path}: tokenizer model is {model.get('type')!r}, expected BPE")
    _check_pre_tokenizer(tok_path, tokenizer)
    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in tokenizer.get("added_tokens", [])}
    for i, a in added.items():
        by_id[i] = a["content"]
    if max(by_id) >= vocab_size:
        raise ValueError(f"{tok_path}: token id {max(by_id)} does not fit the model's vocab_size {vocab_size}")
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            control = added[i].get("special") or _looks_special(by_id[i])
            types.append(gguf.TokenType.CONTROL if control else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _looks_special(token: str) -> bool:
    """llama.cpp's converter treats these added tokens as control tokens even when not marked special."""
    return (token in ("<pad>", "<mask>") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _rope(writer: Any, config: dict[str, Any], cfg_path: Path) -> None:
    import gguf

    # transformers ≥5 writes rope settings under "rope_parameters"; older checkpoints at the top level.
    params = dict(config.get("rope_parameters") or {})
    theta = params.get("rope_theta", config.get("rope_theta", 1_000_000.0))
    writer.add_rope_freq_base(float(theta))
    scaling = config.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if not scaling:
        return
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return
    if kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
    elif kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    else:
        raise ValueError(f"{cfg_path}: rope scaling {kind!r} is not supported by this converter")


def _tensor_plan(index: dict[str, _StTensor], n_layers: int, tied: bool, outtype: OutType,
                 hf_dir: Path) -> Iterator[tuple[str, _StTensor, Any]]:
    import gguf

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, n_layers)
    for name in sorted(index, key=_hf_order):
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if name == "lm_head.weight" and tied:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        new = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ValueError(f"{hf_dir}: tensor {name!r} has no GGUF name for architecture qwen2")
        t = index[name]
        ftype = gguf.GGMLQuantizationType.F32
        if outtype == "f16" and len(t.shape) == 2:
            ftype = gguf.GGMLQuantizationType.F16
        yield new, t, ftype


def _hf_order(name: str) -> tuple[int, int, str]:
    """Embeddings first, then layers in numeric order, then the final norm and head (as HF writes them)."""
    if name.startswith("model.layers."):
        return (1, int(name.split(".")[2]), name)
    return (0 if "embed_tokens" in name else 2, 0, name)


def convert_hf_to_gguf(hf_dir: str | Path, out_path: str | Path, outtype: OutType = "f16") -> Path:
    """Write ``hf_dir`` (a Qwen2ForCausalLM checkpoint in safetensors) as one GGUF file at ``out_path``.

    Raises ``FileNotFoundError`` / ``ValueError`` naming the file or key that is wrong. The output is
    written to a temporary name and renamed, so a crash never leaves a truncated GGUF behind.
    """
    import gguf
    import numpy as np
    from tqdm import tqdm

    if outtype not in ("f16", "f32"):
        raise ValueError(f"outtype must be 'f16' or 'f32', not {outtype!r}")
    hf = Path(hf_dir)
    if not hf.is_dir():
        raise FileNotFoundError(f"HF model directory not found: {hf}")
    cfg_path = hf / "config.json"
    config = _read_json(cfg_path)
    archs = config.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ValueError(f"{cfg_path}: architectures {archs!r} not supported (only {SUPPORTED_ARCHITECTURES})")
    try:
        n_layers = int(config["num_hidden_layers"])
        hidden = int(config["hidden_size"])
        n_head = int(config["num_attention_heads"])
        n_kv = int(config.get("num_key_value_heads", n_head))
        n_ff = int(config["intermediate_size"])
        vocab_size = int(config["vocab_size"])
    except KeyError as exc:
        raise ValueError(f"{cfg_path}: missing key {exc.args[0]!r}") from exc
    tied = bool(config.get("tie_word_embeddings", False))
    index = _safetensors_index(hf)
    if not tied and "lm_head.weight" not in index:
        raise ValueError(f"{hf}: tie_word_embeddings is false but there is no lm_head.weight")
    tokens, types = _vocab(hf, vocab_size)

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN2])
    try:
        writer.add_name(hf.name)
        writer.add_context_length(int(config.get("max_position_embeddings", 32768)))
        writer.add_embedding_length(hidden)
        writer.add_block_count(n_layers)
        writer.add_feed_forward_length(n_ff)
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_kv)
        writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
        _rope(writer, config, cfg_path)
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if outtype == "f16" else gguf.LlamaFileType.ALL_F32)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("qwen2")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(hf, load_merges=True, n_vocab=vocab_size)
        if not special.merges:
            raise ValueError(f"{hf / 'tokenizer.json'}: no BPE merges")
        # Qwen never prepends a BOS; say so explicitly rather than rely on llama.cpp's default.
        special.add_special_token.setdefault("bos", False)
        special.add_to_gguf(writer, quiet=True)

        plan = list(_tensor_plan(index, n_layers, tied, outtype, hf))
        for new, t, ftype in plan:
            dtype = np.float16 if ftype == gguf.GGMLQuantizationType.F16 else np.float32
            nbytes = int(np.prod(t.shape)) * np.dtype(dtype).itemsize
            writer.add_tensor_info(new, t.shape, np.dtype(dtype), nbytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for new, t, ftype in tqdm(plan, desc=f"GGUF {out.name}", unit="tensor", leave=False):
            data = _load_f32(t)
            writer.write_tensor_data(data.astype(np.float16) if ftype == gguf.GGMLQuantizationType.F16 else data)
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    log.info("wrote %s (%d tensors, %s) from %s", out, len(plan), outtype, hf)
    return out


_FTYPES: dict[str, str] = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0"}


def quantize(src: str | Path, dst: str | Path, quant: Quant, *, n_threads: int | None = None) -> Path:
    """Quantize a GGUF with llama.cpp's quantizer (``llama_model_quantize``)."""
    import llama_cpp

    if quant not in _FTYPES:
        raise ValueError(f"unknown quantization {quant!r}; choose one of {', '.join(QUANTS)}")
    src_p, dst_p = Path(src), Path(dst)
    if not src_p.is_file():
        raise FileNotFoundError(f"GGUF to quantize not found: {src_p}")
    with open(src_p, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{src_p} is not a GGUF file (bad magic)")
    dst_p.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst_p.with_name(dst_p.name + ".part")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, _FTYPES[quant])
    params.nthread = n_threads or 0  # 0: llama.cpp uses every core
    # llama.cpp logs a line per tensor (and one per fallback type); keep that for --verbose only.
    native_log = logging.getLogger("llama-cpp-python")
    level = native_log.level
    if not log.isEnabledFor(logging.DEBUG):
        native_log.setLevel(logging.ERROR)
    try:
        rc = llama_cpp.llama_model_quantize(os.fsencode(src_p), os.fsencode(tmp), ctypes.byref(params))
    finally:
        native_log.setLevel(level)
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise ValueError(f"llama.cpp could not quantize {src_p} to {quant} (status {rc})")
    os.replace(tmp, dst_p)
    log.info("quantized %s -> %s (%s, %.1f MB)", src_p, dst_p, quant, dst_p.stat().st_size / 1e6)
    return dst_p
