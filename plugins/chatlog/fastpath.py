"""Let NoneBot skip its matchers for chat lines no matcher can take (most of a group's traffic).

Profiled during a 1,500-message burst (py-spy on ``python -m corefbot``), two thirds of the bot's CPU went to
NoneBot checking every matcher against every event: each of the seven ``on_command``/``on_message``
matchers costs a permission check and a rule check, each solved as a dependency inside its own anyio
task group, whatever the rule's content — ~14 ms an event here, 58 events/s through the whole bot. A
plain chat line ("哈哈哈", "thanks!") cannot start a command and is not a moderator's bare a/b/c, so after
the capture preprocessor has queued it, :func:`can_skip` tells NoneBot to ignore it.

Safe by construction: an event is skipped only when every message matcher loaded is one we can judge
cheaply — a command matcher (the event's first text segment does not start with any registered command,
checked with NoneBot's own command trie) or a matcher registered here with its own cheap pre-check — and
ours is the only event preprocessor (skipping cancels the others). Any other plugin's matcher turns the
shortcut off, so its behaviour never changes. The same check lets the adapter (bot/adapter.py) capture a plain
text line without dispatching it at all (``handlers.capture_without_dispatch``).
"""
from __future__ import annotations

from typing import Any, Callable

from nonebot.adapters import Event
from nonebot.matcher import Matcher, matchers
from nonebot.rule import CommandRule, TrieRule

#: matcher class -> "could this event possibly pass your rule?" (must be cheap and never raise)
_prefilters: dict[type[Matcher], Callable[[Event], bool]] = {}
skipped = 0  # events whose matchers were skipped (for /corefbot health and the benchmark)


def register(matcher: type[Matcher], could_match: Callable[[Event], bool]) -> None:
    """Declare a cheap necessary condition for ``matcher``'s rule; False lets an event skip it."""
    _prefilters[matcher] = could_match


def _is_command(matcher: type[Matcher]) -> bool:
    return any(isinstance(d.call, CommandRule) for d in matcher.rule.checkers)


def _could_be_command(event: Event) -> bool:
    try:
        message = event.get_message()
    except Exception:  # noqa: BLE001 - no message: no command either
        return False
    if not message:
        return False
    first = message[0]
    if not first.is_text():
        return False
    return bool(TrieRule.prefix.longest_prefix(str(first).lstrip()))  # a falsy step when nothing matches


def can_skip(event: Event, preprocessors: int) -> bool:
    """Whether no loaded matcher could take ``event`` (``preprocessors``: how many event preprocessors
    are registered; with others besides ours, never skip)."""
    if preprocessors != 1 or event.get_type() != "message":
        return False
    command: bool | None = None
    for priority_matchers in matchers.values():
        for matcher in priority_matchers:
            if matcher.type not in ("message", ""):
                continue
            check: Any = _prefilters.get(matcher)
            if check is not None:
                if check(event):
                    return False
                continue
            if matcher.type == "message" and _is_command(matcher):
                if command is None:
                    command = _could_be_command(event)
                if command:
                    return False
                continue
            return False  # a matcher we cannot judge cheaply: NoneBot decides, as always
    return True
