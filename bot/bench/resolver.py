"""Resolver latency: naive full-prompt calls vs per-group prefill, end to end with the rewrite, RSS.

Run on the Qwen2.5-0.5B stand-in::

    corefbot make-model --shape qwen2.5-0.5b /tmp/q05 --gguf q4_k_m
    corefbot bench resolver --model /tmp/q05/model-q4_k_m.gguf --report resolver.json --threads 2

What is timed is the served call, ``LlamaBackend.resolve``, from the question's submission to the
decision, each question answered both ways one after the other (one loaded model):
- project: the group's window was prefilled by ``observe`` when its last message arrived (timed
  separately as ``prefill_ms``: that work happens between messages, not while a member waits), groups
  interleaved so each question restores its group's saved KV state;
- naive: ``cold=True``, the whole ChatML prompt evaluated from scratch;
- end to end: the project call including the rewrite, for the questions that need one (generated with
  ``rewrite="always"`` and capped at ``--rewrite-tokens``, because a random-weight stand-in never ends
  its line by itself).

``--decide-by rewrite`` serves as ``COREFBOT_DECIDE_BY=rewrite`` does: every question is rewritten and the
decision is known once the rewrite is; ``as_asked_p50_ms`` is the decision latency of the questions the
model forwards as asked (those it copies in one batch, see ``LlamaBackend._generate_line``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import get_args

from corefbot.models.serve.llama import DRAFT_TOKENS
from corefbot.models.serve.types import DecideBy
from corefbot.pipeline.metrics import percentile
from corefbot.pipeline.records import Turn

# A bilingual technical group chat, the kind the method was built for (mmpose / deployment questions).
CHAT: list[tuple[str, str]] = [
    ("li", "大家好，有人用 mmpose 做过手机端部署吗？"),
    ("sam", "Can mmpose be deployed on mobile phones? We need 30 fps on a mid-range Android."),
    ("wang", "可以的，用 mmdeploy 转成 ncnn，RTMPose-s 在骁龙 865 上大概 40 fps"),
    ("sam", "Nice, did you use the int8 model or fp16?"),
    ("wang", "fp16，int8 掉点有点多"),
    ("li", "我这边 onnxruntime 导出的时候报错 Unsupported ONNX opset version: 18"),
    ("chen", "把 opset 改成 11 试试，mmdeploy 的 config 里有 opset_version"),
    ("li", "改了，还是不行，报 RuntimeError: CUDA error: no kernel image is available"),
    ("sam", "That usually means your PyTorch build does not support your GPU's compute capability."),
    ("chen", "你是什么显卡？驱动版本多少？"),
    ("li", "RTX 4090，驱动 535，CUDA 12.1，PyTorch 2.0.1"),
    ("wang", "PyTorch 2.0.1 的 cu117 包不支持 sm_89 吧，装 cu121 的"),
    ("sam", "Also check that mmcv was compiled against the same CUDA version."),
    ("li", "好的我重新装一下 mmcv 试试"),
    ("kim", "Has anyone tried RTMPose on Jetson devices? The docs only mention x86."),
    ("wang", "TX2 上跑过 RTMPose-t，TensorRT 8.2，大概 25 fps"),
    ("kim", "Thanks! What JetPack version did you use?"),
    ("wang", "JetPack 4.6，Python 3.6 有点老，mmdeploy 要自己编译"),
    ("chen", "Orin 上就方便多了，JetPack 5 直接 pip 装"),
    ("sam", "Is the TensorRT engine portable between TX2 and Orin, or do we rebuild it?"),
    ("wang", "要重新 build，engine 跟 GPU 架构绑定的"),
    ("li", "mmcv 重新编译好了，终于跑起来了，谢谢大家"),
    ("kim", "Great. By the way, is there a Docker image for mmdeploy with TensorRT preinstalled?"),
    ("chen", "官方有 openmmlab/mmdeploy 的镜像，tag 里有 tensorrt 版本"),
    ("sam", "I'll try the image on our T4 server tomorrow."),
]
# (asker, text, needs resolution)
QUESTIONS: list[tuple[str, str, bool]] = [
    ("kim", "BTW, how to deploy it on TX2?", True),
    ("li", "在 TX2 上呢？", True),
    ("zhao", "为什么不好用？", True),
    ("sam", "Does it support CUDA 12?", True),
    ("zhao", "那个怎么装？", True),
    ("kim", "How do I install TensorRT 8.6 on Ubuntu 22.04?", False),
    ("li", "mmpose 1.x 和 0.x 的配置文件能通用吗？", False),
    ("sam", "Which version of PyTorch do you use with it?", True),
    ("zhao", "有没有人知道 RTMPose-l 在 Orin 上的 fps？", False),
    ("kim", "Can the engine be reused there?", True),
]
GROUPS = 3
WINDOW = 11


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="MODEL", help="the GGUF to serve, or a finetune run folder")
    p.add_argument("--report", metavar="OUT.json", help="write the figures as JSON")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads (default 2)")
    p.add_argument("--n", type=int, default=20, help="questions timed per mode (default 20)")
    p.add_argument("--window", type=int, default=WINDOW, help=f"messages in the context window (default {WINDOW})")
    p.add_argument("--rewrite-tokens", type=int, default=24,
                   help="rewrite length cap for the end-to-end figure (default 24 tokens)")
    p.add_argument("--n-ctx", type=int, default=2048, help="llama.cpp context size (default 2048)")
    p.add_argument("--draft-tokens", type=int, default=DRAFT_TOKENS,
                   help=f"tokens drafted per rewrite step (default {DRAFT_TOKENS}; 0: one token a step)")
    p.add_argument("--decide-by", choices=get_args(DecideBy), default="letter",
                   help="how the backend decides (COREFBOT_DECIDE_BY); rewrite: every question is rewritten, "
                        "and one the model copies is answered as asked")


def _cases(n: int, window: int) -> list[tuple[str, list[Turn], Turn, bool]]:
    """``n`` questions, each with its group and the ``window`` messages before it (sliding over CHAT)."""
    cases = []
    span = len(CHAT) - window + 1
    for i in range(n):
        start = (i * 7) % span  # 7 is coprime with the span: consecutive questions get new windows
        turns = [Turn(s, t, 1_700_000_000.0 + 30 * (start + k)) for k, (s, t) in enumerate(CHAT[start:start + window])]
        asker, text, needs = QUESTIONS[i % len(QUESTIONS)]
        question = Turn(asker, text, turns[-1].timestamp + 20)
        cases.append((f"g{i % GROUPS}", turns, question, needs))
    return cases


def _rss_mb() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MB, from /proc (Linux)."""
    fields = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            fields[key] = value.strip()
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return peak, peak


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _timed(fn, *args, **kwargs) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, (time.perf_counter() - t0) * 1000


