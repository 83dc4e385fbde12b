"""The nightly retraining job: labels → LoRA → evaluation against the serving model → promotion check → GGUF → registry.

``run_nightly(db_path, config)`` is a plain function meant to run in its own process (``corefbot nightly
--now``; the bot's ``corefbot.plugins.nightly`` starts that command on its schedule). Order of work:

1. take the job lock (a file lock in the work folder: two runs never overlap, in one process or many);
2. copy the labelled examples out of the bot's database in one short read transaction (WAL: the bot's
   writer is never blocked), then work on files only;
3. too few labels changed since the last run that trained → skip with a note;
4. train a LoRA adapter on the train split (``corefbot.models.train.run.run``) into a new run folder,
   continuing the adapter the bot serves when it was trained from the same base (a seed run keeps what it
   learnt from the public sets; ``continue_served``), else from the bare base;
5. evaluate what the bot serves on the same test split, so both F1 figures come from the same examples:
   the registry's serving version, else the model the bot was configured with (``model_path``,
   ``COREFBOT_MODEL_PATH``), else the base — never the bare base while the bot serves a fine-tuned run.
   From a GGUF base (the adapter route, the default) the candidate is exported first (its ``adapter.gguf``
   and measured decide mode, ``corefbot.models.ship.lora.export_lora``) and both sides are measured as the
   bot serves them: the shipped gate, each model's decide mode, rewrite validation — the serving version
   from its run folder or GGUF, or the base GGUF when nothing serves yet. From a Hugging Face base (the
   merge route) both are evaluated under PyTorch over all option orders (serving: base + its adapter);
6. promote only when the candidate's F1 beats that by at least ``margin`` (the paper's Qwen1.5-4B lost
   11.5 F1 points after fine-tuning: a new adapter is not better by default);
7. (merge route) merge → GGUF → quantize (``corefbot.models.ship.export.export_gguf``); served-vs-HF agreement
   at least ``min_agreement``; then register and promote in the registry — the only step that changes what
   serves, and the last one.

A crash at any step leaves the registry's serving version and its GGUF file as they were: everything
new is written under a new run folder, and the registry flips only at the end. Every run leaves a row
in ``nightly_runs`` (pipeline/store.py migration 6) with its outcome and one-paragraph summary.
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

from corefbot.models.ship.gguf import Quant

log = logging.getLogger(__name__)

Status = Literal["promoted", "rejected", "skipped", "failed", "busy"]
STATUSES: tuple[Status, ...] = ("promoted", "rejected", "skipped", "failed", "busy")
Step = Literal["lock", "snapshot", "train", "baseline", "promotion", "export", "register", "done"]
#: Called with each step's name as it starts (progress, and tests that inject a failure).
StepHook = Callable[[str], None]


class NightlyBusy(RuntimeError):
    """Another nightly run holds the lock."""


@dataclass(frozen=True)
class NightlyConfig:
    """What a nightly run does; the CLI fills it from arguments and ``COREFBOT_*`` settings."""

    base_model: Path | None = None  # Hugging Face folder of the base model (COREFBOT_BASE_MODEL)
    # What the bot serves while the registry has no serving version (COREFBOT_MODEL_PATH): the baseline then.
    model_path: Path | None = None
    continue_served: bool = True  # the candidate continues the served run's adapter (same base), not the bare base
    work_dir: Path | None = None  # run folders and the lock; default: "nightly" beside the database
    preset: str = "paper"  # finetune preset name or YAML path
    finetune_overrides: Mapping[str, Any] = field(default_factory=dict)  # e.g. {"max_steps": 200}
    min_new_labels: int = 50  # fewer labels added or changed since the last trained run: skip
    margin: float = 0.01  # the candidate's test F1 must beat the baseline's by this much (fraction)
    quant: Quant = "q4_k_m"
    min_agreement: float = 0.9  # quantized vs merged decisions on the test split; below: not promoted
    agreement_examples: int = 200
    use_member_labels: bool = True
    window: int = 12
    force: bool = False  # ignore min_new_labels (a moderator's /model retrain)
    keep_runs: int = 5  # newest run folders kept; older ones go unless a serving/retired/candidate version uses them
    n_threads: int | None = None  # llama.cpp threads for the agreement check
    trigger: str = "manual"  # who started it: schedule, cli, moderator:<id>
    progress: bool = False  # tqdm bars on stderr

    def resolved_work_dir(self, db_path: str | Path) -> Path:
        return Path(self.work_dir) if self.work_dir else Path(db_path).expanduser().resolve().parent / "nightly"


@dataclass(frozen=True)
class NightlyReport:
    status: Status
    summary: str  # one paragraph for the moderators
    reason: str = ""  # why: skipped / rejected / failed
    run_id: int | None = None  # nightly_runs row
    trigger: str = "manual"
    started_at: float = 0.0
    finished_at: float = 0.0
    run_dir: str = ""
    labels: int = 0  # labelled examples exported (needs + not needed)
    new_labels: int = 0  # added or changed since the last run that trained
    needs: int = 0
    train: int = 0
    validation: int = 0
    test: int = 0
    baseline: str = ""  # "serving v3", "the configured model avg678", "the base model"
    continued: str = ""  # the run folder whose adapter the candidate continued; "": trained from the base
    serving_before: int | None = None  # registry id serving when the run started
    f1_before: float | None = None  # baseline's test F1: as served (adapter route) or mean over option orders
    f1_after: float | None = None  # candidate's test F1
    margin: float = 0.0
    version_id: int | None = None  # the registered version (promoted or rejected)
    gguf_path: str = ""
    agreement: float | None = None
    failed_step: str = ""
    error: str = ""
    seconds: Mapping[str, float] = field(default_factory=dict)

    @property
    def promoted(self) -> bool:
        return self.status == "promoted"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["seconds"] = dict(self.seconds)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "NightlyReport":
        names = {f.name for f in dataclasses.fields(cls)}
        if data.get("status") not in STATUSES:
            raise ValueError(f"nightly report: unknown status {data.get('status')!r}")
        return cls(**{k: v for k, v in data.items() if k in names})


# ---- the lock ---------------------------------------------------------------------------------

class NightlyLock:
    """An exclusive, non-blocking ``flock`` on ``<work_dir>/nightly.lock``.

    flock locks belong to the open file, so the lock holds against other processes and against a
    second opener in the same process; the kernel drops it when the holder dies (no stale locks).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def holder(self) -> str:
        """The pid written by the current holder (for messages), or ""."""
        try:
            return self.path.read_text().strip()
        except OSError:
            return ""

    def __enter__(self) -> "NightlyLock":
        if not self.acquire():
            raise NightlyBusy(f"another nightly run holds {self.path} (pid {self.holder() or '?'})")
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_path(work_dir: str | Path) -> Path:
    return Path(work_dir) / "nightly.lock"


