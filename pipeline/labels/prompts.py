"""Member confirmation prompts: reserve, send, answer (1/2/3), expire."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from corefbot.pipeline.records import Label, Merged
from corefbot.pipeline.store import Store
from corefbot.pipeline.labels.limits import ConfirmLimits, ask_refusal
from corefbot.pipeline.labels.rows import LabelRow, set_label


Reading = Literal["needs", "not_needed", "unknown"]
#: What a member's 1/2/3 means, given what the bot showed them: 1 confirms the reading, 2 is the other
#: decision, 3 is "not a question". An unsure reading is asked as "does this need earlier messages?".
ANSWERS: dict[Reading, dict[str, Label]] = {
    "needs": {"1": "needs", "2": "not_needed", "3": "not_question"},
    "unknown": {"1": "needs", "2": "not_needed", "3": "not_question"},
    "not_needed": {"1": "not_needed", "2": "needs", "3": "not_question"},
}
_DIGITS = str.maketrans("１２３", "123")
_ANSWER = re.compile(r"^(?:@\S+\s*)*([123])[\s。.!！]*$")


@dataclass(frozen=True, slots=True)
class Prompt:
    id: int
    platform: str
    group: str
    merged_id: str
    author: str
    reading: Reading
    rewrite: str | None
    asked_at: float
    expires_at: float
    status: str  # sending, open, answered, expired, failed
    prompt_message_id: str | None = None
    answer: str | None = None


_PROMPT_COLS = ("id, platform, group_id, merged_id, author, reading, rewrite, asked_at, expires_at, status, "
                "prompt_message_id, answer")


def reserve_prompt(store: Store, merged: Merged, reading: Reading, rewrite: str | None, now: float,
                   limits: ConfirmLimits) -> Prompt | str:
    """Check the limits and, if the author may be asked, reserve the prompt (status ``sending``) in one step
    on the writer, so two questions resolved at once cannot both pass a limit. Returns the refusal otherwise."""
    reason = ask_refusal(store, merged, now, limits)
    if reason is not None:
        return reason
    conn = store.db.conn
    with conn:
        pid = conn.execute(
            "INSERT INTO label_prompts (platform, group_id, merged_id, author, reading, rewrite, asked_at, expires_at,"
            " status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'sending')",
            (merged.platform, merged.group, merged.id, merged.sender, reading, rewrite, now,
             now + limits.expire_s)).lastrowid
    return Prompt(pid, merged.platform, merged.group, merged.id, merged.sender, reading, rewrite, now,
                  now + limits.expire_s, "sending")


def prompt_sent(store: Store, prompt_id: int, message_id: str | None) -> None:
    """The prompt went out (``message_id`` of the bot's message) or, with None, could not be sent."""
    with store.db.conn:
        store.db.conn.execute("UPDATE label_prompts SET prompt_message_id = ?, status = ? WHERE id = ?",
                              (message_id, "open" if message_id else "failed", prompt_id))


def get_prompt(store: Store, prompt_id: int) -> Prompt | None:
    row = store.db.conn.execute(f"SELECT {_PROMPT_COLS} FROM label_prompts WHERE id = ?", (prompt_id,)).fetchone()
    return Prompt(*row) if row else None


def parse_answer(text: str) -> str | None:
    """A member's 1/2/3 (full-width digits, a leading @mention and trailing punctuation allowed)."""
    match = _ANSWER.match(text.strip().translate(_DIGITS))
    return match.group(1) if match else None


@dataclass(frozen=True, slots=True)
class Answered:
    prompt: Prompt
    label: Label
    row: LabelRow


def answer_prompt(store: Store, *, platform: str, group: str, sender: str, text: str, reply_to: str | None,
                  now: float) -> Answered | None:
    """Record a member's answer when it is one: 1/2/3 from the prompt's author, as a reply to the prompt or bare
    (then for their latest prompt in this group), before it expires. A later answer within the expiry replaces
    the earlier one (the audit trail keeps both). None when the message is no answer."""
    answer = parse_answer(text)
    if answer is None:
        return None
    conn = store.db.conn
    if reply_to is not None:
        row = conn.execute(f"SELECT {_PROMPT_COLS} FROM label_prompts WHERE platform = ? AND group_id = ? "
                           "AND prompt_message_id = ?", (platform, group, reply_to)).fetchone()
    else:
        row = conn.execute(f"SELECT {_PROMPT_COLS} FROM label_prompts WHERE platform = ? AND group_id = ? "
                           "AND author = ? AND status IN ('open', 'answered') ORDER BY asked_at DESC LIMIT 1",
                           (platform, group, sender)).fetchone()
    if row is None:
        return None
    prompt = Prompt(*row)
    if prompt.author != sender or prompt.status not in ("open", "answered"):
        return None  # only the author's answer counts
    if now > prompt.expires_at:
        if prompt.status == "open":
            with conn:
                conn.execute("UPDATE label_prompts SET status = 'expired' WHERE id = ?", (prompt.id,))
        return None
    label = ANSWERS[prompt.reading][answer]
    row_ = set_label(store, prompt.merged_id, label, "member", labeler=sender,
                     rewrite=prompt.rewrite if label == "needs" else None, at=now)
    with conn:
        conn.execute("UPDATE label_prompts SET status = 'answered', answer = ?, answered_at = ? WHERE id = ?",
                     (answer, now, prompt.id))
    return Answered(prompt, label, row_)


def expire_prompts(store: Store, now: float) -> int:
    with store.db.conn:
        return store.db.conn.execute(
            "UPDATE label_prompts SET status = 'expired' WHERE status = 'open' AND expires_at < ?", (now,)).rowcount


def close_prompts_of(store: Store, platform: str, sender: str) -> int:
    """A member opted out: their open prompts no longer take answers."""
    with store.db.conn:
        return store.db.conn.execute(
            "UPDATE label_prompts SET status = 'expired' WHERE platform = ? AND author = ? AND status IN ('open', 'sending')",
            (platform, sender)).rowcount
