"""Pure data: records, the SQLite store, the concat rule, the question filter, windows, exports.

Imports neither nonebot nor torch, so the CLI and the bot's capture path start fast.
"""
