"""The question filter: a bilingual rule scorer (0–10) and a pluggable second-stage LLM scorer.

The paper had an LLM score "is this a question with a topic, or a question to other members" from 0
to 10 and kept scores ≥ 5; texts shorter than 7 characters were never labelled. The rule scorer gives
the same scale without a model, so capture and import work before any model exists; an
:class:`LLMScorer` can re-score what the rules pass (:mod:`corefbot.models.serve.question_llm`: any
OpenAI-compatible endpoint).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Protocol, Sequence

from corefbot.pipeline.records import Turn

log = logging.getLogger(__name__)

THRESHOLD = 5.0
MIN_CHARS = 7

# Placeholders the chat apps put in the text: OneBot's [image], WeChat/QQ emoticons such as [旺柴] [合十]
# [Emm], and [图片]/[表情]. They are not text the member typed: they count toward neither the 7
# characters nor the position of a sentence-final particle ("…有嘛[旺柴]" ends in 嘛).
_PLACEHOLDER = re.compile(
    r"\[(?:image|face|record|video|file|sticker|forward|json|xml|share|location|music|poke|dice|rps|[a-z_]+)\]"
    r"|\[[\u4e00-\u9fff]{1,6}\]|(?<![A-Za-z0-9_])\[[A-Za-z][A-Za-z ]{0,15}\]"
)
_PLACEHOLDER_ASKS = re.compile(r"\[(?:疑问|问号|\?|？)\]")  # an emoticon that asks
_EMOJI = re.compile("[\U0001F000-\U0001FAFF\u2600-\u27BF\uFE0F\u200D]")
_URL = re.compile(r"(?:https?|ftp)://\S+|www\.\S+", re.IGNORECASE)
_QMARK = re.compile(r"[?？]")
# What may follow the last word of a question: punctuation, brackets, tildes, ellipses, a stray
# latin letter typed by accident ("准备要3胎了吗a"), a trailing "（小声" aside.
_TRAIL = r"(?:[\s.,，。!！~～…、:：;；)）(（\]】」』\"“”'’\-—_=^]|（?小声|\(?小声)*"
_END = re.compile(_TRAIL + r"[A-Za-z]?" + _TRAIL + r"$")
_CLAUSE = re.compile(r"[，,。.!！;；\s…~～]+")

# -- Chinese ----------------------------------------------------------------------------------------
# 吗/么 ask wherever a clause ends with them ("原来是被逼的吗（", "能不能用吗 佬们"); 嘛/呢 only at the end.
# An address after the particle ("能用吗大佬", "有嘛各位") still ends the question.
_ADDRESS = r"(?:大佬|佬|各位|兄弟|老师|老哥|朋友|群友|大家|同学)们?"
_ZH_MA = re.compile(r"(?:吗|(?<![什怎那这多要为甚])么)(?=" + _TRAIL + r"(?:$|[\s，,。.!！?？~～…(（)）]|" + _ADDRESS + "))")
_ZH_FINAL = re.compile(r"(?:嘛|呢|否|不|没|没有)$")
_ZH_CLAUSE_FINAL = re.compile(r"(?:嘛|呢)(?=[\s，,。.!！~～…]+\S)")
_ZH_FINAL_NOT = re.compile(r"(?:还|也|都|就|并|才|已|从来)(?:没|没有|不)$|(?:怎么说|谁知道|不知道)呢$|要不$|不得不$")
_ZH_BA = re.compile(r"吧$")
# 吧 that proposes rather than asks: "你先试试吧", "那就这样吧", "算了吧", "好吧".
_ZH_BA_IMPERATIVE = re.compile(
    r"(?:试试|试一下|看看|找找|再说|这样|算了|走|去|来|吃饭|睡|等等|等着|一起\S{0,4}|随便|加油|运气)吧$"
    r"|^(?:那就|也|就|那)?(?:好|行)吧$"
    r"|^(?:那就|你先|先|我们|咱们|大家|要不|干脆|还是|你就|你?(?:换|改|用|装|加|删|重|升级|降级|试|别|把|关|开|跑|去|来))"
)
_ZH_BA_CLAUSE = re.compile(r"吧(?=[\s，,。.!！~～…]+\S)")
_ZH_CONFIRM = re.compile(r"(?:是吧|对吧|是不是|对不对|是么|是吗|是嘛|好不好|行不行|可以不)")
# A-not-A: 算不算, 能不能, 支不支持, 买不买得起, 有没有, 去没去.
_ZH_A_NOT_A = re.compile(r"([\u4e00-\u9fff])[不没]\1")
_ZH_A_NOT_A_NOT = re.compile(r"(?:不管|无论|不论|管他)[\u4e00-\u9fff]{0,4}([\u4e00-\u9fff])[不没]\1|差不差|一不一")
# 还是 between two alternatives ("你用的windows还是linux"), not "还是不行" / "我还是太年轻了".
_ZH_OR = re.compile(
    r"(?<![我你他她它也都就但可而却仍们那这所以])还是(?![不没很挺太比较算得要会有一可用蛮先等再别老觉])"
)
_ZH_WH = re.compile(
    r"谁|啥|咋|怎么|怎样|怎麼|怎办|什么|甚么|为何|何时|何处|何地|如何|何以|哪|几[个种位天点号块张年月次岁层台件款条种句分]|"
    r"几[GgKkWw万千百十]|多少|多大|多久|多长|多高|多快|多远|多重|多贵|干嘛|干啥|为啥|为什么|是否|"
    r"何(?:时|处|地|在|来|去|以|故|夕|人|物|种|为)|从何|难道|岂不|^还是说"
)
# An interrogative used as an indefinite ("什么都试过", "谁都行", "没啥") or inside a report of not
# knowing ("我也不知道怎么回事") asks nothing.
_ZH_WH_INDEF_AT = re.compile(r"(?:谁|啥|什么|哪\S?|几\S?)[\u4e00-\u9fff]{0,3}[都也]|怎么[都也]|怎么说呢|谁知道呢|哪里哪里")
_ZH_IDIOMS = re.compile(r"哪里哪里|怎么说呢|谁知道呢")
_ZH_WH_INDEF_BEFORE = re.compile(r"(?:没|随便\S{0,2}|不管\S{0,4}|无论\S{0,4}|不论\S{0,4})$")
_ZH_UNKNOWING = re.compile(r"(?:我|俺)(?:也|都|还|真|实在)?(?:不知道|不清楚|不晓得|搞不懂|没搞懂|忘了)|^不知道为[什啥]么?[，, ]")
_ZH_REQUEST = re.compile(
    r"请问|请教|求助|求教|求问|求推荐|求带|求一[个份下]|求个|求大佬|求解答|求指导|求指点|求链接|求资源|"
    r"有没有(?:大佬|人|朋友|同学|老哥|群友|佬)|有人(?:知道|用过|试过|遇到|碰到|会|懂|做过|搞过|了解|跑过|有)|"
    r"谁(?:有|会|知道(?!呢)|用过|懂|能|试过)|帮忙(?:看|测|瞅|瞧|问|打听)|帮我(?:看|打听|撤回|测|查|瞅)|"
    r"麻烦(?:帮|大佬|各位|问|看)|想问(?:下|一下|问)|问(?:下|一下)大家|问个|问一个|咨询(?:一下|下)?|打听(?:一下|下)|"
    r"(?:一个|个).{0,6}问题(?:啊|呀)?$|好奇"
)

# -- English ----------------------------------------------------------------------------------------
_EN_LEAD = r"^\s*(?:(?:btw|so|and|but|also|hi|hello|hey|guys|all|everyone|folks|quick question|sorry|um+|uh+|ok|okay)[,:!\s]+)*"
_EN_AUX = re.compile(
    _EN_LEAD + r"(?:is|are|am|was|were|do|does|did|can|could|should|would|will|shall|may|might|has|have|had|"
    r"isn'?t|aren'?t|doesn'?t|don'?t|didn'?t|can'?t|won'?t)\s+(?:there|it|this|that|these|those|i|we|you|they|"
    r"he|she|any|anyone|anybody|someone|somebody|[\w.+-]+)\b",
    re.IGNORECASE,
)
_EN_WH = re.compile(_EN_LEAD + r"(?:what|how|why|when|where|which|who|whom|whose)\b", re.IGNORECASE)
# "What a day", "How cool is that!", "Who knows": exclamations and shrugs, not questions.
_EN_WH_NOT = re.compile(_EN_LEAD + r"(?:what an?\b|how (?:nice|cool|great|sweet|awesome|funny|sad|lucky)\b|who knows\b|"
                        r"whatever\b|however\b|whenever\b|wherever\b)", re.IGNORECASE)
_EN_ANY = re.compile(_EN_LEAD + r"any(?:one|body)\b(?!\s+who\b)", re.IGNORECASE)
_EN_REQUEST = re.compile(
    r"\b(?:any idea|any ideas|anyone know|anybody know|does anyone|has anyone|did anyone|is anyone|"
    r"can (?:someone|anyone|somebody)|could (?:someone|anyone|somebody)|i wonder|wondering (?:if|whether|how|why)|"
    r"is it possible|any (?:recommendation|suggestion|tips|advice|pointers)s?|how (?:to|do|can|should)|"
    r"what(?:'s| is) the (?:best|right|correct|difference)|need (?:some )?help|looking for)\b|^\s*help\b|"
    r"\bhelp(?: me| pls| please|!|\s*$)",
    re.IGNORECASE,
)

_ENTITY = re.compile(r"[A-Za-z][A-Za-z0-9_.+-]{1,}|\d+")
# A line that is a command, a traceback or a log line pasted as is: no question unless a question mark
# stands outside the code.
_CODE = re.compile(
    r"^\s*(?:\$ |>>> |pip3? (?:install|uninstall|download|list|show)\b|python3? \S+\.py|python3? -[mc] |"
    r"git (?:clone|pull|push|checkout|commit|log|status|reset|submodule)\b|sudo |docker (?:run|build|pull|exec)\b|"
    r"conda (?:install|create|activate)\b|cd \S|export \w+=|CUDA_VISIBLE|import \w|from \S+ import|"
    r"def \w+\(|class \w+[(:]|for \w+ in |File \"|Traceback|[A-Z]\w*(?:Error|Exception|Warning):|loss:|\w+ = )"
)


_SPACES = re.compile(r"\s+")
_PUNCT = re.compile(r"[，,。.!！;；]")
_CJK = re.compile(r"[\u4e00-\u9fff]")
_LATIN = re.compile(r"[A-Za-z]{2}")
_ZH_EXCLAIM_BA = re.compile(r"太\S{1,8}了吧$")
_ZH_JUDGED = re.compile(r"应该|是|的|了|不|没|能|会|还|有|够|得|只|至少|大概|可能|估计|算|都|也")
_ZH_MA_END = re.compile(r"(?:吗|(?<![什怎那这多要为甚])么)$")
_ZH_IS_OR = re.compile(r"是[^，,。.!！\s]{1,15}还是")
_ZH_AH_END = re.compile(r"[啊呀哇嘞]$")
# Weak cues: lines that often invite an answer without any question form. They land in the borderline band
# (a second stage decides) and never pass on their own: a rhetorical 不是/不就 ("那不是变成低分辨率了"),
# a request to a member ending in 看看/试试/呗 ("你测下速度看看", "佬重新加下微信呗"), a report of not knowing
# ("我也不知道是啥版本").
_ZH_RHETORICAL = re.compile(r"(?:那|这|岂)\S{0,6}(?:不是|不就|不得|不会)")
_ZH_ASK_MEMBER = re.compile(r"(?:你|您|佬)\S{0,12}(?:看看|试试|瞅瞅|康康)$|呗$")


def _clean(text: str) -> str:
    # The subs are the scorer's main cost over a 58,000-message build: skip those with nothing to do.
    if "://" in text or "www." in text:
        text = _URL.sub(" ", text)
    if "[" in text:
        text = _PLACEHOLDER.sub(" ", text)
    if not text.isascii():
        text = _EMOJI.sub("", text)
    return text.strip()


def text_length(text: str) -> int:
    """Characters that count toward the 7-character rule: placeholders and spaces do not."""
    if "[" in text:
        text = _PLACEHOLDER.sub("", text)
    return len(_SPACES.sub("", text))


def _wh_asks(body: str) -> bool:
    """An interrogative that asks: not an indefinite ("什么都试过", "谁都行", "没啥", "不管怎么")."""
    body = _ZH_IDIOMS.sub(" ", body)
    for m in _ZH_WH.finditer(body):
        if _ZH_WH_INDEF_AT.match(body, m.start()) or _ZH_WH_INDEF_BEFORE.search(body[:m.start()]):
            continue
        return True
    return False


def _ba_asks(clause: str, before: str) -> float:
    """A clause ending in 吧: a confirmation ("30w搞不定吧", "nnapi能调用npu吧") unless it proposes
    ("你先试试吧", "换小一点的模型吧", "好吧"); one that judges nothing stays borderline."""
    if _ZH_BA_IMPERATIVE.search(clause):
        return 0.0
    if _ZH_EXCLAIM_BA.search(clause):
        return 3.5  # "你这配置也太豪华了吧": an exclamation as often as a question
    judged = _ZH_JUDGED.search(before)
    return 5.0 if judged else 3.5


def _zh_score(body: str, core: str, last: str) -> float:
    """Chinese cues. ``core`` is ``body`` without trailing punctuation; ``last`` its last clause."""
    score = 0.0
    if _ZH_MA.search(body) or _ZH_MA_END.search(core):
        score = max(score, 6.0)
    if _ZH_FINAL.search(core) and not _ZH_FINAL_NOT.search(core):
        score = max(score, 6.0 if core.endswith(("呢", "否")) else 5.5)
    for m in _ZH_CLAUSE_FINAL.finditer(body):
        if not _ZH_FINAL_NOT.search(body[:m.end()]):
            score = max(score, 5.0)
    if _ZH_CONFIRM.search(body):
        score = max(score, 6.0)
    if any(not _ZH_A_NOT_A_NOT.search(body[max(0, m.start() - 8):m.end()]) for m in _ZH_A_NOT_A.finditer(body)):
        score = max(score, 6.0)
    if (_ZH_OR.search(body[1:]) and len(body) >= 5) or _ZH_IS_OR.search(body):
        score = max(score, 5.5)
    unknowing = bool(_ZH_UNKNOWING.search(body))
    if not unknowing and _wh_asks(body):
        score = max(score, 5.5)
    if _ZH_REQUEST.search(body):
        score = max(score, 5.5)
    if _ZH_BA.search(core):
        score = max(score, _ba_asks(last, _PUNCT.split(core)[-1]))
    for m in _ZH_BA_CLAUSE.finditer(body):
        clause = _CLAUSE.split(body[:m.end()])[-1]
        score = max(score, _ba_asks(clause, _PUNCT.split(body[:m.end()])[-1]))
    if score < 5 and _ZH_AH_END.search(core):
        score = max(score, 3.0)  # "shape 对不上啊", "nvidia进不去啊": often a question, often not — the second stage decides
    if score < 3 and (unknowing or _ZH_RHETORICAL.search(body) or _ZH_ASK_MEMBER.search(core)):
        return 3.0
    if unknowing and score > 0 and not _QMARK.search(body) and not _ZH_MA.search(body):
        score -= 2.0  # "我也不知道为什么…" reports, it does not ask
    return score


def _en_score(body: str) -> float:
    score = 0.0
    if _EN_WH.search(body) and not _EN_WH_NOT.search(body):
        score = max(score, 5.5)
    if _EN_AUX.search(body):
        score = max(score, 5.5)
    if _EN_ANY.search(body):
        score = max(score, 5.5)
    if _EN_REQUEST.search(body):
        score = max(score, 5.5)
    return score


def rule_score(text: str, min_chars: int = MIN_CHARS) -> float:
    """A 0–10 question score from surface cues, Chinese and English alike.

    Strong cues (a question mark; 吗/么/嘛/呢/不/没 ending a clause, emoticons and punctuation after it
    notwithstanding; A-not-A; 还是 alternatives; interrogatives 谁/啥/咋/哪/几/多少/干嘛…; requests 请教/求/
    有没有大佬/帮忙看看; English questions with or without "?") reach the threshold on their own; weak ones
    (a confirming 吧 without a judgement, a bare 啊 ending) land in the borderline band that a second stage
    may re-score; a named thing (mmpose, TX2, CUDA 12) adds one point to any cue.
    """
    if text_length(text) < min_chars:
        return 0.0
    body = _clean(text)
    if not body:
        return 0.0
    code = bool(_CODE.search(body))
    core = _END.sub("", body)
    clauses = [c for c in _CLAUSE.split(core) if c]
    last = clauses[-1] if clauses else core
    score = 0.0
    if _QMARK.search(body) or _PLACEHOLDER_ASKS.search(text):
        score = 6.0
    # A pasted command or traceback: its English words ("import", "is", "for") are not the member asking;
    # Chinese around it still is ("pip install mmcv 报错了咋办").
    if _CJK.search(body):
        score = max(score, _zh_score(body, core, last))
    if not code and _LATIN.search(body):
        score = max(score, _en_score(body))
    if score > 0 and _ENTITY.search(body):
        score += 1.0  # a topic: a named thing (mmpose, TX2, CUDA 12…)
    return max(0.0, min(score, 10.0))


@dataclass(frozen=True, slots=True)
class QuestionFilter:
    threshold: float = THRESHOLD
    min_chars: int = MIN_CHARS

    def score(self, text: str) -> float:
        return rule_score(text, self.min_chars)

    def passes(self, score: float) -> bool:
        return score >= self.threshold


class LLMScorer(Protocol):
    """A second-stage scorer: the paper's 0–10 prompt answered by a language model."""

    def score(self, text: str, window: Sequence[Turn] = ()) -> float: ...


def parse_score(answer: str) -> float | None:
    match = re.search(r"\d+(?:\.\d+)?", answer)
    if not match:
        return None
    return max(0.0, min(10.0, float(match.group())))
