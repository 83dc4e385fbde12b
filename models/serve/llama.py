"""The ``llama-cpp`` resolver backend: a local GGUF (quantized Qwen) served in-process by llama.cpp.

One :class:`LlamaBackend` owns one ``llama_cpp.Llama`` and one worker thread; every llama.cpp call
happens on that thread, so callers (the bot runs ``resolve`` in a thread off its event loop) never
touch the native context concurrently.

Decision: the prompt comes from :func:`corefbot.pipeline.prompt.build_prompt` (the one prompt builder) with
:data:`~corefbot.pipeline.prompt.SERVE_ORDER`; the next-token logits of the three option letters at the
assistant position are soft-maxed into ``Resolution.probs`` and the decision is their argmax, so it can
never be unparseable. When the decision is "needs", the letter and a newline are appended (exactly as
:func:`corefbot.pipeline.prompt.target` writes training targets) and the rewrite is generated greedily as
one line of bounded length; control tokens are masked so no ChatML marker leaks into the text, and so
are tokens with a Chinese character the chat does not hold (validation would refuse the line for it). The
question's own tokens go into the same batch as the letter, and each later step drafts what followed the
line's last tokens in the question or the window: the runs a rewrite copies cost no steps of their own.
A sure "needs" whose line copies the question or would be refused gets up to two second tries (see
:meth:`LlamaBackend._rewrite`). With ``decide_by="rewrite"`` the rewrite itself decides (see :data:`DecideBy`).

Latency: a sliding window renames senders and drops the oldest line on every message, so the group's
prompt prefix changes from its first chat line on each time a message arrives. :meth:`observe` is
therefore called by the bot as messages arrive: it queues a prefill of that group's prefix (system +
header + window), computed in the background between questions, and keeps the KV state of that one
sequence (no logits: only the KV of seq 0, ~12 KB per token for a 0.5B model) in a bounded LRU of
groups. A question then evaluates only its own tokens. Reuse is by longest common token prefix with
either the live context or the group's saved state, so a question whose prefix was never prefilled
is still answered correctly (cold path), and any partial overlap (the static header) is reused.
"""
from __future__ import annotations

import ctypes
import logging
import math
import os
import threading
import time
import unicodedata
from collections import OrderedDict, deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Literal, Sequence, TypeVar, get_args

from corefbot.models.serve.types import DecideBy, DecideSetting, Resolution, RewriteMode
from corefbot.models.serve.validate import adds_content, allowed_cjk, validate_rewrite
from corefbot.pipeline.prompt import LETTERS, SERVE_ORDER, Prompt, build_prompt, chatml_prefix, one_line
from corefbot.pipeline.records import Decision, Turn
from corefbot.pipeline.text import HAS_CJK

log = logging.getLogger(__name__)
T = TypeVar("T")

# One line, bounded: the rewrite is a single self-contained question (see LlamaBackend._pick).
MAX_REWRITE_CHARS = 300
# Tokens drafted per generation step (see LlamaBackend._generate_line): on 2 cores a 0.5B model evaluates
# 1 token in ~43 ms and 9 in ~95 ms, so a wrong draft costs about one step and a right one saves up to 8.
DRAFT_TOKENS = 8
# Second tries of a rewrite that contradicts a "needs" decision (see LlamaBackend._rewrite): each rewrites the
# line from one of its least certain tokens, so it costs about one more rewrite, and only on such questions.
SECOND_TRIES = 2
# ... and only when the letter is this sure: a copied line is the model's own sign that the question may stand as
# asked, and a second try overrides it (an unsure letter's second tries rewrote self-contained questions).
SECOND_TRY_MIN_P = 0.9
# Room kept for the question, the options and the rewrite when fitting a long window into n_ctx.
QUESTION_RESERVE = 384
_OBSERVE_CHUNK = 64  # prefill granularity: a waiting question pre-empts a prefill within one chunk


DECIDE_FILE = "decide.json"


class BackendBusy(RuntimeError):
    """The request queue is full: the caller should answer without the model (or retry later)."""


class _Abandoned(Exception):
    """The job's caller gave up (timeout) or a question pre-empted a prefill."""


@dataclass(eq=False)
class _Job:
    kind: Literal["resolve", "observe", "call"]
    group: str | None
    window: tuple[Turn, ...]
    question: Turn | None = None
    rewrite: "RewriteMode" = "auto"
    cold: bool = False
    submitted: float = 0.0  # perf_counter at submission
    deadline: float = math.inf
    cancelled: bool = False
    future: Future = field(default_factory=Future)
    fn: "Callable[[_Job], Any] | None" = None  # kind "call": run on the worker thread (see LlamaBackend.call)


@dataclass(frozen=True, slots=True)
class _SavedState:
    tokens: tuple[int, ...]
    data: Any  # ctypes uint8 array holding llama_state_seq_get_data of seq 0
    nbytes: int


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _lookup(line: Sequence[int], sources: Sequence[Sequence[int]], k: int, longest: int = 3) -> list[int]:
    """Up to ``k`` tokens that followed the line's last tokens where they last occur in a source: sources
    in order, the longest match (``longest`` tokens down to one) first within each. Prompt lookup
    decoding: a rewrite copies runs of the question and of the window."""
    if k <= 0:
        return []
    for source in sources:
        for n in range(min(longest, len(line)), 0, -1):
            key = list(line[-n:])
            for i in range(len(source) - n - 1, -1, -1):
                if source[i] == key[0] and list(source[i:i + n]) == key:
                    return list(source[i + n:i + n + k])
    return []


