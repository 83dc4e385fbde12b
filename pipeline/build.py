"""The batch pipeline (``corefbot build``): concat rule + question filter over everything stored.

Runs are rebuilt from the raw messages, so re-running is safe and canonical; a run's id is its first
message's key, so labels and decisions attached to it survive a rebuild.
"""
from __future__ import annotations

from dataclasses import dataclass

from corefbot.pipeline.merge import DEFAULT_GAP_S, merge_all
from corefbot.pipeline.question import LLMScorer, QuestionFilter
from corefbot.pipeline.records import Merged
from corefbot.pipeline.store import Store


@dataclass(frozen=True, slots=True)
class BuildStats:
    messages: int
    merged: int
    questions: int


def score_run(run: Merged, question_filter: QuestionFilter) -> Merged:
    """Set the run's question score (in place); the bot's own messages are never questions."""
    run.question_score = 0.0 if run.from_self else question_filter.score(run.text)
    run.is_question = question_filter.passes(run.question_score)
    return run


def rescore(runs: list[Merged], scorer: LLMScorer, question_filter: QuestionFilter, *,
            progress: bool = False) -> None:
    """Second stage: the LLM re-scores every run the rules saw any question cue in (score > 0)."""
    candidates = [r for r in runs if r.question_score > 0]
    if progress:
        from tqdm import tqdm

        candidates = tqdm(candidates, desc="LLM question scores", unit="q", leave=False)
    for run in candidates:
        run.question_score = scorer.score(run.text)
        run.is_question = question_filter.passes(run.question_score)


def build(store: Store, *, gap_s: float = DEFAULT_GAP_S, question_filter: QuestionFilter = QuestionFilter(),
          scorer: LLMScorer | None = None, progress: bool = False) -> BuildStats:
    messages = store.iter_messages()
    if progress:
        from tqdm import tqdm

        messages = tqdm(messages, total=store.count("messages"), desc="build", unit="msg", leave=False)
    runs = [score_run(run, question_filter) for run in merge_all(messages, gap_s)]
    if scorer is not None:
        rescore(runs, scorer, question_filter, progress=progress)
    store.replace_merged(runs)
    return BuildStats(
        messages=sum(len(r.message_ids) for r in runs), merged=len(runs),
        questions=sum(r.is_question for r in runs),
    )
