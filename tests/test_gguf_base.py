"""Training from the weights a deployment has: a GGUF base (dequantized once, cached), several data files,
a wall-clock budget, and the pairs of the public sets kept on one side of a split."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from corefbot.pipeline.examples import unified_example
from tests.test_finetune import chat_examples, write_unified

pytest.importorskip("peft")


def test_pairs_of_one_case_are_one_conversation() -> None:
    def conv(rid: str) -> str:
        return unified_example({"id": rid, "context": ["a"], "query": "q", "needs_rewrite": False,
                                "source": "s"}).conversation

    # REWRITE's negative is the positive's gold rewrite asked again: they must never straddle a split.
    assert conv("rw17") == conv("rw17_neg") == "s:rw17"
    assert conv("p000_coref") == conv("p000_complete") == "s:p000"
    assert conv("d12t3_coref") == conv("d12t4_complete") == "s:d12"
    assert conv("C_ab_0_q1") == conv("C_ab_0_q7")
    assert conv("rw1") != conv("rw17")


def test_gguf_base_is_dequantized_once_and_cached(tiny_gguf: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    from corefbot.models.train.base import SOURCE_FILE, resolve_base

    monkeypatch.setenv("COREFBOT_CACHE_DIR", str(tmp_path / "cache"))
    first = resolve_base(tiny_gguf)
    assert first.gguf == tiny_gguf.resolve() and (first.hf_dir / "config.json").is_file()
    assert first.hf_dir.parent == tmp_path / "cache" / "gguf-hf"
    assert (first.hf_dir / "tokenizer.json").is_file() or (first.hf_dir / "tokenizer_config.json").is_file()
    source = json.loads((first.hf_dir / SOURCE_FILE).read_text())
    assert source["sha256"] == first.gguf_sha256 and source["gguf"] == str(tiny_gguf.resolve())
    config = json.loads((first.hf_dir / "config.json").read_text())
    assert "quantization_config" not in config  # a plain float folder, loadable without the GGUF

    # The second call must not convert again.
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("converted twice")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    again = resolve_base(tiny_gguf)
    assert again == first
    # The cached folder named directly still knows where it came from.
    assert resolve_base(first.hf_dir).gguf == tiny_gguf.resolve()


def test_bad_base_errors_name_the_file(tmp_path: Path) -> None:
    from corefbot.models.train.base import BaseModelError, resolve_base

    missing = tmp_path / "nope.gguf"
    with pytest.raises(BaseModelError, match="nope.gguf"):
        resolve_base(missing)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(BaseModelError, match="junk.gguf.*not a GGUF"):
        resolve_base(junk)
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 8)
    with pytest.raises(BaseModelError, match="cut.gguf"):
        resolve_base(truncated, cache=tmp_path / "cache")
    empty_dir = tmp_path / "folder"
    empty_dir.mkdir()
    with pytest.raises(BaseModelError, match="folder: no config.json"):
        resolve_base(empty_dir)


@pytest.mark.slow
def test_train_from_gguf_on_several_files_under_a_budget(tiny_gguf: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from corefbot.models.train import finetune
    from corefbot.models.train.finetune import file_sha256, load_preset
    from corefbot.models.train.run import read_run, run, run_split

    monkeypatch.setenv("COREFBOT_CACHE_DIR", str(tmp_path / "cache"))
    exs = chat_examples(90)
    a = write_unified(tmp_path / "a.jsonl", exs[:45])
    b = write_unified(tmp_path / "b.jsonl", exs[45:])
    # A clock that advances 10 s per reading: the 1-minute budget ends training after a few steps,
    # whatever the machine's speed, and the test stays deterministic.
    ticks = iter(range(0, 10**6, 10))
    monkeypatch.setattr(finetune.time, "perf_counter", lambda: float(next(ticks)))
    config = load_preset("tiny", max_steps=50, max_minutes=1.0, eval_max_examples=6, rewrite_max_new_tokens=2)
    result = run(tiny_gguf, [a, b], tmp_path / "run", config, progress=False)

    tr = result.metrics["train"]
    assert tr["stopped_on_budget"] is True and tr["planned_steps"] == 50
    assert 1 <= tr["steps"] < 50
    cfg, manifest, metrics = read_run(result.out)
    for name in ("adapter/adapter_config.json", "tokenizer/tokenizer_config.json", "loss.csv", "metrics.json"):
        assert (result.out / name).is_file(), name
    assert metrics["train"]["steps"] == tr["steps"] and "test" in metrics
    with open(result.out / "loss.csv") as f:
        assert len(f.readlines()) == tr["steps"] + 1
    # The run names the GGUF it started from, and every data file with its hash.
    assert cfg["base_gguf"] == str(tiny_gguf.resolve())
    assert [f["path"] for f in manifest["data_files"]] == [str(a.resolve()), str(b.resolve())]
    assert [f["sha256"] for f in manifest["data_files"]] == [file_sha256(a), file_sha256(b)]
    split, examples = run_split(result.out)
    assert len(examples) == 90 and manifest["split_ids"] == split.ids()
    # The learning rate still decayed: the schedule was re-fitted to the steps the budget allowed.
    rows = (result.out / "loss.csv").read_text().splitlines()[1:]
    lrs = [float(r.split(",")[1]) for r in rows]
    assert lrs[-1] < max(lrs)


def test_same_id_in_two_data_files_is_refused(tmp_path: Path) -> None:
    from corefbot.models.train.run import load_data

    exs = chat_examples(6)
    a = write_unified(tmp_path / "a.jsonl", exs)
    b = write_unified(tmp_path / "b.jsonl", exs[:2])
    with pytest.raises(ValueError, match="in both .*a.jsonl and .*b.jsonl"):
        load_data([a, b])
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_data([a, tmp_path / "missing.jsonl"])
