"""Shared fixtures: a real SQLite store, and locally built tiny Qwen2 models (built once per session)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from nonebug import NONEBOT_INIT_KWARGS

from corefbot.pipeline.store import Store

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


# One NoneBot instance serves every nonebug test of the session (nonebug initialises it once); its
# database is a fresh file, so tests look up their own groups/messages in it.
NONEBUG_DB = Path(tempfile.mkdtemp(prefix="corefbot-nonebug-")) / "corefbot.db"


def pytest_configure(config: pytest.Config) -> None:
    config.stash[NONEBOT_INIT_KWARGS] = {
        "driver": "~fastapi+~aiohttp", "corefbot_db": str(NONEBUG_DB), "superusers": {"90001"},
        "command_start": {"/"}, "log_level": "WARNING",
    }


@pytest.fixture(scope="session", autouse=True)
def after_nonebot_init(after_nonebot_init: None) -> None:
    """Load corefbot's plugins exactly as the bot does."""
    import nonebot
    from nonebot.adapters.onebot.v11 import Adapter as OneBotV11

    from corefbot.app import PLUGINS

    nonebot.get_driver().register_adapter(OneBotV11)
    for plugin in PLUGINS:
        nonebot.load_plugin(plugin)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "corefbot.db")
    yield s
    s.close()


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen2 model with a locally trained ChatML tokenizer (HF format)."""
    pytest.importorskip("transformers")
    from corefbot.models.train.tiny import make_model

    return make_model("tiny", tmp_path_factory.mktemp("tiny_hf"))


def shared_data(name: str) -> Path:
    """A file of ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} is absent (development data lives in ../shared/data)")
    return path


@pytest.fixture(scope="session")
def tiny_gguf(tiny_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as the served format, a Q4_K_M GGUF. Its siblings in the same folder:
    ``tiny-f16.gguf`` (the converter's output) and ``tiny-q8_0.gguf``."""
    pytest.importorskip("llama_cpp")
    from corefbot.models.ship.gguf import convert_hf_to_gguf, quantize

    out = tmp_path_factory.mktemp("tiny_gguf")
    f16 = convert_hf_to_gguf(tiny_hf, out / "tiny-f16.gguf")
    quantize(f16, out / "tiny-q8_0.gguf", "q8_0")
    return quantize(f16, out / "tiny-q4_k_m.gguf", "q4_k_m")
