"""A user swaps a directory for a symlink between discovery and the read: the root daemon reads nothing
outside the layout it discovered."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import anyio
import pytest
from harness import run, scanner_on
from layouts import Layout, named

from indexer.errors import LayoutUnreadable
from indexer.layout import read_layout

SECRET = "token-3f9a7c"


def _everything(db: str) -> str:
    """Every text value in the database, as one string to search."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        out: list[str] = []
        for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
            out.extend(repr(row) for row in conn.execute(f'SELECT * FROM "{table}"'))
        return "\n".join(out)
    finally:
        conn.close()


@pytest.fixture
def swapped(tmp_path: Path) -> tuple[str, str, str]:
    """(tmp, root, P): layout P was indexed, then P was replaced by a symlink to a private layout elsewhere."""
    tmp = str(tmp_path)
    root = os.path.join(tmp, "root")
    app = Layout(os.path.join(root, "user", "app"))
    app.write_index([named(app.manifest(), ref="v1")])
    db = os.path.join(tmp, "index.db")
    assert run(tmp, "scan", "--db", db, root).rc == 0
    private = Layout(os.path.join(tmp, "private", "layout"))
    private.write_index([named(private.manifest(), ref="v1", **{"com.example.secret": SECRET})])
    os.chmod(os.path.join(tmp, "private"), 0o700)
    path = os.path.realpath(app.path)
    os.rename(path, path + ".old")
    os.symlink(private.path, path)
    return tmp, db, path


def test_read_layout_refuses_a_path_whose_directory_became_a_symlink(swapped: tuple[str, str, str]) -> None:
    _tmp, _db, path = swapped
    with pytest.raises(LayoutUnreadable, match="led outside the layout"):
        read_layout(path)  # the discovered, resolved path: where index.json must be


def test_the_daemons_read_of_a_swapped_layout_stores_nothing_of_the_target(swapped: tuple[str, str, str]) -> None:
    _tmp, db, path = swapped
    with scanner_on(db) as scanner:
        counts = anyio.run(scanner.process, [path])  # what the daemon does for an event on the path
    assert counts.errors == 1 and "led outside the layout" in counts.error_messages[0]
    assert SECRET not in _everything(db)
