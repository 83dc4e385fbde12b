"""/model: moderators look at and steer the served model.

- ``/model status`` — the serving version, the model the bot actually has loaded, the schedule, the last run;
- ``/model history [N]`` — the registry's latest versions, newest first;
- ``/model rollback`` — serve again the version the current one replaced (registry, then hot-swap);
- ``/model retrain`` — run the nightly job now, in the background (even with few new labels); the
  summary comes back in this chat when it is done.

Permission: the labels plugin's moderators (superusers, the group's owner and admins, COREFBOT_MODERATORS).
"""
from __future__ import annotations

import math
from datetime import datetime

from nonebot import on_command
from nonebot.adapters import Bot, Event, Message
from nonebot.matcher import Matcher
from nonebot.params import CommandArg

from corefbot.models.ship import registry
from corefbot.models.ship.nightly import recent_runs
from corefbot.pipeline.store import Store
from corefbot.plugins.chatlog.capture import group_of
from corefbot.plugins.common.database import db
from corefbot.plugins.common.moderators import is_moderator
from corefbot.plugins.common.replies import reply_off_the_record

from . import runtime
from .job import JOB_ID

USAGE = "/model status | /model history [N] | /model rollback | /model retrain"
REFUSAL = "/model is for moderators (superusers, group owner/admins, COREFBOT_MODERATORS)."

model_cmd = on_command("model", priority=5, block=True, force_whitespace=True)


@model_cmd.handle()
async def _model(bot: Bot, event: Event, matcher: Matcher, arg: Message = CommandArg()) -> None:
    if not await is_moderator(bot, event):
        await reply_off_the_record(matcher, bot, event, REFUSAL)
        return
    words = arg.extract_plain_text().split()
    action, rest = (words[0].lower(), words[1:]) if words else ("status", [])
    if action == "status":
        text = await _status()
    elif action == "history":
        limit = int(rest[0]) if rest and rest[0].isdigit() else 8
        text = await db(lambda store: _history(store, max(1, min(limit, 30))))
    elif action == "rollback":
        text = await _rollback()
    elif action == "retrain":
        text = _retrain(bot, event)
    else:
        text = USAGE
    await reply_off_the_record(matcher, bot, event, text)


# ---- status and history --------------------------------------------------------------------------

def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M") if ts else "?"


def _f1(version: registry.ModelVersion) -> str:
    f1 = version.f1
    return "F1 n/a" if f1 is None or math.isnan(f1) else f"F1 {100 * f1:.1f}%"


def _version_line(v: registry.ModelVersion) -> str:
    quant = f", {v.quant}" if v.quant else ""
    note = f" — {v.note}" if v.note else ""
    return f"v{v.id} {v.status} {_when(v.created_at)}, {_f1(v)}{quant}{note}"


def _history(store: Store, limit: int) -> str:
    versions = registry.history(store, limit)
    if not versions:
        return "no model versions registered yet (the nightly job or corefbot export-gguf adds them)"
    return "\n".join(_version_line(v) for v in versions)


async def _status() -> str:
    def read(store: Store) -> tuple:
        return registry.serving(store), recent_runs(store, 1)

    serving, runs = await db(read)
    lines = []
    if serving is None:
        lines.append("serving: no registered version (the configured model or the rules backend)")
    else:
        lines.append(f"serving: v{serving.id} since {_when(serving.promoted_at)}, {_f1(serving)}"
                     + (f", {serving.quant}" if serving.quant else ""))
    loaded = runtime.loaded_model_path()
    lines.append(f"loaded: {loaded}" if loaded else "loaded: no local model (rules or http backend)")
    cfg = runtime.config
    if cfg.enabled:
        from nonebot_plugin_apscheduler import scheduler

        job = scheduler.get_job(JOB_ID)
        nxt = job.next_run_time.strftime("%Y-%m-%d %H:%M %Z") if job and job.next_run_time else "not scheduled"
        lines.append(f"nightly: next {nxt}; preset {cfg.corefbot_nightly_preset}, at least "
                     f"{cfg.corefbot_nightly_min_new_labels} new labels, F1 margin "
                     f"{100 * cfg.corefbot_nightly_margin:.1f} points")
    else:
        why = "COREFBOT_BASE_MODEL is not set" if cfg.corefbot_base_model is None else "COREFBOT_NIGHTLY_ENABLED=false"
        lines.append(f"nightly: off ({why})")
    runner = runtime.get_runner()
    if runner.running:
        lines.append(f"running now: {runner.trigger}, since {_when(runner.started_at)}")
    if runs:
        last = runs[0]
        lines.append(f"last run #{last.id} {_when(last.started_at)} ({last.trigger}): {last.status}"
                     + (f" — {last.summary}" if last.summary else ""))
    return "\n".join(lines)


# ---- rollback and retrain ------------------------------------------------------------------------

async def _rollback() -> str:
    from corefbot.plugins.resolver import get_service

    def roll(store: Store) -> tuple[registry.ModelVersion | None, registry.ModelVersion]:
        withdrawn = registry.serving(store)
        return withdrawn, registry.rollback(store)

    try:
        withdrawn, now = await db(roll)
    except registry.RegistryError as exc:
        return f"not rolled back: {exc}"
    old = f"v{withdrawn.id} withdrawn; " if withdrawn else ""
    if not runtime.serves_local_models():
        return f"registry rolled back: {old}v{now.id} serving (not loaded: COREFBOT_RESOLVER is not llama-cpp)"
    try:
        await get_service().swap_model(now.gguf_path)
    except Exception as exc:  # noqa: BLE001 - the registry changed; say plainly that the model did not
        runtime.mark_served(now.id)
        return (f"registry rolled back to v{now.id}, but loading {now.gguf_path} failed ({exc}); "
                f"the bot still serves {runtime.loaded_model_path() or 'its previous model'}")
    runtime.mark_served(now.id)
    return f"rolled back: {old}now serving v{now.id} ({_f1(now)})"


def _retrain(bot: Bot, event: Event) -> str:
    runner = runtime.get_runner()
    if runner.running:
        return f"a run is already in progress ({runner.trigger}, since {_when(runner.started_at)})"
    user, group, self_id = str(event.get_user_id()), group_of(event), str(bot.self_id)

    async def go() -> None:
        report = await runtime.run_and_announce(f"moderator:{user}", force=True, skip_group=group,
                                                skip_user=None if group else user)
        # The bot connection the command came on may have been replaced meanwhile: look it up again.
        await runtime.tell(report.summary, self_id=self_id, group=group, user=user)

    runtime.background(go())
    return "retraining started in the background; I will post the summary here when it is done"