# ---- the run log (nightly_runs) -----------------------------------------------------------------

_RUN_COLS = ("started_at", "finished_at", "status", "trigger", "pid", "run_dir", "labels", "new_labels",
             "label_cutoff", "f1_before", "f1_after", "baseline", "version_id", "reason", "summary", "report")


def _start_row(store: Any, trigger: str) -> int:
    with store.db.conn:
        # We hold the lock, so a row still "running" belongs to a process that died mid-run.
        store.db.conn.execute("UPDATE nightly_runs SET status = 'interrupted', finished_at = ? "
                              "WHERE status = 'running'", (time.time(),))
        cur = store.db.conn.execute("INSERT INTO nightly_runs (started_at, status, trigger, pid) VALUES (?, ?, ?, ?)",
                                    (time.time(), "running", trigger, os.getpid()))
        return int(cur.lastrowid)


def _finish_row(store: Any, run_id: int, report: NightlyReport, label_cutoff: float | None) -> None:
    with store.db.conn:
        store.db.conn.execute(
            "UPDATE nightly_runs SET finished_at = ?, status = ?, run_dir = ?, labels = ?, new_labels = ?, "
            "label_cutoff = ?, f1_before = ?, f1_after = ?, baseline = ?, version_id = ?, reason = ?, summary = ?, "
            "report = ? WHERE id = ?",
            (report.finished_at, report.status, report.run_dir, report.labels, report.new_labels, label_cutoff,
             report.f1_before, report.f1_after, report.baseline, report.version_id, report.reason, report.summary,
             json.dumps(report.to_dict(), ensure_ascii=False), run_id))


