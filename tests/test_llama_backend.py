"""corefbot.models.serve.llama on the tiny Q4_K_M model: decisions, one-line rewrites, state reuse, errors, queue, timeout."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")

from corefbot.models.serve.llama import MAX_REWRITE_CHARS, BackendBusy, LlamaBackend  # noqa: E402
from corefbot.pipeline.prompt import DECISIONS, SERVE_ORDER, build_prompt  # noqa: E402
from corefbot.pipeline.records import Turn  # noqa: E402

WINDOW = [
    Turn("alice", "mmpose 能部署到手机上吗？", 0.0),
    Turn("bob", "Can mmpose be deployed on mobile phones?", 5.0),
    Turn("alice", "试过了，安卓上可以，iOS 还没试", 9.0),
    Turn("carol", "Which version of PyTorch do you use?", 14.0),
]
QUESTIONS = [
    Turn("dave", "BTW, how to deploy it on TX2?", 20.0),
    Turn("dave", "在 TX2 上呢？", 20.0),
    Turn("erin", "为什么不好用？", 20.0),
    Turn("erin", "How do I install CUDA 12 on Ubuntu 22.04?", 20.0),
]


def _long_window(n: int, words: int = 40) -> list[Turn]:
    return [Turn(f"u{i % 6}", " ".join(f"word{(i * 7 + j) % 97}" for j in range(words)) + " 这个怎么装？",
                 float(i)) for i in range(n)]


@pytest.fixture(scope="module")
def backend(tiny_gguf: Path):
    b = LlamaBackend(tiny_gguf, n_threads=2)
    yield b
    b.close()


def test_missing_model_names_the_path(tmp_path: Path):
    path = tmp_path / "absent.gguf"
    with pytest.raises(FileNotFoundError, match="absent.gguf"):
        LlamaBackend(path)


@pytest.mark.parametrize("content", [b"this is not a model", b"GGUF" + bytes(range(256)) * 4])
def test_corrupt_model_names_the_path(tmp_path: Path, content: bytes):
    path = tmp_path / "corrupt.gguf"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="corrupt.gguf"):
        LlamaBackend(path)


def test_truncated_model_names_the_path(tiny_gguf: Path, tmp_path: Path):
    path = tmp_path / "truncated.gguf"
    path.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated.gguf"):
        LlamaBackend(path)


def test_decisions_always_parse_and_probs_sum_to_one(backend: LlamaBackend):
    windows = [WINDOW, [], WINDOW[:1], _long_window(12)]
    for window in windows:
        for q in QUESTIONS:
            res = backend.resolve(window, q, group="g-parse")
            assert res.decision in DECISIONS
            assert set(res.probs) == set(DECISIONS)
            assert sum(res.probs.values()) == pytest.approx(1.0, abs=1e-9)
            assert all(0.0 < p < 1.0 for p in res.probs.values())
            assert res.decision == max(res.probs, key=res.probs.get)
            assert res.backend == "llama-cpp"
            assert res.rewrite is None or res.decision == "needs"


def test_rewrite_is_one_bounded_line(backend: LlamaBackend):
    seen = 0
    for q in QUESTIONS:
        res = backend.resolve(WINDOW, q, group="g-grammar", rewrite="always")
        assert res.rewrite is not None  # a random model still writes something: its first token must write text
        assert "\n" not in res.rewrite and "\r" not in res.rewrite
        assert "<|im_start|>" not in res.rewrite and "<|endoftext|>" not in res.rewrite
        assert 0 < len(res.rewrite) <= MAX_REWRITE_CHARS
        seen += 1
    assert seen == len(QUESTIONS)
    assert backend.resolve(WINDOW, QUESTIONS[0], rewrite="never").rewrite is None


def test_state_reuse_returns_the_cold_answer(tiny_gguf: Path):
    with LlamaBackend(tiny_gguf, n_threads=2, reuse=False) as cold, LlamaBackend(tiny_gguf, n_threads=2) as warm:
        groups = {"g1": WINDOW, "g2": list(reversed(WINDOW)), "g3": _long_window(11, words=12)}
        for group, window in groups.items():
            warm.observe(group, window)
        assert warm.wait_idle(timeout=60)
        assert set(warm.cached_groups()) == set(groups)
        # interleave groups so answers come from restored per-group states, not the live context
        for q in QUESTIONS:
            for group, window in groups.items():
                expected = cold.resolve(window, q, rewrite="always")
                cold_tokens = cold.last_eval_tokens
                got = warm.resolve(window, q, group=group, rewrite="always")
                assert got.decision == expected.decision
                for d in DECISIONS:
                    assert got.probs[d] == pytest.approx(expected.probs[d], abs=1e-5)
                assert got.rewrite == expected.rewrite
                # the prefilled prefix was reused: only the question's own tokens were evaluated
                assert warm.last_reused_tokens > 0
                assert warm.last_eval_tokens < cold_tokens / 2
                again = warm.resolve(window, q, group=group, rewrite="always", cold=True)
                assert warm.last_reused_tokens == 0 and warm.last_eval_tokens == cold_tokens
                assert (again.decision, again.rewrite) == (expected.decision, expected.rewrite)


def test_cold_question_in_a_group_is_kept_for_the_next(tiny_gguf: Path):
    with LlamaBackend(tiny_gguf, n_threads=2) as b:
        b.resolve(WINDOW, QUESTIONS[0], group="g")
        first = b.last_eval_tokens
        b.resolve(list(reversed(WINDOW)), QUESTIONS[0], group="other")
        b.resolve(WINDOW, QUESTIONS[1], group="g")
        assert b.last_eval_tokens < first / 2  # the group's prefix came back from its saved state


def test_group_cache_is_bounded(tiny_gguf: Path):
    with LlamaBackend(tiny_gguf, n_threads=2, max_groups=2) as b:
        for i in range(4):
            b.observe(f"g{i}", WINDOW[: i + 1])
        assert b.wait_idle(timeout=60)
        assert b.cached_groups() == ["g2", "g3"]


def test_long_window_is_cut_to_fit(tiny_gguf: Path):
    with LlamaBackend(tiny_gguf, n_threads=2, n_ctx=1024) as b:
        res = b.resolve(_long_window(60), QUESTIONS[0], group="g", rewrite="always")
        assert res.decision in DECISIONS


def test_queue_full_raises_busy(tiny_gguf: Path):
    with LlamaBackend(tiny_gguf, n_threads=1, max_queue=1) as b:
        # Hold the worker on a job of our own, so that which request queues and which are refused does
        # not depend on how fast the worker picks up the first one (it raced on a loaded CI machine).
        held, release = threading.Event(), threading.Event()
        holder = threading.Thread(target=b.call, args=(lambda job: (held.set(), release.wait(60)),))
        holder.start()
        assert held.wait(60)
        errors: list[BaseException] = []
        done: list[object] = []

        def ask(i: int) -> None:
            try:
                done.append(b.resolve(WINDOW, Turn("x", f"question {i}?", 1.0), group=f"q{i}"))
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(5)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(errors) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        release.set()
        for t in threads + [holder]:
            t.join()
        assert len(errors) == 4 and all(isinstance(e, BackendBusy) for e in errors)
        assert "max_queue=1" in str(errors[0])
        assert len(done) == 1  # the one queued behind the held job was answered


def test_timeout_raises_and_leaves_a_working_backend(tiny_gguf: Path):
    with LlamaBackend(tiny_gguf, n_threads=1, n_ctx=4096, timeout_s=0.005, n_batch=32) as b:
        with pytest.raises(TimeoutError, match="within"):
            b.resolve(_long_window(80), QUESTIONS[0], group="slow")
        assert b.wait_idle(timeout=60)  # the worker dropped the abandoned request
        b.timeout_s = 60
        got = b.resolve(WINDOW, QUESTIONS[0], group="slow", rewrite="always")
    with LlamaBackend(tiny_gguf, n_threads=1, reuse=False) as fresh:
        expected = fresh.resolve(WINDOW, QUESTIONS[0], rewrite="always")
    assert got.decision == expected.decision and got.rewrite == expected.rewrite
    assert got.probs["needs"] == pytest.approx(expected.probs["needs"], abs=1e-5)


def test_no_timeout_runs_questions_and_tasks(tiny_gguf: Path):
    """``timeout_s=None`` (``corefbot eval``) waits as long as it takes, for a question and for a task such
    as the question filter's second stage alike."""
    with LlamaBackend(tiny_gguf, n_threads=1, timeout_s=None) as b:
        assert b.resolve(WINDOW, QUESTIONS[0]).decision in ("needs", "not_needed", "unknown")
        assert b.call(lambda job: job.kind) == "call"


