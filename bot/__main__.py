"""``python -m bot``: start the bot (same as ``corefbot run``)."""
from bot.app import run

run()