def last_trained_cutoff(store: Any) -> tuple[float, float | None]:
    """(label cutoff, finish time) of the last run that trained to the end (promoted or rejected)."""
    row = store.db.conn.execute(
        "SELECT label_cutoff, finished_at FROM nightly_runs WHERE status IN ('promoted', 'rejected') "
        "AND label_cutoff IS NOT NULL ORDER BY id DESC LIMIT 1").fetchone()
    return (float(row[0]), row[1]) if row else (0.0, None)


@dataclass(frozen=True, slots=True)
class RunRow:
    id: int
    started_at: float
    finished_at: float | None
    status: str
    trigger: str
    summary: str
    version_id: int | None


def recent_runs(store: Any, limit: int = 10) -> list[RunRow]:
    """The latest rows of ``nightly_runs``, newest first."""
    rows = store.db.conn.execute(
        "SELECT id, started_at, finished_at, status, trigger, summary, version_id FROM nightly_runs "
        "ORDER BY id DESC LIMIT ?", (limit,))
    return [RunRow(r[0], r[1], r[2], r[3], r[4] or "", r[5] or "", r[6]) for r in rows]


def prune_runs(work: str | Path, store: Any, keep: int) -> list[Path]:
    """Delete run folders older than the newest ``keep``, except those a serving, retired (a rollback
    target) or candidate version points at. Returns the folders deleted."""
    import shutil

    from corefbot.models.ship import registry

    runs_dir = Path(work) / "runs"
    if not runs_dir.is_dir():
        return []
    runs = sorted(p for p in runs_dir.iterdir() if p.is_dir())  # names start with a sortable timestamp
    used = {Path(v.run_dir).resolve() for v in registry.history(store, limit=1_000_000)
            if v.run_dir and v.status in ("serving", "retired", "candidate")}
    gone = []
    for folder in runs[: max(0, len(runs) - keep)]:
        if folder.resolve() not in used:
            shutil.rmtree(folder)
            gone.append(folder)
    if gone:
        log.info("nightly: removed %d old run folder(s) from %s", len(gone), runs_dir)
    return gone


# ---- the job ------------------------------------------------------------------------------------

@dataclass
class _State:
    """What the run has learnt so far; the failure report is built from whatever is filled in."""

    started_at: float
    trigger: str
    run_id: int | None = None
    step: str = "lock"
    run_dir: str = ""
    labels: int = 0
    new_labels: int = 0
    needs: int = 0
    sides: tuple[int, int, int] = (0, 0, 0)
    evaluated: int = 0  # test questions both F1 figures were measured on (the preset may cap the split)
    label_cutoff: float | None = None
    serving_id: int | None = None
    baseline: str = ""
    continued: str = ""
    f1_before: float | None = None
    f1_after: float | None = None
    gguf_path: str = ""
    agreement: float | None = None
    version_id: int | None = None
    budget_stop: str = ""  # how the training budget ended training, when it did
    compared: str = "under PyTorch (all option orders)"  # how both F1 figures were measured
    seconds: dict[str, float] = field(default_factory=dict)

    def report(self, status: Status, summary: str, margin: float, reason: str = "", error: str = "") -> NightlyReport:
        return NightlyReport(
            status=status, summary=summary, reason=reason, run_id=self.run_id, trigger=self.trigger,
            started_at=self.started_at, finished_at=time.time(), run_dir=self.run_dir, labels=self.labels,
            new_labels=self.new_labels, needs=self.needs, train=self.sides[0], validation=self.sides[1],
            test=self.sides[2], baseline=self.baseline, continued=self.continued, serving_before=self.serving_id,
            f1_before=self.f1_before, f1_after=self.f1_after, margin=margin, version_id=self.version_id,
            gguf_path=self.gguf_path, agreement=self.agreement, failed_step=self.step if status == "failed" else "",
            error=error,
            seconds=dict(self.seconds))


