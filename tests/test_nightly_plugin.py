"""plugins/nightly: the schedule (a controllable clock), never overlapping, the job in its own process,
and the /model commands over nonebug (permission allowed and refused, status, history, rollback, retrain)."""
from __future__ import annotations

import asyncio
import json
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from nonebug import App

from tests.onebot_events import Like, db, group_message, make_bot


# ---- the schedule ---------------------------------------------------------------------------------

def test_trigger_time_timezone_cron_and_enabled() -> None:
    from corefbot.plugins.nightly.config import Config
    from corefbot.plugins.nightly.job import make_trigger

    noon_utc = datetime(2026, 11, 21, 12, 0, tzinfo=timezone.utc)
    cfg = Config(corefbot_timezone="Asia/Shanghai")
    nxt = make_trigger(cfg).get_next_fire_time(None, noon_utc)
    assert nxt.astimezone(timezone.utc) == datetime(2026, 11, 21, 19, 30, tzinfo=timezone.utc)  # 03:30 +08:00
    cfg = Config(corefbot_timezone="Europe/Berlin", corefbot_nightly_time="23:05")
    assert make_trigger(cfg).get_next_fire_time(None, noon_utc).astimezone(timezone.utc) == \
        datetime(2026, 11, 21, 22, 5, tzinfo=timezone.utc)
    cfg = Config(corefbot_timezone="UTC", corefbot_nightly_cron="15 2 * * mon")  # the cron line wins
    assert make_trigger(cfg).get_next_fire_time(None, noon_utc) == datetime(2026, 11, 23, 2, 15, tzinfo=timezone.utc)
    with pytest.raises(ValueError, match="COREFBOT_NIGHTLY_CRON"):
        make_trigger(Config(corefbot_nightly_cron="every night"))
    with pytest.raises(ValueError, match="HH:MM"):
        Config(corefbot_nightly_time="3.30")
    with pytest.raises(Exception, match="Mars/Olympus"):
        Config(corefbot_timezone="Mars/Olympus")
    assert not Config().enabled  # no base model: off unless asked
    assert Config(corefbot_base_model="/models/qwen").enabled
    assert not Config(corefbot_base_model="/models/qwen", corefbot_nightly_enabled=False).enabled


def fake_job(tmp_path: Path, seconds: float, status: str = "skipped") -> list[str]:
    """A stand-in for `corefbot nightly --now --json`: notes when it ran, sleeps, prints a report line."""
    script = (
        "import json, sys, time\n"
        f"log = open({str(tmp_path / 'spans.txt')!r}, 'a')\n"
        "start = time.time()\n"
        f"time.sleep({seconds})\n"
        "log.write(f'{start} {time.time()}\\n')\n"
        "print('progress noise')\n"
        f"print(json.dumps({{'status': {status!r}, 'summary': 'fake run', 'trigger': sys.argv[1]}}))\n"
    )
    return [sys.executable, "-c", script]


def spans(tmp_path: Path) -> list[tuple[float, float]]:
    path = tmp_path / "spans.txt"
    return [tuple(map(float, line.split())) for line in path.read_text().splitlines()] if path.exists() else []


async def test_scheduler_fires_on_its_trigger_and_runs_never_overlap(tmp_path: Path) -> None:
    from apscheduler.schedulers.asyncio import AsyncIOScheduler
    from apscheduler.triggers.interval import IntervalTrigger

    from corefbot.plugins.nightly.job import NightlyRunner, install

    runner = NightlyRunner(lambda trigger, force: [*fake_job(tmp_path, 0.8), trigger], log_dir=tmp_path / "logs")
    reports = []

    async def job() -> None:
        reports.append(await runner.run("schedule"))

    scheduler = AsyncIOScheduler()
    # Fires every 0.2 s while one run takes 0.8 s: the job must never run twice at once.
    install(scheduler, IntervalTrigger(seconds=0.2, start_date=datetime.now(timezone.utc)), job)
    scheduler.start()
    try:
        # Until two runs have finished: a loaded machine starts each Python process slowly, so no fixed sleep.
        deadline = time.monotonic() + 60
        while len(spans(tmp_path)) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
    finally:
        scheduler.shutdown(wait=False)
    await runner.wait(10)
    done = spans(tmp_path)
    assert len(done) >= 2  # it fired, more than once
    for (_, end), (start, _) in zip(done, done[1:]):
        assert start >= end  # each run started after the previous one ended
    assert all(r.status == "skipped" and r.trigger == "schedule" for r in reports)


