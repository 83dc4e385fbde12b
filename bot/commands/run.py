"""run, demo: the bot itself, and a first look at it without a chat account."""
from __future__ import annotations

import argparse
import os
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="start the bot (same as python -m corefbot); configuration from .env")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("demo", help="start the bot, play a sample chat over a real OneBot v11 websocket, show the result")
    p.add_argument("--keep", metavar="DIR", help="keep the demo database and bot log in DIR")
    p.add_argument("--model", metavar="MODEL",
                   help="serve this GGUF or finetune run folder with llama-cpp (default: COREFBOT_MODEL_PATH, else rules)")
    p.set_defaults(func=cmd_demo)


def cmd_run(args: argparse.Namespace) -> int:
    if args.db:
        os.environ["COREFBOT_DB"] = str(args.db)
    from corefbot.app import run

    run()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from corefbot.demo import main

    return main(args.keep, sys.stdout, model=args.model)
