"""Running the nightly job from the bot: the schedule, a separate process, hot-swap, the moderators' message.

The job itself (``corefbot.models.ship.nightly.run_nightly``) never runs inside the bot: :class:`NightlyRunner` starts
``python -m corefbot.cli nightly --now --json`` as a child process and reads its one-line JSON report. Two
runs never overlap: the runner refuses a second start while its child is alive, and the job's file lock
refuses a run started anywhere else (another bot, a shell) — the child then reports ``busy``.

The registry decides what serves. After a promotion (or a moderator's rollback) :func:`follow_registry`
hot-swaps the resolver to the registry's serving GGUF; it also runs at startup and every
``COREFBOT_NIGHTLY_SYNC_S`` seconds, so a promotion or rollback made from the command line reaches the bot too.
"""
from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from nonebot import logger

from corefbot.models.ship.nightly import NightlyReport

from .config import Config

if TYPE_CHECKING:
    from apscheduler.schedulers.base import BaseScheduler
    from apscheduler.triggers.cron import CronTrigger

JOB_ID = "corefbot-nightly"
SYNC_JOB_ID = "corefbot-nightly-follow-registry"
LOG_TAIL_CHARS = 600


def timezone(config: Config) -> Any:
    if config.corefbot_timezone:
        from zoneinfo import ZoneInfo

        return ZoneInfo(config.corefbot_timezone)
    from tzlocal import get_localzone

    return get_localzone()


def make_trigger(config: Config) -> "CronTrigger":
    """COREFBOT_NIGHTLY_CRON when set, else every day at COREFBOT_NIGHTLY_TIME, in COREFBOT_TIMEZONE."""
    from apscheduler.triggers.cron import CronTrigger

    tz = timezone(config)
    if config.corefbot_nightly_cron:
        try:
            return CronTrigger.from_crontab(config.corefbot_nightly_cron, timezone=tz)
        except ValueError as exc:
            raise ValueError(f"COREFBOT_NIGHTLY_CRON={config.corefbot_nightly_cron!r}: {exc}") from None
    hour, minute = config.corefbot_nightly_time.split(":")
    return CronTrigger(hour=int(hour), minute=int(minute), timezone=tz)


def job_argv(config: Config, db_path: str | Path, *, trigger: str, force: bool = False) -> list[str]:
    """The command line of one run: ``corefbot --db DB nightly --now --json`` with the bot's settings."""
    argv = [sys.executable, "-m", "corefbot.cli", "--db", str(db_path), "nightly", "--now", "--json",
            "--trigger", trigger, "--preset", config.corefbot_nightly_preset,
            "--min-new-labels", str(config.corefbot_nightly_min_new_labels),
            "--margin", str(config.corefbot_nightly_margin), "--quant", config.corefbot_nightly_quant,
            "--min-agreement", str(config.corefbot_nightly_min_agreement),
            "--keep-runs", str(config.corefbot_nightly_keep_runs)]
    if config.corefbot_nightly_max_minutes:
        argv += ["--max-minutes", str(config.corefbot_nightly_max_minutes)]
    if config.corefbot_base_model:
        argv += ["--base", str(config.corefbot_base_model)]
    if config.corefbot_nightly_dir:
        argv += ["--work-dir", str(config.corefbot_nightly_dir)]
    if force:
        argv.append("--force")
    return argv + shlex.split(config.corefbot_nightly_args)


def _failed(trigger: str, started: float, summary: str, error: str) -> NightlyReport:
    return NightlyReport(status="failed", summary=summary, reason="the job process failed", trigger=trigger,
                         started_at=started, finished_at=time.time(), error=error)


