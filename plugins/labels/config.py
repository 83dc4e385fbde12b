"""plugins/labels settings, read from NoneBot's .env (one namespace, hence the COREFBOT_ prefix)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo

from pydantic import BaseModel, field_validator

from pipeline.labels import ConfirmLimits, parse_quiet_hours
from plugins.settings import id_set, timezone_name


class Config(BaseModel):
    # -- who may label: superusers, the group's owner and admins, and these user ids --
    corefbot_moderators: set[str] = set()

    # -- member confirmation: asking the author whether the bot read their question right --
    corefbot_labels_confirm: bool = True  # False: never ask members
    corefbot_labels_margin: float = 0.3  # ask when the resolver rewrote, or its top-two margin is below this
    corefbot_labels_per_group_day: int = 3  # prompts per group in any 24 h
    corefbot_labels_per_member_day: int = 1  # prompts per member in any 24 h
    corefbot_labels_per_1000: float = 8.0  # prompts per 1,000 group messages over the last 7 days
    corefbot_labels_group_gap_s: float = 900.0  # at least this long between two prompts in a group
    corefbot_labels_quiet_hours: str = "23:00-08:00"  # local time; "" for none
    corefbot_timezone: str = ""  # IANA zone for quiet hours and "today"/"this week"; "" = the machine's zone
    corefbot_labels_expire_s: float = 1800.0  # a prompt takes answers this long
    corefbot_labels_lang: Literal["en", "zh"] = "en"  # language of the prompts
    # wall: limits, quiet hours and expiry read the server's clock; event: the triggering message's own time,
    # so a replayed chat (benchmarks) meets the limits as it would have live.
    corefbot_labels_clock: Literal["wall", "event"] = "wall"

    # -- moderator review --
    corefbot_labels_random_share: float = 0.2  # share of /label next picks drawn at random (not by margin)
    corefbot_labels_show_window: int = 6  # window turns shown with an item
    corefbot_labels_session_s: float = 600.0  # a bare a/b/c from a moderator answers their item this long
    corefbot_labels_timings_file: Path | None = None  # write command handler timings at shutdown (benchmarks)

    _ids = field_validator("corefbot_moderators", mode="before")(id_set)

    @field_validator("corefbot_labels_quiet_hours")
    @classmethod
    def _quiet(cls, value: str) -> str:
        parse_quiet_hours(value)  # raises with the value in the message
        return value

    _tz = field_validator("corefbot_timezone")(timezone_name)

    def limits(self) -> ConfirmLimits:
        return ConfirmLimits(
            margin=self.corefbot_labels_margin, per_group_day=self.corefbot_labels_per_group_day,
            per_member_day=self.corefbot_labels_per_member_day, per_1000=self.corefbot_labels_per_1000,
            group_gap_s=self.corefbot_labels_group_gap_s, quiet=parse_quiet_hours(self.corefbot_labels_quiet_hours),
            tz=ZoneInfo(self.corefbot_timezone) if self.corefbot_timezone else None,
            expire_s=self.corefbot_labels_expire_s,
        )
