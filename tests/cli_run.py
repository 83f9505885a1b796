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
    "config",
    "layers",
    "image_size",
    "created",
    "source",
    "used_by",
    "freshness",
    "warnings",
]


def ocidx(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``ocidx ARGS`` in this process: (exit code, stdout, stderr); fails on a raw control or
    invisible character in either (``hostile.control_characters``)."""
    from hostile import control_characters

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    for stream in (out, err):
        bad = control_characters(stream.encode("utf-8", "surrogateescape"))
        assert not bad, f"raw control characters in the output of ocidx {args!r}: {bad[:5]}"
    return code, out, err
