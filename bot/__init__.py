"""corefbot: group-chat coreference resolution for technical community assistants.

Installed as one namespace from the repository's four folders (pyproject's package-dir):
``corefbot`` (this folder, ``bot/``: the NoneBot process in :mod:`.app`, ``python -m corefbot``, and the
``corefbot`` command line in :mod:`.cli` with one module per command in :mod:`.commands`; :mod:`.demo` plays
a sample chat into the real bot), :mod:`corefbot.plugins` (the NoneBot plugins), :mod:`corefbot.models`
(everything with weights) and :mod:`corefbot.pipeline` (pure data). Dependencies point one way:
``corefbot`` → plugins → models → pipeline.
"""
