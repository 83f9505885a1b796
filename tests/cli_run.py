"""Running the ``ocidx`` command in-process, as the tests of several modules do."""

from __future__ import annotations

import pytest

from indexer.cli import main

# The keys of `resolve --json` and of each `find --json` item, in order (docs/json.md).
ANSWER_KEYS = [
    "layout",
    "digest",
    "mediaType",
    "size",
    "names",
    "annotations",
    "platform",
    "source",
    "freshness",
    "warnings",
]


def ocidx(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``ocidx ARGS`` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err