def run_nightly(db_path: str | Path, config: NightlyConfig, *, on_step: StepHook | None = None) -> NightlyReport:
    """Run the job once (see the module docstring). Never raises for a failed step: the report says
    ``failed`` with the step and the error; ``busy`` when another run holds the lock."""
    from corefbot.pipeline.store import Store

    work = config.resolved_work_dir(db_path)
    state = _State(started_at=time.time(), trigger=config.trigger)
    lock = NightlyLock(lock_path(work))
    if not lock.acquire():
        holder = lock.holder()
        reason = f"another nightly run is in progress (pid {holder or '?'}, lock {lock.path})"
        log.warning("nightly: %s", reason)
        return state.report("busy", f"Nightly retrain not started: {reason}.", config.margin, reason=reason)
    try:
        if not Path(db_path).expanduser().is_file():
            raise FileNotFoundError(f"{db_path}: no corefbot database there")
        store = Store(db_path)
        try:
            state.run_id = _start_row(store, config.trigger)
            try:
                report = _run(store, work, config, state, on_step)
            except Exception as exc:  # noqa: BLE001 - every failure becomes a report (and a row)
                log.exception("nightly run %s failed at step %s", state.run_id, state.step)
                error = f"{type(exc).__name__}: {exc}"
                report = state.report("failed", _failed_summary(state, error), config.margin,
                                      reason=f"failed at {state.step}", error=error)
            _finish_row(store, state.run_id, report,
                        state.label_cutoff if report.status in ("promoted", "rejected") else None)
            if report.run_dir:
                try:
                    prune_runs(work, store, config.keep_runs)
                except OSError as exc:  # disk housekeeping must not turn a good run into a failed one
                    log.warning("nightly: could not prune old run folders in %s: %s", work / "runs", exc)
            return report
        finally:
            store.close()
    except Exception as exc:  # noqa: BLE001 - the database itself could not be opened or written
        log.exception("nightly run could not use the database %s", db_path)
        error = f"{type(exc).__name__}: {exc}"
        return state.report("failed", _failed_summary(state, error), config.margin,
                            reason=f"failed at {state.step}", error=error)
    finally:
        lock.release()


def _step(state: _State, name: Step, on_step: StepHook | None) -> None:
    state.step = name
    log.info("nightly run %s: %s", state.run_id, name)
    if on_step is not None:
        on_step(name)


