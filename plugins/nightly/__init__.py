"""Nightly retraining: a cron job runs `corefbot nightly --now` in its own process, hot-swaps a promoted
model into the resolver and tells the moderators; /model commands for status, history, rollback, retrain."""
from nonebot import get_driver, logger, require
from nonebot.plugin import PluginMetadata

require("nonebot_plugin_apscheduler")
require("corefbot.plugins.chatlog")
require("corefbot.plugins.resolver")
require("corefbot.plugins.labels")  # its moderator check and chat-log purge

from nonebot_plugin_apscheduler import scheduler  # noqa: E402

from . import commands, runtime  # noqa: E402,F401  (registers the /model matcher)
from .config import Config  # noqa: E402
from .job import JOB_ID, SYNC_JOB_ID, install, make_trigger  # noqa: E402

__plugin_meta__ = PluginMetadata(
    name="corefbot nightly",
    description="Nightly LoRA retraining with a promotion check, GGUF export and hot-swap; /model commands.",
    usage="Runs at COREFBOT_NIGHTLY_TIME (03:30) in COREFBOT_TIMEZONE when COREFBOT_BASE_MODEL is set. "
          "Moderators: /model status | /model history [N] | /model rollback | /model retrain.",
    type="application",
    config=Config,
    supported_adapters={"~onebot.v11"},
)

driver = get_driver()


@driver.on_startup
async def _start() -> None:
    # Runs after the resolver's startup (registered first, through require): the service exists.
    cfg = runtime.config
    note = await runtime.follow_registry()
    if note:
        logger.info(f"corefbot nightly: {note}")
    if cfg.corefbot_nightly_follow_registry and cfg.corefbot_nightly_sync_s > 0:
        from apscheduler.triggers.interval import IntervalTrigger

        install(scheduler, IntervalTrigger(seconds=cfg.corefbot_nightly_sync_s), runtime.follow_registry,
                job_id=SYNC_JOB_ID)
    if not cfg.enabled:
        why = "COREFBOT_BASE_MODEL is not set" if cfg.corefbot_base_model is None else "COREFBOT_NIGHTLY_ENABLED=false"
        logger.info(f"corefbot nightly: scheduled retraining is off ({why}); /model retrain still works")
        return
    trigger = make_trigger(cfg)
    job = install(scheduler, trigger, runtime.scheduled_run)
    logger.info(f"corefbot nightly: retraining scheduled ({trigger}); work folder {runtime.work_dir()}"
                + (f", next run {job.next_run_time}" if getattr(job, "next_run_time", None) else ""))


@driver.on_shutdown
async def _stop() -> None:
    await runtime.get_runner().stop()


__all__ = ["Config"]
