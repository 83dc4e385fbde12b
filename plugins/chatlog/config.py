from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel


class Config(BaseModel):
    """corefbot's capture settings, read from NoneBot's .env (one namespace, hence the prefix)."""

    corefbot_db: Path | None = None  # default: the localstore data dir's corefbot/corefbot.db
    corefbot_merge_gap_s: float = 18.0  # the concat rule's gap (paper: 18 s)
    corefbot_window: int = 12  # context window size (paper: 12)
    corefbot_question_threshold: float = 5.0  # question score needed (0–10; paper: 5)
    corefbot_min_chars: int = 7  # shorter texts are never questions (paper's labelling rule)
    corefbot_record_self: bool = True  # also record the bot's own messages
    corefbot_queue_size: int = 10_000  # messages waiting for the writer before capture sheds load
    # Derived copies of a message (its run, the decision, the outbox row) keep at most this many characters,
    # with a marker saying how much was cut; the raw message row keeps the text whole. 0: no bound.
    corefbot_max_text_chars: int = 4000
    # Log lines (NoneBot's own event lines included) are cut to this many characters, with a marker. 0: no bound.
    corefbot_max_log_chars: int = 2000
    # The OneBot websocket's keep-alive (read by bot/app.py when it starts uvicorn): ping every interval, close
    # only when no pong came within the timeout, which must outlast any backlog. 0 turns pinging off.
    corefbot_ws_ping_interval_s: float = 20.0
    corefbot_ws_ping_timeout_s: float = 600.0
    corefbot_timings_file: Path | None = None  # write capture handler timings here at shutdown (benchmarks)