def _run(store: Any, work: Path, config: NightlyConfig, state: _State, on_step: StepHook | None) -> NightlyReport:
    from corefbot.models.ship import registry
    from corefbot.models.train.finetune import load_preset, subset
    from corefbot.models.train.run import run as finetune_run
    from corefbot.models.train.run import run_split

    margin = config.margin
    # ---- snapshot: everything we need from the bot's database, in one short read transaction ----
    _step(state, "snapshot", on_step)
    t = time.perf_counter()
    examples, labels, serving, previous_cutoff, previous_at = _snapshot(store, config)
    state.labels = len(examples)
    state.needs = sum(e.label == "needs" for e in examples)
    state.new_labels = sum(1 for e in examples if labels[e.id].at > previous_cutoff)
    state.label_cutoff = max((labels[e.id].at for e in examples), default=previous_cutoff)
    state.serving_id = serving.id if serving else None
    state.seconds["snapshot"] = time.perf_counter() - t
    configured = _configured_model(config)
    serving_name = (f"v{serving.id}" if serving else f"the configured model {configured.name}" if configured
                    else "the base model (nothing promoted yet)")
    if not config.force and state.new_labels < config.min_new_labels:
        since = f" since {_when(previous_at)}" if previous_at else ""
        reason = f"{state.new_labels} new label(s){since}, fewer than the minimum {config.min_new_labels}"
        summary = (f"Nightly retrain skipped: {state.new_labels} new label(s){since} "
                   f"({state.labels} in all); it needs at least {config.min_new_labels}. "
                   f"Serving {serving_name}, unchanged.")
        return state.report("skipped", summary, margin, reason=reason)
    # ---- train the candidate ----
    _step(state, "train", on_step)
    if config.base_model is None:
        raise ValueError("no base model configured (COREFBOT_BASE_MODEL or --base)")
    base = Path(config.base_model).expanduser()
    from corefbot.models.train.base import resolve_base

    base_model = resolve_base(base)  # a GGUF is dequantized once (cached); errors name the file
    cfg = load_preset(config.preset, **dict(config.finetune_overrides))
    if config.continue_served:
        cfg = _continuing(cfg, _served_run(serving, configured), base_model, state)
    # ---- a new run folder: nothing outside it is written until the registry step ----
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = work / "runs" / f"{stamp}-run{state.run_id}"
    run_dir.mkdir(parents=True, exist_ok=False)
    state.run_dir = str(run_dir)
    data_path = run_dir / "labels.json"
    _write_data(examples, data_path, labels)
    t = time.perf_counter()
    result = finetune_run(base, data_path, run_dir, cfg, progress=config.progress)
    state.seconds["train"] = time.perf_counter() - t
    trained = result.metrics["train"]
    if trained.get("stopped_on_budget"):
        state.budget_stop = (f", stopped by the {cfg.max_minutes:g}-minute budget after {trained['steps']} of "
                             f"{trained['planned_steps']} steps")
    split, _ = run_split(run_dir)  # the run's own split, checked against its manifest
    state.sides = (len(split.train), len(split.validation), len(split.test))
    test = subset(split.test, cfg.eval_max_examples)
    state.evaluated = len(test)
    from corefbot.models.serve.llama import DEFAULT_ROUTE

    if base_model.gguf is not None and DEFAULT_ROUTE == "adapter":
        # The adapter route: the run folder serves (base GGUF + adapter.gguf), so both sides of the promotion
        # check are measured as served — the bot's resolver with each model's measured decide mode — and
        # not by the HF letters, which a small model learns last (models/EXPERIMENTS.md).
        _step(state, "export", on_step)
        t = time.perf_counter()
        quant, served_path, size_bytes, record = _export_adapter(run_dir, config, result.metrics, state)
        state.seconds["export"] = time.perf_counter() - t
        _step(state, "baseline", on_step)
        t = time.perf_counter()
        state.compared = "as served (gate, each model's decide mode, rewrite validation)"
        state.f1_after = _served_f1(served_path, test, config)
        state.baseline, state.f1_before = _served_baseline_f1(serving, configured, base_model.gguf, test, config)
        state.seconds["baseline"] = time.perf_counter() - t
    else:
        state.f1_after = float(result.metrics["test"]["decision"]["f1"]["mean"])
        _step(state, "baseline", on_step)
        t = time.perf_counter()
        state.baseline, state.f1_before = _baseline_f1(serving, configured, base, test, cfg)
        state.seconds["baseline"] = time.perf_counter() - t
        served_path = None

    # ---- the promotion check ----
    _step(state, "promotion", on_step)
    head = _trained_sentence(state, config, cfg.preset, base)
    gain = state.f1_after - state.f1_before
    if not gain >= margin:  # also catches NaN
        reason = (f"test F1 {_pct(state.f1_after)} is not at least {_points(margin)} points above "
                  f"{state.baseline}'s {_pct(state.f1_before)}")
        state.version_id = registry.register(
            store, gguf_path="", run_dir=run_dir.resolve(), base=str(base),
            metrics=_metrics(result.metrics, state), note=f"nightly run {state.run_id}: {reason}",
            status="rejected").id
        summary = (f"{head} Not promoted: {reason}. Serving {serving_name}, unchanged "
                   f"(candidate kept as v{state.version_id}, rejected).")
        return state.report("rejected", summary, margin, reason=reason)

    if served_path is None:  # ---- the merge route: GGUF for serving ----
        _step(state, "export", on_step)
        from corefbot.models.ship.export import export_gguf

        t = time.perf_counter()
        exported = export_gguf(run_dir, config.quant, store=None, max_examples=config.agreement_examples,
                               n_threads=config.n_threads, progress=config.progress)
        quant, served_path, size_bytes = config.quant, exported.gguf_path.resolve(), exported.size_bytes
        state.agreement = exported.agreement.agreement
        record = json.loads((run_dir / f"export-{config.quant}.json").read_text())["metrics"]
        state.seconds["export"] = time.perf_counter() - t
    state.gguf_path = str(served_path)
    metrics = {**record, **_metrics(result.metrics, state)}
    if not state.agreement >= config.min_agreement:
        reason = (f"the served model ({quant}) agrees with the HF one on only "
                  f"{_pct(state.agreement)} of test decisions (minimum {_pct(config.min_agreement)})")
        state.version_id = registry.register(
            store, gguf_path=state.gguf_path, run_dir=run_dir.resolve(), base=str(base), metrics=metrics,
            quant=quant, note=f"nightly run {state.run_id}: {reason}", status="rejected").id
        summary = (f"{head} Not promoted: {reason}. Serving {serving_name}, unchanged "
                   f"(candidate kept as v{state.version_id}, rejected).")
        return state.report("rejected", summary, margin, reason=reason)

    # ---- the only step that changes what serves ----
    _step(state, "register", on_step)
    reason = f"test F1 {_pct(state.f1_before)} → {_pct(state.f1_after)} ({_signed_points(gain)} points)"
    version = registry.register(store, gguf_path=state.gguf_path, run_dir=run_dir.resolve(), base=str(base),
                                metrics=metrics, quant=quant, note=f"nightly run {state.run_id}: {reason}")
    state.version_id = version.id
    registry.promote(store, version.id)
    state.step = "done"  # promoted: from here nothing may report a failure
    size_mb = size_bytes / 1e6
    decides = (f"; it decides by the {metrics['decide_by']} (Matthews letters {metrics['decide_mcc_letter']:.2f}, "
               f"rewrite {metrics['decide_mcc_rewrite']:.2f})" if "decide_by" in metrics else "")
    summary = (f"{head} Promoted as v{version.id} ({quant}, {size_mb:.0f} MB; served decisions agree "
               f"with the HF model on {_pct(state.agreement)} of test questions{decides}), replacing {serving_name}.")
    return state.report("promoted", summary, margin, reason=reason)


