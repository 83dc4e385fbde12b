"""/optout, /optin, /forgetme: for every member, in a group or in a private chat with the bot."""
from __future__ import annotations

import time

from nonebot import on_command
from nonebot.adapters import Bot, Event, Message
from nonebot.matcher import Matcher
from nonebot.params import CommandArg

from corefbot.pipeline.labels.forget import forget_member
from corefbot.pipeline.labels.prompts import close_prompts_of
from corefbot.pipeline.store import Store
from corefbot.plugins.chatlog.capture import platform_of

from corefbot.plugins.common.database import db, forget_open_runs

from .commands import _reply

optout = on_command("optout", priority=5, block=True, force_whitespace=True)
optin = on_command("optin", priority=5, block=True, force_whitespace=True)
forgetme = on_command("forgetme", priority=5, block=True, force_whitespace=True)


def _refusal(command: str, arg: Message) -> str | None:
    """These commands act on the sender only. An argument (``/forgetme @someone``) used to be ignored and
    the sender's own history deleted; now nothing is done and the member is told why."""
    if not arg.extract_plain_text().strip() and not any(not seg.is_text() for seg in arg):
        return None
    return (f"/{command} only acts on your own messages and takes no name or argument; nothing was done. "
            f"Send /{command} alone to apply it to yourself. Nobody can {_WHAT[command]} for someone else.")


_WHAT = {"optout": "stop recording", "optin": "resume recording", "forgetme": "delete messages"}


@optout.handle()
async def _optout(bot: Bot, event: Event, matcher: Matcher, arg: Message = CommandArg()) -> None:
    started = time.perf_counter()
    if refusal := _refusal("optout", arg):
        await _reply(matcher, bot, event, refusal, started)
        return
    platform, user = platform_of(bot), str(event.get_user_id())

    def work(store: Store) -> None:
        store.opt_out(platform, user)
        close_prompts_of(store, platform, user)

    await db(work)
    await _reply(matcher, bot, event, "OK: I no longer record your messages or ask you anything. "
                                      "/optin to undo, /forgetme to delete what is stored.", started)


@optin.handle()
async def _optin(bot: Bot, event: Event, matcher: Matcher, arg: Message = CommandArg()) -> None:
    started = time.perf_counter()
    if refusal := _refusal("optin", arg):
        await _reply(matcher, bot, event, refusal, started)
        return
    platform, user = platform_of(bot), str(event.get_user_id())
    await db(lambda store: store.opt_in(platform, user))
    await _reply(matcher, bot, event, "OK: your messages are recorded again.", started)


@forgetme.handle()
async def _forgetme(bot: Bot, event: Event, matcher: Matcher, arg: Message = CommandArg()) -> None:
    started = time.perf_counter()
    if refusal := _refusal("forgetme", arg):
        await _reply(matcher, bot, event, refusal, started)
        return
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
