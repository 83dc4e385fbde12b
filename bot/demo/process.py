"""Run the real bot (``python -m corefbot``) as a child process on a free loopback port.

Used by ``corefbot demo``, the end-to-end tests and the live-capture benchmark: the bot is the same
process a deployment runs, configured only through environment variables.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BotProcess:
    def __init__(self, db: str | Path, *, env: dict[str, str] | None = None, port: int | None = None,
                 log_path: str | Path | None = None, access_token: str | None = None) -> None:
        self.db = Path(db)
        self.port = port or free_port()
        self.access_token = access_token
        self.log_path = Path(log_path) if log_path else self.db.with_suffix(".bot.log")
        self.env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(self.port), "COREFBOT_DB": str(self.db),
                    "LOG_LEVEL": os.environ.get("LOG_LEVEL", "INFO"), **(env or {})}
        if access_token:
            self.env["ONEBOT_ACCESS_TOKEN"] = access_token
        self.proc: subprocess.Popen | None = None

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/onebot/v11/ws"

    def start(self, timeout: float = 60.0) -> "BotProcess":
        self._log = open(self.log_path, "w")
        # cwd: a folder without a .env, so the environment above is the whole configuration.
        self.proc = subprocess.Popen([sys.executable, "-m", "corefbot"], env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, cwd=self.db.parent)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the bot exited with {self.proc.returncode}; log: {self.log_path}\n"
                                   + self.log_path.read_text()[-3000:])
            try:  # ready when the websocket server accepts connections (whatever the log level)
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"the bot did not start within {timeout:.0f}s; log: {self.log_path}")

    def stop(self, timeout: float = 30.0) -> int:
        """Stop gracefully (SIGINT, as Ctrl+C): the writer flushes everything queued."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        code = self.proc.returncode
        self.proc = None
        return code

    def log(self) -> str:
        return self.log_path.read_text()

    def __enter__(self) -> "BotProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
