"""Fixtures shared by every test."""

from __future__ import annotations

import pytest

from engine.settings import Settings

pytest_plugins = ["tests.services", "tests.rabbit_fixtures", "tests.kafka_fixtures"]


@pytest.fixture(autouse=True)
def _no_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings keys of the developer's shell or CI never leak into a test."""
    for key in Settings.model_fields:
        monkeypatch.delenv(key, raising=False)
