"""plugins/nightly settings, read from NoneBot's .env (one namespace, hence the COREFBOT_ prefix)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, field_validator

from plugins.settings import id_set, timezone_name

Notify = Literal["auto", "groups", "superusers", "none"]


class Config(BaseModel):
    # -- what the job trains (passed to `corefbot nightly --now`) --
    corefbot_base_model: Path | None = None  # HF folder of the base model; without it the nightly job is off
    corefbot_nightly_preset: str = "paper"  # finetune preset name or YAML file
    corefbot_nightly_min_new_labels: int = 50  # fewer new/changed labels since the last trained run: skip
    corefbot_nightly_margin: float = 0.01  # test F1 gain (fraction) needed to promote
    corefbot_nightly_quant: Literal["q4_k_m", "q8_0"] = "q4_k_m"
    corefbot_nightly_min_agreement: float = 0.9  # quantized-vs-merged decision agreement needed to promote
    corefbot_nightly_keep_runs: int = 5  # run folders kept (plus any the registry serves or may roll back to)
    corefbot_nightly_dir: Path | None = None  # run folders + lock; default "nightly" beside the database
    corefbot_nightly_args: str = ""  # extra `corefbot nightly` options, e.g. "--max-steps 400"

    # -- when --
    corefbot_nightly_enabled: bool | None = None  # default: on exactly when COREFBOT_BASE_MODEL is set
    corefbot_nightly_time: str = "03:30"  # HH:MM every day, in COREFBOT_TIMEZONE
    corefbot_nightly_cron: str | None = None  # a crontab line ("30 3 * * *"); wins over the time
    corefbot_timezone: str = ""  # IANA zone name; "" = the machine's local zone
    corefbot_nightly_timeout_s: float = 8 * 3600.0  # a run still going after this is killed (counts as failed)

    # -- who hears about it --
    corefbot_nightly_notify: Notify = "auto"  # auto: the moderator groups when set, else superusers privately
    corefbot_moderator_groups: set[str] = set()  # group ids that get the nightly summary

    # -- serving follows the registry --
    corefbot_nightly_follow_registry: bool = True  # serve the registry's serving version (startup and changes)
    corefbot_nightly_sync_s: float = 60.0  # how often to look for registry changes made elsewhere; 0: never

    _ids = field_validator("corefbot_moderator_groups", mode="before")(id_set)

    _tz = field_validator("corefbot_timezone")(timezone_name)

    @field_validator("corefbot_nightly_time")
    @classmethod
    def _time(cls, value: str) -> str:
        hour, _, minute = value.partition(":")
        if not (hour.isdigit() and minute.isdigit() and 0 <= int(hour) < 24 and 0 <= int(minute) < 60):
            raise ValueError(f"COREFBOT_NIGHTLY_TIME={value!r}: expected HH:MM, e.g. 03:30")
        return value

    @property
    def enabled(self) -> bool:
        if self.corefbot_nightly_enabled is None:
            return self.corefbot_base_model is not None
        return self.corefbot_nightly_enabled
