"""Settings: one model per area read by the bot and the CLI alike, the README generated from it, and the
defects of settings written in several places (each test failed before the fix)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from aiohttp import web

from corefbot.cli import main
from corefbot.commands.config import markdown
from corefbot.models.ship.nightly import NightlyConfig
from corefbot.plugins.common.settings import (AREAS, LabelsSettings, NightlySettings, ResolverSettings,
                                              default_db_path, read_settings, settings_table)
from tests.test_http_backend import LoopbackServer, completion

README = Path(__file__).resolve().parents[1] / "README.md"
ZH = Path(__file__).resolve().parents[1] / "models" / "train" / "cases" / "zh_cases.jsonl"


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory of its own (for .env) and no COREFBOT_* keys from the calling environment."""
    import os

    for key in list(os.environ):
        if key.upper().startswith(("COREFBOT_", "LOCALSTORE_")):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_readme_tables_are_the_settings_models() -> None:
    text = README.read_text(encoding="utf-8")
    assert markdown() in text, "README's configuration tables differ: paste `corefbot config --markdown` there"
    for model in AREAS.values():
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
    keys = [name for model in AREAS.values() for name in model.model_fields]
    assert len(keys) == len(set(keys)) + 3 * 2  # only the two common keys are inherited (by three areas)


def test_settings_table_needs_descriptions() -> None:
    from pydantic import BaseModel

    class Bare(BaseModel):
        corefbot_x: int = 1

    with pytest.raises(ValueError, match="corefbot_x has no description"):
        settings_table(Bare)


def test_read_settings_from_dotenv_and_environment(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (workdir / ".env").write_text("COREFBOT_LABELS_LANG=zh\ncorefbot_moderators=1,2\nCOREFBOT_TIMEZONE=Asia/Shanghai\n")
    monkeypatch.setenv("COREFBOT_TIMEZONE", "Europe/Berlin")  # the environment wins over .env, as in NoneBot
    cfg = read_settings(LabelsSettings)
    assert (cfg.corefbot_labels_lang, cfg.corefbot_moderators, cfg.corefbot_timezone) == ("zh", {"1", "2"}, "Europe/Berlin")
    assert cfg.limits().tz is not None and str(cfg.limits().tz) == "Europe/Berlin"
    monkeypatch.setenv("COREFBOT_NIGHTLY_MARGIN", "a lot")
    with pytest.raises(ValueError, match="COREFBOT_NIGHTLY_MARGIN='a lot'"):
        read_settings(NightlySettings)


def test_db_path_from_the_settings(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (workdir / ".env").write_text("LOCALSTORE_DATA_DIR=store\n")
    assert default_db_path() == (workdir / "store" / "corefbot" / "corefbot.db").resolve()
    monkeypatch.setenv("COREFBOT_DB", str(workdir / "x.db"))
    assert default_db_path() == workdir / "x.db"


def test_nightly_cli_reads_the_bots_settings_and_options_win(workdir: Path) -> None:
    from corefbot.commands.nightly import config_from

    parser_args = ["nightly", "--now", "--margin", "0.07"]
    from corefbot.cli import build_parser

    (workdir / ".env").write_text("COREFBOT_NIGHTLY_MIN_NEW_LABELS=9\nCOREFBOT_NIGHTLY_MARGIN=0.03\n"
                                  "COREFBOT_NIGHTLY_QUANT=q8_0\nCOREFBOT_BASE_MODEL=/models/base\n")
    cfg = config_from(build_parser().parse_args(parser_args))
    assert (cfg.min_new_labels, cfg.margin, cfg.quant, cfg.base_model) == (9, 0.07, "q8_0", Path("/models/base"))
    (workdir / ".env").unlink()
    cfg = config_from(build_parser().parse_args(["nightly", "--now"]))
    job = NightlyConfig()
    assert (cfg.preset, cfg.min_new_labels, cfg.margin, cfg.quant, cfg.min_agreement, cfg.keep_runs,
            cfg.model_path, cfg.continue_served) == \
        (job.preset, job.min_new_labels, job.margin, job.quant, job.min_agreement, job.keep_runs, None, True)
    # The model the bot serves at start is the job's baseline, unless another backend serves.
    (workdir / ".env").write_text("COREFBOT_MODEL_PATH=/runs/seed\nCOREFBOT_NIGHTLY_CONTINUE=false\n")
    cfg = config_from(build_parser().parse_args(["nightly", "--now"]))
    assert (cfg.model_path, cfg.continue_served) == (Path("/runs/seed"), False)
    (workdir / ".env").write_text("COREFBOT_MODEL_PATH=/runs/seed\nCOREFBOT_RESOLVER=rules\n")
    cfg = config_from(build_parser().parse_args(["nightly", "--now", "--from-base"]))
    assert (cfg.model_path, cfg.continue_served) == (None, False)
    cfg = config_from(build_parser().parse_args(["nightly", "--now", "--model", "/runs/avg"]))
    assert (cfg.model_path, cfg.continue_served) == (Path("/runs/avg"), True)


def test_eval_uses_the_resolver_key_the_bot_uses(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`corefbot eval` read COREFBOT_RESOLVER_API_KEY while the bot reads COREFBOT_RESOLVER_KEY."""
    async def handler(request: web.Request) -> web.Response:
        return web.json_response(completion("B", {"A": -3.0, "B": -0.1, "C": -4.0}))

    server = LoopbackServer(handler)
    try:
        (workdir / ".env").write_text(f"COREFBOT_RESOLVER_URL={server.url}\nCOREFBOT_RESOLVER_KEY=s3cret\n"
                                      "COREFBOT_RESOLVER_MODEL=qwen-coref\n")
        out = workdir / "report.json"
        assert main(["eval", str(ZH), "--backend", "http", "--no-gate", "--limit", "2", "--report", str(out)]) == 0
    finally:
        server.close()
    assert json.loads(out.read_text())["n"] == 2
    assert server.headers and all(h.get("Authorization") == "Bearer s3cret" for h in server.headers)
    assert all(r["model"] == "qwen-coref" for r in server.requests)


@pytest.mark.slow
def test_hot_swap_keeps_the_configured_threads_and_gate(tmp_path: Path, tiny_gguf: Path) -> None:
    """A nightly promotion reloaded the model with neither COREFBOT_RESOLVER_THREADS nor COREFBOT_GATE_PATH."""
    from corefbot.models.serve.gate import DEFAULT_PATH
    from corefbot.plugins.resolver.handlers import _service, swap_loader

    retrained = tmp_path / "gate.json"
    doc = json.loads(DEFAULT_PATH.read_text(encoding="utf-8"))
    doc["meta"] = {"retrained": "for this deployment"}
    retrained.write_text(json.dumps(doc), encoding="utf-8")
    shutil.copy(tiny_gguf, tmp_path / "served.gguf")
    resolver = swap_loader(ResolverSettings(corefbot_resolver_threads=1, corefbot_gate_path=retrained,
                                            corefbot_decide_by="rewrite"))(str(tmp_path / "served.gguf"))
    try:
        assert resolver.backend.n_threads == 1 and resolver.backend.decide_by == "rewrite"
        assert resolver.gate.meta == {"retrained": "for this deployment"}
    finally:
        resolver.close()
    assert _service._model_loader is not None  # the bot's service swaps with the configured loader
