"""Start-up repair: attach messages that are in no merged run.

Before a message and its run were written in one transaction (``Store.record_message``), a crash
between the two commits left a stored message in no run; a re-sent copy is a duplicate and returns
early, so it never reached a window or the question filter. The repair rebuilds the runs of each
affected group from its raw messages with the same concat rule and question filter as live capture.
Run ids are their first message's key, so every run the orphan does not touch keeps its id (and the
labels, decisions and outbox rows keyed by it).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from corefbot.pipeline.build import score_run
from corefbot.pipeline.merge import DEFAULT_GAP_S, merge_all
from corefbot.pipeline.question import QuestionFilter
from corefbot.pipeline.records import Merged
from corefbot.pipeline.sanitize import bounded
from corefbot.pipeline.store import Store


@dataclass(frozen=True, slots=True)
class RepairReport:
    orphans: int  # messages found in no run
    groups: int  # groups whose runs were rebuilt


def bounded_run(run: Merged, max_chars: int) -> Merged:
    """The copy of a run the derived tables keep: its text bounded (the raw messages stay whole)."""
    if max_chars <= 0 or len(run.text) <= max_chars:
        return run
    return dataclasses.replace(run, text=bounded(run.text, max_chars), message_ids=list(run.message_ids))


def repair_orphans(store: Store, *, gap_s: float = DEFAULT_GAP_S,
                   question_filter: QuestionFilter = QuestionFilter(), max_chars: int = 0) -> RepairReport:
    """Rebuild the runs of every group holding a message that is in no run; one transaction per group."""
    orphans = store.orphan_messages()
    groups = sorted({(m.platform, m.group) for m in orphans})
    for platform, group in groups:
        messages = (dataclasses.replace(m, text=bounded(m.text, max_chars)) if max_chars > 0 else m
                    for m in store.iter_messages(platform, group))
        runs = [score_run(bounded_run(run, max_chars), question_filter) for run in merge_all(messages, gap_s)]
        store.replace_merged(runs, platform, group)
    return RepairReport(orphans=len(orphans), groups=len(groups))
