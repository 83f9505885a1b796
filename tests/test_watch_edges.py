"""The daemon against what other users and other writers can do to a watched tree and its config.

Real daemon processes, real inotify, real mounts (tmpfs, as root), real hard links and
real non-UTF-8 names; every wait polls a condition a user could observe against a deadline.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from test_daemon import REPO, Daemon

integration = pytest.mark.integration


@pytest.fixture
def tmp(tmp_path: os.PathLike[str]) -> str:
    return os.path.realpath(os.fspath(tmp_path))


# -- config numbers ------------------------------------------------------------------------------


@integration
@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("reconcile_interval_s = nan", "daemon.reconcile_interval_s"),
        ("heartbeat_interval_s = nan", "daemon.heartbeat_interval_s"),
        ("heartbeat_interval_s = 1e-9", "daemon.heartbeat_interval_s"),
        ("reconcile_interval_s = 1e-9", "daemon.reconcile_interval_s"),
    ],
)
def test_a_daemon_with_a_nan_or_tiny_interval_exits_2_naming_the_key(tmp: str, line: str, key: str) -> None:
    root = os.path.join(tmp, "root")
    os.makedirs(root)
    config = os.path.join(tmp, "bad.toml")
    with open(config, "w", encoding="utf-8") as fh:
        fh.write(f"[daemon]\n{line}\n")
    env = Daemon(tmp, [root]).env
    proc = subprocess.run(
        [sys.executable, "-m", "indexer", "daemon", "--config", config, "--db", os.path.join(tmp, "i.db"), root],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2, proc.stderr
    assert key in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.exists(os.path.join(tmp, "i.db"))
