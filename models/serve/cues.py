"""The cue lexicon: what makes a question lean on its context, named so a classifier can weigh it.

:func:`cues` covers
- English: personal pronouns (it, they, he…), demonstratives (this, that, those…), "one", "there",
  "the same", "what about / how about …", "else / other / another", a bare "the NOUN" with no name;
- Chinese: 它/他/她/他们, 这个/那个/这/那/该/此/上述/其, sentence-initial 那/那么, and ellipsis without any
  pronoun: 「为什么不好用？」「在 TX2 上呢？」「怎么装？」 — a question with no subject or object of its own;
- both: questions with no content word, very short questions, a window that is empty.

:data:`STRONG_CUES` are the cues that alone send a question to the model. Shared by the gate
(:mod:`.gate`, features) and the rules backend (:mod:`.rules`, terms and names for the rewrite).
"""
from __future__ import annotations

import re
from typing import Sequence

from corefbot.pipeline.records import Turn
from corefbot.pipeline.text import HAS_CJK as _HAS_CJK



EN_PERSONAL = frozenset("it its itself they them their theirs themselves he him his himself she her hers herself".split())
EN_DEMONSTRATIVE = frozenset("this that these those".split())
EN_OTHER = frozenset("else other another others besides aside additional same former latter".split())
EN_QWORDS = frozenset("what when where who whom whose why how which is are was were do does did can could will would should "
                      "may might has have had any".split())
EN_STOP = frozenset("""
a an the of in on at to for from with by about into over as and or but than then so is are was were be been am
do does did done has have had will would can could should may might must shall i me my you your we us our
what when where who whom whose why how which there here not no yes please tell know any some much many more
it its they them their he him his she her this that these those one ones get got make made go went like just
also too very really well ok okay thanks thank hi hello else other another same btw fyi imo
""".split())
_THAT_ANAPHORIC_AFTER = frozenset("about is was for of with on in do does did like from to at after before by into than "
                                  "and or but so if what how when why where about is's".split())
#: Cues that alone send a question to the model (the gate's rule half): explicit anaphors and the
#: clearest ellipsis patterns. A learned weight can be wrong on text unlike its training data; these are not.
STRONG_CUES = frozenset({"en_continuation", "en_personal", "en_dem_bare", "en_dem_np", "en_else_other", "en_what_about", "en_same",
                         "zh_personal", "zh_dem", "zh_initial", "zh_predicate_only", "zh_ne", "no_content"})
EN_ELLIPSIS_START = re.compile(r"^\s*(and\s+|so\s+|but\s+|then\s+)?(what|how)\s+about\b|^\s*(and|also|so)\b[^?]{0,25}\?", re.I)

ZH_PERSONAL = ("它们", "他们", "她们", "它", "他", "她")
ZH_DEMONSTRATIVE = ("这个", "那个", "这些", "那些", "这种", "那种", "这款", "那款", "这俩", "那俩", "这两", "那两",
                    "上述", "前者", "后者", "该", "此", "其")
ZH_INITIAL = re.compile(r"^\s*(那么|那(?![个些种款边里样时])|所以|然后|还有|另外|顺便问下?|顺便)[，,\s]?")
# Ellipsis: a question made only of a predicate (why/how/how much…), or a bare "X 呢？".
ZH_PREDICATE_ONLY = re.compile(
    r"^[\s，,。]*(为什么|为啥|怎么|怎样|如何|咋|能|可以|会|要|有|是不是|是|多少|多久|多大|哪个|哪些|啥|什么)"
    r"[^A-Za-z0-9]{0,10}[？?吗呢]?\s*$")
ZH_NE = re.compile(r"呢\s*[？?]?\s*$")
_CLAUSE = re.compile(r"(?<=[？?!！。；;])\s*|[，,]\s*")
_PLACEHOLDER = re.compile(r"\[[a-z_]+\]")  # chatlog's [image], [face]…: never an antecedent
ZH_STOP = frozenset("的了吗呢吧啊呀么是有在上中里和与跟及或把被对为于从到给还也都就又再很太更最能会要可以怎样什为啥哪多少个这那它他她们该此其请问下一不没")