def _measure(model: Path, args: argparse.Namespace, cases) -> dict:
    """Naive and project calls interleaved question by question, so that whatever else runs on the
    machine weighs on both alike (llama.cpp's spinning threads make contention hit hard)."""
    from tqdm import tqdm

    from corefbot.models.serve.llama import LlamaBackend

    # A generous timeout: the bench measures latency, it does not serve (a loaded machine can be slow).
    b = LlamaBackend(model, n_threads=args.threads, n_ctx=args.n_ctx, max_rewrite_tokens=args.rewrite_tokens,
                     max_groups=GROUPS * 4, timeout_s=600, decide_by=args.decide_by, draft_tokens=args.draft_tokens)
    try:
        b.resolve(cases[0][1], cases[0][2], rewrite="never", cold=True)  # warm-up: buffers, thread pool
        out: dict[str, list[float]] = {k: [] for k in ("lat", "naive", "e2e", "prefill", "q_tokens", "tokens",
                                                       "as_asked")}
        bar = tqdm(total=len(cases), desc="questions", unit="q", file=sys.stderr)
        for r in range(0, len(cases), GROUPS):
            round_ = cases[r:r + GROUPS]
            for group, window, _, _ in round_:  # each group's last message arrives: prefill its window
                t0 = time.perf_counter()
                b.observe(group, window)
                b.wait_idle()
                out["prefill"].append((time.perf_counter() - t0) * 1000)
            for group, window, question, needs in round_:  # then the questions, groups interleaved
                # project path; the rewrite (when the question needs one) comes after the decision
                res, ms = _timed(b.resolve, window, question, group=group, rewrite="always" if needs else "never")
                out["lat"].append(b.last_decision_ms)
                if res.decision != "needs":  # type: ignore[attr-defined]
                    out["as_asked"].append(b.last_decision_ms)
                if needs:
                    out["e2e"].append(ms)
                out["q_tokens"].append(b.last_eval_tokens)
                # naive: the same question, the whole prompt evaluated from scratch
                b.resolve(window, question, group=group, rewrite="never", cold=True)
                out["naive"].append(b.last_decision_ms)
                out["tokens"].append(b.last_eval_tokens)
                bar.update()
        bar.close()
        rss, _ = _rss_mb()
        return {**out, "rss_mb": rss, "cached_groups": len(b.cached_groups())}
    finally:
        b.close()


def _suffix_cost(model: Path, args: argparse.Namespace, prefix_tokens: int,
                 sizes: tuple[int, ...] = (1, 20, 40, 80)) -> dict[int, float]:
    """ms to evaluate k tokens on a kept prefix: what a question costs as a function of its suffix
    length (the prompt's question part includes the static options and instruction after it)."""
    import llama_cpp

    from corefbot.models.serve.llama import served_model

    served = served_model(model)  # a run folder: its base GGUF with its adapter, as served
    llm = llama_cpp.Llama(model_path=str(served.gguf), n_ctx=args.n_ctx, n_threads=args.threads,
                          n_threads_batch=args.threads, verbose=False,
                          lora_path=str(served.lora) if served.lora else None, lora_scale=served.lora_scale)
    try:
        text = " ".join(f"{s}: {t}" for s, t in CHAT) * 4
        toks = llm.tokenize(text.encode("utf-8"), add_bos=False)[: prefix_tokens + max(sizes)]
        llm.eval(toks[:prefix_tokens])
        out: dict[int, float] = {}
        for k in sizes:
            samples = []
            for _ in range(3):
                llm._ctx.kv_cache_seq_rm(0, prefix_tokens, -1)
                llm.n_tokens = prefix_tokens
                t0 = time.perf_counter()
                llm.eval(toks[prefix_tokens:prefix_tokens + k])
                samples.append((time.perf_counter() - t0) * 1000)
            out[k] = round(sorted(samples)[1], 1)
        return out
    finally:
        llm.close()