def _export_adapter(run_dir: Path, config: NightlyConfig, finetune_metrics: dict,
                    state: _State) -> tuple[str, Path, int, dict[str, Any]]:
    """adapter.gguf and decide.json for the run folder; (quant, served path, size, registry record)."""
    from corefbot.models.serve.llama import DECIDE_FILE
    from corefbot.models.ship.lora import export_lora

    adapter, agreement = export_lora(run_dir, max_examples=config.agreement_examples,
                                     n_threads=config.n_threads, progress=config.progress)
    state.agreement = agreement.agreement if agreement is not None else math.nan
    decision = finetune_metrics.get("test", {}).get("decision", {})
    record = {"test_f1": decision.get("f1", {}).get("mean"), "agreement": state.agreement,
              "agreement_examples": agreement.examples if agreement else 0, "route": "adapter",
              "gguf_serve_f1": agreement.gguf_f1 if agreement else None,
              "hf_serve_f1": agreement.hf_f1 if agreement else None}
    decide_file = run_dir / DECIDE_FILE
    if decide_file.is_file():  # how the served run decides (COREFBOT_DECIDE_BY=auto), measured on the test split
        decide = json.loads(decide_file.read_text())
        record.update(decide_by=decide["decide_by"], decide_mcc_letter=decide["letter"]["mcc"],
                      decide_mcc_rewrite=decide["rewrite"]["mcc"])
    return "lora", run_dir.resolve(), adapter.stat().st_size, record


def _served_f1(model: str | Path, test: list, config: NightlyConfig) -> float:
    """Decision F1 on ``test`` of the bot's resolver serving ``model`` (a run folder or a GGUF) with its
    default settings: the shipped gate, the model's measured decide mode, rewrite validation."""
    from corefbot.models.train.eval_resolver import evaluate

    report = evaluate(test, "llama-cpp", model_path=str(model), n_threads=config.n_threads,
                      progress=config.progress)
    return float(report["decision"]["f1"])


def _served_baseline_f1(serving: Any, configured: Path | None, base_gguf: Path, test: list,
                        config: NightlyConfig) -> tuple[str, float]:
    """(name, served F1 on ``test``) of what the candidate must beat: the serving version as it serves
    (its run folder or GGUF), else the configured model, else the base GGUF."""
    path = Path(serving.gguf_path) if serving is not None and serving.gguf_path else None
    return _compare_with(serving, path if path is not None and path.exists() else None, base_gguf,
                         lambda model: _served_f1(model, test, config), configured=configured)