_TERM = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_.+][A-Za-z0-9]+)*(?:\s?\d+(?:\.\d+)*[A-Za-z]*)?|\d+(?:\.\d+)?[A-Za-z]+\d*")
_CAP_WORD = r"[A-Z][\w'’-]*(?:\.(?=\w)[\w'’-]*)*"  # dots only inside a word: "D.Y", not "Prince. They"
_CAP_SEQ = re.compile(rf"\b{_CAP_WORD}(?:[ \t]+(?:(?:of|the|and|de|van|von|der|la|le|in|for)[ \t]+){{0,2}}{_CAP_WORD})*")
ZH_NOUNS = ("显卡", "驱动", "模型", "数据集", "服务器", "镜像", "环境", "教程", "文档", "版本", "插件", "接口", "配置",
            "权重", "代码", "仓库", "容器", "算子", "脚本", "依赖", "内存", "显存", "电源", "主板", "框架", "论文", "方案")
# (报错 "error" is left out: in chat it is mostly a verb, 「一直报错」.)


def _norm(text: str) -> str:
    return text.strip().lower()


def en_words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9][a-z0-9'’+#.-]*", text.lower())


def content_words(text: str) -> list[str]:
    """Content-bearing tokens: Latin words that are not stop words, and Chinese characters that are not function characters."""
    words = [w.strip(".'’-") for w in en_words(text)]
    out = [w for w in words if w and w not in EN_STOP]
    out += [c for c in text if _HAS_CJK.match(c) and c not in ZH_STOP]
    return out


def terms(text: str) -> list[str]:
    """Technical terms and named things in a message, in order: mmpose, TX2, CUDA 12.1, Golden Wok, 显卡驱动…"""
    text = _PLACEHOLDER.sub(lambda m: " " * len(m.group(0)), text)
    found: list[tuple[int, str]] = []
    for m in _TERM.finditer(text):
        word = m.group(0).strip()
        if word.split()[0].lower() in EN_STOP or (len(word) < 2 and not word.isupper()):
            continue
        is_tech = (_HAS_CJK.search(text) is not None) or any(c.isdigit() for c in word) \
            or (any(c.isupper() for c in word[1:])) or word.isupper()
        if is_tech:
            found.append((m.start(), word))
    for m in _CAP_SEQ.finditer(text):
        seq, start = m.group(0).strip(" ."), m.start()
        # A capitalised question word glues onto the name after it ("Was Vlade Divac …", "Did Georgia …"): drop it.
        while seq and seq.split()[0].lower() in EN_STOP:
            rest = seq.split(None, 1)[1] if " " in seq else ""
            start += len(seq) - len(rest)
            seq = rest
        if not seq or (start == 0 and len(seq.split()) == 1):  # a sentence's first word is capitalised anyway
            continue
        found.append((start, seq))
    for noun in ZH_NOUNS:
        for m in re.finditer(re.escape(noun), text):
            # Noun compounds stay whole: 「显卡驱动」 is one antecedent, not 「显卡」 then 「驱动」.
            start = m.start()
            for other in ZH_NOUNS:
                if text[:start].endswith(other):
                    start -= len(other)
                    break
            found.append((start, text[start:m.end()]))
    found.sort()
    out: list[str] = []
    for _, t in found:
        if not any(t in o for o in out):
            out = [o for o in out if o not in t] + [t]
    return out


def cues(window: Sequence[Turn], question: Turn) -> list[str]:
    """Named rule cues for one question; the gate's classifier weighs them."""
    text = question.text.strip()
    low = text.lower()
    words = [w.strip(".'’-") for w in en_words(text)]
    zh = _HAS_CJK.search(text) is not None
    out: list[str] = []
    if any(w in EN_PERSONAL for w in words):
        out.append("en_personal")
    for i, w in enumerate(words):
        if w in EN_DEMONSTRATIVE:
            prev = words[i - 1] if i else ""
            nxt = words[i + 1] if i + 1 < len(words) else ""
            if w == "that" and prev and prev not in _THAT_ANAPHORIC_AFTER:
                continue  # "a restaurant that serves…", "I think that…": relative or complementiser, not a reference
            out.append("en_dem_np" if nxt and nxt not in EN_STOP else "en_dem_bare")
    if re.search(r"\b(one|ones)\b", low) and not re.search(r"\bone of\b", low):
        out.append("en_one")
    if re.search(r"\bthere\b", low) and not re.search(r"\b(is|are|was|were)\s+there\b|\bthere\s+(is|are|was|were)\b", low):
        out.append("en_there")
    if re.search(r"\bthe same\b", low):
        out.append("en_same")
    if EN_ELLIPSIS_START.search(low):
        out.append("en_what_about")
    if any(w in EN_OTHER for w in words):
        out.append("en_else_other")
    if re.search(r"\b(the|that)\s+[a-z]", text) and not _CAP_SEQ.search(text[1:]):
        out.append("en_the_np_no_name")
    if any(p in text for p in ZH_PERSONAL):
        out.append("zh_personal")
    if any(d in text for d in ZH_DEMONSTRATIVE):
        out.append("zh_dem")
    elif re.search(r"[这那](?![么样里儿些])", text):
        out.append("zh_dem_bare")
    if ZH_INITIAL.search(text):
        out.append("zh_initial")
    # Per clause: 「在 Jetson Nano 上呢？能跑起来吗」 is two elliptical clauses in one message.
    clauses = [c for c in _CLAUSE.split(text) if c.strip()] or [text]
    if zh and any(ZH_PREDICATE_ONLY.search(c) for c in clauses):
        out.append("zh_predicate_only")
    if zh and any(ZH_NE.search(c) and len(c.replace(" ", "")) <= 16 for c in [text, *clauses]):
        out.append("zh_ne")
    if window and _partial_name(window, text):
        out.append("partial_name")
    if window and _full_name(window, text):
        out.append("full_name")
    the_type = _THE_TYPE.search(text)
    if the_type and not re.match(r"\s+(of|called|named)\s+[A-Z]|\s+[A-Z]", text[the_type.end():]):
        out.append("en_the_type")
    if _CONTINUATION.search(low):
        out.append("en_continuation")
    content = content_words(text)
    q_terms = terms(text)
    if not content:
        out.append("no_content")
    n = len(content) if not zh else len(content) / 2
    out.append("content_0-2" if n <= 2 else "content_3-4" if n <= 4 else "content_5+")
    if not q_terms:
        out.append("no_term")
    if not window:
        out.append("window_empty")
    else:
        window_text = " ".join(t.text for t in window).lower()
        if q_terms and any(t.lower() in window_text for t in q_terms):
            out.append("term_in_window")
        if q_terms and not any(t.lower() in window_text for t in q_terms):
            out.append("term_new")
        # Chinese content comes as single characters: count shared character pairs instead (a name like
        # 三星堆 repeated from the window gives two).
        pairs = {text[i:i + 2] for i in range(len(text) - 1)
                 if _HAS_CJK.match(text[i]) and _HAS_CJK.match(text[i + 1]) and not set(text[i:i + 2]) <= ZH_STOP}
        shared = [w for w in set(content) if len(w) > 1 and w in window_text] + [p for p in pairs if p in window_text]
        out.append("overlap_0" if not shared else "overlap_1" if len(shared) == 1 else "overlap_2+")
    if zh:
        out.append("lang_zh")
    return out


_THE_TYPE = re.compile(
    r"\b(the|that|this)\s+(team|band|group|album|song|single|record|show|series|season|film|movie|book|novel|play|"
    r"musical|game|console|company|firm|party|club|league|tour|article|project|paper|model|library|repo|repository|"
    r"version|release|dataset|script|server|program|war|battle|case|trial|incident|event|award|prize|role|character|"
    r"label|product|device|card|chip|board|course|school|university|city|country|author|director|founder|person|man|woman)s?\b",
    re.I)
_CONTINUATION = re.compile(
    r"\bwhat (happened|did \w+ do) (next|then|after|later|afterwards?)\b|^\s*what happened\s*[?.]?\s*$|\bafter (that|this)\b|"
    r"\b(any|anything|something) (else|more)\b|\bany other\b|\b(afterwards?|later on|as a result|the next year|by then)\b")


def _full_name(window: Sequence[Turn], text: str) -> bool:
    """The question names a window entity in full ("Where was Linus Torvalds born?" after "Linus Torvalds")."""
    for turn in window:
        for m in _CAP_SEQ.finditer(turn.text):
            name = m.group(0).strip(" .")
            if name.lower() in EN_STOP:
                continue
            if (len(name.split()) >= 2 or m.start() == 0) and len(name) >= 3 and re.search(rf"\b{re.escape(name)}\b", text):
                return True
    return False


def _partial_name(window: Sequence[Turn], text: str) -> bool:
    """A name used in part: "Kohli" after "Virat Kohli" — a shortened mention is a reference back."""
    q_caps = {w for w in re.findall(r"\b[A-Z][\w'’-]+", text)}
    if not q_caps:
        return False
    for turn in window:
        for m in _CAP_SEQ.finditer(turn.text):
            parts = [p for p in re.split(r"\s+", m.group(0).strip(" .")) if p[:1].isupper()]
            if len(parts) < 2 or m.group(0).strip(" .") in text:
                continue
            if any(p.rstrip("'’s") in q_caps or p in q_caps for p in parts):
                return True
    return False