def run(args: argparse.Namespace) -> int:
    from corefbot.models.serve.llama import served_model

    model = Path(args.model)
    served_model(model)  # a GGUF or a run folder; raises naming what is missing
    if args.n < 1 or args.window < 1 or args.window > len(CHAT):
        raise ValueError(f"--n must be ≥ 1 and --window between 1 and {len(CHAT)}")
    cases = _cases(args.n, args.window)
    load_start = _loadavg()
    rss_before, _ = _rss_mb()
    m = _measure(model, args, cases)
    _, rss_peak = _rss_mb()
    prefix_p50 = int(percentile(m["tokens"], 50) - percentile(m["q_tokens"], 50))
    suffix = _suffix_cost(model, args, max(prefix_p50, 1))

    p50, p95 = percentile(m["lat"], 50), percentile(m["lat"], 95)
    naive_p50 = percentile(m["naive"], 50)
    report = {
        "model": str(model), "model_mb": round(model.stat().st_size / 1e6, 1), "threads": args.threads,
        "decide_by": args.decide_by,
        "n": len(cases), "window": args.window, "groups": GROUPS, "cpu_count": os.cpu_count(),
        "naive_p50_ms": round(naive_p50, 1), "naive_p95_ms": round(percentile(m["naive"], 95), 1),
        "p50_ms": round(p50, 1), "p95_ms": round(p95, 1), "speedup": round(naive_p50 / p50, 2),
        "e2e_p50_ms": round(percentile(m["e2e"], 50), 1), "e2e_p95_ms": round(percentile(m["e2e"], 95), 1),
        "e2e_n": len(m["e2e"]), "rewrite_tokens_cap": args.rewrite_tokens, "draft_tokens": args.draft_tokens,
        # questions the model decided to forward as asked: with --decide-by rewrite, those it copied
        "as_asked_n": len(m["as_asked"]), "as_asked_p50_ms": round(percentile(m["as_asked"], 50), 1),
        "prefill_p50_ms": round(percentile(m["prefill"], 50), 1),
        "prompt_tokens_p50": percentile(m["tokens"], 50),
        "question_tokens_p50": percentile(m["q_tokens"], 50),
        "rss_mb": round(m["rss_mb"], 1), "rss_before_load_mb": round(rss_before, 1),
        "rss_peak_mb": round(rss_peak, 1),
        "suffix_ms_by_tokens": suffix,
        # llama.cpp's threads spin at barriers: other busy processes on the same cores inflate every
        # figure far more than their share of the CPU, so the report keeps the load it ran under.
        "loadavg_start": load_start, "loadavg_end": _loadavg(),
    }
    report["targets"] = {"speedup>=8": report["speedup"] >= 8, "p50<=300ms": report["p50_ms"] <= 300,
                         "e2e_p50<=1s": report["e2e_p50_ms"] <= 1000, "rss<=800MB": report["rss_mb"] <= 800}
    print(f"model {model} ({report['model_mb']} MB), {args.threads} threads, {len(cases)} questions, "
          f"{args.window}-message windows, {GROUPS} groups interleaved")
    print(f"prompt {report['prompt_tokens_p50']:.0f} tokens (p50); the question part {report['question_tokens_p50']:.0f}")
    print(f"naive (full prompt each time): p50 {report['naive_p50_ms']:.0f} ms   p95 {report['naive_p95_ms']:.0f} ms")
    print(f"project (prefilled per group), decided by the {args.decide_by}: p50 {report['p50_ms']:.0f} ms   "
          f"p95 {report['p95_ms']:.0f} ms   speedup {report['speedup']:.1f}x; forwarded as asked "
          f"({report['as_asked_n']} questions): p50 {report['as_asked_p50_ms']:.0f} ms")
    print(f"end to end with the rewrite (≤{args.rewrite_tokens} tokens, {report['e2e_n']} questions): "
          f"p50 {report['e2e_p50_ms']:.0f} ms   p95 {report['e2e_p95_ms']:.0f} ms")
    print(f"background prefill per arriving message: p50 {report['prefill_p50_ms']:.0f} ms")
    print(f"load average {report['loadavg_start']} at the start, {report['loadavg_end']} at the end "
          f"({report['cpu_count']} CPUs)")
    print(f"RSS with the model loaded: {report['rss_mb']:.0f} MB (peak {report['rss_peak_mb']:.0f} MB, "
          f"{report['rss_before_load_mb']:.0f} MB before loading)")
    print(f"evaluating k tokens on a kept {prefix_p50}-token prefix: "
          + ", ".join(f"{k}: {ms:.0f} ms" for k, ms in suffix.items()))
    print("targets: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in report["targets"].items()))
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"report: {args.report}")
    return 0
