"""``corefbot config``: every ``COREFBOT_*`` setting with its value as the bot would read it, or (``--markdown``)
the README's configuration tables, generated from the settings models."""
from __future__ import annotations

import argparse

TITLES = {
    "common": "Shared by every plugin",
    "chatlog": "Capture, concat rule, question filter (`plugins/chatlog`)",
    "resolver": "Resolver and forwarding (`plugins/resolver`)",
    "labels": "Labels in the chat (`plugins/labels`)",
    "nightly": "Nightly retraining (`plugins/nightly`)",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="show every COREFBOT_* setting as the bot would read it (.env, environment)")
    p.add_argument("--markdown", action="store_true", help="print the configuration tables of the README instead")
    p.set_defaults(func=run)


def markdown() -> str:
    from corefbot.plugins.common.settings import AREAS, settings_table

    return "\n\n".join(f"### {TITLES[area]}\n\n{settings_table(model)}" for area, model in AREAS.items())


def run(args: argparse.Namespace) -> int:
    from corefbot.plugins.common.settings import AREAS, own_fields, raw_settings, read_settings

    if args.markdown:
        print(markdown())
        return 0
    raw = raw_settings()
    for area, model in AREAS.items():
        values = read_settings(model)
        print(f"[{area}]")
        for name in own_fields(model):
            key = name.upper()
            source = "set" if raw.get(key, "") != "" else "default"
            print(f"  {key} = {getattr(values, name)!r}  ({source})")
    return 0
