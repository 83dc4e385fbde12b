"""The one prompt builder: alpaca export, training, evaluation and serving all render prompts here.

It lives in ``pipeline`` (pure text, no weights) because the alpaca export needs it and ``pipeline``
must not import ``models``; ``models`` imports it from here.

Layout, chosen so a server can keep the key/value state of everything before the question:

    <header: the task, the options, the answer format> <history: one line per turn, senders A, B, C…> <the last message>

The option order is an explicit argument. The alpaca export and the paper's presets shuffle it (balanced
per letter), the CPU presets train in :data:`SERVE_ORDER`; evaluation averages over all six orders;
serving uses :data:`SERVE_ORDER`. The reference implementation
trained shuffled and evaluated fixed, which rewards a model that learned a letter position.
"""
from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass
from typing import Sequence

from corefbot.pipeline.records import Decision, Turn

DECISIONS: tuple[Decision, ...] = ("needs", "not_needed", "unknown")
LETTERS = "ABC"
OPTION_TEXT: dict[Decision, str] = {
    "needs": "needs coreference resolution",
    "not_needed": "does not need coreference resolution",
    "unknown": "don't know",
}
Order = tuple[Decision, Decision, Decision]
ALL_ORDERS: tuple[Order, ...] = tuple(itertools.permutations(DECISIONS))  # type: ignore[assignment]
SERVE_ORDER: Order = DECISIONS  # type: ignore[assignment]

# The served prompt is paid on every training example and every cold call, so it is as short as it can
# be while saying the same thing: with Qwen2.5's tokenizer the previous wording cost 409 tokens for an
# 11-message window (162 of them instruction, 88 now; `corefbot bench prompt` prints today's count), and
# fine-tuned for the same time on 2 cores it decided worse (models/EXPERIMENTS.md, `pshort` against `plong`).
SYSTEM = "You resolve references in group-chat questions."

HEADER = (
    "Does the last message of this chat need coreference resolution (a pronoun or an omission that "
    "only the earlier messages explain)?\n{options}"
    "Reply with the letter; if it needs it, add the last message rewritten as a self-contained "
    "question on the next line.\n\n"
)
NO_HISTORY = "(no earlier messages)\n"

CHATML_USER = "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"
CHATML_ASSISTANT = "<|im_end|>\n<|im_start|>assistant\n"
CHATML_END = "<|im_end|>"


def sender_letters(senders: Sequence[str]) -> dict[str, str]:
    """Rename senders A, B, C… in order of first appearance (AA, AB… past Z)."""
    names: dict[str, str] = {}
    for sender in senders:
        if sender not in names:
            names[sender] = _letter_name(len(names))
    return names


def _letter_name(i: int) -> str:
    name = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        name = chr(65 + r) + name
    return name


def one_line(text: str) -> str:
    """A message as one line: a merged run's lines joined by ' / '."""
    return re.sub(r"\s*\n\s*", " / ", text.strip())


@dataclass(frozen=True, slots=True)
class Prompt:
    """A rendered single-choice question. ``order[i]`` is the decision behind ``LETTERS[i]``."""

    history: str  # header (with the options) + window lines: the part a server keeps state for, per group
    question: str  # the last message
    order: Order

    @property
    def instruction(self) -> str:
        return self.history + self.question

    def letter(self, decision: Decision) -> str:
        return LETTERS[self.order.index(decision)]

    def decision(self, letter: str) -> Decision:
        return self.order[LETTERS.index(letter)]

    def chatml(self, response: str | None = None) -> str:
        """The ChatML text a Qwen chat model sees; with ``response``, the full training sequence."""
        text = chatml_prefix(self.history) + self.question + CHATML_ASSISTANT
        if response is not None:
            text += response + CHATML_END
        return text


def chatml_prefix(history: str) -> str:
    """The ChatML text up to the end of the history: stable while a group's window is unchanged."""
    return CHATML_USER.format(system=SYSTEM) + history


def build_prompt(window: Sequence[Turn], question: Turn, order: Order = SERVE_ORDER) -> Prompt:
    names = sender_letters([t.sender for t in window] + [question.sender])
    lines = "".join(f"{names[t.sender]}: {one_line(t.text)}\n" for t in window) or NO_HISTORY
    options = "".join(f"{LETTERS[i]}. {OPTION_TEXT[d]}\n" for i, d in enumerate(order))
    # Only the last message comes after the chat, so a server keeping the group's state evaluates
    # little more than the question's own tokens (the options sit in the header, fixed when serving).
    tail = f"Last message, {names[question.sender]}: {one_line(question.text)}"
    return Prompt(history=HEADER.format(options=options) + lines, question=tail, order=order)


def target(prompt: Prompt, decision: Decision, rewrite: str | None = None) -> str:
    """The response a model is trained to give: the letter, then the rewrite when one applies."""
    letter = prompt.letter(decision)
    if decision == "needs" and rewrite:
        return f"{letter}\n{one_line(rewrite)}"
    return letter


def parse_response(prompt: Prompt, response: str) -> tuple[Decision | None, str | None]:
    """Read a response back; ``None`` decision when it does not start with an option letter."""
    text = response.strip()
    if not text or text[0] not in LETTERS:
        return None, None
    decision = prompt.decision(text[0])
    rest = text[1:].lstrip(" .:)\t")
    rewrite = rest.strip().splitlines()[0].strip() if rest.strip() else None
    return decision, (rewrite if decision == "needs" else None)


def balanced_orders(decisions: Sequence[Decision], seed: int) -> list[Order]:
    """One option order per example, so the correct letter lands on A, B and C equally often.

    The correct answer's position cycles through a seeded shuffle of [0, 1, 2, 0, 1, 2, …]; the other
    two options fill the remaining letters in a seeded random order.
    """
    rng = random.Random(seed)
    positions = [i % len(LETTERS) for i in range(len(decisions))]
    rng.shuffle(positions)
    orders: list[Order] = []
    for decision, pos in zip(decisions, positions):
        others = [d for d in DECISIONS if d != decision]
        rng.shuffle(others)
        others.insert(pos, decision)
        orders.append(tuple(others))  # type: ignore[arg-type]
    return orders


# The paper's question-filter prompt (0–10 score, threshold 5), for a second-stage LLM scorer.
QUESTION_SCORE_PROMPT = (
    "You are a scoring bot for a technical group chat. Judge whether the message below is a question "
    "with a topic, or a question addressed to other members. Answer with one integer from 0 to 10: "
    "10 for a clear question, 0 for idle chat or a statement. Reply with the number only.\n\n"
    "Message: {text}\nScore:"
)