def _configured_model(config: NightlyConfig) -> Path | None:
    """The model the bot serves while nothing is promoted (``model_path``), when it exists; a missing one
    is named in the log (the bot itself then falls back to the rules, so the base is the fair baseline)."""
    if config.model_path is None:
        return None
    path = Path(config.model_path).expanduser()
    if not path.exists():
        log.warning("nightly: the configured model %s does not exist; comparing with the base model", path)
        return None
    return path.resolve()


def _is_run_folder(path: Path) -> bool:
    """A finetune run folder: its adapter and the config it was trained with (base, rank, layers)."""
    return (path / "adapter").is_dir() and (path / "config.yaml").is_file()


def _served_run(serving: Any, configured: Path | None) -> Path | None:
    """The run folder behind what the bot serves (its adapter may be continued), if there is one."""
    if serving is not None:
        return Path(serving.run_dir) if serving.run_dir else None
    return configured if configured is not None and configured.is_dir() else None


def _continuing(cfg: Any, run_dir: Path | None, base_model: Any, state: _State) -> Any:
    """``cfg`` continuing ``run_dir``'s adapter when that run was trained from this base (its rank, alpha and
    layers kept, widened to the preset's layers when it asks for more); else ``cfg`` unchanged, from the base."""
    import yaml

    if run_dir is None or not _is_run_folder(run_dir):
        return cfg
    folder = run_dir / "adapter"
    trained = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    if base_model.gguf is not None:
        same = trained.get("base_gguf_sha256") == base_model.gguf_sha256
    else:
        same = (not trained.get("base_gguf_sha256")
                and Path(str(trained.get("base", ""))).resolve() == base_model.hf_dir.resolve())
    if not same:
        log.info("nightly: %s was trained from another base (%s); the candidate starts from the base",
                 run_dir, trained.get("base_gguf") or trained.get("base"))
        return cfg
    adapter = json.loads((folder / "adapter_config.json").read_text())
    layers = adapter.get("layers_to_transform")
    lora_layers = None if layers is None or cfg.lora_layers is None else max(cfg.lora_layers, len(layers))
    state.continued = str(run_dir)
    return cfg.replace(init_adapter=str(run_dir), lora_r=adapter["r"], lora_alpha=adapter["lora_alpha"],
                       lora_layers=lora_layers)


def _snapshot(store: Any, config: NightlyConfig) -> tuple[list, dict, Any, float, float | None]:
    """Labelled examples, their label rows, the serving version and the last cutoff — one consistent
    read (a WAL snapshot: the bot keeps writing meanwhile)."""
    from corefbot.models.ship import registry
    from corefbot.pipeline.export import store_examples
    from corefbot.pipeline.labels.rows import effective_labels

    store.salt()  # may write (first export ever): before the read transaction
    conn = store.db.conn
    conn.execute("BEGIN")
    try:
        examples = store_examples(store, config.window, use_member=config.use_member_labels)
        labels = effective_labels(store, use_member=config.use_member_labels)
        serving = registry.serving(store)
        cutoff, at = last_trained_cutoff(store)
    finally:
        conn.execute("COMMIT")
    return examples, labels, serving, cutoff, at


def _write_data(examples: list, out: Path, labels: dict) -> None:
    """The alpaca export of the snapshot, with a manifest (counts, sources, hash) beside it."""
    import hashlib

    from corefbot.pipeline.export import alpaca_rows, manifest_path

    data = json.dumps(alpaca_rows(examples), ensure_ascii=False, indent=1).encode()
    out.write_bytes(data)
    sources: dict[str, int] = {}
    counts: dict[str, int] = {}
    for e in examples:
        sources[labels[e.id].source] = sources.get(labels[e.id].source, 0) + 1
        counts[e.label] = counts.get(e.label, 0) + 1
    manifest_path(out).write_text(json.dumps({
        "path": str(out), "rows": len(examples), "labels": counts, "sources": sources,
        "sha256": hashlib.sha256(data).hexdigest(), "created_at": time.time()}, indent=2) + "\n")


