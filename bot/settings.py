"""Where the CLI finds the bot's database without starting NoneBot.

The bot reads ``COREFBOT_DB`` from NoneBot's ``.env``; without it the database is
``corefbot/corefbot.db`` in nonebot-plugin-localstore's data directory. This resolves the same path
from the environment and ``.env`` in the working directory, so ``corefbot stats`` looks at the
database ``corefbot run`` writes.
"""
from __future__ import annotations

import os
from pathlib import Path

DB_FILE = ("corefbot", "corefbot.db")


def _env(key: str) -> str | None:
    if key in os.environ:
        return os.environ[key]
    if key.lower() in os.environ:
        return os.environ[key.lower()]
    path = Path.cwd() / ".env"
    if path.is_file():
        from dotenv import dotenv_values

        values = {k.upper(): v for k, v in dotenv_values(path).items()}
        return values.get(key) or None
    return None


def default_db_path() -> Path:
    if explicit := _env("COREFBOT_DB"):
        return Path(explicit).expanduser()
    if data_dir := _env("LOCALSTORE_DATA_DIR"):
        base = Path(data_dir).expanduser()
    elif (_env("LOCALSTORE_USE_CWD") or "").lower() in ("1", "true", "yes"):
        base = Path.cwd() / "data"
    else:
        from nonestorage import user_data_dir

        base = user_data_dir("nonebot2")
    return base.resolve().joinpath(*DB_FILE)
