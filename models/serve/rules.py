"""The no-LLM resolver: the gate's learned classifier decides, a nearest-antecedent rewrite from the window.

:class:`RulesBackend` decides with the gate's classifier (rules + character n-grams; its probability is
the confidence) and rewrites by putting the nearest fitting antecedent — a technical term or named
thing from the window, newest message first — where the pronoun was, or next to the elliptical question.
The cues it reads are :mod:`.cues`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from corefbot.models.serve.cues import EN_STOP, ZH_INITIAL, ZH_PERSONAL, en_words, terms
from corefbot.models.serve.types import Resolution, RewriteMode
from corefbot.pipeline.prompt import one_line
from corefbot.pipeline.records import Turn
from corefbot.pipeline.text import HAS_CJK as _HAS_CJK


def antecedent(window: Sequence[Turn], question: Turn, *, person: bool = False) -> str | None:
    """The nearest fitting antecedent: a term of the newest window message that has one, skipping
    terms the question already contains.

    Within a message, English prefers a multi-word name, then the first term (the subject is the
    most salient); Chinese takes the first term too, except after an existential or a request
    (「有人用过 mmpose 吗」, 「我在用 TensorRT 加速 YOLOv8」) where the topic comes last.
    ``person`` prefers capitalised names without digits.
    """
    q_low = question.text.lower()
    turns = list(reversed(window))
    if person:
        # "he"/"she" means a person: the newest full name (two or more capitalised words, no digits) in the
        # window, even when a newer message only names a team or a product ("… joined Arsenal").
        for turn in turns:
            names = [t for t in terms(_focus(turn.text)) if len(t.split()) >= 2 and t.lower() not in q_low
                     and all(w[:1].isupper() for w in t.split()) and not any(c.isdigit() for c in t)]
            if names:
                return names[0]
    asked: list[Turn] = []
    if terms(question.text):
        # "在 TX2 上呢？" after "x86 上跑得挺快的": the question's own term replaces the parallel one
        # (x86); what it leaves out is the topic that was asked about. Prefer recent questions.
        asked = [t for t in turns[:4] if _focus(t.text).rstrip().endswith(_QUESTION_END)]
        turns = asked + [t for t in turns if t not in asked]
    for turn in turns:
        text = _focus(turn.text)
        candidates = [t for t in terms(text) if t.lower() not in q_low and not _is_number_like(t)]
        if person:
            named = [t for t in candidates if t[:1].isupper() and not any(c.isdigit() for c in t)]
            candidates = named or candidates
        if not candidates and turn in asked:
            # "Can mmpose be deployed on mobile phones?": lower-case project names are no "terms",
            # but a question's first content word is what it asks about.
            subject = _question_subject(text, q_low)
            candidates = [subject] if subject else []
        if not candidates:
            continue
        if _HAS_CJK.search(text):
            # 「mmpose 训练 COCO 要几天」: the subject; 「有人用过 mmpose 吗」: what the existential asks about.
            return candidates[-1] if _ZH_EXISTENTIAL.match(text) else candidates[0]
        multi = [t for t in candidates if len(t.split()) >= 2 and t[:1].isupper()]
        return (multi or candidates)[0]
    # No term anywhere: the last content word of the newest question in the window ("Has anyone
    # tried mmpose?"): what was asked about is what a follow-up refers to.
    for turn in reversed(window):
        if turn.text.rstrip().endswith(("?", "？")) and not _HAS_CJK.search(turn.text):
            words = [w.strip(".'’-") for w in en_words(turn.text)]
            words = [w for w in words if w not in EN_STOP and len(w) >= 3 and w not in q_low.split()]
            if words:
                return words[-1]
    return None


_QUESTION_END = ("?", "？", "吗", "呢")


def _focus(text: str) -> str:
    """The part of a merged run a follow-up refers to: its last question line, else all of it."""
    lines = [line for line in text.splitlines() if line.strip()]
    asked = [line for line in lines if line.rstrip().endswith(_QUESTION_END)]
    return asked[-1] if asked and len(lines) > 1 else text


_AUX = frozenset("can could does do did is are was will would should may might has have".split())


def _question_subject(text: str, q_low: str) -> str | None:
    """What an English question asks about: the subject right after a leading auxiliary ("Can mmpose be
    deployed…?"), else its last content word ("Has anyone tried mmpose?")."""
    if _HAS_CJK.search(text):
        return None
    words = [w.strip(".'’-") for w in en_words(text)]
    if len(words) > 1 and words[0] in _AUX and words[1] not in EN_STOP and len(words[1]) >= 3 \
            and not words[1].startswith(("any", "some", "every")) and words[1] not in q_low.split():
        return words[1]
    words = [w for w in words if w not in EN_STOP and len(w) >= 3 and w not in q_low.split()]
    return words[-1] if words else None


_ZH_EXISTENTIAL = re.compile(r"^\s*(有人|有没有|有谁|谁|大家(?!好)|求|请问|问下|问一下|推荐|我(在|用|把|们)|你们)")


def _is_number_like(term: str) -> bool:
    letters = sum(c.isalpha() for c in term)
    return letters <= 2 and sum(c.isdigit() for c in term) >= 3  # phone numbers, post codes


_EN_SUBST = re.compile(r"\b(it|they|them|this|that|these|those|he|she|him|her|its|their|his)\b(?!\s+(?:is|are|was|were)\b\s*$)", re.I)


def rewrite_question(window: Sequence[Turn], question: Turn) -> str | None:
    """A nearest-antecedent rewrite (one line, as forwarded), or None when the window offers nothing."""
    lines = [line for line in question.text.splitlines() if line.strip()]
    if len(lines) > 1 and any(terms(line) for line in lines[:-1]):
        # 「mmdeploy 转 TensorRT 报错了 / 提示 CUDA out of memory / 这个怎么解决？」: the run names what its
        # pronoun means; forwarded whole, it is already self-contained.
        return None
    text = one_line(question.text)  # a merged run's lines, joined as the prompt shows them
    if _HAS_CJK.search(text):
        ante = antecedent(window, question)
        if not ante:
            return None
        body = ZH_INITIAL.sub("", text)
        for pron in ZH_PERSONAL + ("这个", "那个", "这些", "那些", "上述", "该", "此"):
            if pron in body:
                spaced = f" {ante} " if ante.isascii() else ante  # Latin terms keep spaces around them in Chinese text
                return body.replace(pron, spaced, 1).strip().replace("  ", " ")
        for dem in ("这种", "那种", "这款", "那款"):
            if dem in body:
                return body.replace(dem, ante, 1)
        return f"{ante} {body}" if ante.isascii() else f"{ante}{body}"
    person = bool(re.search(r"\b(he|she|him|her|his)\b", text, re.I))
    ante = antecedent(window, question, person=person)
    if not ante:
        return None
    m = _EN_SUBST.search(text)
    if m:
        pron = m.group(1).lower()
        nxt = text[m.end():].lstrip().split(" ", 1)[0].lower().strip("?.!,")
        if pron in ("this", "that", "these", "those") and nxt and nxt not in EN_STOP:
            return f"{text[:m.start()]}the {ante} {text[m.end():].lstrip()}"  # "that version" -> "the CUDA 11.8 version"
        repl = ante + "'s" if pron in ("its", "their", "his") or (pron == "her" and nxt and nxt not in EN_STOP) else ante
        return text[:m.start()] + repl + text[m.end():]
    what_about = re.match(r"^\s*(?:and\s+)?(what|how)\s+about\s+(.+?)\s*\??$", text, re.I)
    if what_about:
        return f"What about {what_about.group(2)} for {ante}?"
    stripped = text.rstrip("?？.! ")
    end = text[len(stripped):].strip() or "?"
    the_np = re.search(r"\bthe\s+(\w+(?:\s+(?!(?:please|and|or|for|of|in|on|to|is|are)\b)\w+)?)", stripped, re.I)
    if the_np:  # "what is the address?" -> "what is the address of Curry Prince?"
        return f"{stripped[:the_np.end()]} of {ante}{stripped[the_np.end():]}{end}"
    return f"{stripped} about {ante}{end}"


@dataclass
class RulesBackend:
    """No LLM: the gate's classifier decides (its probability is the confidence), rules rewrite."""

    name: str = "rules"
    gate: object | None = None  # corefbot.models.serve.gate.Gate; loaded on first use

    def _gate(self):
        if self.gate is None:
            from corefbot.models.serve.gate import Gate

            self.gate = Gate.load()
        return self.gate

    def resolve(self, window: Sequence[Turn], question: Turn, *, group: str | None = None,
                rewrite: RewriteMode = "auto") -> "Resolution":
        # rewrite="always" changes nothing here: the Resolver asks for it where the gate is sure, and this
        # backend decides "needs" (and rewrites) below that point (decision_threshold < sure_threshold).
        gate = self._gate()
        p, strong = gate.evidence(window, question)
        needs = strong or p >= gate.decision_threshold
        if strong:  # an explicit anaphor: confident, but the classifier still shades the confidence
            p = 0.75 + 0.25 * p
        # "unknown" carries the mass of the classifier's doubt near its decision threshold.
        doubt = 0.0 if strong else max(0.0, 0.2 - abs(p - gate.decision_threshold)) / 0.2 * 0.2
        probs = {"needs": p * (1 - doubt), "not_needed": (1 - p) * (1 - doubt), "unknown": doubt}
        if needs:
            return Resolution("needs", probs, rewrite=rewrite_question(window, question), backend=self.name)
        return Resolution("not_needed", probs, backend=self.name)

    def observe(self, group: str, window: Sequence[Turn]) -> None:
        """Stateless: nothing to prefill."""

    def close(self) -> None:
        """Nothing to free."""


def pronoun_baseline(question: Turn) -> bool:
    """The plain pronoun-list rule the issue asks ``rules`` to beat: any listed pronoun in the question."""
    text = question.text.lower()
    if re.search(r"\b(it|its|they|them|their|this|that|these|those|he|she|him|her|his|one)\b", text):
        return True
    return any(p in text for p in ("它", "他", "她", "这", "那"))
