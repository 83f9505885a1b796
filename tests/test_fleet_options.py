"""One rule for the fleet database of every fleet command: ``--dsn``, then ``$OCIDX_FLEET_DSN``, then
``[fleet] dsn`` (docs/fleet.md, Connecting); an unreachable database is exit 4 for all of them."""

from __future__ import annotations

import json
import os

import pytest
from cli_run import ocidx
from pg_cluster import FleetDb

Capsys = pytest.CaptureFixture[str]
UNREACHABLE = "host=/nonexistent port=1 dbname=x user=y connect_timeout=2"
COMMANDS = [
    ["fleet", "migrate"],
    ["fleet", "add-host", "h1"],
    ["fleet", "remove-host", "h1"],
    ["hosts"],
    ["find", "--fleet", ":v1"],
    ["referrers", "--fleet", "@sha256:" + "a" * 64],
]


def _config(tmp_path: str, dsn: str) -> str:
    path = os.path.join(tmp_path, "config.toml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(f'[fleet]\ndsn = "{dsn}"\n')
    return path


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c))
def test_every_fleet_command_takes_dsn_and_an_unreachable_database_is_exit_4(
    capsys: Capsys, command: list[str]
) -> None:
    code, out, err = ocidx(capsys, *command, "--dsn", UNREACHABLE, "--json")
    assert code == 4, err
    assert json.loads(out)["error"] == "fleet_unavailable"


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c))
def test_no_dsn_anywhere_says_the_three_ways_to_give_one(capsys: Capsys, command: list[str]) -> None:
    code, _, err = ocidx(capsys, *command)
    assert code == 4
    assert "--dsn" in err and "$OCIDX_FLEET_DSN" in err and "[fleet] dsn" in err


def test_dsn_goes_with_fleet_only(capsys: Capsys) -> None:
    code, _, err = ocidx(capsys, "find", "--dsn", UNREACHABLE, ":v1")
    assert code == 2 and "--fleet" in err
    code, _, err = ocidx(capsys, "referrers", "--dsn", UNREACHABLE, "@sha256:" + "a" * 64)
    assert code == 2 and "--fleet" in err


@pytest.mark.fleet
def test_the_flag_wins_over_the_environment_which_wins_over_the_config(
    fleet_db: FleetDb, capsys: Capsys, monkeypatch: pytest.MonkeyPatch, tmp_path: str
) -> None:
    admin = fleet_db.admin_dsn
    # The config alone (the administrator's config file) for the admin commands, too:
    config = _config(tmp_path, admin)
    code, _, err = ocidx(capsys, "fleet", "migrate", "--config", config)
    assert code == 0 and "up to date" in err
    code, _, err = ocidx(capsys, "fleet", "add-host", "h1", "--config", config)
    assert code == 0, err
    # The environment wins over the config: a config naming an unreachable database is not used.
    os.mkdir(os.path.join(tmp_path, "other"))
    bad_config = _config(os.path.join(tmp_path, "other"), UNREACHABLE)
    monkeypatch.setenv("OCIDX_FLEET_DSN", admin)
    nothing = "@sha256:" + "a" * 64
    for command in (
        ["fleet", "add-host", "h2"],
        ["hosts"],
        ["find", "--fleet", ":v1"],
        ["referrers", "--fleet", nothing],
    ):
        code, _, err = ocidx(capsys, *command, "--config", bad_config)
        assert code in (0, 1), (command, err)  # 1: find and referrers found nothing; never 4
    # The flag wins over the environment.
    monkeypatch.setenv("OCIDX_FLEET_DSN", UNREACHABLE)
    code, out, err = ocidx(capsys, "hosts", "--dsn", admin, "--json")
    assert code == 0, err
    assert [row["host"] for row in json.loads(out)] == ["h1", "h2"]
    code, out, err = ocidx(capsys, "referrers", "--fleet", "--dsn", admin, "--json", nothing)
    assert (code, json.loads(out)) == (1, []), err
    code, _, err = ocidx(capsys, "fleet", "remove-host", "h2", "--dsn", admin)
    assert code == 0 and "host h2: 0 layouts removed" in err


@pytest.mark.fleet
def test_removing_a_host_that_was_never_added_is_exit_1(fleet_db: FleetDb, capsys: Capsys) -> None:
    code, out, err = ocidx(capsys, "fleet", "remove-host", "never-added", "--dsn", fleet_db.admin_dsn, "--json")
    assert code == 1
    assert json.loads(out)["error"] == "not_found"
    assert "never-added is not a host of the fleet" in err
    fleet_db.add_host("h1")
    assert ocidx(capsys, "fleet", "remove-host", "h1", "--dsn", fleet_db.admin_dsn)[0] == 0
    code, _, err = ocidx(capsys, "fleet", "remove-host", "h1", "--dsn", fleet_db.admin_dsn)
    assert code == 1  # removed already: saying 0 would hide a typo in a host name
