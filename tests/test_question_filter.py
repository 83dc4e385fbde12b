"""The bilingual rule scorer: 0–10, threshold 5, at least 7 characters."""
from __future__ import annotations

import pytest

from corefbot.pipeline.question import QuestionFilter, parse_score, rule_score, text_length

QUESTIONS = [
    "Can mmpose be deployed on mobile phones?",
    "BTW, how to deploy it on TX2?",
    "mmpose 能部署到手机上吗",
    "调到 1 了还是不行，为什么不好用？",
    "在 Jetson Nano 上呢？能跑起来吗",
    "请问 CUDA 12 支持吗",
    "有人知道 mmdeploy 怎么转 TensorRT",
    "how do I fix the CUDA out of memory error",
    "Does anyone know whether ncnn supports int8",
    "这个报错怎么解决",
]
NOT_QUESTIONS = [
    "哈哈哈哈哈哈哈哈",
    "ok thanks everyone!",
    "今天天气不错啊大家",
    "I pushed the fix to main today",
    "把 batch size 调小一点试试",
    "收到",  # too short anyway
    "what?",  # a question mark, but under 7 characters
    "[image][image][image][image]",
]


@pytest.mark.parametrize("text", QUESTIONS)
def test_questions_pass(text: str) -> None:
    f = QuestionFilter()
    assert f.passes(f.score(text)), (text, f.score(text))


@pytest.mark.parametrize("text", NOT_QUESTIONS)
def test_non_questions_do_not_pass(text: str) -> None:
    f = QuestionFilter()
    assert not f.passes(f.score(text)), (text, f.score(text))


def test_scores_are_on_the_paper_scale() -> None:
    for text in QUESTIONS + NOT_QUESTIONS:
        assert 0.0 <= rule_score(text) <= 10.0


def test_seven_character_rule_counts_characters_not_placeholders() -> None:
    assert text_length("怎么装？[image]") == 4
    assert QuestionFilter().score("那个怎么装？") == 0.0  # 6 characters: the paper never labels it
    assert QuestionFilter(min_chars=3).score("那个怎么装？") >= 5


def test_llm_scores_are_parsed_and_clamped() -> None:
    assert parse_score("8") == 8.0 and parse_score("Score: 12") == 10.0 and parse_score("n/a") is None


def test_second_stage_llm_scorer_over_an_openai_compatible_endpoint(store) -> None:
    """The paper's 0–10 prompt sent to a loopback chat-completions endpoint re-scores the rule candidates."""
    from corefbot.pipeline.build import build
    from corefbot.models.serve.question_llm import OpenAIScorer
    from corefbot.pipeline.records import Message
    from tests.loopback import chat_endpoint

    # a model that knows thanks-with-a-question-mark is chatter
    with chat_endpoint(lambda prompt: "2" if "thanks" in prompt else "9") as (url, prompts):
        store.insert_messages([
            Message("p", "g", "1", "a", 0.0, "Can mmpose run on TX2?"),
            Message("p", "g", "2", "b", 60.0, "great, thanks everyone?"),
            Message("p", "g", "3", "c", 120.0, "今天天气不错啊大家"),
        ])
        build(store, scorer=OpenAIScorer(url))
    scores = {m.text: (m.question_score, m.is_question) for m in store.iter_merged()}
    assert scores == {"Can mmpose run on TX2?": (9.0, True), "great, thanks everyone?": (2.0, False),
                      "今天天气不错啊大家": (0.0, False)}
    assert len(prompts) == 2 and all("0 to 10" in p for p in prompts)  # no cue, no call
