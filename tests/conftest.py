"""Shared fixtures: a real SQLite store, and locally built tiny Qwen2 models (built once per session)."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.store import Store

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "corefbot.db")
    yield s
    s.close()


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen2 model with a locally trained ChatML tokenizer (HF format)."""
    pytest.importorskip("transformers")
    from models.tiny import make_model

    return make_model("tiny", tmp_path_factory.mktemp("tiny_hf"))


def shared_data(name: str) -> Path:
    """A file of ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} is absent (development data lives in ../shared/data)")
    return path