def _utf8_shape(piece: bytes) -> tuple[int, int, int]:
    """(leading continuation bytes, 1 if that is all of it, the bytes owed after the rest or -1 if the rest
    is not valid UTF-8): what :meth:`LlamaBackend._pick` needs to keep a line valid across byte tokens."""
    lead = 0
    while lead < len(piece) and 0x80 <= piece[lead] < 0xC0:
        lead += 1
    owed = 0
    for b in piece[lead:]:
        if owed:
            if not 0x80 <= b < 0xC0:
                return lead, 0, -1
            owed -= 1
        elif b >= 0x80:
            if 0xC2 <= b < 0xE0:
                owed = 1
            elif 0xE0 <= b < 0xF0:
                owed = 2
            elif 0xF0 <= b < 0xF5:
                owed = 3
            else:
                return lead, 0, -1
    return lead, int(bool(piece) and lead == len(piece)), owed


def _prefill_pays_off(window: Sequence[Turn], newer: "_Job | None") -> bool:
    """Whether finishing a prefill of ``window`` can still help, given a newer queued prefill of the
    same group. While the window grows (fewer messages than the cap) the newer prompt extends this one
    and reuses all of it; once it slides, the oldest line and the senders' letters change, so only the
    static header (already kept) would be shared."""
    if newer is None:
        return True
    if not window:
        return True
    return bool(newer.window) and newer.window[0] == window[0]


def _deadline(timeout_s: float | None) -> float:
    """When a job stops being worth running; no timeout (``corefbot eval``) means never."""
    return math.inf if timeout_s is None else time.monotonic() + timeout_s


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


#: What a finetune run folder serves when it has both: the base GGUF + the run's GGUF LoRA ("adapter",
#: no second quantization, a small file per version) or the merged-and-requantized model ("merged").
#: Chosen by measurement (models/EXPERIMENTS.md): both routes on the same test split.
DEFAULT_ROUTE: Literal["adapter", "merged"] = "adapter"
MERGED_PREFERENCE = ("model-q4_k_m.gguf", "model-q8_0.gguf")
RUN_ADAPTER = "adapter.gguf"


@dataclass(frozen=True, slots=True)
class ServedModel:
    """The files llama.cpp loads for a model name: a GGUF, and maybe a GGUF LoRA applied to it."""

    gguf: Path
    lora: Path | None = None
    lora_scale: float = 1.0
    route: Literal["gguf", "adapter", "merged"] = "gguf"
    decide_by: DecideBy | None = None  # the mode measured better on the run's test split for this route
    # Deciding by the letter: "needs" when its probability reaches this cut (chosen on the same split,
    # kept only where it beat the plain argmax out of sample); None: the likeliest letter.
    needs_threshold: float | None = None

    def decide_mode(self, setting: DecideSetting = "auto") -> DecideBy:
        """How a question is decided under ``setting``: "auto" is the mode measured for this model, and the
        letter where nothing was measured (a plain GGUF)."""
        if setting not in get_args(DecideSetting):
            raise ValueError(f"decide_by must be 'auto', 'letter' or 'rewrite', not {setting!r}")
        return (self.decide_by or "letter") if setting == "auto" else setting


def _check_gguf(path: Path, what: str = "GGUF model") -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (bad magic)")
    return path


def served_model(path: str | Path, route: Literal["auto", "adapter", "merged"] = "auto") -> ServedModel:
    """Resolve a model name as every caller gives it (``COREFBOT_MODEL_PATH``, ``eval --model``, ``bench
    resolver --model``, ``demo --model``, the registry): a GGUF file as it is, or a finetune run folder as
    its base GGUF + ``adapter.gguf`` (``corefbot export-lora``) or its merged ``model-<quant>.gguf``
    (``corefbot export-gguf``), :data:`DEFAULT_ROUTE` first when it has both."""
    import yaml

    path = Path(path)
    if not path.is_dir():
        return ServedModel(_check_gguf(path))
    if not (path / "config.yaml").is_file():
        raise FileNotFoundError(f"{path}: a folder but not a finetune run folder (no config.yaml); "
                                "name a GGUF file or a run folder")
    config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    options: dict[str, ServedModel] = {}
    if (path / RUN_ADAPTER).is_file() and config.get("base_gguf"):
        base = Path(config["base_gguf"])
        options["adapter"] = ServedModel(base, path / RUN_ADAPTER, 1.0, "adapter")
    for name in MERGED_PREFERENCE:
        if (path / name).is_file():
            options["merged"] = ServedModel(path / name, None, 1.0, "merged")
            break
    order = [route] if route != "auto" else [DEFAULT_ROUTE] + [r for r in ("adapter", "merged") if r != DEFAULT_ROUTE]
    for name in order:
        if name in options:
            chosen = options[name]
            _check_gguf(chosen.gguf, "base GGUF of the run" if name == "adapter" else "GGUF model")
            decide_by, threshold = _measured_decision(path, chosen.route)
            return replace(chosen, decide_by=decide_by, needs_threshold=threshold)
    wanted = "" if route == "auto" else f" by the {route} route"
    raise FileNotFoundError(f"{path}: this run folder has nothing llama.cpp can serve{wanted}: run "
                            f"`corefbot export-lora {path}` (base GGUF + adapter) or `corefbot export-gguf {path}` (merged)")


