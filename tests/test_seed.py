"""The seed recipe's data: fixed held-out parts, successive training samples that never overlap."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from corefbot.models.train.seed import SEED_SETS, SeedSet, _rewrite_held, build_seed_data, with_caps


def _pairs(n: int, prefix: str = "rw") -> list[dict]:
    rows = []
    for i in range(n):
        rows.append({"id": f"{prefix}{i}", "lang": "zh", "context": ["秦始皇活了多久", "50岁"], "query": "为什么",
                     "rewrite": "为什么秦始皇活了50岁", "needs_rewrite": True})
        rows.append({"id": f"{prefix}{i}_neg", "lang": "zh", "context": ["秦始皇活了多久", "50岁"],
                     "query": "为什么秦始皇活了50岁", "rewrite": "为什么秦始皇活了50岁", "needs_rewrite": False})
    return rows


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text(encoding="utf-8").splitlines()]


def test_successive_samples_are_fresh_pairs_with_the_same_held_out_part(tmp_path: Path) -> None:
    _write(tmp_path / "rw.jsonl", _pairs(300))
    _write(tmp_path / "small.jsonl", _pairs(5, "case"))
    sets = (SeedSet("rewrite_zh", "rw.jsonl", "zh", _rewrite_held, 100),
            SeedSet("small", "small.jsonl", "zh", lambda r: r["id"].startswith("case0"), None))
    first = build_seed_data(tmp_path, tmp_path / "s0", sets=sets)
    second = build_seed_data(tmp_path, tmp_path / "s1", sets=sets, sample=1)

    assert _ids(first.heldout["rewrite_zh"]) == _ids(second.heldout["rewrite_zh"])
    assert first.counts["rewrite_zh"]["heldout"] > 0
    a, b = set(_ids(first.train)), set(_ids(second.train))
    small = {f"case{i}{neg}" for i in range(1, 5) for neg in ("", "_neg")}
    assert a & b == small  # an uncapped set is whole in every sample; the capped set's samples never overlap
    for ids in (a, b):  # a pair is never split
        assert all((i + "_neg" in ids) for i in ids if not i.endswith("_neg"))
    assert first.counts["rewrite_zh"]["train"] == second.counts["rewrite_zh"]["train"] == 100
    assert json.loads((tmp_path / "s1" / "seed-data.json").read_text())["sample"] == 1
    with pytest.raises(ValueError, match="sample"):
        build_seed_data(tmp_path, tmp_path / "bad", sets=sets, sample=-1)


def test_a_cap_changes_how_many_rows_one_set_trains_on(tmp_path: Path) -> None:
    _write(tmp_path / "rw.jsonl", _pairs(300))
    sets = (SeedSet("rewrite_zh", "rw.jsonl", "zh", _rewrite_held, 100),)
    default = build_seed_data(tmp_path, tmp_path / "d", sets=sets)
    more = build_seed_data(tmp_path, tmp_path / "m", sets=with_caps({"rewrite_zh": 200}, sets))

    assert (default.counts["rewrite_zh"]["train"], more.counts["rewrite_zh"]["train"]) == (100, 200)
    assert set(_ids(default.train)) < set(_ids(more.train))  # the same hash order, further along it
    assert _ids(default.heldout["rewrite_zh"]) == _ids(more.heldout["rewrite_zh"])
    assert json.loads((tmp_path / "m" / "seed-data.json").read_text())["caps"] == {"rewrite_zh": 200}
    with pytest.raises(ValueError, match="'rewrite'"):
        with_caps({"rewrite": 10}, sets)
    with pytest.raises(ValueError, match="1 or more"):
        with_caps({"rewrite_zh": 0}, sets)


def test_a_missing_public_set_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="task_gecor.jsonl"):
        build_seed_data(tmp_path, tmp_path / "out", sets=SEED_SETS[:1])
    more = (SeedSet("small", "small.jsonl", "zh", lambda r: False, None, more=("extra.jsonl",)),)
    _write(tmp_path / "small.jsonl", _pairs(2, "case"))
    with pytest.raises(FileNotFoundError, match="extra.jsonl"):
        build_seed_data(tmp_path, tmp_path / "out", sets=more)


def test_a_sets_further_files_train_under_its_held_out_rule(tmp_path: Path) -> None:
    _write(tmp_path / "small.jsonl", _pairs(3, "case"))
    _write(tmp_path / "extra.jsonl", _pairs(2, "more"))
    sets = (SeedSet("small", "small.jsonl", "zh", lambda r: r["id"].startswith("case0"), None, more=("extra.jsonl",)),)
    data = build_seed_data(tmp_path, tmp_path / "out", sets=sets)
    assert _ids(data.train) == ["case1", "case1_neg", "case2", "case2_neg", "more0", "more0_neg", "more1", "more1_neg"]
    assert _ids(data.heldout["small"]) == ["case0", "case0_neg"]


def test_the_shipped_referent_rows_train_zh_topics_only() -> None:
    # 「这家公司」 or 「他」 decides between two named things: rows written for the rewriter, all training rows, and
    # none of them is in the file the gate and the rules baseline are fitted on.
    from corefbot.models.train.gate import OWN_DATA
    from corefbot.models.train.seed import CASES_DIR

    topics = next(s for s in SEED_SETS if s.name == "topics_zh")
    rows = [json.loads(line) for line in (CASES_DIR / "zh_topics_referents.jsonl").read_text(encoding="utf-8").splitlines()]
    assert topics.more == ("cases/zh_topics_referents.jsonl",) and len(rows) == 270
    assert all(r["split"] == "train" for r in rows)
    assert CASES_DIR / "zh_topics_referents.jsonl" not in OWN_DATA


@pytest.mark.slow
def test_seed_from_a_gguf_base_ends_servable_with_figures_as_served(tiny_gguf: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture) -> None:
    """The one command: train from the serving GGUF, export the adapter, pick the decide mode, evaluate as served."""
    pytest.importorskip("llama_cpp")
    from corefbot.cli import main
    from corefbot.models.serve.llama import served_model
    from tests.test_finetune import chat_examples, write_unified

    monkeypatch.setenv("COREFBOT_CACHE_DIR", str(tmp_path / "cache"))
    data = tmp_path / "public"
    data.mkdir()
    for i, name in enumerate(("task_gecor.jsonl", "canard_dev.jsonl", "rewrite_zh_train.jsonl")):
        rows = write_unified(data / name, chat_examples(24, seed=i)).read_text()
        (data / name).write_text(rows.replace('"source": "t"', f'"source": "s{i}"'))  # ids unique across sets
    run = tmp_path / "seed"
    assert main(["seed", "--base", str(tiny_gguf), "--out", str(run), "--data-dir", str(data), "--preset", "tiny",
                 "--max-steps", "2", "--per-set", "3", "--decide-examples", "6", "--threads", "2",
                 "--lora-layers", "1"]) == 0

    assert (run / "adapter.gguf").is_file()
    decide = json.loads((run / "decide.json").read_text())
    figures = json.loads((run / "figures.json").read_text())
    assert figures["engine"] == "llama" and figures["decide_by"] == decide["decide_by"]
    assert served_model(run).decide_by == decide["decide_by"]
    served = {s["name"]: s["served"] for s in figures["sets"]}
    assert {"cases_en", "cases_zh"} <= set(served)  # the project's own held-out cases are always there
    for s in served.values():
        d = s["decision"]
        assert s["decide_by"] == decide["decide_by"] and d["tp"] + d["fp"] + d["fn"] + d["tn"] == 3

    # A further sitting is one command too: fresh training pairs, the same held-out part, this adapter continued
    # (here on both layers: the first sitting's top layer widened).
    again = tmp_path / "seed2"
    assert main(["seed", "--base", str(tiny_gguf), "--out", str(again), "--data-dir", str(data), "--preset", "tiny",
                 "--max-steps", "1", "--sample", "1", "--init-adapter", str(run), "--lr", "1e-4", "--no-figures",
                 "--lora-layers", "2"]) == 0
    # Trained only: not servable yet, and the command says what makes it so.
    assert not (again / "adapter.gguf").exists() and f"corefbot export-lora {again}" in capsys.readouterr().out
    config = yaml.safe_load((again / "config.yaml").read_text())
    assert config["init_adapter"] == str(run.resolve()) and config["learning_rate"] == 1e-4
    adapter = json.loads((again / "adapter" / "adapter_config.json").read_text())
    assert config["lora_layers"] == 2 and adapter["layers_to_transform"] is None  # both layers: every layer
    assert (again / "seed-data" / "heldout-task.jsonl").read_text() == (run / "seed-data" / "heldout-task.jsonl").read_text()
