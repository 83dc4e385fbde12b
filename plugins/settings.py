"""Validators shared by the plugins' configs (NoneBot's .env is one namespace: one key, one meaning)."""
from __future__ import annotations

from zoneinfo import ZoneInfo


def id_set(value: object) -> object:
    """User or group ids as a set of strings: .env gives '["1","2"]' (parsed) or a plain "1,2"."""
    if isinstance(value, (int, str)):
        return {v.strip() for v in str(value).split(",") if v.strip()}
    if isinstance(value, (list, set, tuple)):
        return {str(v) for v in value}
    return value


def timezone_name(value: str) -> str:
    """COREFBOT_TIMEZONE: an IANA zone name, or "" for the machine's local zone; unknown zones fail at start."""
    if value:
        ZoneInfo(value)
    return value