def _measured_decision(run_dir: Path, route: str) -> tuple[DecideBy | None, float | None]:
    """The run's ``decide.json`` for this route: the mode, and the letter's cut on p(needs) if it has one."""
    import json

    try:
        record = json.loads((run_dir / DECIDE_FILE).read_text())
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as exc:
        log.warning("%s unreadable (%s): deciding by the letter", run_dir / DECIDE_FILE, exc)
        return None, None
    chosen = record.get("decide_by")
    if record.get("route") != route or chosen not in get_args(DecideBy):
        return None, None  # measured on another route of this run, or not a choice this version knows
    threshold = record.get("letter_threshold")
    if threshold is not None and not (isinstance(threshold, (int, float)) and 0.0 < threshold < 1.0):
        log.warning("%s: letter_threshold %r is not a probability: deciding by the likeliest letter",
                    run_dir / DECIDE_FILE, threshold)
        threshold = None
    return chosen, threshold


class LlamaBackend:
    """A GGUF model served by llama.cpp with per-group KV-state reuse. See the module docstring."""

    name = "llama-cpp"

    def __init__(self, model_path: str | Path, *, n_threads: int | None = None, n_ctx: int = 2048,
                 timeout_s: float | None = 30.0, max_queue: int = 8, max_groups: int = 32,
                 max_state_mb: float = 256.0, max_rewrite_tokens: int = 96, n_batch: int = 512,
                 reuse: bool = True, lora_path: str | Path | None = None, lora_scale: float = 1.0,
                 decide_by: DecideSetting = "auto", draft_tokens: int = DRAFT_TOKENS,
                 second_tries: int = SECOND_TRIES) -> None:
        """``model_path``: a GGUF, or a finetune run folder (see :func:`served_model`), which brings its
        own adapter. ``lora_path``: a GGUF LoRA applied to the GGUF at ``lora_scale`` (llama.cpp takes it
        only when the context is built: another adapter means another backend). ``timeout_s=None``
        waits as long as the answer takes (evaluation, not serving). ``reuse=False`` evaluates every
        prompt from scratch (a cold reference in tests); so does a single ``resolve(..., cold=True)``,
        the naive call the benchmark compares against."""
        import llama_cpp

        self.model_path = Path(model_path)  # as named (a run folder stays a run folder: reloads reuse it)
        served = served_model(self.model_path)
        if lora_path is not None:
            if served.lora is not None:
                raise ValueError(f"{self.model_path} already brings its adapter {served.lora}; "
                                 f"do not also pass lora_path={lora_path}")
            served = ServedModel(served.gguf, Path(lora_path), lora_scale, served.route)
        self.gguf_path, self.lora_path, self.lora_scale = served.gguf, served.lora, served.lora_scale
        if self.lora_path is not None and not self.lora_path.is_file():
            raise FileNotFoundError(f"GGUF LoRA adapter not found: {self.lora_path}")
        self.timeout_s = timeout_s
        self.max_queue = max_queue
        self.max_groups = max_groups
        self.max_state_bytes = int(max_state_mb * 1024 * 1024)
        self.max_rewrite_tokens = max_rewrite_tokens
        if draft_tokens < 0:
            raise ValueError(f"draft_tokens must be 0 or more, not {draft_tokens}")
        self.draft_tokens = draft_tokens  # 0: a rewrite step evaluates only its token (the question is still read in one batch)
        if second_tries < 0:
            raise ValueError(f"second_tries must be 0 or more, not {second_tries}")
        self.second_tries = second_tries
        self.second_try_min_p = SECOND_TRY_MIN_P
        self.reuse = reuse
        self.decide_by: DecideBy = served.decide_mode(decide_by)
        self.needs_threshold = served.needs_threshold  # the run's own calibration of its letter, in either setting
        self.n_threads = n_threads or _default_threads()
        try:
            self._llm = llama_cpp.Llama(
                model_path=str(self.gguf_path), n_ctx=n_ctx, n_batch=n_batch, n_threads=self.n_threads,
                n_threads_batch=self.n_threads, logits_all=False, verbose=False,
                lora_path=str(self.lora_path) if self.lora_path else None, lora_scale=self.lora_scale,
            )
        except Exception as exc:  # llama-cpp-python raises ValueError/RuntimeError with no detail
            what = f"{self.gguf_path} with adapter {self.lora_path}" if self.lora_path else str(self.gguf_path)
            raise ValueError(f"llama.cpp could not load {what}: {exc}") from exc
        self._lc = llama_cpp
        self.n_ctx = self._llm.n_ctx()
        self._n_vocab = self._llm.n_vocab()
        self._vocab = self._llm._model.vocab
        try:
            self._letters = [self._single_token(letter) for letter in LETTERS]
            self._nl = self._single_token("\n")
            for marker in ("<|im_start|>", "<|im_end|>"):
                self._single_token(marker, special=True)
        except ValueError:
            self._llm.close()
            raise
        self._init_line_masks()
        self._live: list[int] = []  # tokens whose KV is in seq 0 of the context, in order
        self._groups: OrderedDict[str, _SavedState] = OrderedDict()
        self._state_bytes = 0
        self._job: _Job | None = None
        self.last_eval_tokens = 0  # tokens evaluated for the last decision (tests and the bench read it)
        self.last_reused_tokens = 0
        self.last_decision_ms = 0.0  # submission to decision: before any rewrite (letter), with the rewrite (rewrite)
        self.last_rewrite_steps = 0  # tokens of the last rewrite generated one at a time (not copied in a batch)
        self.last_second_tries = 0  # lines written again for the last rewrite (see _rewrite)
        self.skipped_prefills = 0  # background prefills stopped because a newer window made them useless

        self._cv = threading.Condition()
        self._resolves: deque[_Job] = deque()
        self._observes: OrderedDict[str, _Job] = OrderedDict()
        self._closing = False
        self._worker = threading.Thread(target=self._run, name=f"llama-cpp:{self.model_path.name}", daemon=True)
        self._worker.start()
        by_cut = self.needs_threshold is not None and self.decide_by == "letter"
        cut = f", needs at p >= {self.needs_threshold:.3g}" if by_cut else ""
        log.info("llama-cpp backend loaded %s (n_ctx %d, %d threads, deciding by the %s%s)", self.model_path, self.n_ctx,
                 self.n_threads, self.decide_by, cut)

    # -- public API (any thread) -------------------------------------------------------------------

    def resolve(self, window: Sequence[Turn], question: Turn, *, group: str | None = None,
                rewrite: RewriteMode = "auto", cold: bool = False) -> Resolution:
        """Decide (and rewrite) one question. Blocks up to ``timeout_s``; raises :class:`BackendBusy`
        when ``max_queue`` requests are already waiting and ``TimeoutError`` when the answer is late."""
        if rewrite not in ("auto", "always", "never"):
            raise ValueError(f"rewrite must be 'auto', 'always' or 'never', not {rewrite!r}")
        start = time.perf_counter()
        job = _Job("resolve", group, tuple(window), question, rewrite=rewrite, cold=cold, submitted=start,
                   deadline=_deadline(self.timeout_s))
        res: Resolution = self._submit(job, self.timeout_s, "resolver", "gave no answer")
        return Resolution(res.decision, res.probs, res.rewrite, backend=self.name,
                          latency_ms=(time.perf_counter() - start) * 1000)

    def call(self, fn: "Callable[[_Job], T]", *, timeout_s: float | None = None) -> T:
        """Run ``fn(job)`` on the model's thread, queued with the questions (same ``max_queue``, same
        :class:`BackendBusy`, pre-empting prefills): another task on the one loaded model, such as the
        question filter's second stage (:mod:`corefbot.models.serve.question_llm`). ``fn`` may use the backend's KV
        helpers (``_reuse``, ``_decode``, ``_save``); ``_decode(tokens, job)`` honours the deadline."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        job = _Job("call", None, (), submitted=time.perf_counter(), deadline=_deadline(timeout_s), fn=fn)
        return self._submit(job, timeout_s, "backend", "did not run the task")

    def letter_logits(self, prompt: Prompt) -> tuple[float, ...]:
        """The logits of the option letters A, B, C as the answer's first token for ``prompt``, in whatever
        option order it was built (evaluation over all orders; serving asks in SERVE_ORDER through
        :meth:`resolve`). Prompts built one order after another share their header's KV."""
        def run(job: _Job) -> tuple[float, ...]:
            full = self._tokenize(prompt.chatml())
            n = self._reuse(None, full)
            self._decode(full[n:], job)
            return tuple(self._letter_logits())

        return self.call(run)

    def _submit(self, job: _Job, timeout_s: float | None, what: str, late: str) -> Any:
        """Queue ``job`` with the questions (bounded: :class:`BackendBusy`) and wait for its result."""
        with self._cv:
            if self._closing:
                raise RuntimeError(f"llama-cpp backend for {self.model_path} is closed")
            if len(self._resolves) >= self.max_queue:
                raise BackendBusy(f"llama-cpp {what} ({self.model_path.name}) is busy: "
                                  f"{len(self._resolves)} requests already queued (max_queue={self.max_queue})")
            self._resolves.append(job)
            self._cv.notify()
        try:
            return job.future.result(timeout=timeout_s)
        except FutureTimeout:
            job.cancelled = True
            raise TimeoutError(f"llama-cpp {what} ({self.model_path.name}) {late} within {timeout_s or 0:g} s") from None

    def observe(self, group: str, window: Sequence[Turn]) -> None:
        """Queue a background prefill of ``group``'s prompt prefix for ``window``: the window the
        group's *next* question will be asked with (the latest messages, including the one that just
        arrived). Returns at once; a newer window for the same group replaces a queued one."""
        with self._cv:
            if self._closing or not self.reuse:
                return
            self._observes.pop(group, None)
            self._observes[group] = _Job("observe", group, tuple(window))
            while len(self._observes) > self.max_groups:  # more groups pending than we would keep
                self._observes.popitem(last=False)
            self._cv.notify()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no job is queued or running (benchmarks and tests); False on timeout."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while self._resolves or self._observes or self._job is not None:
                remaining = None if end is None else end - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cv.wait(remaining)
        return True

    def cached_groups(self) -> list[str]:
        with self._cv:
            return list(self._groups)

    def close(self) -> None:
        with self._cv:
            if self._closing:
                return
            self._closing = True
            pending = list(self._resolves)
            self._resolves.clear()
            self._observes.clear()
            self._cv.notify_all()
        for job in pending:
            job.future.set_exception(RuntimeError(f"llama-cpp backend for {self.model_path} was closed"))
        self._worker.join()
        self._groups.clear()
        self._llm.close()
        log.info("llama-cpp backend closed %s", self.model_path)

    def __enter__(self) -> "LlamaBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- worker thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._closing or self._resolves or self._observes):
                    self._cv.wait()
                if self._closing:
                    return
                if self._resolves:
                    job = self._resolves.popleft()
                else:
                    _, job = self._observes.popitem(last=False)
                self._job = job
            try:
                if job.kind != "observe":
                    if job.cancelled or time.monotonic() > job.deadline:
                        raise _Abandoned
                    job.future.set_result(self._resolve(job) if job.kind == "resolve" else job.fn(job))
                else:
                    self._observe(job)
            except _Abandoned:
                if job.kind != "observe" and not job.future.done():
                    job.future.set_exception(TimeoutError("abandoned"))
                elif job.kind == "observe":
                    self._requeue_observe(job)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
                if job.kind != "observe":
                    job.future.set_exception(exc)
                else:
                    log.exception("prefill for group %s failed", job.group)
                self._reset_context()
            finally:
                with self._cv:
                    self._job = None
                    self._cv.notify_all()

    def _requeue_observe(self, job: _Job) -> None:
        with self._cv:
            if job.group is not None and job.group not in self._observes and not self._closing:
                self._observes[job.group] = job
                self._observes.move_to_end(job.group, last=False)

    def _check(self, job: _Job) -> None:
        if job.kind != "observe":
            if job.cancelled or time.monotonic() > job.deadline:
                raise _Abandoned
        elif self._resolves:  # a question is waiting: it goes first
            raise _Abandoned
        elif job.group is not None and not _prefill_pays_off(job.window, self._observes.get(job.group)):
            # A newer message slid this group's window while its prefill ran: the prefix this prefill
            # computes is dead before any question can use it, so stop paying for it now.
            self.skipped_prefills += 1
            raise _Abandoned

    # -- llama.cpp work (worker thread only) -------------------------------------------------------

    def _single_token(self, text: str, *, special: bool = False) -> int:
        toks = self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)
        if len(toks) != 1:
            raise ValueError(f"{self.model_path}: {text!r} is not a single token in this model's vocabulary "
                             f"({toks}); a Qwen2 ChatML tokenizer is required")
        return toks[0]

    def _init_line_masks(self) -> None:
        """What a rewrite line may hold (see :meth:`_pick`), from every token's bytes (~0.4 s for Qwen's vocabulary)."""
        import numpy as np

        lc, buf = self._lc, ctypes.create_string_buffer(256)
        pieces = []
        for t in range(self._n_vocab):
            n = lc.llama_token_to_piece(self._vocab, t, buf, len(buf), 0, False)
            if n < 0:  # a longer piece: -n is its size
                buf = ctypes.create_string_buffer(-n)
                n = lc.llama_token_to_piece(self._vocab, t, buf, len(buf), 0, False)
            pieces.append(buf.raw[:n] if n > 0 else b"")
        self._pieces = pieces
        eog = np.array([bool(lc.llama_vocab_is_eog(self._vocab, t)) for t in range(self._n_vocab)])
        control = np.array([bool(lc.llama_vocab_is_control(self._vocab, t)) for t in range(self._n_vocab)]) & ~eog
        # Empty or NUL-led pieces write nothing (llama.cpp's grammar sampler refused them too).
        bad = np.array([not p or p[0] == 0 or b"\r" in p or b"\n" in p[:-1] for p in pieces]) & ~eog
        self._utf8 = np.array([_utf8_shape(p) for p in pieces], dtype=np.int8).T  # lead, all continuation, rest
        lead, cont, rest = self._utf8
        # By the continuation bytes the line still owes (0-3): a token must pay exactly those, then be valid UTF-8.
        inside = [control | bad | ~np.where(cont == 1, (lead <= owed) & (lead > 0), (lead == owed) & (rest >= 0))
                  for owed in range(4)]
        for owed in (1, 2, 3):
            inside[owed] |= eog  # the line cannot end inside a character
        self._not_inside = inside
        self._not_first = inside[0] | eog | np.array([p.startswith(b"\n") for p in pieces])
        # Never drafted: a draft only carries text the line goes on with.
        self._unsafe_draft = frozenset(np.flatnonzero(self._not_first | np.array([b"\n" in p for p in pieces])).tolist())
        # What ends a rewrite line, and what the copy probability masks.
        self._line_ends = np.flatnonzero(eog).tolist() + [self._nl]
        self._control_ids = np.flatnonzero(control).tolist()
        # Each token's distinct Chinese characters, as postings (character -> tokens) and a count per token:
        # :meth:`_foreign` finds the tokens with a character outside a set from them in ~0.1 ms.
        postings: dict[str, list[int]] = {}
        self._cjk_count = np.zeros(self._n_vocab, dtype=np.int16)
        for t, p in enumerate(pieces):
            # Bytes of a character split across tokens are not a character: only whole ones count.
            chars = set(HAS_CJK.findall(unicodedata.normalize("NFKC", p.decode("utf-8", errors="ignore"))))
            self._cjk_count[t] = len(chars)
            for c in chars:
                postings.setdefault(c, []).append(t)
        self._cjk_postings = {c: np.array(ts) for c, ts in postings.items()}

    def _foreign(self, allowed: frozenset[str]) -> Any:
        """Tokens holding a Chinese character not in ``allowed`` (a boolean mask over the vocabulary)."""
        import numpy as np

        inside = np.zeros(self._n_vocab, dtype=np.int16)
        for c in allowed:
            ts = self._cjk_postings.get(c)
            if ts is not None:
                inside[ts] += 1  # a token lists each of its characters once
        return inside < self._cjk_count

    def _owed_after(self, owed: int, token: int) -> int:
        """The continuation bytes the line owes after ``token`` (one :meth:`_pick` allowed)."""
        lead, cont, rest = (int(x) for x in self._utf8[:, token])
        return owed - lead if cont else rest

    def _tokenize(self, text: str) -> list[int]:
        return self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def _fit(self, window: tuple[Turn, ...]) -> tuple[tuple[Turn, ...], list[int], str]:
        """Drop the oldest turns until the prefix leaves room for a question in ``n_ctx``."""
        budget = self.n_ctx - QUESTION_RESERVE
        n_turns = len(window)
        while True:
            history = build_prompt(window, Turn("", "", 0.0), SERVE_ORDER).history
            prefix = self._tokenize(chatml_prefix(history))
            if len(prefix) <= budget or not window:
                break
            window = window[1:]
        if len(window) < n_turns:
            log.warning("window cut from %d to %d turns to fit n_ctx %d (%d tokens kept for the question)",
                        n_turns, len(window), self.n_ctx, QUESTION_RESERVE)
        return window, prefix, history

    def _reset_context(self) -> None:
        self._llm._ctx.kv_cache_clear()
        self._live = []

    def _truncate(self, n: int) -> None:
        if n < len(self._live):
            if not self._llm._ctx.kv_cache_seq_rm(0, n, -1):
                self._reset_context()
                return
            del self._live[n:]

    def _decode(self, tokens: Sequence[int], job: _Job, chunk: int | None = None, logits_all: bool = False) -> None:
        step = min(chunk or self._llm.n_batch, self._llm.n_batch)
        if logits_all and len(tokens) > step:
            raise ValueError(f"{len(tokens)} tokens with every position's logits exceed one batch ({step})")
        for i in range(0, len(tokens), step):
            self._check(job)
            part = list(tokens[i:i + step])
            if len(self._live) + len(part) > self.n_ctx:
                raise ValueError(f"prompt of {len(self._live) + len(part)} tokens exceeds n_ctx {self.n_ctx}")
            self._llm._batch.set_batch(batch=part, n_past=len(self._live), logits_all=logits_all)
            rc = self._lc.llama_decode(self._llm.ctx, self._llm._batch.batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed with status {rc} ({self.model_path})")
            self._live.extend(part)

    def _restore(self, state: _SavedState) -> None:
        self._reset_context()
        got = self._lc.llama_state_seq_set_data(self._llm.ctx, state.data, state.nbytes, 0)
        if got == 0:
            raise RuntimeError(f"could not restore a saved KV state ({self.model_path})")
        self._live = list(state.tokens)

    def _save(self, group: str) -> None:
        size = self._lc.llama_state_seq_get_size(self._llm.ctx, 0)
        buf = (ctypes.c_uint8 * size)()
        n = self._lc.llama_state_seq_get_data(self._llm.ctx, buf, size, 0)
        old = self._groups.pop(group, None)
        if old is not None:
            self._state_bytes -= old.nbytes
        self._groups[group] = _SavedState(tuple(self._live), buf, int(n))
        self._state_bytes += int(n)
        while self._groups and (len(self._groups) > self.max_groups or self._state_bytes > self.max_state_bytes):
            _, dropped = self._groups.popitem(last=False)
            self._state_bytes -= dropped.nbytes

    def _reuse(self, group: str | None, tokens: Sequence[int], cold: bool = False) -> int:
        """Bring the context to the longest available prefix of ``tokens``; returns its length."""
        if cold or not self.reuse:
            self._reset_context()
            return 0
        n = _lcp(self._live, tokens)
        saved = self._groups.get(group) if group is not None else None
        if saved is not None:
            self._groups.move_to_end(group)  # type: ignore[arg-type]
            if _lcp(saved.tokens, tokens) > n:
                self._restore(saved)
                n = _lcp(self._live, tokens)
        n = min(n, len(tokens) - 1)  # the last token is always evaluated: its logits are the answer
        self._truncate(n)
        return n

    def _observe(self, job: _Job) -> None:
        _, prefix, _ = self._fit(job.window)
        assert job.group is not None
        saved = self._groups.get(job.group)
        if saved is not None and saved.tokens == tuple(prefix):
            self._groups.move_to_end(job.group)
            return
        n = self._reuse(job.group, prefix)
        self._decode(prefix[n:], job, chunk=_OBSERVE_CHUNK)
        self._save(job.group)

    def _resolve(self, job: _Job) -> Resolution:
        assert job.question is not None
        window, prefix, _ = self._fit(job.window)
        prompt = build_prompt(window, job.question, SERVE_ORDER)
        full = self._tokenize(prompt.chatml())
        if len(full) + self.max_rewrite_tokens + 2 > self.n_ctx:
            raise ValueError(f"question of {len(full)} prompt tokens does not fit n_ctx {self.n_ctx}")
        boundary = _lcp(prefix, full)  # BPE may merge across the prefix/question seam
        n = self._reuse(job.group, full, job.cold)
        self.last_reused_tokens = n
        if self.reuse and not job.cold and job.group is not None and n < boundary:
            # Cold for this group: compute its prefix first and keep it for the next question.
            self._decode(full[n:boundary], job)
            self._save(job.group)
            n = boundary
        self._decode(full[n:], job)
        self.last_eval_tokens = len(full) - self.last_reused_tokens
        probs = self._option_probs()
        decision: Decision = max(probs, key=probs.__getitem__)
        if self.needs_threshold is not None:
            rest = {d: p for d, p in probs.items() if d != "needs"}
            decision = "needs" if probs["needs"] >= self.needs_threshold else max(rest, key=rest.__getitem__)
        if self.decide_by == "letter":
            self.last_decision_ms = (time.perf_counter() - job.submitted) * 1000  # the rewrite comes after it
        rewrite, copy_p = None, None
        self.last_second_tries = 0
        if self.decide_by == "rewrite" or job.rewrite == "always" or (job.rewrite == "auto" and decision == "needs"):
            sure = self.decide_by == "letter" and decision == "needs" and probs["needs"] >= self.second_try_min_p
            rewrite, copy_p = self._rewrite(job, window, full, retry=sure)
        if self.decide_by == "rewrite":
            decision = "needs" if rewrite and adds_content(job.question.text, rewrite) else "not_needed"
            if copy_p is not None:  # the rewrite's own confidence; the letters' is noise where this mode wins
                probs = {"needs": 1.0 - copy_p, "not_needed": copy_p, "unknown": 0.0}
            if decision != "needs" and job.rewrite != "always":
                rewrite = None
            self.last_decision_ms = (time.perf_counter() - job.submitted) * 1000  # known once the rewrite is
        return Resolution(decision, probs, rewrite, backend=self.name)

    def _rewrite(self, job: _Job, window: tuple[Turn, ...], full: Sequence[int], retry: bool) -> tuple[str | None, float | None]:
        """The rewrite line after the "needs" letter (see :meth:`_generate_line`), and its copy probability.

        With ``retry`` (the letter said "needs" with at least :attr:`second_try_min_p`), a line that contradicts
        it gets up to :attr:`second_tries` more: one that adds nothing to the question (the small model's usual
        slip is to copy it: 「为啥第二次从 OpenAI 离职」 for 「Karpathy 为啥第二次从 OpenAI 离职」), or that validation would
        refuse. Each try writes the line again from the position where the first was least certain (the
        smallest logit margin between its token and the best other), with that other token, then greedily;
        the first that adds content and passes validation is kept, else the first line (the question then
        goes as asked, as without tries). Nothing changes for a line that already resolves."""
        assert job.question is not None
        texts = [t.text for t in window]
        lead = [self._letters[SERVE_ORDER.index("needs")], self._nl]
        question = self._llm.tokenize(one_line(job.question.text).encode("utf-8"), add_bos=False, special=False)
        # Kept to the chat's Chinese characters: a rewrite with any other is refused by validation anyway.
        banned = self._foreign(allowed_cjk(job.question.text, texts))
        start = len(self._live)
        departures: list[tuple[float, int, int]] | None = [] if retry and self.second_tries else None
        first, copy_p = self._generate_line(job, lead, question, sources=(question, full), banned=banned,
                                            departures=departures)

        def resolves(line: str | None) -> bool:
            return bool(line) and adds_content(job.question.text, line) and validate_rewrite(job.question.text, line, texts)[0]

        if departures is None or resolves(first):
            return first, copy_p
        for margin, at, token in sorted(departures)[: self.second_tries]:
            self._truncate(start)
            self.last_second_tries += 1
            line, _ = self._generate_line(job, lead, question, sources=(question, full), banned=banned, forced=(at, token))
            log.debug("second try from token %d (margin %.2f): %r -> %r", at, margin, first, line)
            if resolves(line):
                return line, copy_p
        return first, copy_p

    def _letter_logits(self) -> list[float]:
        """The option letters' logits at the last evaluated position."""
        ptr = self._lc.llama_get_logits_ith(self._llm.ctx, -1)
        return [float(ptr[t]) for t in self._letters]

    def _option_probs(self) -> dict[Decision, float]:
        logits = self._letter_logits()
        top = max(logits)
        exps = [math.exp(x - top) for x in logits]
        total = sum(exps)
        return {SERVE_ORDER[i]: exps[i] / total for i in range(len(LETTERS))}

    def _generate_line(self, job: _Job, lead: Sequence[int], guess: Sequence[int] = (),
                       sources: Sequence[Sequence[int]] = (), banned: Any = None,
                       forced: tuple[int, int] | None = None,
                       departures: list[tuple[float, int, int]] | None = None) -> tuple[str | None, float | None]:
        """Greedy generation of one line (see :meth:`_pick`) after ``lead`` (the answer letter and a newline),
        never writing a token of ``banned`` (a boolean mask over the vocabulary; see :meth:`_foreign`);
        the line, and the probability that the model copies ``guess`` whole and ends the line there (None
        without a guess, or when deciding by the letter). ``forced``: (position, token) written at that
        position of the line in place of the greedy choice. ``departures``: a list that receives, for each
        position of the line (its end included), ``(margin, position, token)``: the best other token there and
        how many logits it trails the chosen one by.

        The line is written by speculation that never changes it: tokens are put in the context before the
        model has chosen them, with the logits of every position, and kept as long as greedy choice agrees.
        ``guess`` (the question's own tokens) goes into the same batch as the lead: a model that copies the
        whole question and ends the line (the usual answer when nothing needs resolving) costs one batch and
        no generation steps. Once the line departs from its draft, each step evaluates the token chosen plus
        a new draft looked up in ``sources`` (the question, then the prompt): what followed the line's last
        tokens there, since a rewrite is mostly the question's words around a name copied from the window.
        A wrong draft costs a few positions of one batch, a right one saves a step per token. Whatever is
        drafted, the greedy choice at every position writes the line, so it is the one plain generation
        writes, up to llama.cpp's batched vs one-by-one arithmetic."""
        first, inside = self._not_first, self._not_inside
        if banned is not None:
            first, inside = first | banned, [m | banned for m in inside]
        draft = list(guess[: self.max_rewrite_tokens])
        line_start = len(self._live) + len(lead)
        self._decode([*lead, *draft], job, logits_all=bool(draft))
        at = len(lead) - 1  # batch position of the logits for the line's next token
        # Only deciding by the rewrite reads it: letter mode keeps the softmax over the vocabulary off its hot path.
        copy_p = self._copy_probability(at, draft) if draft and self.decide_by == "rewrite" else None
        line: list[int] = []
        tail = b""  # the text of the token that ended the line, before its newline
        owed = 0  # continuation bytes of a character the line has begun (tokens may split one)
        self.last_rewrite_steps = 0
        while len(line) < self.max_rewrite_tokens:
            self._check(job)
            if departures is None:
                tok = self._pick(at, inside[owed] if line else first)
            else:
                tok, other, margin = self._pick_two(at, inside[owed] if line else first)
                departures.append((margin, len(line), other))
            if forced is not None and forced[0] == len(line):
                tok = forced[1]
            owed = self._owed_after(owed, tok)
            if draft and tok == draft[0]:  # already in the context, with its logits: no step
                draft.pop(0)
                line.append(tok)
                at += 1
                continue
            if draft:  # the draft departs here: drop the rest of it from the context
                self._truncate(line_start + len(line))
            if self._lc.llama_vocab_is_eog(self._vocab, tok):
                break
            if b"\n" in self._pieces[tok]:
                tail = self._pieces[tok].split(b"\n", 1)[0]
                break
            line.append(tok)
            draft = _lookup(line, sources, min(self.draft_tokens, self.max_rewrite_tokens - len(line)))
            for i, t in enumerate(draft):
                if t in self._unsafe_draft:
                    del draft[i:]
                    break
            self._decode([tok, *draft], job, logits_all=bool(draft))
            at = 0 if draft else -1
            self.last_rewrite_steps += 1
        # Only a cut at max_rewrite_tokens can leave a character unfinished: "ignore" drops that one.
        text = (b"".join(self._pieces[t] for t in line) + tail).decode("utf-8", errors="ignore").strip()
        return text[:MAX_REWRITE_CHARS] or None, copy_p

    def _pick(self, at: int, refused: Any) -> int:
        """The greedy token at batch position ``at`` outside ``refused``, the mask of what a one-line rewrite
        cannot hold there: :meth:`_init_line_masks` builds them for valid UTF-8 going on from the continuation
        bytes the line owes (``_not_inside[owed]``), no control token, no carriage return, a newline only as
        a token's last byte (it ends the line), and for the first token (``_not_first``), which must write
        something (no end, no leading newline). This is the rule the GBNF grammar ``[^\\r\\n]+ "\\n"?`` gave,
        as numpy masks: llama.cpp's grammar sampler spent ~28 ms a token on Qwen's 152k vocabulary (2 cores),
        more than a third of a rewrite's time."""
        return int(self._masked_logits(at, refused).argmax())

    def _pick_two(self, at: int, refused: Any) -> tuple[int, int, float]:
        """:meth:`_pick`'s token, the best other, and how many logits the other trails by."""
        import numpy as np

        masked = self._masked_logits(at, refused)
        best = int(masked.argmax())
        top = float(masked[best])
        masked[best] = -np.inf
        other = int(masked.argmax())
        return best, other, top - float(masked[other])

    def _masked_logits(self, at: int, refused: Any) -> Any:
        """The logits at batch position ``at``, a new array with ``refused`` tokens at -inf."""
        import numpy as np

        return np.where(refused, -np.inf, self._logits_row(at))

    def _logits_row(self, at: int) -> Any:
        """The logits at batch position ``at``: a numpy view of llama.cpp's buffer, valid until the next decode."""
        import numpy as np

        return np.ctypeslib.as_array(self._lc.llama_get_logits_ith(self._llm.ctx, at), shape=(self._n_vocab,))

    def _copy_probability(self, at: int, guess: Sequence[int]) -> float:
        """P(the line is ``guess`` and ends): the product of each guess token's probability and then a line
        end's, from the logits of batch positions ``at`` … ``at + len(guess)`` (control tokens masked, as
        the sampler masks them). Deciding by the rewrite reads its confidence from this."""
        import numpy as np

        logp = 0.0
        for i, token in enumerate([*guess, None]):
            row = self._logits_row(at + i).astype(np.float64)
            row[self._control_ids] = -np.inf
            top = row.max()
            log_total = top + math.log(np.exp(row - top).sum())
            if token is None:
                logp += math.log(max(np.exp(row[self._line_ends] - log_total).sum(), 1e-300))
            else:
                logp += float(row[token]) - log_total
        return math.exp(logp)
