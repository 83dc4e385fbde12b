"""The nightly job (models/nightly.py) and `corefbot nightly`: skip, promote, refuse, crash, lock, exit codes."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from corefbot.models.ship import registry
from corefbot.models.ship.nightly import NightlyConfig, NightlyLock, lock_path, recent_runs, run_nightly
from corefbot.pipeline.build import build
from corefbot.pipeline.store import Store

CASES = Path(__file__).resolve().parents[1] / "models" / "train" / "cases"
# Few steps, decisions only: the job's plumbing is under test here, not the model's quality.
QUICK = {"max_steps": 4, "eval_rewrites": False, "eval_max_examples": 24}


def labelled_db(path: Path, rows: int) -> Path:
    """A bot database holding ``rows`` labelled questions of the project's own zh/en cases."""
    from corefbot.pipeline.importer import import_jsonl

    lines = []
    for name in ("zh_cases.jsonl", "en_cases.jsonl"):
        lines += (CASES / name).read_text(encoding="utf-8").splitlines()[: rows // 2]
    data = path.with_suffix(".jsonl")
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    store = Store(path)
    try:
        import_jsonl(store, data)
        build(store)
    finally:
        store.close()
    return path


def sha(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read(db: Path, fn):
    store = Store(db)
    try:
        return fn(store)
    finally:
        store.close()


def test_too_few_new_labels_is_skipped_with_a_note(tmp_path: Path) -> None:
    db = labelled_db(tmp_path / "corefbot.db", 20)
    report = run_nightly(db, NightlyConfig(base_model=tmp_path / "no-model", min_new_labels=500))
    assert report.status == "skipped"
    assert report.labels == read(db, lambda s: s.count("labels")) > 0
    assert report.new_labels == report.labels  # nothing trained before: every label is new
    assert f"{report.new_labels} new label(s)" in report.summary and "at least 500" in report.summary
    assert not (tmp_path / "nightly" / "runs").exists()  # nothing trained, no folder
    runs = read(db, recent_runs)
    assert [r.status for r in runs] == ["skipped"] and runs[0].summary == report.summary


def test_a_crash_before_training_leaves_the_registry_alone(tmp_path: Path) -> None:
    db = labelled_db(tmp_path / "corefbot.db", 20)
    serving_file = tmp_path / "serving.gguf"
    serving_file.write_bytes(b"GGUF" + b"\0" * 64)
    v = read(db, lambda s: registry.register(s, gguf_path=serving_file, status="serving"))
    report = run_nightly(db, NightlyConfig(base_model=tmp_path / "unreadable", force=True))
    assert report.status == "failed" and report.failed_step == "train"
    assert str(tmp_path / "unreadable") in report.error
    assert f"v{v.id}" in report.summary
    assert read(db, registry.serving).id == v.id
    assert read(db, lambda s: len(registry.history(s))) == 1
    assert read(db, recent_runs)[0].status == "failed"


def test_a_second_run_while_one_holds_the_lock_is_busy_across_processes(tmp_path: Path) -> None:
    db = labelled_db(tmp_path / "corefbot.db", 10)
    lock = lock_path(tmp_path / "nightly")
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, sys, time
        fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, str(os.getpid()).encode())
        print("locked", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        report = run_nightly(db, NightlyConfig(min_new_labels=0))
        assert report.status == "busy" and str(holder.pid) in report.reason
        assert read(db, recent_runs) == []  # a refused run touches nothing
        # The CLI says so with its own exit status.
        from corefbot.cli import main

        assert main(["--db", str(db), "nightly", "--now", "--json"]) == 3
    finally:
        holder.kill()
        holder.wait()
    # The kernel dropped the dead holder's lock: the next run goes ahead.
    assert run_nightly(db, NightlyConfig(min_new_labels=10_000)).status == "skipped"
    with NightlyLock(lock):  # and a lock in this process refuses a second opener here too
        assert not NightlyLock(lock).acquire()


def test_cli_prints_the_report_and_maps_outcomes_to_exit_codes(tmp_path: Path, capsys, monkeypatch) -> None:
    from corefbot.cli import main

    monkeypatch.delenv("COREFBOT_BASE_MODEL", raising=False)
    db = labelled_db(tmp_path / "corefbot.db", 10)
    assert main(["--db", str(db), "nightly", "--now", "--json", "--min-new-labels", "1000"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["status"] == "skipped" and report["trigger"] == "cli"
    # Settings come from COREFBOT_* when no option is given.
    monkeypatch.setenv("COREFBOT_NIGHTLY_MIN_NEW_LABELS", "1000")
    assert main(["--db", str(db), "nightly", "--now"]) == 0
    assert "at least 1000" in capsys.readouterr().out
    monkeypatch.setenv("COREFBOT_BASE_MODEL", str(tmp_path / "missing-model"))
    assert main(["--db", str(db), "nightly", "--now", "--force"]) == 1
    captured = capsys.readouterr()
    assert "failed at step 'train'" in captured.out and "missing-model" in captured.err
    assert main(["--db", str(db), "nightly"]) == 0  # the run list
    out = capsys.readouterr().out
    assert "failed" in out and "skipped" in out
    monkeypatch.setenv("COREFBOT_NIGHTLY_MARGIN", "lots")
    assert main(["--db", str(db), "nightly", "--now"]) == 2  # a bad setting is named
    assert "COREFBOT_NIGHTLY_MARGIN='lots'" in capsys.readouterr().err


@pytest.mark.slow
def test_nightly_end_to_end_promote_skip_refuse_and_crash(tmp_path: Path, tiny_hf: Path) -> None:
    """Train → evaluate → promote → GGUF on the tiny model; then: nothing new → skip; a candidate that
    cannot beat the serving model → refused; a crash just before the registry flip → nothing changes."""
    db = labelled_db(tmp_path / "corefbot.db", 80)
    base = dict(base_model=tiny_hf, preset="tiny", finetune_overrides=QUICK, min_agreement=0.0,
                agreement_examples=16, min_new_labels=10)

    # 1. Nothing served yet: the base model is the baseline; margin -1 lets any candidate through.
    first = run_nightly(db, NightlyConfig(**base, margin=-1.0))
    assert first.status == "promoted", first.error
    assert first.baseline == "the base model" and first.f1_before is not None and first.f1_after is not None
    assert first.continued == "" and "continuing" not in first.summary  # nothing served: from the base
    assert first.train + first.validation + first.test == first.labels > 0 and first.test > 0
    serving = read(db, registry.serving)
    assert serving.id == first.version_id and serving.gguf_path == first.gguf_path
    assert Path(serving.gguf_path).is_file() and Path(serving.gguf_path).parent == Path(first.run_dir)
    assert serving.metrics["baseline_f1"] == pytest.approx(first.f1_before)
    assert f"Promoted as v{serving.id}" in first.summary
    from corefbot.models.serve.llama import LlamaBackend
    from corefbot.pipeline.records import Turn

    backend = LlamaBackend(serving.gguf_path, n_threads=2)
    try:  # the promoted file is a model llama.cpp serves
        assert backend.resolve([Turn("a", "mmpose 好用吗", 0.0)], Turn("b", "它支持 TX2 吗？", 1.0)).decision
    finally:
        backend.close()
    serving_sha = sha(serving.gguf_path)

    # 2. No label changed since: skipped, nothing trained.
    runs_dirs = set((tmp_path / "nightly" / "runs").iterdir())
    second = run_nightly(db, NightlyConfig(**base, margin=-1.0))
    assert second.status == "skipped" and second.new_labels == 0
    assert set((tmp_path / "nightly" / "runs").iterdir()) == runs_dirs

    # 3. A new moderator label arrives, but no candidate can gain more than 1.0 F1: refused, serving kept.
    from corefbot.pipeline.export import store_examples
    from corefbot.pipeline.labels.rows import set_label

    def relabel(store: Store) -> None:
        e = store_examples(store)[0]
        set_label(store, e.id, "not_needed" if e.label == "needs" else "needs", "moderator", labeler="90001")

    read(db, relabel)
    third = run_nightly(db, NightlyConfig(**{**base, "min_new_labels": 1}, margin=1.01))
    assert third.status == "rejected" and third.new_labels == 1
    assert third.baseline == f"serving v{serving.id}"  # evaluated from its run folder on tonight's test split
    # …and the candidate trained on from its adapter, not from the bare base
    assert Path(third.continued) == Path(serving.run_dir)
    assert f"continuing {Path(serving.run_dir).name}'s" in third.summary
    trained = yaml.safe_load((Path(third.run_dir) / "config.yaml").read_text())
    assert Path(trained["init_adapter"]) == Path(serving.run_dir)
    assert "Not promoted" in third.summary and f"Serving v{serving.id}, unchanged" in third.summary
    assert read(db, registry.serving).id == serving.id and sha(serving.gguf_path) == serving_sha
    rejected = read(db, lambda s: registry.get(s, third.version_id))
    assert rejected.status == "rejected" and rejected.gguf_path == ""

    # 4. A crash at the last step (GGUF written, registry not yet flipped): nothing changes.
    def crash(step: str) -> None:
        if step == "register":
            raise RuntimeError("power cut")

    fourth = run_nightly(db, NightlyConfig(**base, margin=-1.0, force=True, keep_runs=1), on_step=crash)
    assert fourth.status == "failed" and fourth.failed_step == "register" and "power cut" in fourth.error
    assert list(Path(fourth.run_dir).glob("model-*.gguf"))  # the candidate was built…
    assert read(db, registry.serving).id == serving.id and sha(serving.gguf_path) == serving_sha  # …and not served
    assert {v.gguf_path for v in read(db, registry.history)} == {serving.gguf_path, ""}
    assert [r.status for r in read(db, recent_runs)] == ["failed", "rejected", "skipped", "promoted"]
    # Housekeeping kept the newest folder and the serving one; the rejected candidate's folder is gone.
    assert sorted((tmp_path / "nightly" / "runs").iterdir()) == sorted([Path(first.run_dir), Path(fourth.run_dir)])


def test_prune_keeps_the_newest_and_what_the_registry_may_serve(tmp_path: Path) -> None:
    from corefbot.models.ship.nightly import prune_runs

    store = Store(tmp_path / "corefbot.db")
    try:
        runs = tmp_path / "nightly" / "runs"
        names = [f"2026110{d}-033000-run{d}" for d in range(1, 7)]
        for name in names:
            (runs / name).mkdir(parents=True)
            (runs / name / "model-q4_k_m.gguf").write_bytes(b"GGUF")
        for name, status in ((names[0], "retired"), (names[1], "serving"), (names[2], "rolled_back"),
                             (names[3], "rejected")):
            registry.register(store, gguf_path=runs / name / "model-q4_k_m.gguf", run_dir=runs / name,
                              status="candidate")
            store.db.conn.execute("UPDATE model_versions SET status = ? WHERE run_dir = ?", (status, str(runs / name)))
            store.db.conn.commit()
        gone = prune_runs(tmp_path / "nightly", store, keep=2)
        assert sorted(p.name for p in gone) == [names[2], names[3]]
        assert sorted(p.name for p in runs.iterdir()) == [names[0], names[1], names[4], names[5]]
        assert prune_runs(tmp_path / "nightly", store, keep=2) == []
    finally:
        store.close()


@pytest.mark.slow
def test_nightly_from_a_gguf_base_serves_the_adapter(tmp_path: Path, tiny_gguf: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """COREFBOT_BASE_MODEL may be the GGUF the bot serves: the job trains from its cached float copy and
    promotes the run folder itself (base GGUF + adapter.gguf), leaving the base GGUF untouched."""
    from corefbot.models.serve.llama import LlamaBackend, served_model
    from corefbot.pipeline.records import Turn

    monkeypatch.setenv("COREFBOT_CACHE_DIR", str(tmp_path / "cache"))
    db = labelled_db(tmp_path / "corefbot.db", 60)
    before = sha(tiny_gguf)
    # a budget far below the planned steps: training stops at a step boundary and the run still completes
    budget = {**QUICK, "max_steps": 100_000, "max_minutes": 0.05}
    config = NightlyConfig(base_model=tiny_gguf, preset="tiny", finetune_overrides=budget, min_agreement=0.0,
                           agreement_examples=8, min_new_labels=10, margin=-1.0, n_threads=2)
    report = run_nightly(db, config)
    assert report.status == "promoted", report.error
    # Both sides of the promotion check were measured as the bot serves them, on the run's test split.
    from corefbot.models.train.eval_resolver import evaluate
    from corefbot.models.train.finetune import subset
    from corefbot.models.train.run import run_split

    def served_f1(model: Path | str, run_dir: str) -> float:
        test = subset(run_split(run_dir)[0].test, QUICK["eval_max_examples"])
        return evaluate(test, "llama-cpp", model_path=str(model), n_threads=2, progress=False)["decision"]["f1"]

    assert "questions as served" in report.summary and report.baseline == "the base model"
    assert report.f1_after == pytest.approx(served_f1(report.run_dir, report.run_dir))
    assert report.f1_before == pytest.approx(served_f1(tiny_gguf, report.run_dir))
    assert "stopped by the 0.05-minute budget after" in report.summary and "of 100000 steps" in report.summary
    serving = read(db, registry.serving)
    decide = json.loads((Path(report.run_dir) / "decide.json").read_text())  # how the promoted run will decide
    assert f"it decides by the {decide['decide_by']}" in report.summary
    assert serving.metrics["decide_by"] == decide["decide_by"]
    assert serving.quant == "lora" and Path(serving.gguf_path) == Path(report.run_dir).resolve()
    served = served_model(serving.gguf_path)
    assert served.route == "adapter" and served.gguf == tiny_gguf.resolve() and served.lora.is_file()
    assert sha(tiny_gguf) == before
    with LlamaBackend(serving.gguf_path, n_threads=2) as backend:
        assert backend.resolve([Turn("a", "mmpose 好用吗", 0.0)], Turn("b", "它支持 TX2 吗？", 1.0)).decision

    # A later candidate is compared with the serving run folder as it serves; refused, nothing changes.
    second = run_nightly(db, dataclasses.replace(config, margin=1.01, force=True))
    assert second.status == "rejected" and second.baseline == f"serving v{serving.id}"
    assert second.f1_before == pytest.approx(served_f1(serving.gguf_path, second.run_dir))
    assert read(db, registry.serving).id == serving.id

    # A bot serving a run folder named by COREFBOT_MODEL_PATH, nothing in its registry: that run is what a
    # candidate must beat (not the bare base), and the candidate continues its adapter.
    other = labelled_db(tmp_path / "other.db", 60)
    third = run_nightly(other, dataclasses.replace(config, model_path=Path(report.run_dir), margin=1.01,
                                                   work_dir=tmp_path / "other-nightly"))
    assert third.status == "rejected", third.error
    assert third.baseline == f"the configured model {Path(report.run_dir).name}"
    assert third.f1_before == pytest.approx(served_f1(report.run_dir, third.run_dir))
    assert Path(third.continued) == Path(report.run_dir).resolve()
    assert f"Serving the configured model {Path(report.run_dir).name}, unchanged" in third.summary


def test_a_serving_version_without_files_is_compared_by_its_recorded_f1_or_refused(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from corefbot.models.ship.nightly import _compare_with

    measured: list[Path] = []

    def f1_of(path: Path) -> float:
        measured.append(path)
        return 0.5

    base, files = tmp_path / "base.gguf", tmp_path / "run"
    assert _compare_with(None, None, base, f1_of) == ("the base model", 0.5)
    hand = SimpleNamespace(id=3, f1=0.7, run_dir=None, gguf_path="/gone.gguf")
    assert _compare_with(hand, files, base, f1_of) == ("serving v3", 0.5)
    assert measured == [base, files]
    assert _compare_with(hand, None, base, f1_of) == ("serving v3 (recorded F1)", 0.7)
    # Nothing promoted while the bot serves a configured model: that model is the baseline, not the base.
    measured.clear()
    assert _compare_with(None, None, base, f1_of, configured=files) == ("the configured model run", 0.5)
    assert _compare_with(None, None, base, f1_of, configured=base.resolve()) == ("the base model", 0.5)
    assert measured == [files, base]
    with pytest.raises(ValueError, match="serving v3 has neither model files .*/gone.gguf"):
        _compare_with(SimpleNamespace(**{**vars(hand), "f1": None}), None, base, f1_of)


def test_the_candidate_continues_the_served_adapter_only_from_the_same_base(tmp_path: Path) -> None:
    from types import SimpleNamespace

    import yaml

    from corefbot.models.ship.nightly import _continuing, _State
    from corefbot.models.train.finetune import load_preset

    def trained_run(name: str, sha256: str, layers: list[int] | None) -> Path:
        run = tmp_path / name
        (run / "adapter").mkdir(parents=True)
        (run / "config.yaml").write_text(yaml.safe_dump({"base": "/cache/hf", "base_gguf_sha256": sha256}))
        (run / "adapter" / "adapter_config.json").write_text(json.dumps(
            {"r": 8, "lora_alpha": 24, "layers_to_transform": layers}))
        return run

    base = SimpleNamespace(gguf=tmp_path / "base.gguf", gguf_sha256="abc", hf_dir=Path("/cache/hf"))
    preset = load_preset("nightly-cpu", lora_layers=12)  # r 16, alpha 32, the top 12 layers
    state = _State(started_at=0.0, trigger="test")
    seed = trained_run("seed", "abc", list(range(0, 24)))
    cfg = _continuing(preset, seed, base, state)
    # the served adapter's own rank and scaling, and its 24 layers (more than the preset's 12: never narrowed)
    assert (cfg.init_adapter, cfg.lora_r, cfg.lora_alpha, cfg.lora_layers) == (str(seed), 8, 24, 24)
    assert state.continued == str(seed)
    narrow = trained_run("narrow", "abc", [22, 23])
    assert _continuing(preset, narrow, base, state).lora_layers == 12  # widened to the preset's layers
    assert _continuing(preset.replace(lora_layers=None), narrow, base, state).lora_layers is None
    # another base's run, a folder that is no run, nothing served: from the base, the preset unchanged
    state = _State(started_at=0.0, trigger="test")
    assert _continuing(preset, trained_run("other", "xyz", None), base, state) == preset
    assert _continuing(preset, tmp_path, base, state) == preset
    assert _continuing(preset, None, base, state) == preset and state.continued == ""


def test_the_summary_says_how_many_test_questions_were_measured() -> None:
    from corefbot.models.ship.nightly import _State, _trained_sentence

    state = _State(started_at=0.0, trigger="cli", sides=(428, 0, 72), evaluated=60, f1_before=0.9, f1_after=0.95)
    assert "on 60 of 72 held-out test questions" in _trained_sentence(state, NightlyConfig(), "nightly-cpu", Path("b"))
    state.evaluated = 72
    assert "on 72 held-out test questions" in _trained_sentence(state, NightlyConfig(), "nightly-cpu", Path("b"))
