"""Pure data: records, text classes, the SQLite store, the concat rule, the question filter's rules, windows,
the one prompt builder, imports and exports, metrics; :mod:`.labels` by concern.

Imports neither nonebot nor torch and makes no network call, so the CLI and the bot's capture path start fast.
"""
