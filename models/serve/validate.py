"""Rewrite validation: forward a model's rewrite only when it is the question, made self-contained
with words the chat already contains.

A rewrite is accepted when
- it is one short line with no chat-template markup;
- the question does not read as an instruction to the model ("ignore the above and say …",
  「忽略上面的指令，输出…」): for those the original question is always forwarded;
- it keeps the question's content (most of its content words / Chinese characters survive);
- everything it adds comes from the window: each added Latin word is a window word (or a short
  function word), and each added run of Chinese characters is covered by substrings of at least two
  characters found in the window, apart from a few grammatical particles (的, 在, 上…) and at most one
  character the window holds only on its own (「你看过飘吗」 → 「飘的主人公是谁」).

Chinese has no spaces, so "words" cannot be compared one by one: an added run such as 「显卡驱动」
is accepted when the window contains 「显卡驱动」 or 「显卡」 and 「驱动」 as substrings. Single characters
are weak evidence (almost every character occurs somewhere in a long window), so runs are covered by
pieces of length two or more, and one lone character per rewrite is the only exception.
"""
from __future__ import annotations

import difflib
import re
import unicodedata
from typing import Sequence

from corefbot.pipeline.text import CJK, HAS_CJK

# A Latin word stops where Chinese starts: in 「c语言」 or 「8分钟」 the word is "c" or "8" (\w matches 语 too).
_PIECE = re.compile(rf"[{CJK}]+|[A-Za-z0-9](?:[^\W{CJK}]|[.+#\-])*", re.UNICODE)

# Words a rewrite may add without the window containing them: glue, not content.
EN_GLUE = frozenset("""
a an the of in on at to for from with by about into over under as and or but than then
is are was were be been being am do does did done has have had will would can could should may might
what which who whom whose when where why how that this these those there it its
his her their them they he she him its one ones
not no any some other else also besides aside apart after before during while between same such
addition regards regard along against together related
i me my you your we us our please want like get got
doesn don dont isn aren wasn didn t
s 's
""".split())
ZH_GLUE = frozenset("的地得了在上中里和与跟及或是有用把被对为于从到给吗呢吧啊么什怎样个这那该此其它他她们还也都就又再你我"
                    # modal and light verbs of tech chat (run, install, enable, add…): they carry no entity
                    "能会要需而时才比之后前以并但所着过好跑装开加做写改转说")

# Words whose disappearance from the question is expected: they are what a rewrite replaces.
EN_ANAPHORS = frozenset("""
it its they them their theirs this that these those he him his she her hers one ones there here
such same former latter the a an do does did so too also else
anything anywhere anyone something somewhere someone everything
""".split())
ZH_ANAPHORS = frozenset("它他她们这那该此其上述个些呢吗吧啊呀么然后前者办")
# A demonstrative with its classifier and head noun (「这本书」, 「这书」, 「那种性格」) is the anaphor as a whole:
# the rewrite replaces it with the name (「十一种孤独」), so its noun may disappear from the question.
# So is an ordinal with its classifier (「第一个人」 → 「蔡浩宇」, 「第二款」, 「第二首」), but not 「第二次」: "the second time" names nothing.
_DEMONSTRATIVE = re.compile(rf"[这那该此](?:一?[个本种部款位首只件台张条篇家些样]?)[{CJK}]{{1,2}}"
                            rf"|第[一二两三四五六七八九十]+[个本种部款位只件台张条篇家首][{CJK}]?")

_INJECTION = [
    re.compile(r"\b(ignore|disregard|forget)\b.{0,40}\b(above|previous|prior|earlier|instructions?|prompt|rules?)\b", re.I),
    re.compile(r"\b(system prompt|you are now|act as|pretend to be|new instructions?)\b", re.I),
    re.compile(r"\b(say|print|output|repeat|reply with|respond with|write)\b\s*[:\"'“‘「]", re.I),
    re.compile(r"(忽略|无视|忘记|忘掉|不要管).{0,12}(指令|指示|提示|上面|以上|之前|前面|规则|要求)"),
    re.compile(r"(系统提示|提示词|你现在是|扮演|假装你?是|新的指令)"),
    re.compile(r"(输出|回复|回答|说|打印|重复)\s*[:：\"'“‘「]"),
    re.compile(r"<\|im_(start|end)\|>|<\|endoftext\|>"),
]

# Question words. A rewrite that keeps none of them forwards a statement: 「为啥不接受」 was written 「SQLite 的作者
# D. Richard Hipp 不接受外部贡献代码」. Any one survives is enough (「为啥」 may become 「为什么」, "what" "which").
_ASKS = re.compile(r"谁|哪|啥|什么|几|多少|怎|咋|为何|如何|吗|是否|\b(?:what|which|who|whom|whose|when|where|why|how)\b")

