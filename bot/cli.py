"""``corefbot``: one console script, one subcommand per module in :mod:`corefbot.commands`.

Each command module has ``register(subparsers)`` which adds its parser(s) with ``func`` set to a
function ``(args) -> int``. The CLI only parses, calls library functions, and turns domain errors
(:class:`CliError`, ``ValueError``, ``FileNotFoundError``) into one clear line and a non-zero exit.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMAND_MODULES = [
    "corefbot.commands.data",  # import, build, export, stats
    "corefbot.commands.run",  # run, demo
    "corefbot.commands.bench",  # bench NAME
    "corefbot.commands.train",  # train, export-gguf, scaling-check
    "corefbot.commands.models_cmd",  # make-model
    "corefbot.commands.nightly",  # nightly --now (the nightly retraining job)
    "corefbot.commands.eval",  # eval, eval-compare (resolver backends on labelled data)
    "corefbot.commands.config",  # config (every COREFBOT_* setting)
    "corefbot.commands.questions",  # eval-questions (the question filter on real inquiries / labelled lines)
]


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="corefbot", description="corefbot: resolve follow-up questions in technical group chats before "
        "they reach the assistant; record, label, train.")
    parser.add_argument("--db", metavar="PATH", help="SQLite database (default: COREFBOT_DB or the bot's localstore file)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (CliError, ValueError, FileNotFoundError) as exc:
        print(f"corefbot {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `corefbot config | head`: the reader left, nothing is wrong
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
