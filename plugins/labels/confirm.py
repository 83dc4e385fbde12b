"""Member confirmation: after the resolver rewrote a question (or was unsure of it), quote the author's message,
@ them with the reading, and take their 1/2/3 as a member label. Limits, quiet hours and expiry are in
:mod:`corefbot.pipeline.labels`; every database step runs on the chatlog writer."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import nonebot
from nonebot import get_driver, logger

from corefbot.pipeline.labels.limits import wants_confirmation
from corefbot.pipeline.labels.prompts import answer_prompt, parse_answer, prompt_sent, reserve_prompt
from corefbot.pipeline.records import message_key
from corefbot.plugins.chatlog import Update, get_recorder
from corefbot.plugins.chatlog.capture import platform_of

from corefbot.plugins.common.database import db, purge

from . import runtime
from .texts import prompt_text

if TYPE_CHECKING:
    from corefbot.models.serve.types import Resolution


def _pick_bot(platform: str, mentions: tuple[str, ...]) -> Any | None:
    bots = [b for b in nonebot.get_bots().values() if platform_of(b) == platform]
    return next((b for b in bots if b.self_id in mentions), bots[0] if bots else None)


async def send_prompt(bot: Any, group: str, author: str, reply_to: str, text: str) -> str | None:
    """Quote the author's message and @ them (OneBot v11). Returns the bot message's id."""
    from nonebot.adapters.onebot.v11 import Bot as V11Bot, MessageSegment

    if not isinstance(bot, V11Bot):
        logger.warning(f"labels: member prompts are implemented for OneBot v11 only, not {bot.adapter.get_name()}")
        return None
    message = MessageSegment.text(" " + text)
    if author.isdigit():
        message = MessageSegment.at(int(author)) + message
    if reply_to.isdigit():
        message = MessageSegment.reply(int(reply_to)) + message
    result = await bot.send_group_msg(group_id=int(group), message=message)
    mid = result.get("message_id") if isinstance(result, dict) else None
    return str(mid) if mid is not None else None


async def on_resolution(update: Update, resolution: "Resolution") -> None:
    """The resolver's listener: ask the author to confirm when the limits allow it."""
    if not runtime.config.corefbot_labels_confirm:
        return
    merged = update.merged
    if not wants_confirmation(resolution.decision, resolution.rewrite, resolution.margin, runtime.limits):
        return
    t = runtime.now(update.message.timestamp)
    reading, rewrite = resolution.decision, resolution.rewrite
    reserved = await db(lambda store: reserve_prompt(store, merged, reading, rewrite, t, runtime.limits))
    if isinstance(reserved, str):
        logger.debug(f"labels: not asking about {merged.id}: {reserved}")
        return
    bot = _pick_bot(merged.platform, merged.mentions)
    mid = None
    try:
        if bot is None:
            raise RuntimeError(f"no {merged.platform} bot connected")
        # Quote the author's last line of the run: that is what they will see the prompt under.
        reply_to = merged.message_ids[-1].rsplit(":", 1)[-1]
        mid = await send_prompt(bot, merged.group, merged.sender, reply_to,
                                prompt_text(reading, rewrite, runtime.config.corefbot_labels_lang))
    except Exception as exc:  # noqa: BLE001 - a failed prompt is recorded as failed, never retried
        logger.warning(f"labels: could not send the prompt about {merged.id}: {exc!r}")
    await db(lambda store: prompt_sent(store, reserved.id, mid))
    if mid is not None:
        await purge([message_key(merged.platform, merged.group, mid)])


def wants_message(update: Update) -> bool:
    """Only a member's 1/2/3 can answer a prompt: other chat lines need no task on the event loop."""
    return not update.message.from_self and parse_answer(update.message.text) is not None


async def on_message_stored(update: Update) -> None:
    """The chatlog listener: a 1/2/3 from a prompted author becomes their member label."""
    message = update.message
    if message.from_self or parse_answer(message.text) is None:
        return  # most messages: decided here, without a trip to the writer
    t = runtime.now(message.timestamp)
    answered = await db(lambda store: answer_prompt(
        store, platform=message.platform, group=message.group, sender=message.sender, text=message.text,
        reply_to=message.reply_to, now=t))
    if answered is not None:
        logger.info(f"labels: member {message.sender} answered {answered.prompt.merged_id}: {answered.label}")
        await purge([message.key])


driver = get_driver()


@driver.on_startup
async def _start() -> None:
    get_recorder().add_listener(on_message_stored, wants=wants_message)
    try:
        from corefbot.plugins.resolver import get_service
    except ImportError:
        logger.warning("labels: corefbot.plugins.resolver is not loaded; members will not be asked to confirm")
        return
    try:
        get_service().add_resolution_listener(on_resolution)
    except RuntimeError as exc:
        logger.warning(f"labels: resolver service not running ({exc}); members will not be asked to confirm")
