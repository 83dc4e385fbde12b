"""A base model for training, from the weights a deployment actually has: a Hugging Face folder or a GGUF.

A GGUF (the file the bot serves) is dequantized once through transformers' GGUF loading
(``from_pretrained(dir, gguf_file=…)``, tokenizer included) into a float32 Hugging Face folder, cached
under :func:`cache_dir` and keyed by the SHA-256 of the GGUF's bytes, so a second run — or tonight's
nightly job — starts from the cache, and a changed file never reuses a stale conversion. Converting the
real Qwen2.5-0.5B Q4_K_M takes 1–4 minutes and ~4 GB of memory on 2 cores; the cached folder is ~2.5 GB.

Cache location: ``COREFBOT_CACHE_DIR`` when set, else ``$XDG_CACHE_HOME/corefbot`` (``~/.cache/corefbot``);
conversions live in its ``gguf-hf/<first 16 hex digits of the hash>/`` and can be deleted at any time.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE_FILE = "corefbot-source.json"  # written into a converted folder: which GGUF it came from


class BaseModelError(ValueError):
    """The base model cannot be used; the message names the file or folder."""


@dataclass(frozen=True, slots=True)
class BaseModel:
    """A training base: ``hf_dir`` is what torch loads; ``gguf`` the file it was converted from (if any)."""

    hf_dir: Path
    gguf: Path | None = None
    gguf_sha256: str | None = None


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_dir() -> Path:
    env = os.environ.get("COREFBOT_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "corefbot"


def is_gguf(path: str | Path) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def resolve_base(base: str | Path, *, cache: str | Path | None = None) -> BaseModel:
    """A Hugging Face folder as it is, or a GGUF file converted (once) to one."""
    base = Path(base)
    if base.is_dir():
        if not (base / "config.json").is_file():
            raise BaseModelError(f"{base}: no config.json (not a Hugging Face model folder)")
        source = base / SOURCE_FILE
        if source.is_file():  # a cached conversion named directly: keep its origin
            info = json.loads(source.read_text())
            return BaseModel(base, Path(info["gguf"]), info.get("sha256"))
        return BaseModel(base)
    if not base.exists():
        raise BaseModelError(f"{base}: no such base model (a Hugging Face folder or a GGUF file)")
    if not is_gguf(base):
        raise BaseModelError(f"{base}: not a GGUF file (bad magic) and not a Hugging Face folder")
    return dequantize_gguf(base, cache=cache)


def dequantize_gguf(gguf: str | Path, *, cache: str | Path | None = None) -> BaseModel:
    """Convert a GGUF to a float32 Hugging Face folder in the cache (or reuse the cached one)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf).resolve()
    digest = file_sha256(gguf)
    root = Path(cache) if cache else cache_dir()
    out = root / "gguf-hf" / digest[:16]
    if (out / SOURCE_FILE).is_file() and (out / "config.json").is_file():
        log.info("base %s: using the cached conversion %s", gguf, out)
        return BaseModel(out, gguf, digest)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.perf_counter()
    log.info("base %s: dequantizing to float32 once (cached in %s)", gguf, out)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for an unreadable or unsupported file
        raise BaseModelError(f"{gguf}: transformers could not load this GGUF ({type(exc).__name__}: {exc})") from exc
    # transformers 5 dequantizes GGUF tensors to plain float ones but keeps its GGUF "quantizer" on the
    # model, which refuses save_pretrained; nothing quantized is left, so drop it before saving.
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / SOURCE_FILE).write_text(json.dumps(
        {"gguf": str(gguf), "sha256": digest, "size": gguf.stat().st_size,
         "seconds": round(time.perf_counter() - start, 1)}, indent=2))
    del model
    # Rename last, so a crash mid-conversion leaves no folder that looks complete.
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log.info("base %s: converted in %.0f s", gguf, time.perf_counter() - start)
    return BaseModel(out, gguf, digest)
