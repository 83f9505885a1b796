"""Shared fixtures: every test runs isolated from the user's ocidx config and database; the test's
directory, the daemons it starts, and a throwaway PostgreSQL (the harness itself is tests/harness.py)."""

from __future__ import annotations

import os

import pytest

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator

    from harness import Daemon
    from pg_cluster import Cluster, FleetDb


@pytest.fixture(autouse=True)
def _isolated(tmp_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """No user config or database leaks in; relative paths are relative to the test's directory."""
    monkeypatch.setenv("XDG_CONFIG_HOME", os.path.join(tmp_path, "xdg-config"))
    monkeypatch.setenv("XDG_DATA_HOME", os.path.join(tmp_path, "xdg-data"))
    monkeypatch.delenv("OCIDX_CONFIG", raising=False)
    monkeypatch.delenv("OCIDX_DB", raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def _no_fleet(monkeypatch: pytest.MonkeyPatch) -> None:
    """No fleet DSN of the user's environment leaks into a test."""
    monkeypatch.delenv("OCIDX_FLEET_DSN", raising=False)


@pytest.fixture
def tmp(tmp_path: os.PathLike[str]) -> str:
    """The test's directory, its real path (what the daemon and the lookups print)."""
    return os.path.realpath(os.fspath(tmp_path))


@pytest.fixture
def base(tmp_path: os.PathLike[str]) -> str:
    """The directory below which each host of a fleet test has its own (tests/fleet_hosts.py)."""
    return os.path.realpath(os.fspath(tmp_path))


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    """Every daemon a test starts through it is stopped (killed if need be) at the end."""
    import signal
    import subprocess

    from harness import DEADLINE_S

    started: list[Daemon] = []
    yield started
    for daemon in started:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.proc.send_signal(signal.SIGTERM)
            try:
                daemon.proc.wait(DEADLINE_S)
            except subprocess.TimeoutExpired:
                daemon.kill()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    """One throwaway PostgreSQL cluster for the session (tests/pg_cluster.py); skipped or failed when missing."""
    import importlib.util

    from needs import require
    from pg_cluster import bin_dir, running_cluster

    require(["psycopg"] if importlib.util.find_spec("psycopg") is None else [], "pip install 'ocidx[fleet]'")
    require(["postgresql (initdb, pg_ctl, postgres)"] if bin_dir() is None else [], "apt-get install postgresql")
    with running_cluster() as cluster:
        yield cluster


@pytest.fixture
def fleet_db(pg_cluster: Cluster, request: pytest.FixtureRequest) -> FleetDb:
    """A new database, migrated by ``ocidx fleet migrate`` as the cluster's superuser."""
    from pg_cluster import FleetDb

    from indexer.fleet import admin

    dbname = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name.lower())[:50]
    dbname += f"_{os.getpid()}"
    pg_cluster.psql(f'DROP DATABASE IF EXISTS "{dbname}"')
    pg_cluster.psql(f'CREATE DATABASE "{dbname}"')
    admin.migrate(pg_cluster.dsn(dbname=dbname))
    return FleetDb(pg_cluster, dbname)
