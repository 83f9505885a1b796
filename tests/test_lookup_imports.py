"""The lookup path imports only the standard library it needs (DESIGN.md: CLI start-up budget).

Each check runs a fresh interpreter that imports ``indexer.cli``, runs lookups
through ``main`` against a real database and real layouts, and then reports
which heavy modules ended up in ``sys.modules``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from layouts import LINUX_AMD64, LINUX_ARM64, Layout, named

from indexer.cli import main

HEAVY = (
    "asyncio",
    "anyio",
    "watchdog",
    "typing",
    "dataclasses",
    "logging",
    "psycopg",
    "socket",
    "prometheus_client",
)
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = """
import json, sys
import indexer.cli
codes = [indexer.cli.main(argv) for argv in json.loads(sys.argv[1])]
heavy = [name for name in json.loads(sys.argv[2]) if name in sys.modules]
sys.stderr.write("PROBE " + json.dumps({"codes": codes, "heavy": heavy}) + "\\n")
"""


def probe(argvs: list[list[str]], heavy: tuple[str, ...] = HEAVY) -> tuple[list[int], list[str]]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(argvs), json.dumps(heavy)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": CHECKOUT},
    )
    assert done.returncode == 0, done.stderr
    line = next(line for line in done.stderr.splitlines() if line.startswith("PROBE "))
    result = json.loads(line.removeprefix("PROBE "))
    return result["codes"], result["heavy"]


@pytest.fixture
def indexed(tmp_path: str, capsys: pytest.CaptureFixture[str]) -> tuple[str, str, str]:
    """A scanned layout, a layout changed since the scan, and the database."""
    root = os.path.join(tmp_path, "root")
    lay = Layout(os.path.join(root, "lay"))
    lay.write_index(
        [named(lay.index([lay.manifest(platform=LINUX_AMD64), lay.manifest(platform=LINUX_ARM64)]), ref="latest")]
    )
    changed = Layout(os.path.join(root, "changed"))
    changed.write_index([named(changed.manifest(), ref="latest")])
    db = os.path.join(tmp_path, "index.db")
    assert main(["scan", "--db", db, "--no-progress", root]) == 0
    changed.write_index([named(changed.manifest(label="newer"), ref="latest")])  # read through
    capsys.readouterr()
    return db, os.path.realpath(lay.path), os.path.realpath(changed.path)


def test_resolve_imports_nothing_heavy(indexed: tuple[str, str, str]) -> None:
    db, lay, _ = indexed
    codes, heavy = probe([["resolve", "--db", db, f"oci-layout://{lay}"]])
    assert codes == [0]
    assert heavy == []


def test_every_lookup_form_imports_nothing_heavy(indexed: tuple[str, str, str]) -> None:
    db, lay, changed = indexed
    codes, heavy = probe(
        [
            ["resolve", "--db", db, "--json", "--platform", "linux/arm64", f"oci-layout://{lay}:latest"],
            ["resolve", "--db", db, "--format", "context", f"oci-layout://{changed}"],
            ["resolve", "--db", db, "--layout", lay, "nosuch"],
            ["find", "--db", db, "--verify-all", ":latest"],
            ["ls", "--db", db, lay],
            ["ls", "--db", db, "--json"],
            ["status", "--db", db],
            ["ref", "--json", "alpine", "Bad"],
            ["resolve", "--db", db + ".missing", f"oci-layout://{lay}"],
            ["find", "--db", db + ".missing", ":latest"],
            ["resolve", "--db", db, "--json", f"oci-layout://{lay}", f"oci-layout://{changed}:latest"],
            ["find", "--db", db, ":latest", "nosuch"],
            ["wait", "--db", db, "--timeout", "0.01", f"oci-layout://{lay}:nosuch"],
            ["wait", "--db", db, f"oci-layout://{lay}"],
            ["ls", "--db", db, changed],  # read through: the content graph read from the layout
            ["referrers", "--db", db, "--json", f"oci-layout://{lay}:latest"],
            ["du", "--db", db, "--json"],
        ]
    )
    assert codes == [0, 0, 1, 0, 0, 0, 0, 2, 0, 4, 0, 1, 1, 0, 0, 1, 0]
    assert heavy == []


def test_a_config_file_adds_no_async_or_logging(indexed: tuple[str, str, str], tmp_path: str) -> None:
    db, lay, _ = indexed
    config = os.path.join(tmp_path, "config.toml")
    with open(config, "w") as f:
        f.write(f'[stores]\nmain = "{lay}"\n')
    # tomllib itself imports typing; nothing of the daemon's may come with it
    codes, heavy = probe(
        [["resolve", "--db", db, "--config", config, "oci-layout://main:latest"]],
        heavy=tuple(m for m in HEAVY if m != "typing"),
    )
    assert codes == [0]
    assert heavy == []


def test_the_probe_sees_heavy_imports(indexed: tuple[str, str, str], tmp_path: str) -> None:
    """The check above can fail: scan, which is async, is seen importing anyio and asyncio."""
    db, _, _ = indexed
    codes, heavy = probe([["scan", "--db", db, "--no-progress", os.path.join(tmp_path, "root")]])
    assert codes == [0]
    assert {"anyio", "asyncio"} <= set(heavy)


def test_find_fleet_is_what_imports_the_driver(indexed: tuple[str, str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above can fail for the fleet too: find --fleet imports psycopg (and reaches no server here)."""
    pytest.importorskip("psycopg")
    db, _, _ = indexed
    monkeypatch.setenv("OCIDX_FLEET_DSN", "host=/nonexistent port=1 dbname=x user=y")
    codes, heavy = probe([["find", "--db", db, "--fleet", ":latest"]])
    assert codes == [4]
    assert "psycopg" in heavy


def test_the_exceptions_come_from_indexer_itself_and_import_indexer_stays_cheap() -> None:
    """``from indexer import NotFound`` works, and ``import indexer`` alone imports neither the
    lookups (sqlite3) nor anything heavy: each name is imported when it is first used."""
    probe = (
        "import json, sys\n"
        "import indexer\n"
        "light = [m for m in ('sqlite3', 'indexer.query', 'indexer.errors', 'anyio') if m in sys.modules]\n"
        "from indexer import Ambiguous, InvalidReference, LayoutNotFound, NotFound, OcidxError\n"
        "from indexer.errors import NotFound as Same\n"
        "sys.stdout.write(json.dumps([light, NotFound is Same, issubclass(LayoutNotFound, NotFound), "
        "sorted(n for n in indexer.__all__ if n[0].isupper())]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": CHECKOUT},
        check=True,
    )
    light, same, subclass, exported = json.loads(done.stdout)
    assert light == []
    assert same and subclass
    assert {"Ambiguous", "InvalidReference", "LayoutNotFound", "NotFound", "OcidxError", "Index"} <= set(exported)