def test_closed_backend_refuses_requests(tiny_gguf: Path):
    b = LlamaBackend(tiny_gguf, n_threads=1)
    b.close()
    b.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        b.resolve(WINDOW, QUESTIONS[0])
    with LlamaBackend(b.model_path, n_threads=1) as other, pytest.raises(ValueError, match="rewrite"):
        other.resolve(WINDOW, QUESTIONS[0], rewrite="sometimes")  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["absent.gguf", "corrupt.gguf"])
def test_load_resolver_falls_back_to_rules(tmp_path: Path, bad: str):
    from corefbot.models.serve.resolver import load_resolver

    path = tmp_path / bad
    if bad == "corrupt.gguf":
        path.write_bytes(b"GGUF" + b"\0" * 64)
    resolver = load_resolver("llama-cpp", model_path=str(path), fallback=True)
    try:
        assert resolver.name == "rules"
        assert resolver.fallback_reason is not None and bad in resolver.fallback_reason
        res = resolver.resolve(WINDOW, QUESTIONS[0], group="g")
        assert res.decision in DECISIONS
    finally:
        resolver.close()
    with pytest.raises((FileNotFoundError, ValueError), match=bad):
        load_resolver("llama-cpp", model_path=str(path), fallback=False)


def test_load_resolver_serves_the_gguf(tiny_gguf: Path):
    from corefbot.models.serve.resolver import load_resolver

    resolver = load_resolver("llama-cpp", model_path=str(tiny_gguf), n_threads=1)
    try:
        assert resolver.name == "llama-cpp" and resolver.fallback_reason is None
        resolver.observe("g", WINDOW)
        for q in QUESTIONS:
            res = resolver.resolve(WINDOW, q, group="g")
            assert res.decision in DECISIONS
            assert sum(res.probs.values()) == pytest.approx(1.0)
    finally:
        resolver.close()


