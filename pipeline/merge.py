"""The concat rule: merge each member's consecutive lines into one query.

A message joins the open run of its group when it comes from the run's sender, is not a reply, and
follows the run's last message by at most ``gap_s`` seconds (18 s in the paper). A reply, a message
from someone else, or a longer pause opens a new run. Every message belongs to exactly one run: the
reference code dropped the message that ends a run, this one does not.

The same :class:`Merger` runs live (one message at a time, as the bot receives them) and in batch
(``corefbot build``), so both give the same runs for messages that arrive in time order.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

from corefbot.pipeline.records import Merged, Message

DEFAULT_GAP_S = 18.0
GroupKey = tuple[str, str]


def joins(run: Merged, message: Message, gap_s: float = DEFAULT_GAP_S) -> bool:
    """Whether ``message`` continues ``run`` under the concat rule (boundary inclusive)."""
    return (
        message.sender == run.sender
        and message.reply_to is None
        and 0 <= message.timestamp - run.end_timestamp <= gap_s
    )


def start_run(message: Message) -> Merged:
    return Merged(
        id=message.key, platform=message.platform, group=message.group, sender=message.sender,
        sender_name=message.sender_name, text=message.text, timestamp=message.timestamp,
        end_timestamp=message.timestamp, message_ids=[message.key], reply_to=message.reply_to,
        mentions=message.mentions, from_self=message.from_self,
    )


def extend_run(run: Merged, message: Message) -> Merged:
    """Append ``message`` to the open run, in place (a run grows; nothing else holds it)."""
    run.text = f"{run.text}\n{message.text}"
    run.end_timestamp = message.timestamp
    run.message_ids.append(message.key)
    run.mentions += tuple(m for m in message.mentions if m not in run.mentions)
    run.sender_name = message.sender_name or run.sender_name
    return run


class Merger:
    """Incremental concat rule over many groups; keeps only each group's open run.

    ``load_open`` lets a restarted bot pick up the run still open in the database.
    """

    def __init__(self, gap_s: float = DEFAULT_GAP_S,
                 load_open: Callable[[str, str], Merged | None] | None = None) -> None:
        self.gap_s = gap_s
        self._open: dict[GroupKey, Merged] = {}
        self._load_open = load_open

    def feed(self, message: Message) -> tuple[Merged, Merged | None]:
        """Apply one message. Returns (the run it now belongs to, the run it closed or None)."""
        key = (message.platform, message.group)
        run = self._open.get(key)
        if run is None and self._load_open is not None:
            run = self._load_open(*key)
        if run is not None and joins(run, message, self.gap_s):
            run = extend_run(run, message)
            closed = None
        else:
            closed, run = run, start_run(message)
        self._open[key] = run
        return run, closed

    def forget(self, platform: str, group: str) -> None:
        self._open.pop((platform, group), None)


def merge_all(messages: Iterable[Message], gap_s: float = DEFAULT_GAP_S) -> Iterator[Merged]:
    """Batch concat over messages sorted by group and time; yields each run once, complete."""
    merger = Merger(gap_s)
    last: dict[GroupKey, Merged] = {}
    for message in messages:
        run, closed = merger.feed(message)
        if closed is not None:
            yield closed
        last[(message.platform, message.group)] = run
    yield from last.values()  # each group's final run
