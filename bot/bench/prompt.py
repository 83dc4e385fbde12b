"""Prompt length with a real tokenizer: the served prompt's tokens for a window, split into parts.

    corefbot bench prompt --model /work/qwen/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf --window 11

Every token of the prompt is paid on every training example and on every cold call, so this is the
figure the prompt wording is judged by (with the scores, which come from ``corefbot seed``). Counts
come from llama.cpp's tokenizer of the GGUF (vocabulary only, no weights loaded).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="GGUF", help="a GGUF whose tokenizer counts")
    p.add_argument("--window", type=int, default=11, help="messages before the question (default 11)")
    p.add_argument("--report", metavar="OUT.json")


def run(args: argparse.Namespace) -> int:
    import llama_cpp

    from corefbot.bench.resolver import CHAT, QUESTIONS
    from corefbot.pipeline.prompt import CHATML_ASSISTANT, build_prompt, chatml_prefix
    from corefbot.pipeline.records import Turn

    if not Path(args.model).is_file():
        raise FileNotFoundError(f"{args.model}: no such GGUF")
    llm = llama_cpp.Llama(model_path=str(args.model), vocab_only=True, verbose=False)

    def n(text: str) -> int:
        return len(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    window = [Turn(s, t, float(i)) for i, (s, t) in enumerate(CHAT[-args.window:])] if args.window else []
    asker, text, _ = QUESTIONS[0]
    p = build_prompt(window, Turn(asker, text, float(len(CHAT))))
    empty = build_prompt([], Turn(asker, text, 0.0))
    figures = {
        "window_messages": len(window),
        "total": n(p.chatml()),
        "instruction": n(chatml_prefix(empty.history)) - n("(no earlier messages)\n"),  # system + header
        "window": n(chatml_prefix(p.history)) - n(chatml_prefix(empty.history)) + n("(no earlier messages)\n"),
        "question_and_assistant_turn": n(p.question + CHATML_ASSISTANT),
    }
    for k, v in figures.items():
        print(f"{k:30s} {v}")
    if args.report:
        Path(args.report).write_text(json.dumps(figures, indent=2))
    llm.close()
    return 0