async def test_runner_refuses_a_second_start_and_reports_crashes(tmp_path: Path) -> None:
    from corefbot.plugins.nightly.job import NightlyRunner

    runner = NightlyRunner(lambda trigger, force: [*fake_job(tmp_path, 0.5), trigger], log_dir=tmp_path / "logs")
    first, second = await asyncio.gather(runner.run("schedule"), runner.run("moderator:1"))
    assert first.status == "skipped" and second.status == "busy" and "already in progress" in second.summary
    assert len(spans(tmp_path)) == 1 and not runner.running

    crash = NightlyRunner(lambda t, f: [sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(9)"],
                          log_dir=tmp_path / "logs")
    report = await crash.run("schedule")
    assert report.status == "failed" and "exit status 9" in report.summary and "boom" in report.error

    slow = NightlyRunner(lambda t, f: fake_job(tmp_path, 30), log_dir=tmp_path / "logs", timeout_s=0.5)
    started = time.monotonic()
    report = await slow.run("schedule")
    assert report.status == "failed" and "stopped" in report.error and time.monotonic() - started < 10


def test_job_argv_carries_the_bot_settings(tmp_path: Path) -> None:
    from corefbot.plugins.nightly.config import Config
    from corefbot.plugins.nightly.job import job_argv

    cfg = Config(corefbot_base_model=tmp_path / "base", corefbot_nightly_preset="tiny",
                 corefbot_nightly_margin=0.02, corefbot_nightly_max_minutes=45, corefbot_nightly_args="--max-steps 7")
    argv = job_argv(cfg, tmp_path / "corefbot.db", trigger="schedule", force=True)
    assert argv[:3] == [sys.executable, "-m", "corefbot.cli"]
    from corefbot.cli import build_parser

    args = build_parser().parse_args(argv[3:])
    assert (args.command, args.now, args.json, args.force, args.trigger) == ("nightly", True, True, True, "schedule")
    assert (args.db, args.base, args.preset, args.margin, args.max_steps, args.max_minutes) == \
        (str(tmp_path / "corefbot.db"), str(tmp_path / "base"), "tiny", 0.02, 7, 45)
    from corefbot.commands.nightly import config_from

    assert config_from(args).finetune_overrides == {"max_steps": 7, "max_minutes": 45}


# ---- /model ---------------------------------------------------------------------------------------

@pytest.fixture
async def registry_rows():
    """Model versions registered by a test are removed afterwards (the nonebug database is shared), and
    the resolver goes back to the model it had."""
    from corefbot.plugins.nightly import runtime
    from corefbot.plugins.resolver import get_service

    service = get_service()
    resolver = service.resolver
    yield
    await db(lambda s: s.db.conn.execute("DELETE FROM model_versions") and s.db.conn.commit())
    if service.resolver is not resolver:  # a test swapped in a llama.cpp model: put the original back
        swapped, service._resolver = service.resolver, resolver
        await asyncio.to_thread(swapped.close)
    runtime.mark_served(None)


async def test_model_commands_are_refused_for_members(app: App, registry_rows, tmp_path: Path) -> None:
    from corefbot.models.ship import registry
    from corefbot.plugins.nightly import runtime
    from corefbot.plugins.nightly.commands import REFUSAL

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    await db(lambda s: [registry.register(s, gguf_path=gguf, status="serving") for _ in range(2)])
    before = await db(lambda s: [(v.id, v.status) for v in registry.history(s)])
    async with app.test_matcher() as ctx:
        bot = make_bot(ctx)
        for text in ("/model", "/model status", "/model history", "/model rollback", "/model retrain"):
            event = group_message(text, group=701, user=41001, role="member")
            ctx.receive_event(bot, event)
            ctx.should_call_send(event, REFUSAL, result={"message_id": 1})
    assert await db(lambda s: [(v.id, v.status) for v in registry.history(s)]) == before
    assert not runtime.get_runner().running


async def test_model_status_and_history_for_an_admin(app: App, registry_rows, tmp_path: Path) -> None:
    from corefbot.models.ship import registry

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")

    def seed(store):
        a = registry.register(store, gguf_path=gguf, metrics={"test_f1": 0.5}, quant="q4_k_m", note="first",
                              status="serving")
        b = registry.register(store, gguf_path="", metrics={"test_f1": 0.45}, note="worse", status="rejected")
        return a.id, b.id

    a, b = await db(seed)
    async with app.test_matcher() as ctx:
        bot = make_bot(ctx)
        event = group_message("/model status", group=702, user=41002, role="admin")
        ctx.receive_event(bot, event)
        ctx.should_call_send(event, Like(rf"^serving: v{a} since .*F1 50\.0%, q4_k_m\nloaded: no local model.*"
                                         r"\nnightly: off \(COREFBOT_BASE_MODEL is not set\)"), result={"message_id": 2})
        event = group_message("/model history", group=702, user=41002, role="owner")
        ctx.receive_event(bot, event)
        ctx.should_call_send(event, Like(rf"^v{b} rejected .*F1 45\.0% — worse\nv{a} serving .*F1 50\.0%, q4_k_m — first$"),
                             result={"message_id": 3})
        event = group_message("/model frobnicate", group=702, user=90001)  # a superuser, any role
        ctx.receive_event(bot, event)
        ctx.should_call_send(event, Like(r"^/model status \| /model history"), result={"message_id": 4})


@pytest.mark.slow
async def test_model_rollback_swaps_the_served_model_back(app: App, registry_rows, tmp_path: Path,
                                                          tiny_gguf: Path) -> None:
    from corefbot.models.ship import registry
    from corefbot.plugins.nightly import runtime

    old, new = tmp_path / "old.gguf", tmp_path / "new.gguf"
    shutil.copy(tiny_gguf, old)
    shutil.copy(tiny_gguf, new)

    def seed(store):
        a = registry.register(store, gguf_path=old, metrics={"test_f1": 0.6}, status="serving")
        b = registry.register(store, gguf_path=new, metrics={"test_f1": 0.7}, status="serving")
        return a.id, b.id

    a, b = await db(seed)
    assert await runtime.follow_registry() == f"The bot now serves v{b}."  # what a promotion does
    assert runtime.loaded_model_path() == str(new)
    async with app.test_matcher() as ctx:
        bot = make_bot(ctx)
        event = group_message("/model rollback", group=703, user=41003, role="admin")
        ctx.receive_event(bot, event)
        ctx.should_call_send(event, f"rolled back: v{b} withdrawn; now serving v{a} (F1 60.0%)",
                             result={"message_id": 5})
        event = group_message("/model rollback", group=703, user=41003, role="admin")
        ctx.receive_event(bot, event)
        ctx.should_call_send(event, Like(rf"^not rolled back: model version {a} is the only one"),
                             result={"message_id": 6})
    assert runtime.loaded_model_path() == str(old)
    statuses = await db(lambda s: {v.id: v.status for v in registry.history(s)})
    assert statuses == {a: "serving", b: "rolled_back"}
    assert await runtime.follow_registry() == ""  # already serving what the registry says


async def test_model_retrain_runs_the_job_in_its_own_process_and_reports_back(app: App, registry_rows) -> None:
    """The real `corefbot nightly --now` in a child process; with no base model configured it fails
    cleanly, and the summary reaches the superuser privately and the asking group."""
    from corefbot.plugins.nightly import runtime

    async with app.test_matcher() as ctx:
        bot = make_bot(ctx)
        event = group_message("/model retrain", group=704, user=41004, role="admin")
        ctx.receive_event(bot, event)
        ctx.should_call_send(event, Like(r"^retraining started in the background"), result={"message_id": 7})
    # The handler has answered; the job runs on in its own process (a Python start-up: about a second).
    async with app.test_api() as ctx:
        make_bot(ctx)
        failed = r"^Nightly retrain failed at step 'train': ValueError: no base model configured"
        ctx.should_call_api("send_private_msg", {"user_id": 90001, "message": Like(failed)}, result={"message_id": 8})
        ctx.should_call_api("send_group_msg", {"group_id": 704, "message": Like(failed)}, result={"message_id": 9})
        await asyncio.wait_for(asyncio.gather(*list(runtime._tasks)), 60)
    report = runtime.get_runner().last
    assert report is not None and report.status == "failed" and report.trigger == "moderator:41004"
    runs = await db(lambda s: s.db.conn.execute(
        "SELECT status, trigger, report FROM nightly_runs ORDER BY id DESC LIMIT 1").fetchone())
    assert runs[:2] == ("failed", "moderator:41004") and json.loads(runs[2])["failed_step"] == "train"


async def test_announce_goes_to_the_moderator_groups_when_set(app: App) -> None:
    from corefbot.plugins.nightly import runtime

    saved = runtime.config.corefbot_moderator_groups, runtime.config.corefbot_nightly_notify
    try:
        async with app.test_api() as ctx:
            make_bot(ctx)
            runtime.config.corefbot_moderator_groups = {"801", "802"}
            ctx.should_call_api("send_group_msg", {"group_id": 801, "message": "summary"}, result={"message_id": 1})
            ctx.should_call_api("send_group_msg", {"group_id": 802, "message": "summary"}, result={"message_id": 2})
            assert await runtime.announce("summary") == 2
            ctx.should_call_api("send_group_msg", {"group_id": 802, "message": "again"}, result={"message_id": 3})
            assert await runtime.announce("again", skip_group="801") == 1  # the asking group hears it once
            runtime.config.corefbot_nightly_notify = "none"
            assert await runtime.announce("quiet") == 0
    finally:
        runtime.config.corefbot_moderator_groups, runtime.config.corefbot_nightly_notify = saved
