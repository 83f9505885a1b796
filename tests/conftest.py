"""Shared test set-up: every test runs isolated from the user's ocidx config and database."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _isolated(tmp_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """No user config or database leaks in; relative paths are relative to the test's directory."""
    monkeypatch.setenv("XDG_CONFIG_HOME", os.path.join(tmp_path, "xdg-config"))
    monkeypatch.setenv("XDG_DATA_HOME", os.path.join(tmp_path, "xdg-data"))
    monkeypatch.delenv("OCIDX_CONFIG", raising=False)
    monkeypatch.delenv("OCIDX_DB", raising=False)
    monkeypatch.chdir(tmp_path)
