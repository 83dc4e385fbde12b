"""What the bot says: prompts to members, item displays and replies to moderators (plain text, short)."""
from __future__ import annotations

from typing import Sequence

from corefbot.pipeline.labels.prompts import Reading
from corefbot.pipeline.labels.rows import LabelRow
from corefbot.pipeline.prompt import sender_letters
from corefbot.pipeline.records import Merged

LABEL_NAMES = {"needs": "a · needs resolution", "not_needed": "b · does not", "not_question": "c · not a question"}
LETTER_LABEL = {"a": "needs", "b": "not_needed", "c": "not_question"}
USAGE = ("usage: /label [next] | /label <id> a|b|c [rewrite] | /label a|b|c [rewrite] | /label undo | "
         "/label skip | /label show <id> | /label stats")
REFUSAL = "Only moderators can label."

_PROMPTS = {
    "en": {
        "needs": 'I read this as: "{rewrite}" — reply 1 if right, 2 if it needed no rewrite, 3 if it is not a question.',
        "needs_plain": "I read this as referring to something said earlier — reply 1 if right, "
                       "2 if it stands on its own, 3 if it is not a question.",
        "unknown": "Does this question need the earlier messages to be understood? Reply 1 if it does, "
                   "2 if it stands on its own, 3 if it is not a question.",
        "not_needed": "I read this as a question that stands on its own — reply 1 if right, "
                      "2 if it refers to something said earlier, 3 if it is not a question.",
    },
    "zh": {
        "needs": "我理解为：「{rewrite}」——对请回复 1，原句无需改写回复 2，不是问题回复 3。",
        "needs_plain": "我理解这句指代了前面提到的内容——对请回复 1，本身就完整回复 2，不是问题回复 3。",
        "unknown": "这个问题需要结合前面的消息才能看懂吗？需要回复 1，本身就完整回复 2，不是问题回复 3。",
        "not_needed": "我理解这是一个本身完整的问题——对请回复 1，指代了前面的内容回复 2，不是问题回复 3。",
    },
}


def prompt_text(reading: Reading, rewrite: str | None, lang: str = "en") -> str:
    texts = _PROMPTS.get(lang, _PROMPTS["en"])
    if reading == "needs":
        return texts["needs"].format(rewrite=_clip(rewrite, 200)) if rewrite else texts["needs_plain"]
    return texts[reading]


def _clip(text: str | None, n: int) -> str:
    text = " / ".join(line.strip() for line in (text or "").splitlines() if line.strip())
    return text if len(text) <= n else text[: n - 1] + "…"


def item_text(item: int, merged: Merged, window: Sequence[Merged], labels: dict[str, LabelRow],
              decision: tuple | None, *, header: str = "") -> str:
    """One question for review: the window with senders as A, B, C…, the question, what is known of it."""
    names = sender_letters([m.sender for m in window] + [merged.sender])
    lines = [f"{header}#{item} · group {merged.group}"]
    lines += [f"{names[m.sender]}: {_clip(m.text, 80)}" for m in window]
    lines.append(f"▶ {names[merged.sender]}: {_clip(merged.text, 200)}")
    if decision is not None:
        kind, margin, rewrite = decision
        lines.append(f"model: {kind} (margin {margin:.2f})" + (f" → {_clip(rewrite, 120)}" if rewrite else ""))
    for source in ("member", "moderator", "import"):
        if source in labels:
            row = labels[source]
            lines.append(f"{source}: {LABEL_NAMES[row.label]}" + (f" → {_clip(row.rewrite, 120)}" if row.rewrite else ""))
    lines.append(f"a needs resolution / b does not / c not a question — reply a, b or c, or /label {item} a <rewrite>")
    return "\n".join(lines)


def stats_text(stats) -> str:
    kappa = f"{stats.kappa:.2f} on {stats.kappa_n}" if stats.kappa is not None else "n/a (no question labelled by both)"
    fmt = lambda d: ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "0"  # noqa: E731
    return "\n".join([
        f"labels: {fmt(stats.by_label)}",
        f"by source: {fmt(stats.by_source)}",
        f"member vs moderator kappa: {kappa}",
        f"today: {fmt(stats.today)} · this week: {fmt(stats.week)}",
        f"member prompts: {fmt(stats.prompts)}",
    ])
