"""/optout, /optin, /forgetme: for every member, in a group or in a private chat with the bot."""
from __future__ import annotations

import time

from nonebot import on_command
from nonebot.adapters import Bot, Event
from nonebot.matcher import Matcher

from corefbot.pipeline.labels.forget import forget_member
from corefbot.pipeline.labels.prompts import close_prompts_of
from corefbot.pipeline.store import Store
from corefbot.plugins.chatlog.capture import platform_of

from corefbot.plugins.common.database import db, forget_open_runs

from .commands import _reply

optout = on_command("optout", priority=5, block=True, force_whitespace=True)
optin = on_command("optin", priority=5, block=True, force_whitespace=True)
forgetme = on_command("forgetme", priority=5, block=True, force_whitespace=True)


@optout.handle()
async def _optout(bot: Bot, event: Event, matcher: Matcher) -> None:
    started = time.perf_counter()
    platform, user = platform_of(bot), str(event.get_user_id())

    def work(store: Store) -> None:
        store.opt_out(platform, user)
        close_prompts_of(store, platform, user)

    await db(work)
    await _reply(matcher, bot, event, "OK: I no longer record your messages or ask you anything. "
                                      "/optin to undo, /forgetme to delete what is stored.", started)


@optin.handle()
async def _optin(bot: Bot, event: Event, matcher: Matcher) -> None:
    started = time.perf_counter()
    platform, user = platform_of(bot), str(event.get_user_id())
    await db(lambda store: store.opt_in(platform, user))
    await _reply(matcher, bot, event, "OK: your messages are recorded again.", started)


@forgetme.handle()
async def _forgetme(bot: Bot, event: Event, matcher: Matcher) -> None:
    started = time.perf_counter()
    platform, user = platform_of(bot), str(event.get_user_id())

    def work(store: Store):
        groups = {(platform, g) for (g,) in store.db.conn.execute(
            "SELECT DISTINCT group_id FROM messages WHERE platform = ? AND sender = ?", (platform, user))}
        done = forget_member(store, platform, user)
        forget_open_runs(groups)  # their open run must not come back with their next line
        return done

    done = await db(work)
    await _reply(matcher, bot, event, f"Done: deleted {done.messages} of your messages and every label, prompt "
                                      "and reply about them. /optout to stop recording from now on.", started)