class NightlyRunner:
    """Starts the job's process, one at a time, and turns its output into a :class:`NightlyReport`."""

    def __init__(self, argv_for: Callable[[str, bool], Sequence[str]], *, log_dir: Path,
                 timeout_s: float = 8 * 3600.0) -> None:
        self.argv_for = argv_for  # (trigger, force) -> command line
        self.log_dir = log_dir
        self.timeout_s = timeout_s
        self.started_at: float | None = None  # set while a run is going
        self.trigger: str = ""
        self.last: NightlyReport | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._done = asyncio.Event()
        self._done.set()

    @property
    def running(self) -> bool:
        return self.started_at is not None

    async def wait(self, timeout: float | None = None) -> None:
        """Until no run is going (tests, shutdown)."""
        await asyncio.wait_for(self._done.wait(), timeout)

    async def run(self, trigger: str, *, force: bool = False) -> NightlyReport:
        """Run the job once and return its report; ``busy`` at once when a run is already going."""
        if self.running:
            since = datetime.fromtimestamp(self.started_at or 0).strftime("%H:%M")
            reason = f"a nightly run ({self.trigger}) is already in progress since {since}"
            logger.info(f"corefbot nightly: not starting ({trigger}): {reason}")
            return NightlyReport(status="busy", summary=f"Nightly retrain not started: {reason}.", reason=reason,
                                 trigger=trigger, started_at=time.time(), finished_at=time.time())
        self.started_at, self.trigger = time.time(), trigger
        self._done.clear()
        try:
            report = await self._run(trigger, force)
        finally:
            self.started_at, self._proc = None, None
            self._done.set()
        self.last = report
        return report

    async def _run(self, trigger: str, force: bool) -> NightlyReport:
        started = time.time()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{datetime.now():%Y%m%d-%H%M%S}-{trigger.replace(':', '-')}.log"
        argv = list(self.argv_for(trigger, force))
        logger.info(f"corefbot nightly: starting ({trigger}); log {log_path}")
        with open(log_path, "wb") as log_file:
            try:
                proc = self._proc = await asyncio.create_subprocess_exec(
                    *argv, stdout=asyncio.subprocess.PIPE, stderr=log_file, stdin=asyncio.subprocess.DEVNULL,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
            except OSError as exc:
                return _failed(trigger, started, f"Nightly retrain could not start: {exc}.", str(exc))
            try:
                out, _ = await asyncio.wait_for(proc.communicate(), self.timeout_s)
            except asyncio.TimeoutError:
                await _stop(proc)
                error = f"still running after {self.timeout_s:g} s; stopped"
                return _failed(trigger, started, f"Nightly retrain {error}. Nothing was promoted.", error)
            except asyncio.CancelledError:  # the bot is shutting down: do not leave the job orphaned
                await _stop(proc)
                raise
        report = _parse_report(out.decode("utf-8", "replace"))
        if report is None:
            tail = _tail(log_path)
            error = f"exit status {proc.returncode}, no report; log {log_path}: …{tail}"
            return _failed(trigger, started, f"Nightly retrain crashed (exit status {proc.returncode}); "
                                             f"the serving model is unchanged. Log: {log_path}", error)
        logger.info(f"corefbot nightly: {report.status} ({trigger}) in {time.time() - started:.0f} s")
        return report

    async def stop(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            await _stop(self._proc)


async def _stop(proc: asyncio.subprocess.Process, grace_s: float = 10.0) -> None:
    if proc.returncode is not None:
        return
    proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), grace_s)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()


def _parse_report(stdout: str) -> NightlyReport | None:
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return NightlyReport.from_dict(json.loads(line))
            except (ValueError, TypeError) as exc:
                logger.error(f"corefbot nightly: unreadable report line ({exc}): {line[:200]}")
                return None
    return None


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-LOG_TAIL_CHARS:].strip()
    except OSError:
        return ""


def install(scheduler: "BaseScheduler", trigger: Any, job: Callable[[], Any], *, job_id: str = JOB_ID) -> Any:
    """Add (or replace) the nightly job: one instance at a time; a missed run within an hour still runs
    once (the bot was down at 03:30), several missed runs run once."""
    return scheduler.add_job(job, trigger, id=job_id, replace_existing=True, max_instances=1, coalesce=True,
                             misfire_grace_time=3600)
