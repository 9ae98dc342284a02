"""Fixtures shared by the integration tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.settings import Settings


@pytest.fixture
def config(tmp_path: Path, settings: Settings) -> str:
    """A main.json for the CLI: the test's Redis and prefix, 2 partitions."""
    path = tmp_path / "main.json"
    path.write_text(json.dumps({"REDIS_URL": settings.REDIS_URL,
                                "REDIS_PREFIX": settings.REDIS_PREFIX, "PARTITIONS": 2}))
    return str(path)
