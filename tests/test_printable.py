"""Text output a script can trust: one escaping (``indexer.errors.printable``), reversible for values."""

from __future__ import annotations

import logging
import os
import re
import sys
import unicodedata

import pytest
from harness import run
from hostile import control_characters, is_invisible
from layouts import Layout, named

from indexer.daemon.logs import TextFormatter
from indexer.errors import printable

_ESCAPE = re.compile(r"\\(\\|x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8})")

NASTY = [
    "app\nx",
    "app\\x0ax",
    "app\\\\x0ax",
    "back\\slash",
    "trailing\\",
    "bidi\u202eevil",
    "bidi\\u202eevil",
    "zero\u200bwidth",
    "tag\U000e0041char",
    "tag\\U000e0041char",
    "bom\ufeff",
    "soft\u00adhyphen",
    "arabic\u061cmark",
    "rtl\u200fmark",
    "line\u2028sep",
    "esc\x1b[2J\x07\x7f\x9b",
    os.fsdecode(b"raw\xff\xfe"),
    "raw\\udcff",
    "caf\u00e9 \u65e5\u672c",
]


def decode(text: str) -> str:
    """The documented reversal of printable(..., reversible=True): Python's backslash escapes."""

    def one(match: re.Match[str]) -> str:
        body = match.group(1)
        return "\\" if body == "\\" else chr(int(body[1:], 16))

    return _ESCAPE.sub(one, text)


def test_value_escaping_is_reversible_and_distinct() -> None:
    escaped = [printable(text, reversible=True) for text in NASTY]
    assert len(set(escaped)) == len(NASTY)
    for text, out in zip(NASTY, escaped, strict=True):
        assert decode(out) == text
        assert not control_characters(out.encode("utf-8")), out
    assert printable("app\nx", reversible=True) == "app\\x0ax"
    assert printable("app\\x0ax", reversible=True) == "app\\\\x0ax"


def test_every_format_character_and_tag_is_escaped() -> None:
    chars = [chr(c) for c in range(0x80, sys.maxunicode + 1) if is_invisible(chr(c))]
    assert len(chars) > 150  # Cf, Zl, Zp and the whole tag block
    for ch in chars:
        assert printable(ch) != ch, f"U+{ord(ch):04X} {unicodedata.name(ch, '')} is not escaped"
        assert printable(ch, reversible=True) == printable(ch)
        assert decode(printable(ch)) == ch


def test_messages_are_not_escaped_twice() -> None:
    once = printable("layout app\nx: broken")
    assert printable(once) == once  # the message form leaves backslashes alone
    assert printable("plain ascii text") == "plain ascii text"


def test_text_log_keeps_an_escaped_sequence_on_one_line() -> None:
    formatter = TextFormatter()
    lines = []
    for path in ("/r/app\nx", "/r/app\\x0ax"):
        record = logging.LogRecord("ocidx.daemon", logging.WARNING, __file__, 1, "layout %s is broken", (path,), None)
        lines.append(formatter.format(record))
    assert all("\n" not in line for line in lines)
    assert lines[0].endswith("layout /r/app\\x0ax is broken")
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord(
            "ocidx.daemon", logging.ERROR, __file__, 1, "failed on %s", ("a\nb",), sys.exc_info()
        )
    text = formatter.format(record)
    first, *rest = text.split("\n")
    assert first.endswith("failed on a\\x0ab") and rest and all(line.startswith("    ") for line in rest)


@pytest.mark.integration
def test_ls_and_context_tell_a_newline_from_its_spelling(tmp_path: os.PathLike[str]) -> None:
    tmp = os.path.realpath(os.fspath(tmp_path))
    root = os.path.join(tmp, "root")
    paths = [os.path.join(root, "app\nx"), os.path.join(root, "app\\x0ax"), os.path.join(root, "rtl\u202eppa")]
    digests = {}
    for number, path in enumerate(paths):
        lay = Layout(path)
        image = lay.manifest(label=f"image-{number}")
        lay.write_index([named(image, ref="v1")])
        digests[path] = str(image["digest"])
    db = os.path.join(tmp, "index.db")
    assert run(tmp, "scan", "--db", db, "--no-progress", root).rc == 0

    listed = run(tmp, "ls", "--db", db).out.decode("utf-8").splitlines()
    shown = sorted(decode(line.split("\t")[0]) for line in listed)
    assert shown == sorted(paths)

    contexts = set()
    for path in paths:
        answer = run(tmp, "resolve", "--db", db, "--format", "context", "--layout", path, ":v1")
        assert answer.rc == 0, answer
        context = answer.out.decode("utf-8").rstrip("\n")
        assert "\n" not in context
        assert decode(context) == f"oci-layout://{path}@{digests[path]}"
        contexts.add(context)
    assert len(contexts) == len(paths)


@pytest.mark.integration
def test_ls_path_shortens_a_long_invalid_name(tmp_path: os.PathLike[str]) -> None:
    tmp = os.path.realpath(os.fspath(tmp_path))
    lay = Layout(os.path.join(tmp, "root", "long"))
    lay.write_index([named(lay.manifest(label="x"), ref="bad name " + "y" * 20_000)])
    db = os.path.join(tmp, "index.db")
    assert run(tmp, "scan", "--db", db, "--no-progress", lay.path).rc == 0
    shown = run(tmp, "ls", "--db", db, lay.path)
    assert shown.rc == 0, shown
    lines = shown.out.decode("utf-8").splitlines()
    invalid = [line for line in lines if line.endswith("(invalid)")]
    assert len(invalid) == 1 and "20009 chars" in invalid[0]
    assert max(len(line) for line in lines) < 1000
