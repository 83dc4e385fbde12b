"""plugins/resolver settings, read from NoneBot's .env (one namespace, hence the COREFBOT_ prefix)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel

ReplyMode = Literal["mention", "all"]
AssistantApi = Literal["openai", "json"]


class Config(BaseModel):
    # -- the resolver (models/resolver.py) --
    corefbot_resolver: Literal["rules", "llama-cpp", "http"] | None = None  # default: llama-cpp with a model, else rules
    corefbot_model_path: Path | None = None  # GGUF for the llama-cpp backend
    corefbot_resolver_url: str | None = None  # OpenAI-compatible base URL for the http backend
    corefbot_resolver_model: str = "default"  # model name sent to the http backend
    corefbot_resolver_key: str | None = None  # bearer key for the http backend
    corefbot_gate_path: Path | None = None  # a retrained gate (default: the shipped one)
    corefbot_resolver_threads: int | None = None  # llama.cpp threads (default: the backend's choice)
    corefbot_resolve_all: bool = True  # resolve and record every question, also those the bot will not answer
    corefbot_resolve_backlog: int = 16  # unaddressed questions waiting for the model beyond this are skipped

    # -- the upstream assistant --
    corefbot_assistant_url: str | None = None  # unset: resolve and record, forward nothing
    corefbot_assistant_api: AssistantApi = "openai"  # openai: chat completions; json: {query, group, history} -> {answer}
    corefbot_assistant_model: str = "default"
    corefbot_assistant_key: str | None = None  # sent as "Authorization: Bearer <key>"
    corefbot_assistant_system: str | None = None  # optional system prompt (openai API)
    corefbot_assistant_timeout_s: float = 60.0  # one request; a late answer counts as a failed attempt
    corefbot_assistant_history: int = 12  # window turns (other members' messages) sent as history (json API); 0: none
    corefbot_max_query_chars: int = 4000  # forwarded query and each history text are cut to this (with a marker); 0: no bound
    corefbot_assistant_concurrency: int = 4  # requests in flight at once

    # -- when and how the bot answers --
    corefbot_reply_mode: ReplyMode = "mention"  # mention: only @bot or replies to the bot; all: every question
    corefbot_show_query: bool = True  # quote the resolved query above the answer when it differs from the question
    corefbot_max_answer_chars: int = 3000
    corefbot_rate_limit: int = 5  # forwards per group per period; 0 disables the limit
    corefbot_rate_period_s: float = 60.0

    # -- the durable outbox --
    corefbot_retry_base_s: float = 2.0  # first retry delay; doubles each attempt
    corefbot_retry_max_s: float = 300.0  # cap on one delay
    corefbot_max_attempts: int = 1000  # safety valve only: retrying ends at COREFBOT_OUTBOX_MAX_AGE_S long before
    # Posted once (quoting the question, @asker) when an item gives up without an answer; "" posts nothing.
    corefbot_unavailable_reply: str = ("Sorry, the assistant is unavailable right now and could not answer this. "
                                       "Please ask again later.")
    corefbot_outbox_max_age_s: float = 3600.0  # older undelivered items are marked expired, never sent
    corefbot_outbox_keep_days: float = 30.0  # finished items (delivered/failed/expired) are deleted after this; 0 keeps them