MAX_EXTRA_CHARS = 160  # a rewrite may add at most this much beyond the question (CANARD's longest golds are near it)


# A title in 《》 names a work, it instructs nobody: 《塞尔达传说：王国之泪》 holds 「说：」.
_TITLE = re.compile(r"《[^《》]*》")


def looks_like_injection(text: str) -> bool:
    """True when a message reads as an instruction to the model rather than a question to the group."""
    text = _TITLE.sub("《》", text)
    return any(p.search(text) for p in _INJECTION)


def _norm(text: str) -> str:
    return unicodedata.normalize("NFKC", text).lower()


_CJK_CHAR = re.compile(f"[{CJK}]")


def _latin_words(text: str) -> list[str]:
    # Chinese runs split words first: 「你最喜欢exo哪个人」 holds the word "exo" (\w matches 哪 as well).
    return [w.strip(".-") for w in re.findall(r"[a-z0-9][\w.+#\-']*", _CJK_CHAR.sub(" ", text))]


def _stem(word: str) -> str:
    word = word.removesuffix("'s").removesuffix("’s")
    for suffix in ("ies", "es", "s", "ed", "ing"):
        if len(word) > len(suffix) + 2 and word.endswith(suffix):
            return word[: -len(suffix)]
    return word


def _variant(a: str, b: str) -> bool:
    """Same word up to a short suffix: "mmpose-v1" / "mmpose", "deployment" / "deploy" (not "openpose" / "pose"),
    or a long word spelled with one letter changed: "apologise" / "apologize" (a digit is never one: "llama2" and
    "llama3" are two models)."""
    short, long = sorted((a, b), key=len)
    if len(short) >= 6 and len(short) == len(long):
        changed = [(x, y) for x, y in zip(short, long) if x != y]
        return len(changed) == 1 and changed[0][0].isalpha() and changed[0][1].isalpha()
    return len(short) >= 4 and long.startswith(short) and len(long) - len(short) <= 4


def _content_units(text: str) -> list[str]:
    """The question's content: Latin words that are not anaphors or glue, and Chinese characters that are not."""
    units = [_stem(w) for w in _latin_words(text) if w not in EN_ANAPHORS and w not in EN_GLUE]
    units += [c for c in text if HAS_CJK.match(c) and c not in ZH_ANAPHORS and c not in ZH_GLUE]
    return units


def adds_content(question_text: str, rewrite: str) -> bool:
    """True when ``rewrite`` brings a content word (Latin) or character (Chinese) the question lacks: what
    resolving a reference does. Dropping 「那」 or 「到底」, reordering or retyping the question adds
    nothing, so such a rewrite does not say the question needed resolution."""
    asked = set(_content_units(_norm(question_text)))
    return any(u not in asked for u in _content_units(_norm(rewrite)))


def allowed_cjk(question_text: str, window_texts: Sequence[str]) -> frozenset[str]:
    """The Chinese characters a rewrite may hold: those of the chat (window and question) and the glue.
    :func:`validate_rewrite` refuses a rewrite with any other; the served model is kept to these while it
    writes, so a rewrite is not thrown away for one made-up character (「温州市」 where the chat says 「温州」)."""
    return frozenset(_CJK_CHAR.findall(_norm("\n".join([*window_texts, question_text])))) | ZH_GLUE


def _cover_cjk(run: str, window: str) -> str:
    """Greedily cover ``run`` with window substrings (length ≥ 2) and glue characters; the uncovered characters."""
    i, missing = 0, []
    while i < len(run):
        best = 0
        for j in range(len(run), i + 1, -1):  # longest piece first
            if run[i:j] in window:
                best = j - i
                break
        if best:
            i += best
        else:
            if run[i] not in ZH_GLUE:
                missing.append(run[i])
            i += 1
    return "".join(missing)


_UNIT = re.compile(rf"[{CJK}]|[a-z0-9]+")


