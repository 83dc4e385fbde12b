"""models.question_llm on the tiny Q4_K_M model: the second stage always parses, shares the resolver's
model and bounded queue, falls back to the rule score when busy, and only runs inside its band."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")

from corefbot.models.serve.llama import BackendBusy, LlamaBackend  # noqa: E402
from corefbot.models.serve.question_llm import LlamaQuestionScorer, SecondStage, make_scorer, parse_band  # noqa: E402
from corefbot.pipeline.question import rule_score  # noqa: E402
from corefbot.pipeline.question_eval import LabelledLine, evaluate  # noqa: E402
from corefbot.pipeline.records import Turn  # noqa: E402

LINES = [
    "有人用 mmdeploy 转过 rtmdet 吗[合十][合十]",
    "这个 shape 对不上啊",
    "收到",
    "",
    "[旺柴][旺柴]",
    "Traceback (most recent call last):\n  File \"train.py\", line 3, in <module>",
    "anyone know how to export rtmpose to ncnn",
    "x" * 3000,  # cut to MAX_CHARS, never overflows the context
]


@pytest.fixture(scope="module")
def backend(tiny_gguf: Path):
    b = LlamaBackend(tiny_gguf, n_threads=2, n_ctx=2048)
    yield b
    b.close()


def test_every_line_gets_a_score_on_the_paper_scale(backend: LlamaBackend) -> None:
    scorer = LlamaQuestionScorer(backend)
    scores = [scorer.score(text) for text in LINES]
    assert all(isinstance(s, float) and 0.0 <= s <= 10.0 for s in scores), scores
    assert len(set(round(s, 6) for s in scores)) > 1  # read from the model, not a constant


def test_the_instruction_prefix_is_evaluated_once(backend: LlamaBackend) -> None:
    scorer = LlamaQuestionScorer(backend)
    scorer.score("第一条消息，先把前缀算好")
    backend.resolve([Turn("a", "mmpose 能部署到手机上吗？", 0.0)], Turn("b", "在 TX2 上呢？", 1.0), group="g1")
    scorer.score("有没有大佬知道 deepspeed zero3 为啥会卡住")  # after the resolver used the context
    assert 0 < scorer.last_eval_tokens < 60  # only the line and the turn's tail, not ~700 prefix tokens


def test_scoring_leaves_the_resolver_correct(backend: LlamaBackend) -> None:
    window = [Turn("a", "mmpose 能部署到手机上吗？", 0.0), Turn("b", "Which version of PyTorch?", 3.0)]
    question = Turn("c", "BTW, how to deploy it on TX2?", 5.0)
    cold = backend.resolve(window, question, group="g2", cold=True, rewrite="never")
    LlamaQuestionScorer(backend).score("这个 shape 对不上啊")
    warm = backend.resolve(window, question, group="g2", rewrite="never")
    assert warm.decision == cold.decision
    assert all(abs(warm.probs[k] - cold.probs[k]) < 1e-3 for k in cold.probs)


def test_busy_backend_raises_and_the_second_stage_falls_back_to_rules(tiny_gguf: Path) -> None:
    with LlamaBackend(tiny_gguf, n_threads=1, max_queue=1, timeout_s=30) as b:
        scorer = LlamaQuestionScorer(b)
        release, running = threading.Event(), threading.Event()

        def hold(job) -> None:
            running.set()
            release.wait(20)

        holder = threading.Thread(target=b.call, args=(hold,))
        holder.start()
        assert running.wait(20)  # the worker is busy with it
        queued = threading.Thread(target=scorer.score, args=("排队的一条消息啊",))
        queued.start()
        try:
            for _ in range(200):  # wait until it sits in the queue
                with b._cv:
                    if b._resolves:
                        break
                threading.Event().wait(0.01)
            with pytest.raises(BackendBusy, match="max_queue=1"):
                scorer.score("这个 shape 对不上啊")
            stage = SecondStage(scorer, 3.0, 5.0)
            text = "这个 shape 对不上啊"
            result = stage.score(text, rule_score(text))
            assert not result.used and result.score == rule_score(text) and "BackendBusy" in result.reason
        finally:
            release.set()
            holder.join()
            queued.join()
        assert b.wait_idle(30)


def test_second_stage_only_runs_inside_its_band() -> None:
    calls: list[str] = []

    class Counting:
        def score(self, text: str, window=()) -> float:
            calls.append(text)
            return 8.0

    stage = SecondStage(Counting(), 3.0, 5.0)
    assert stage.score("有人知道 mmdeploy 怎么转 TensorRT", 6.0).score == 6.0
    assert stage.score("好的好的，我晚上回去试一下", 0.0).score == 0.0
    inside = stage.score("这个 shape 对不上啊", 4.0)
    assert inside.used and inside.score == 8.0 and calls == ["这个 shape 对不上啊"]


def test_the_evaluation_measures_the_served_second_stage() -> None:
    """eval-questions goes through the served SecondStage: a model that cannot answer a borderline line
    leaves its rule score (counted as a fallback), as in the bot, instead of failing the evaluation."""
    class Flaky:
        def score(self, text: str, window=()) -> float:
            if "进不去" in text:
                raise TimeoutError("late")
            return 8.0

    rows = [LabelledLine("这个 shape 对不上啊", True), LabelledLine("nvidia进不去啊", True),
            LabelledLine("有人知道 mmdeploy 怎么转 TensorRT 吗", True), LabelledLine("好的好的，我晚上回去试一下", False)]
    r = evaluate(rows, second=SecondStage(Flaky(), 3.0, 5.0))
    assert r.second_stage_share == pytest.approx(0.5) and r.second_stage_fallbacks == 1
    assert r.misses == ["nvidia进不去啊"] and r.recall == pytest.approx(2 / 3) and r.keep_rate_negatives == 0.0
    assert r.ms_per_second_stage is not None  # timed over the line the model answered


def test_band_and_mode_errors_name_the_problem() -> None:
    assert parse_band("2.5-5") == (2.5, 5.0)
    with pytest.raises(ValueError, match="LOW-HIGH"):
        parse_band("five")
    with pytest.raises(ValueError, match="LOW < HIGH"):
        parse_band("5-3")
    with pytest.raises(ValueError, match="llama-cpp resolver backend"):
        make_scorer("local", backend=object())
    with pytest.raises(ValueError, match="COREFBOT_QUESTION_LLM_URL"):
        make_scorer("http")
    assert make_scorer("off") is None