@pytest.mark.parametrize("bias", [30.0, -30.0])
def test_a_gate_all_but_certain_turns_the_letter_and_a_question_turned_to_needs_is_rewritten(backend: LlamaBackend,
                                                                                              bias: float):
    """Between the gate's sure sides its log-odds are added to the letter's: a gate this certain decides every
    question, and one it turns to "needs" gets the rewrite a second call on the same prompt writes."""
    from corefbot.models.serve.gate import Gate
    from corefbot.models.serve.resolver import Resolver

    resolver = Resolver(backend=backend, gate=Gate(weights={"bias": bias}, threshold=0.0), validate=False)
    turned = 0
    for q in QUESTIONS:
        alone = backend.resolve(WINDOW, q)
        res = resolver.resolve(WINDOW, q)
        assert (res.decision == "needs") == (bias > 0) and res.probs == pytest.approx(alone.probs, abs=1e-6)
        assert res.gate_swayed == ((alone.decision == "needs") != (bias > 0))
        turned += res.gate_swayed
        if bias > 0 and res.gate_swayed:
            assert res.rewrite == backend.resolve(WINDOW, q, rewrite="always").rewrite
        if bias < 0:
            assert res.rewrite is None
    assert turned  # the tiny model's letters are not all on the gate's side


def test_a_prefill_stops_paying_off_once_a_newer_message_slides_the_window():
    from corefbot.models.serve.llama import _Job, _prefill_pays_off

    w = [Turn(f"u{i % 3}", f"message {i}", float(i)) for i in range(14)]
    assert _prefill_pays_off(w[:5], None)  # nothing newer: the next question uses it
    assert _prefill_pays_off(w[:5], _Job("observe", "g", tuple(w[:6])))  # grows: the newer prompt extends it
    assert not _prefill_pays_off(w[:12], _Job("observe", "g", tuple(w[1:13])))  # slid: dead before use
    assert _prefill_pays_off([], _Job("observe", "g", tuple(w[:1])))


