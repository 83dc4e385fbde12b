"""The one short reply an asker gets when the outbox gives up on their question (assistant unavailable).

The outbox marks an item's ``notice`` due when it fails or expires without an answer; the service's
outbox loop hands each due item to :func:`tell_asker`. Posting is claimed first (``due → sending``), so a
notice is posted at most once; one found in ``sending`` at start-up is never re-posted.
"""
from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable

from . import outbox

log = logging.getLogger("corefbot.resolver")
DbCall = Callable[[Callable[[Any], Any]], Awaitable[Any]]
PostReply = Callable[[outbox.OutboxItem, str], Awaitable[str | None]]


async def due(db: DbCall, text: str, inflight: set[int]) -> list[outbox.OutboxItem]:
    """Items owing their asker a notice and not being handled already ([] when notices are off)."""
    if not text:
        return []
    try:
        return [i for i in await db(outbox.notices_due) if i.id not in inflight]
    except Exception:  # noqa: BLE001 - database trouble: the next loop tries again
        log.exception("outbox: could not read due notices")
        return []


async def tell_asker(item: outbox.OutboxItem, text: str, *, db: DbCall, post_reply: PostReply,
                     unavailable: type[Exception]) -> None:
    """Post ``text`` quoting the item's question and @-mentioning its asker, at most once.

    ``unavailable`` is the poster's "no bot connected, nothing sent" error: the notice stays due."""
    if not await db(lambda s: outbox.claim_notice(s, item.id)):
        return
    log.error("outbox %d (%s): gave up without an answer (%s); telling the asker", item.id, item.merged_id, item.error)
    try:
        await post_reply(item, text)
    except unavailable:
        await db(lambda s: outbox.finish_notice(s, item.id, "due"))
        return
    except Exception as exc:  # noqa: BLE001 - may be in the group already: never posted twice
        log.error("outbox %d: posting the unavailable notice into %s failed (%r)", item.id, item.group, exc)
        await db(lambda s: outbox.finish_notice(s, item.id, "failed"))
        return
    await db(lambda s: outbox.finish_notice(s, item.id, "sent"))