def _baseline_f1(serving: Any, configured: Path | None, base: Path, test: list, cfg: Any) -> tuple[str, float]:
    """(name, test F1) of what the candidate must beat, evaluated on ``test`` the same way (under PyTorch): a
    configured model counts when it is a run folder (a GGUF cannot be evaluated there)."""
    from corefbot.models.train.evaluate import evaluate_decisions, load_model

    def f1_of(path: Path) -> float:
        model, tokenizer = load_model(path, device=cfg.device, dtype=cfg.dtype)
        try:
            return float(evaluate_decisions(model, tokenizer, test).stat("f1").mean)
        finally:
            del model

    run_dir = Path(serving.run_dir) if serving is not None and serving.run_dir else None
    ok = run_dir is not None and _is_run_folder(run_dir)
    if configured is not None and not _is_run_folder(configured):
        log.warning("nightly: the configured model %s is not a run folder PyTorch can load; comparing with the "
                    "base model", configured)
        configured = None
    return _compare_with(serving, run_dir if ok else None, base, f1_of, configured=configured)


def _compare_with(serving: Any, model: Path | None, base: Path, f1_of: Callable[[Path], float], *,
                  configured: Path | None = None) -> tuple[str, float]:
    """(name, F1) of the serving version measured from ``model`` (its files; None: none to evaluate); when
    nothing is promoted yet, of the ``configured`` model the bot serves, or of ``base``. A version registered
    by hand without files is compared by its recorded F1; one with neither cannot be compared."""
    if serving is None:
        if configured is not None and configured != Path(base).resolve():
            return f"the configured model {configured.name}", f1_of(configured)
        return "the base model", f1_of(base)
    if model is not None:
        return f"serving v{serving.id}", f1_of(model)
    if serving.f1 is not None:
        log.warning("serving v%d has no model files to evaluate (run folder %r, model %r); comparing with its "
                    "recorded F1", serving.id, serving.run_dir, serving.gguf_path)
        return f"serving v{serving.id} (recorded F1)", serving.f1
    raise ValueError(f"serving v{serving.id} has neither model files (run folder {serving.run_dir!r}, model "
                     f"{serving.gguf_path!r}) nor a recorded F1: nothing to compare a candidate with (roll back or "
                     "register its metrics)")


def _metrics(finetune_metrics: dict, state: _State) -> dict[str, Any]:
    d = finetune_metrics.get("test", {}).get("decision", {})
    return {"test_f1": d.get("f1", {}).get("mean"), "test_f1_std": d.get("f1", {}).get("std"),
            "test_precision": d.get("precision", {}).get("mean"), "test_recall": d.get("recall", {}).get("mean"),
            "test_examples": d.get("examples"), "baseline": state.baseline, "baseline_f1": state.f1_before,
            "labels": state.labels, "nightly_run": state.run_id}


def _trained_sentence(state: _State, config: NightlyConfig, preset: str, base: Path) -> str:
    train, _, test = state.sides
    measured = f"{state.evaluated} of {test}" if 0 < state.evaluated < test else f"{test}"
    minutes = state.seconds.get("train", 0.0) / 60
    continued = f", continuing {Path(state.continued).name}'s adapter" if state.continued else ""
    return (f"Nightly retrain ({config.trigger}): {state.labels} labels ({state.new_labels} new, "
            f"{state.needs} needing resolution); LoRA on {base.name} ({preset} preset{continued}) trained on {train} "
            f"examples in {minutes:.1f} min{state.budget_stop}; on {measured} held-out test questions {state.compared}, "
            f"decision F1 {_pct(state.f1_before)} ({state.baseline}) → {_pct(state.f1_after)} "
            f"({_signed_points((state.f1_after or 0) - (state.f1_before or 0))} points; "
            f"promotion needs {_signed_points(config.margin)}).")


def _failed_summary(state: _State, error: str) -> str:
    serving = f"v{state.serving_id}" if state.serving_id else "the model it had"
    return (f"Nightly retrain failed at step '{state.step}': {error}. Nothing was promoted; the bot keeps serving "
            f"{serving}." + (f" Run folder: {state.run_dir}." if state.run_dir else ""))


def _pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _points(x: float) -> str:
    return f"{100 * x:.1f}"


def _signed_points(x: float) -> str:
    return f"{100 * x:+.1f}"


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")
