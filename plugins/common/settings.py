"""Every ``COREFBOT_*`` setting: one typed model per area, each field with its default and a description.

Nothing else writes a key or its default: NoneBot fills the models from ``.env`` and the environment
(each plugin's ``config.py`` names its model for ``get_plugin_config``), the CLI with :func:`read_settings`
from the same places, and the README's configuration tables are :func:`settings_table` of them (a test
compares). They live here, not in the plugin packages, so the CLI reads them without starting NoneBot.
NoneBot's ``.env`` is one namespace, hence the ``COREFBOT_`` prefix on every key.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, TypeVar
from zoneinfo import ZoneInfo

from pydantic import BaseModel, Field, field_validator
from pydantic_core import PydanticUndefined

from corefbot.models.serve.types import BackendName, DecideSetting
from corefbot.models.ship.gguf import Quant
from corefbot.models.ship.nightly import NightlyConfig
from corefbot.pipeline.labels.limits import ConfirmLimits, parse_quiet_hours
from corefbot.pipeline.merge import DEFAULT_GAP_S
from corefbot.pipeline.question import MIN_CHARS, THRESHOLD
from corefbot.pipeline.window import DEFAULT_WINDOW

#: The database inside nonebot-plugin-localstore's data directory when COREFBOT_DB is not set.
DB_FILE = ("corefbot", "corefbot.db")

M = TypeVar("M", bound=BaseModel)


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


class CommonConfig(BaseModel):
    """Keys every plugin reads the same way."""

    corefbot_db: Path | None = Field(
        None, description="the SQLite database; default `corefbot/corefbot.db` in localstore's data directory")
    corefbot_timezone: str = Field(
        "", description="IANA zone for quiet hours, \"today/this week\" and the nightly schedule; empty: the machine's")

    _tz = field_validator("corefbot_timezone")(timezone_name)

    def tz(self) -> ZoneInfo | None:
        return ZoneInfo(self.corefbot_timezone) if self.corefbot_timezone else None


#: What an asker is told once when the assistant never answered their question.
UNAVAILABLE_REPLY = "Sorry, the assistant is unavailable right now and could not answer this. Please ask again later."
ReplyMode = Literal["mention", "all"]
AssistantApi = Literal["openai", "json"]
Notify = Literal["auto", "groups", "superusers", "none"]
_LIMITS = ConfirmLimits()  # the library's defaults, so each is written once
_JOB = NightlyConfig()


class ChatlogSettings(CommonConfig):
    """plugins/chatlog: capture, the concat rule and the question filter (defaults are the paper's)."""

    corefbot_merge_gap_s: float = Field(DEFAULT_GAP_S, description="concat rule: max seconds between a member's consecutive lines")
    corefbot_window: int = Field(DEFAULT_WINDOW, description="context window: previous merged messages of the group")
    corefbot_question_threshold: float = Field(THRESHOLD, description="question score (0–10) needed")
    corefbot_min_chars: int = Field(MIN_CHARS, description="shorter texts are never questions")
    corefbot_record_self: bool = Field(True, description="record the bot's own messages")
    corefbot_queue_size: int = Field(
        10_000, description="messages waiting for the writer before capture sheds load (logged)")
    corefbot_max_text_chars: int = Field(
        4000, description="derived copies of a message (its run, the decision, the outbox row) keep at most this many "
                          "characters, with a marker saying how much was cut; the raw message row keeps the text whole; `0`: no bound")
    corefbot_max_log_chars: int = Field(
        2000, description="log lines (NoneBot's own event lines included) are cut to this many characters, head and "
                          "tail kept; `0`: no bound")
    corefbot_ws_ping_interval_s: float = Field(
        20.0, description="the OneBot websocket's keep-alive ping interval; `0` turns pinging off")
    corefbot_ws_ping_timeout_s: float = Field(
        600.0, description="close the websocket only when no pong came within this long: it must outlast any backlog")
    corefbot_timings_file: Path | None = Field(
        None, description="write capture-handler timings here at shutdown (benchmarks)")


class ResolverSettings(BaseModel):
    """plugins/resolver: the resolver, the upstream assistant, when the bot answers, the outbox."""

    # -- the resolver (corefbot.models.serve.resolver) --
    corefbot_resolver: BackendName | None = Field(
        None, description="`rules`, `llama-cpp` or `http`; default `llama-cpp` when `COREFBOT_MODEL_PATH` is set, else `rules`")
    corefbot_model_path: Path | None = Field(
        None, description="GGUF for `llama-cpp`, or a finetune run folder (its base GGUF + `adapter.gguf`, or its "
                          "merged GGUF); missing or corrupt → a clear error at start, fallback to `rules`, "
                          "the bot keeps running")
    corefbot_resolver_url: str | None = Field(
        None, description="OpenAI-compatible endpoint of the `http` backend (llama.cpp server, vLLM, Ollama)")
    corefbot_resolver_model: str = Field("default", description="model name sent to the `http` backend")
    corefbot_resolver_key: str | None = Field(None, description="bearer key for the `http` backend")
    corefbot_resolver_threads: int | None = Field(None, description="llama.cpp threads; unset: the backend's choice")
    corefbot_decide_by: DecideSetting = Field(
        "auto", description="how `llama-cpp` decides: `letter` (the option letters, the paper's way), `rewrite` "
                            "(needs resolution when the model's rewrite adds a word the question lacks) or `auto` (the "
                            "mode a run folder's `decide.json` names, measured on its test split by `corefbot "
                            "export-lora` and the nightly job: the letters unless the rewrite is clearly better; "
                            "`letter` for a bare GGUF). See README \"Real Qwen\"")
    corefbot_gate_path: Path | None = Field(None, description="a retrained gate; unset: the shipped one")
    corefbot_weigh_gate: bool = Field(
        True, description="between the gate's sure sides, decide by the model's letter and the gate's probability "
                          "together (their log-odds added); `false`: by the letter alone. See README \"How a "
                          "question is resolved\"")
    corefbot_resolve_all: bool = Field(
        True, description="also resolve and record questions the bot will not answer (they feed the label queue)")
    corefbot_resolve_backlog: int = Field(
        16, description="unaddressed questions waiting for the model beyond this are skipped")

    # -- the question filter's second stage (corefbot.models.serve.question_llm) --
    corefbot_question_llm: Literal["off", "local", "http"] = Field(
        "off", description="re-score borderline messages with a model: `local` (the resolver's GGUF, in its "
                           "bounded queue), `http` (an OpenAI-compatible endpoint) or `off`")
    corefbot_question_band: str = Field(
        "3-5", description="rule scores `LOW-HIGH` (low inclusive, high exclusive) that the second stage re-scores")
    corefbot_question_llm_url: str | None = Field(None, description="OpenAI-compatible base URL for `http`")
    corefbot_question_llm_model: str = Field("default", description="model name sent to that endpoint")
    corefbot_question_llm_key: str | None = Field(None, description="bearer key for that endpoint")

    # -- the upstream assistant --
    corefbot_assistant_url: str | None = Field(
        None, description="the group's assistant; unset: resolve and record, forward nothing")
    corefbot_assistant_api: AssistantApi = Field(
        "openai", description="`openai` (POST to its chat-completions endpoint) or `json` "
                              "(POST `{query, group, history, id}` → `{answer}`)")
    corefbot_assistant_model: str = Field("default", description="model name sent to the assistant (`openai` API)")
    corefbot_assistant_key: str | None = Field(None, description="sent as `Authorization: Bearer <key>`")
    corefbot_assistant_system: str | None = Field(None, description="system prompt (`openai` API)")
    corefbot_assistant_timeout_s: float = Field(60.0, description="one request; a late answer counts as a failed attempt")
    corefbot_assistant_history: int = Field(
        12, description="window turns (other members' messages) sent as `history` (`json` API; senders renamed "
                        "A, B, …); `0`: none")
    corefbot_max_query_chars: int = Field(
        4000, description="the forwarded query and each history text are cut to this, with a marker; `0`: no bound")
    corefbot_assistant_concurrency: int = Field(4, description="requests in flight at once")

    # -- when and how the bot answers --
    corefbot_reply_mode: ReplyMode = Field(
        "mention", description="`mention`: only when the bot is @-mentioned or a bot message is quoted; `all`: every question")
    corefbot_show_query: bool = Field(
        True, description="quote the resolved query above the answer when it differs from the question")
    corefbot_max_answer_chars: int = Field(3000, description="longer answers are cut")
    corefbot_rate_limit: int = Field(
        5, description="forwards per group per `COREFBOT_RATE_PERIOD_S` (0: off); a question over the limit waits for "
                       "the group's next free slot if that is at most one period away, otherwise its decision is "
                       "recorded and nothing forwarded")
    corefbot_rate_period_s: float = Field(60.0, description="the rate limit's period")

    # -- the durable outbox --
    corefbot_retry_base_s: float = Field(2.0, description="first retry delay for the assistant; doubles each attempt (with jitter); "
                                                 "retrying goes on until the item's age limit")
    corefbot_retry_max_s: float = Field(300.0, description="cap on one retry delay")
    corefbot_max_attempts: int = Field(
        1000, description="safety valve only: retrying ends at `COREFBOT_OUTBOX_MAX_AGE_S` long before this many attempts")
    corefbot_outbox_max_age_s: float = Field(
        3600.0, description="undelivered items older than this expire and are never sent; a question that gets no "
                            "answer (expired, or a permanent error) earns its asker one short reply")
    corefbot_unavailable_reply: str = Field(
        UNAVAILABLE_REPLY,
        description="posted once (quoting the question, @-mentioning the asker) when an item gives up without an "
                    "answer; empty: nothing is posted")
    corefbot_outbox_keep_days: float = Field(
        30.0, description="delivered, failed and expired outbox items are deleted this long after they finished "
                          "(checked hourly); `0` keeps them")

    @field_validator("corefbot_question_band")
    @classmethod
    def _band(cls, value: str) -> str:
        from corefbot.models.serve.question_llm import parse_band

        parse_band(value)  # raises with the value in the message
        return value


class LabelsSettings(CommonConfig):
    """plugins/labels: who may label, when members are asked to confirm, moderator review."""

    # -- who may label: superusers, the group's owner and admins, and these user ids --
    corefbot_moderators: set[str] = Field(
        set(), description="user ids who may label (besides `SUPERUSERS` and the group's owner and admins); "
                           "`1,2` or `[\"1\",\"2\"]`")

    # -- member confirmation: asking the author whether the bot read their question right --
    corefbot_labels_confirm: bool = Field(True, description="ask authors to confirm the bot's reading")
    corefbot_labels_margin: float = Field(
        _LIMITS.margin, description="ask when the resolver rewrote, or its top-two margin is below this")
    corefbot_labels_per_group_day: int = Field(_LIMITS.per_group_day, description="prompts per group in any 24 h")
    corefbot_labels_per_member_day: int = Field(_LIMITS.per_member_day, description="prompts per member in any 24 h")
    corefbot_labels_per_1000: float = Field(
        _LIMITS.per_1000, description="prompts per 1,000 group messages over the last 7 days")
    corefbot_labels_group_gap_s: float = Field(
        _LIMITS.group_gap_s, description="at least this long between two prompts in a group")
    corefbot_labels_quiet_hours: str = Field(
        "23:00-08:00", description="no prompts then (local time, `COREFBOT_TIMEZONE`); empty for none")
    corefbot_labels_expire_s: float = Field(_LIMITS.expire_s, description="a prompt takes answers this long")
    corefbot_labels_lang: Literal["en", "zh"] = Field("en", description="`en` or `zh` prompts")
    # wall: limits, quiet hours and expiry read the server's clock; event: the triggering message's own time,
    # so a replayed chat (benchmarks) meets the limits as it would have live.
    corefbot_labels_clock: Literal["wall", "event"] = Field(
        "wall", description="`event`: judge limits at each message's own time (replays)")

    # -- moderator review --
    corefbot_labels_random_share: float = Field(
        0.2, description="share of `/label next` picks drawn at random rather than by smallest margin")
    corefbot_labels_show_window: int = Field(6, description="window lines shown with an item")
    corefbot_labels_session_s: float = Field(
        600.0, description="how long a bare `a`/`b`/`c` from a moderator answers their item on screen")
    corefbot_labels_timings_file: Path | None = Field(
        None, description="write command timings at shutdown (benchmarks)")

    _ids = field_validator("corefbot_moderators", mode="before")(id_set)

    @field_validator("corefbot_labels_quiet_hours")
    @classmethod
    def _quiet(cls, value: str) -> str:
        parse_quiet_hours(value)  # raises with the value in the message
        return value

    def limits(self) -> ConfirmLimits:
        return ConfirmLimits(
            margin=self.corefbot_labels_margin, per_group_day=self.corefbot_labels_per_group_day,
            per_member_day=self.corefbot_labels_per_member_day, per_1000=self.corefbot_labels_per_1000,
            group_gap_s=self.corefbot_labels_group_gap_s, quiet=parse_quiet_hours(self.corefbot_labels_quiet_hours),
            tz=self.tz(), expire_s=self.corefbot_labels_expire_s,
        )


class NightlySettings(CommonConfig):
    """plugins/nightly: what the nightly job trains (the job's defaults are
    :class:`~corefbot.models.ship.nightly.NightlyConfig`'s), when, who hears about it, serving the registry."""

    # -- what the job trains (passed to `corefbot nightly --now`) --
    corefbot_base_model: Path | None = Field(
        None, description="base model: a Hugging Face folder or a GGUF (dequantized once, cached in "
                          "`COREFBOT_CACHE_DIR`); without it the nightly job is off")
    corefbot_nightly_preset: str = Field(_JOB.preset, description="finetune preset (`paper`, `paper-7b`, `nightly-cpu` on a CPU, `tiny`) or a YAML file")
    corefbot_nightly_continue: bool = Field(
        _JOB.continue_served, description="train the candidate on from the adapter the bot serves (the registry's "
        "serving run, else `COREFBOT_MODEL_PATH` when it is a run folder of the same base), so a seed run keeps what "
        "it learnt; `false`: from the bare base each night")
    corefbot_nightly_min_new_labels: int = Field(
        _JOB.min_new_labels, description="fewer new or changed labels since the last trained run: skip with a note")
    corefbot_nightly_margin: float = Field(_JOB.margin, description="test-split F1 gain needed to promote")
    corefbot_nightly_quant: Quant = Field(_JOB.quant, description="`q4_k_m` or `q8_0`")
    corefbot_nightly_min_agreement: float = Field(
        _JOB.min_agreement, description="quantized-vs-merged decision agreement needed to promote")
    corefbot_nightly_keep_runs: int = Field(
        _JOB.keep_runs, description="run folders kept (plus any the registry serves or may roll back to)")
    corefbot_nightly_max_minutes: float | None = Field(
        90.0, description="training budget: the run stops at a step boundary and still evaluates, checks and "
                          "exports, so a CPU run ends in time; `0`: no budget")
    corefbot_nightly_dir: Path | None = Field(
        None, description="run folders and the lock; unset: `nightly/` beside the database")
    corefbot_nightly_args: str = Field("", description="extra `corefbot nightly` options, e.g. `--max-steps 400`")

    # -- when --
    corefbot_nightly_enabled: bool | None = Field(
        None, description="unset: on exactly when `COREFBOT_BASE_MODEL` is set")
    corefbot_nightly_time: str = Field("03:30", description="daily time (HH:MM) in `COREFBOT_TIMEZONE`")
    corefbot_nightly_cron: str | None = Field(None, description="a crontab line; wins over the time")
    corefbot_nightly_timeout_s: float = Field(
        8 * 3600.0, description="a run still going after this is killed (counts as failed)")

    # -- who hears about it --
    corefbot_nightly_notify: Notify = Field(
        "auto", description="where the summary goes: `auto` (the moderator groups when set, else superusers "
                            "privately), `groups`, `superusers`, `none`")
    corefbot_moderator_groups: set[str] = Field(set(), description="group ids that get the nightly summary")

    # -- serving follows the registry --
    corefbot_nightly_follow_registry: bool = Field(
        True, description="serve the registry's serving version (at start and when it changes, also from the CLI)")
    corefbot_nightly_sync_s: float = Field(
        60.0, description="how often to look for registry changes made elsewhere; `0`: never")

    _ids = field_validator("corefbot_moderator_groups", mode="before")(id_set)

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

    def work_dir(self, db_path: str | Path) -> Path:
        return NightlyConfig(work_dir=self.corefbot_nightly_dir).resolved_work_dir(db_path)


#: Every area's settings, in the README's order.
AREAS: dict[str, type[BaseModel]] = {"common": CommonConfig, "chatlog": ChatlogSettings, "resolver": ResolverSettings,
                                     "labels": LabelsSettings, "nightly": NightlySettings}


def _dotenv(cwd: Path) -> dict[str, str]:
    path = cwd / ".env"
    if not path.is_file():
        return {}
    from dotenv import dotenv_values

    return {k.upper(): v for k, v in dotenv_values(path).items() if v is not None}


def raw_settings(cwd: Path | None = None) -> dict[str, str]:
    """Every key as NoneBot sees it: ``.env`` in the working directory, the environment over it; upper-case."""
    values = _dotenv(cwd or Path.cwd())
    values.update({k.upper(): v for k, v in os.environ.items()})
    return values


def read_settings(model: type[M], cwd: Path | None = None) -> M:
    """``model`` filled from ``.env`` and the environment, as the bot would be; a bad value raises
    ``ValueError`` naming the key."""
    from pydantic import ValidationError

    raw = raw_settings(cwd)
    data = {name: raw[name.upper()] for name in model.model_fields if raw.get(name.upper(), "") != ""}
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = str(first["loc"][0]).upper() if first["loc"] else model.__name__
        raise ValueError(f"{key}={data.get(key.lower())!r}: {first['msg']}") from None


def default_db_path(cwd: Path | None = None) -> Path:
    """The database ``corefbot run`` writes: COREFBOT_DB, else ``corefbot/corefbot.db`` in localstore's data
    directory, resolved from the environment and ``.env`` the way nonebot-plugin-localstore does."""
    raw = raw_settings(cwd)
    if explicit := raw.get("COREFBOT_DB"):
        return Path(explicit).expanduser()
    if data_dir := raw.get("LOCALSTORE_DATA_DIR"):
        base = Path(data_dir).expanduser()
    elif raw.get("LOCALSTORE_USE_CWD", "").lower() in ("1", "true", "yes"):
        base = (cwd or Path.cwd()) / "data"
    else:
        from nonestorage import user_data_dir

        base = user_data_dir("nonebot2")
    return base.resolve().joinpath(*DB_FILE)


def _shown(default: Any) -> str:
    if default is None or default is PydanticUndefined:
        return "unset"
    if isinstance(default, bool):
        return "`true`" if default else "`false`"
    if isinstance(default, (set, frozenset, list, tuple)):
        return "empty" if not default else f"`{','.join(sorted(map(str, default)))}`"
    if isinstance(default, float) and default.is_integer():
        default = int(default)
    return "empty" if default == "" else f"`{default}`"


def own_fields(model: type[BaseModel]) -> list[str]:
    """The fields ``model`` declares itself (not those it inherits): each key is documented once."""
    inherited = {name for base in model.__mro__[1:] if isinstance(base, type) and issubclass(base, BaseModel)
                 for name in getattr(base, "model_fields", {})}
    return [name for name in model.model_fields if name not in inherited]


def settings_table(model: type[BaseModel]) -> str:
    """The README's configuration table of one settings model (key, default, meaning)."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for name in own_fields(model):
        field = model.model_fields[name]
        if not field.description:
            raise ValueError(f"{model.__module__}.{model.__name__}.{name} has no description")
        rows.append(f"| `{name.upper()}` | {_shown(field.get_default(call_default_factory=True))} | {field.description} |")
    return "\n".join(rows)
