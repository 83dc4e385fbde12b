"""The plugin's state and its actions: the runner, following the registry, telling the moderators."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Awaitable

import nonebot
from nonebot import get_plugin_config, logger

from corefbot.models.ship import registry
from corefbot.models.ship.nightly import NightlyReport
from corefbot.pipeline.records import message_key
from corefbot.plugins.common.database import db, purge
from corefbot.plugins.chatlog.capture import platform_of
from corefbot.plugins.chatlog.handlers import db_path

from .config import Config
from .job import NightlyRunner, job_argv

config = get_plugin_config(Config)
_runner: NightlyRunner | None = None
_served_version: int | None = None  # the registry version the bot last switched to (or found serving)
_swap_lock = asyncio.Lock()
_tasks: set[asyncio.Task] = set()


def work_dir() -> Path:
    return config.work_dir(db_path())


def get_runner() -> NightlyRunner:
    global _runner
    if _runner is None:
        _runner = NightlyRunner(lambda trigger, force: job_argv(config, db_path(), trigger=trigger, force=force),
                                log_dir=work_dir() / "logs", timeout_s=config.corefbot_nightly_timeout_s)
    return _runner


def set_runner(runner: NightlyRunner) -> NightlyRunner:
    """Replace the runner (tests run a stand-in job command); returns the previous one."""
    global _runner
    previous, _runner = get_runner(), runner
    return previous


def background(coro: Awaitable[Any]) -> asyncio.Task:
    """Keep a reference to a fire-and-forget task (the loop only keeps weak ones)."""
    task = asyncio.ensure_future(coro)
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
    return task


# ---- what serves ---------------------------------------------------------------------------------

def loaded_model_path() -> str | None:
    """The GGUF the resolver serves right now (None: no llama-cpp model loaded)."""
    from corefbot.plugins.resolver import get_service

    try:
        backend = get_service().resolver.backend
    except RuntimeError:
        return None
    path = getattr(backend, "model_path", None)
    return str(path) if path else None


def serves_local_models() -> bool:
    """False when the operator chose another backend explicitly (COREFBOT_RESOLVER=rules or http): then
    registry changes are recorded but never loaded into the bot."""
    from corefbot.plugins.resolver.handlers import config as resolver_config

    return resolver_config.corefbot_resolver in (None, "llama-cpp")


async def follow_registry() -> str:
    """Serve the registry's serving version if the bot is not serving it yet. Returns a sentence for
    the moderators when something happened (swapped, or the swap failed), else ""."""
    global _served_version
    if not config.corefbot_nightly_follow_registry or not serves_local_models():
        return ""
    from corefbot.plugins.resolver import get_service

    async with _swap_lock:
        version = await db(registry.serving)
        if version is None or version.id == _served_version:
            return ""
        loaded = loaded_model_path()
        if loaded and Path(loaded).resolve() == Path(version.gguf_path).resolve():
            _served_version = version.id
            return ""
        try:
            await get_service().swap_model(version.gguf_path)
        except Exception as exc:  # noqa: BLE001 - a model that will not load must not take the bot down
            _served_version = version.id  # do not retry a broken file every minute; a moderator decides
            logger.error(f"corefbot nightly: could not load v{version.id} ({version.gguf_path}): {exc!r}")
            return (f"Loading v{version.id} failed ({exc}); the bot still serves {loaded or 'its previous model'} "
                    f"— /model rollback returns the registry to the previous version.")
        _served_version = version.id
        logger.info(f"corefbot nightly: now serving v{version.id} ({version.gguf_path})")
        return f"The bot now serves v{version.id}."


def mark_served(version_id: int | None) -> None:
    global _served_version
    _served_version = version_id


# ---- telling the moderators -------------------------------------------------------------------

def _v11_bot() -> Any | None:
    from nonebot.adapters.onebot.v11 import Bot as V11Bot

    return next((b for b in nonebot.get_bots().values() if isinstance(b, V11Bot)), None)


def targets() -> tuple[list[str], list[str]]:
    """(group ids, superuser ids) that get the nightly summary."""
    mode = config.corefbot_nightly_notify
    groups = sorted(config.corefbot_moderator_groups)
    if mode == "none":
        return [], []
    if mode == "groups" or (mode == "auto" and groups):
        return groups, []
    return [], sorted(nonebot.get_driver().config.superusers)


async def announce(text: str, *, skip_group: str | None = None, skip_user: str | None = None) -> int:
    """Send ``text`` (one message) to each target; returns how many were sent. The bot's own posts in
    moderator groups are removed from the chat log again (they are not chat)."""
    groups, users = targets()
    groups = [g for g in groups if g != skip_group]
    users = [u for u in users if u != skip_user]
    if not groups and not users:
        return 0
    bot = _v11_bot()
    if bot is None:
        logger.warning(f"corefbot nightly: no OneBot v11 bot connected to tell the moderators: {text}")
        return 0
    sent = 0
    sent_keys: list[str] = []  # the summary is about the model, not chat: kept out of the chat log
    for group in groups:
        try:
            result = await bot.send_group_msg(group_id=int(group), message=text)
            sent += 1
            if isinstance(result, dict) and result.get("message_id") is not None:
                sent_keys.append(message_key(platform_of(bot), group, str(result["message_id"])))
        except Exception as exc:  # noqa: BLE001 - one unreachable group must not stop the others
            logger.error(f"corefbot nightly: could not post the summary in group {group}: {exc!r}")
    for user in users:
        try:
            await bot.send_private_msg(user_id=int(user), message=text)
            sent += 1
        except Exception as exc:  # noqa: BLE001
            logger.error(f"corefbot nightly: could not send the summary to {user}: {exc!r}")
    if sent_keys:
        await purge(sent_keys)
    return sent


async def tell(text: str, *, self_id: str, group: str | None, user: str) -> bool:
    """Post ``text`` in ``group`` (or privately to ``user``) through the bot ``self_id`` if it is connected."""
    bot = nonebot.get_bots().get(self_id) or _v11_bot()
    if bot is None:
        logger.warning(f"corefbot nightly: no bot connected to answer {user}: {text}")
        return False
    try:
        if group is not None:
            await bot.send_group_msg(group_id=int(group), message=text)
        else:
            await bot.send_private_msg(user_id=int(user), message=text)
        return True
    except Exception as exc:  # noqa: BLE001 - the chat may be gone; the moderators were told anyway
        logger.error(f"corefbot nightly: could not answer {user} in {group or 'private'}: {exc!r}")
        return False


async def run_and_announce(trigger: str, *, force: bool = False, skip_group: str | None = None,
                           skip_user: str | None = None) -> NightlyReport:
    """One run in its own process; after a promotion the resolver switches to the new model; then one
    message to the moderators (a run refused as busy is only logged)."""
    report = await get_runner().run(trigger, force=force)
    text = report.summary
    if report.status == "promoted":
        note = await follow_registry()
        text = f"{text} {note}".strip()
    if report.status != "busy":
        await announce(text, skip_group=skip_group, skip_user=skip_user)
    return NightlyReport.from_dict({**report.to_dict(), "summary": text})


async def scheduled_run() -> None:
    """The scheduler's job."""
    try:
        await run_and_announce("schedule")
    except Exception:  # noqa: BLE001 - apscheduler would only log it less clearly
        logger.exception("corefbot nightly: the scheduled run failed")
