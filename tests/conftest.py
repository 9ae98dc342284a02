"""Fixtures shared by every test."""

from __future__ import annotations

import pytest
from hypothesis import settings as hypothesis_settings

from engine.settings import Settings

pytest_plugins = ["tests.services", "tests.rabbit_fixtures", "tests.kafka_fixtures"]

# no time limit per example: on a busy 2-core machine one slow example (a collection,
# the scheduler) would fail a property test that holds
hypothesis_settings.register_profile("hookray", deadline=None)
hypothesis_settings.load_profile("hookray")


@pytest.fixture(autouse=True)
def _no_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings keys of the developer's shell or CI never leak into a test."""
    for key in Settings.model_fields:
        monkeypatch.delenv(key, raising=False)