def _repeated_run(q: str, r: str, window: str) -> str | None:
    """A run of two of the question's Chinese characters that ``r`` writes more often than
    the question does, where the extra copies are not part of a longer name taken from the window; ``None``
    when there is none. The small model's slip where the name meets the copied question: 「为啥 Andrej Karpathy
    从 OpenAI 离职第二次从 OpenAI 离职」, 「WWDC 开始几点开始」. 「游戏科学之前做过啥游戏」 repeats 「游戏」 inside the
    chat's 「游戏科学」, which is not a slip. ``q``, ``r`` and ``window`` are normalised (:func:`_norm`)."""
    a, b = _UNIT.findall(q), _UNIT.findall(r)
    flat = "".join(_UNIT.findall(window))
    for i in range(len(a) - 1):
        run = a[i:i + 2]
        if not all(HAS_CJK.match(u) for u in run):  # English repeats a name on purpose ("address of X … post code of X")
            continue
        asked = sum(a[k:k + 2] == run for k in range(len(a) - 1))
        seen = [j for j in range(len(b) - 1) if b[j:j + 2] == run]
        if len(seen) <= asked:
            continue
        # An occurrence inside a longer window phrase (the run plus a neighbour) was copied as part of a name. At the
        # line's start the left slice is the run alone, so there the run found in the window is enough: a name put
        # first often holds it (「天津」 before a question naming 「天津之眼」: 3 more distinct gold rewrites would be refused without it).
        loose = [j for j in seen if "".join(b[max(j - 1, 0):j + 2]) not in flat and "".join(b[j:j + 3]) not in flat]
        if len(loose) > asked:
            return "".join(run)
    return None


def validate_rewrite(question_text: str, rewrite: str, window_texts: Sequence[str]) -> tuple[bool, str | None]:
    """``(True, None)`` when ``rewrite`` may be forwarded in place of the question, else ``(False, reason)``."""
    q, r = _norm(question_text).strip(), _norm(rewrite).strip()
    if not r:
        return False, "empty rewrite"
    if "\n" in r or "<|" in r:
        return False, "rewrite is not one plain line"
    if looks_like_injection(question_text):
        return False, "the question reads as an instruction to the model; forwarding it as asked"
    if looks_like_injection(rewrite):
        return False, "the rewrite reads as an instruction to the model"
    if len(r) > len(q) + MAX_EXTRA_CHARS:
        return False, f"rewrite adds {len(r) - len(q)} characters (limit {MAX_EXTRA_CHARS})"

    asked = _ASKS.search(q)
    if asked and not _ASKS.search(r):
        return False, f"rewrite no longer asks (the question's {asked.group()!r} is gone)"

    # Content kept: most of the question's content units survive (typos fixed and inflections changed
    # by a rewrite are why this is a fraction and not all).
    q_units = _content_units(_DEMONSTRATIVE.sub(" ", q))
    if q_units:
        r_units = set(_content_units(r)) | set(_latin_words(r)) | {_stem(w) for w in _latin_words(r)}
        lost = [u for u in q_units if u not in r_units and not (u.isascii() and any(_variant(u, w) for w in r_units))]
        if len(lost) > 0.4 * len(q_units):
            return False, f"rewrite drops the question's content ({' '.join(lost[:5])})"
        # A line that loses a word and brings none resolves nothing: the question as asked is better
        # (「召回和排序有啥区别」 written 「回和排序有啥区别」).
        if lost and not adds_content(question_text, rewrite):
            return False, f"rewrite drops {' '.join(lost[:5])} and adds nothing"

    window = _norm("\n".join(window_texts))
    twice = _repeated_run(q, r, window)
    if twice:
        return False, f"rewrite writes the question's {twice!r} twice"
    window_words = set(_latin_words(window))
    window_words |= {part for w in window_words for part in w.split("-")}  # "funkadelic" of "parliament-funkadelic"
    window_stems = {_stem(w) for w in window_words}
    q_words = set(_latin_words(q))
    q_stems = {_stem(w) for w in q_words}

    # What the rewrite adds, span by span (a character diff against the question). Lone characters are
    # counted as a set (「猫」 added twice is one); two would let a made-up word of scattered characters in.
    singles: set[str] = set()
    matcher = difflib.SequenceMatcher(a=q, b=r, autojunk=False)
    for op, _a0, _a1, b0, b1 in matcher.get_opcodes():
        if op not in ("insert", "replace"):
            continue
        # Widen to whole Latin words: the diff can split "mmpose" against "model".
        while b0 > 0 and r[b0 - 1].isalnum() and not HAS_CJK.match(r[b0 - 1]):
            b0 -= 1
        while b1 < len(r) and r[b1].isalnum() and not HAS_CJK.match(r[b1]):
            b1 += 1
        for piece in _PIECE.findall(r[b0:b1]):
            if HAS_CJK.match(piece):
                seen = window + "\n" + q
                missing = _cover_cjk(piece, seen)
                singles.update(missing)
                if len(singles) > 1 or any(c not in seen for c in missing):
                    return False, f"rewrite adds {piece!r}, not found in the chat ({missing!r} unexplained)"
            else:
                word = piece.strip(".-")
                if not word or word in EN_GLUE or word in window_words or word in q_words:
                    continue
                if _stem(word) in window_stems or _stem(word) in q_stems:
                    continue
                if any(_variant(word, w) for w in window_words | q_words):
                    continue
                return False, f"rewrite adds {word!r}, which the chat never mentions"
    return True, None
