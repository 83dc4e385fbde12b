"""``python -m corefbot``: start the bot (same as ``corefbot run``)."""
from corefbot.app import run

run()
