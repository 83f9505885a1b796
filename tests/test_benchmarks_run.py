"""The benchmark runner leaves the tracked ``benchmarks/RESULTS.md`` alone unless ``--write-results`` asks."""

from __future__ import annotations

import os
import shutil

import pytest

from benchmarks import run


@pytest.fixture
def results(tmp_path: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A copy of RESULTS.md that the runner writes instead of the tracked one, and no figures to
    measure (the suite itself takes minutes: what is checked here is only what the runner writes)."""
    copy = os.path.join(tmp_path, "RESULTS.md")
    shutil.copyfile(run.RESULTS, copy)
    monkeypatch.setattr(run, "RESULTS", copy)
    monkeypatch.setattr(run.Bench, "run", lambda self, only: None)
    return copy


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def test_a_run_does_not_rewrite_results_md_unless_asked(results: str, tmp_path: str) -> None:
    before = _read(results)
    assert run.main(["--data", os.path.join(tmp_path, "data")]) == 0
    assert _read(results) == before
    assert run.main(["--data", os.path.join(tmp_path, "data"), "--write-results"]) == 0
    after = _read(results)
    assert after != before
    assert "- Command: `python -m benchmarks --data" in after and "--write-results`" in after
    head, tail = before.partition(run.BEGIN)[0], before.partition(run.END)[2]
    assert after.startswith(head) and after.endswith(tail)  # the hand-written text is kept
