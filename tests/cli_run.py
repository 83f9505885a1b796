"""Running the ``ocidx`` command in-process, as the tests of several modules do."""

from __future__ import annotations

import pytest

from indexer.cli import main


def ocidx(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``ocidx ARGS`` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err
