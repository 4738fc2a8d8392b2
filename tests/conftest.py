"""Shared test helpers: the repository root and a config builder that never reads the real environment."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
# Fixtures every test may ask for by name: the session's schema registry.
pytest_plugins = ["tests.support.schema_registry"]


@pytest.fixture
def write_config(tmp_path: Path):
    """Write a YAML config into tmp_path and return its path."""

    def _write(text: str) -> Path:
        path = tmp_path / "meterflow.yaml"
        path.write_text(text)
        return path

    return _write