def test_a_rewrite_read_against_the_question_is_the_plain_greedy_line(backend: LlamaBackend):
    """The rewrite read against the question's tokens in one batch equals plain greedy generation,
    whatever the question: the model's own line comes back without generating a token, a line that
    departs from it halfway is generated only from there, and an unrelated line is generated whole."""
    lead = [backend._letters[SERVE_ORDER.index("needs")], backend._nl]
    other = backend._llm.tokenize("完全无关 unrelated line".encode(), add_bos=False)

    def rewrites(job, question: Turn) -> list[tuple[str | None, str | None, int, int]]:
        full = backend._tokenize(build_prompt(WINDOW, question, SERVE_ORDER).chatml())
        backend._reset_context()
        backend._decode(full, job)
        plain, _ = backend._generate_line(job, lead)
        own = backend._live[len(full) + len(lead):]  # the tokens it wrote (the one that ended the line is never evaluated)
        assert plain and own, "the tiny model wrote no line"
        rows = []
        # guesses in the place of the question's tokens; the last one unrelated, with a source to draft from
        for guess, sources in ((own, ()), (own[: len(own) // 2] + other, ()), (other, ()), (other, (other, own))):
            backend._reset_context()
            backend._decode(full, job)
            line = backend._generate_line(job, lead, guess, sources)[0]
            rows.append((plain, line, backend.last_rewrite_steps, len(own)))
        return rows

    rows = [row for q in QUESTIONS for row in backend.call(lambda job, q=q: rewrites(job, q), timeout_s=300)]
    assert all(plain == got for plain, got, *_ in rows)
    own, halfway, unrelated, drafted = rows[0::4], rows[1::4], rows[2::4], rows[3::4]
    assert any(steps == 0 for *_, steps, _ in own), "the model's own line was never copied in one batch"
    assert all(steps <= n - n // 2 + 1 for *_, steps, n in halfway)
    assert all(steps >= 1 for *_, steps, _ in unrelated)
    # Drafts looked up in a source that holds the line: the same line in far fewer steps than tokens.
    assert sum(steps for *_, steps, _ in drafted) * 2 < sum(n for *_, n in drafted)


def test_a_rewrite_writes_no_token_with_a_chinese_character_the_chat_lacks(backend: LlamaBackend):
    """The served line is kept to tokens whose Chinese characters the chat (and validation's glue) has:
    the tiny model, left alone, writes tokens with characters the chat never had; kept, it writes none
    and the line is still one line. (A character the vocabulary only holds as bytes split across tokens
    is not seen by the mask; validation still refuses it.)"""
    from corefbot.models.serve.validate import allowed_cjk
    from corefbot.pipeline.text import HAS_CJK

    lead = [backend._letters[SERVE_ORDER.index("needs")], backend._nl]
    window = WINDOW[:2]

    def foreign_tokens(job, question: Turn, kept: bool) -> tuple[set[str], str | None]:
        allowed = allowed_cjk(question.text, [t.text for t in window])
        full = backend._tokenize(build_prompt(window, question, SERVE_ORDER).chatml())
        backend._reset_context()
        backend._decode(full, job)
        line = backend._generate_line(job, lead, banned=backend._foreign(allowed) if kept else None)[0]
        written = backend._live[len(full) + len(lead):]
        chars = {c for t in written for c in HAS_CJK.findall(backend._pieces[t].decode("utf-8", errors="ignore"))}
        return chars - allowed, line

    free = [backend.call(lambda job, q=q: foreign_tokens(job, q, False), timeout_s=300) for q in QUESTIONS]
    kept = [backend.call(lambda job, q=q: foreign_tokens(job, q, True), timeout_s=300) for q in QUESTIONS]
    assert any(chars for chars, _ in free), "the tiny model never wrote a foreign character: the test shows nothing"
    assert all(not chars for chars, _ in kept), kept
    assert all(line and "\n" not in line for _, line in kept)


def test_foreign_tokens_are_those_with_a_chinese_character_outside_the_set(backend: LlamaBackend):
    from corefbot.pipeline.text import HAS_CJK

    allowed = frozenset("部署手机上吗")
    banned = backend._foreign(allowed)
    for t, piece in enumerate(backend._pieces):
        chars = set(HAS_CJK.findall(piece.decode("utf-8", errors="ignore")))
        assert bool(banned[t]) == bool(chars - allowed), (t, piece)
    assert banned.any() and not banned.all()


def test_drafts_continue_the_latest_match_in_the_first_source_that_has_one():
    from corefbot.models.serve.llama import _lookup

    question, prompt = [5, 6, 7, 8], [1, 2, 6, 9, 9, 1, 2, 3, 4]
    assert _lookup([6], (question, prompt), 8) == [7, 8]  # the question first
    assert _lookup([1, 2], (question, prompt), 2) == [3, 4]  # its latest occurrence
    assert _lookup([0, 2, 6], (question, prompt), 8) == [7, 8]  # the longest match in the question
    assert _lookup([4], (question, prompt), 8) == []  # nothing follows the match
    assert _lookup([1], (question, prompt), 0) == []


def test_a_line_stays_valid_utf8_across_tokens_that_split_a_character():
    from corefbot.models.serve.llama import _utf8_shape

    assert _utf8_shape(b"abc") == (0, 0, 0)
    assert _utf8_shape("不".encode()[:2]) == (0, 0, 1)  # begins a character, owes one byte
    assert _utf8_shape(b"\x8d") == (1, 1, 0)  # pays one byte, nothing else
    assert _utf8_shape(b"\x8d ok") == (1, 0, 0)
    assert _utf8_shape(b"a\x8d") == (0, 0, -1)  # a continuation byte nobody owed
    assert _utf8_shape(b"\xff") == (0, 0, -1)


def test_deciding_by_the_rewrite_reports_the_probability_of_copying_the_question(tiny_gguf: Path):
    """In rewrite mode the confidence is P(the line after the "needs" letter is the question, then a line
    end), computed from the same batch; checked against a separate llama.cpp evaluation of those tokens."""
    import math

    import llama_cpp
    import numpy as np

    question = QUESTIONS[0]
    with LlamaBackend(tiny_gguf, n_threads=2, decide_by="rewrite") as served:
        res = served.resolve(WINDOW, question)
        full = served._tokenize(build_prompt(WINDOW, question, SERVE_ORDER).chatml())
        lead = [served._letters[SERVE_ORDER.index("needs")], served._nl]
    assert res.probs["not_needed"] + res.probs["needs"] == pytest.approx(1.0) and res.probs["unknown"] == 0.0

    llm = llama_cpp.Llama(str(tiny_gguf), n_ctx=1024, n_threads=2, logits_all=True, verbose=False)
    try:
        guess = llm.tokenize(question.text.encode(), add_bos=False, special=False)
        llm.eval(full + lead + guess)
        vocab = llm._model.vocab
        control = [t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_control(vocab, t)
                   and not llama_cpp.llama_vocab_is_eog(vocab, t)]
        ends = [t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)] + lead[1:]
        logp = 0.0
        for i, token in enumerate([*guess, None]):
            row = np.array(llm.scores[len(full) + len(lead) - 1 + i], dtype=np.float64)
            row[control] = -np.inf
            row -= row.max()
            row -= math.log(np.exp(row).sum())
            logp += math.log(np.exp(row[ends]).sum()) if token is None else row[token]
    finally:
        llm.close()
    # In logs: a random-weight model copies with a tiny probability, and every token's term must be right.
    assert math.log(res.probs["not_needed"]) == pytest.approx(logp, abs=0.05)


def test_drafting_changes_the_cost_of_a_rewrite_not_the_rewrite(tiny_gguf: Path):
    with pytest.raises(ValueError, match="draft_tokens"):
        LlamaBackend(tiny_gguf, n_threads=2, draft_tokens=-1)
    lines = {}
    for k in (0, 8):
        with LlamaBackend(tiny_gguf, n_threads=2, draft_tokens=k) as b:
            lines[k] = [b.resolve(WINDOW, q, rewrite="always").rewrite for q in QUESTIONS]
    assert lines[0] == lines[8]


def test_a_forced_departure_keeps_the_line_up_to_it_and_writes_the_other_token_there(backend: LlamaBackend):
    """What a second try rests on: ``departures`` gives, for every position of the greedy line and its end, the
    best other token and its margin; forcing that token keeps the line before it and writes it there."""
    lead = [backend._letters[SERVE_ORDER.index("needs")], backend._nl]

    def lines(job, question: Turn) -> list[tuple[list[int], list[int], int, int]]:
        full = backend._tokenize(build_prompt(WINDOW, question, SERVE_ORDER).chatml())
        backend._reset_context()
        backend._decode(full, job)
        departures: list[tuple[float, int, int]] = []
        backend._generate_line(job, lead, departures=departures)
        greedy = backend._live[len(full) + len(lead):]
        assert [at for _, at, _ in departures] == list(range(len(greedy) + 1))  # each token, then the line's end
        assert all(margin >= 0 for margin, *_ in departures)
        out = []
        for _, at, token in sorted(departures)[:2]:
            backend._truncate(len(full))
            backend._generate_line(job, lead, forced=(at, token))
            out.append((greedy, backend._live[len(full) + len(lead):], at, token))
        return out

    rows = [row for q in QUESTIONS for row in backend.call(lambda job, q=q: lines(job, q), timeout_s=300)]
    for greedy, forced, at, token in rows:
        assert at == len(greedy) or token != greedy[at]
        assert forced[:at] == greedy[:at]
        # The forced token is written, unless it ends the line there (the token that ends a line is never evaluated).
        assert forced[at:at + 1] == [token] or len(forced) == at


def test_a_second_try_replaces_only_a_line_that_does_not_resolve(tiny_gguf: Path):
    """With every question decided "needs", a line that adds nothing or that validation refuses is written again
    (at most ``second_tries`` times); what comes back resolves, or is the first line, as without tries."""
    from corefbot.models.serve.validate import adds_content, validate_rewrite

    with pytest.raises(ValueError, match="second_tries"):
        LlamaBackend(tiny_gguf, n_threads=2, second_tries=-1)
    got = {}
    for tries in (0, 2):
        with LlamaBackend(tiny_gguf, n_threads=2, second_tries=tries) as b:
            b.needs_threshold = b.second_try_min_p = 0.0  # every question "needs", surely: the tiny model's lines rarely resolve
            got[tries] = [(b.resolve(WINDOW, q).rewrite, b.last_second_tries) for q in QUESTIONS]
    texts = [t.text for t in WINDOW]
    retried = 0
    for q, (first, none), (line, tries) in zip(QUESTIONS, got[0], got[2]):
        assert none == 0 and tries <= 2
        resolves = bool(first) and adds_content(q.text, first) and validate_rewrite(q.text, first, texts)[0]
        if resolves:
            assert (line, tries) == (first, 0)
        else:
            retried += tries > 0
            assert line == first or (adds_content(q.text, line) and validate_rewrite(q.text, line, texts)[0])
    assert retried, "no line was written again: the test shows nothing"
    with LlamaBackend(tiny_gguf, n_threads=2) as b:  # a letter never sure enough: no second try
        b.needs_threshold, b.second_try_min_p = 0.0, 1.01
        assert [(b.resolve(WINDOW, q).rewrite, b.last_second_tries) for q in QUESTIONS] == got[0]
