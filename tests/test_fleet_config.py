"""``[fleet]`` in the config file and ``$OCIDX_FLEET_DSN`` (no PostgreSQL needed)."""

from __future__ import annotations

import os

import pytest
from cli_run import ocidx

from indexer import config as config_mod
from indexer.errors import ConfigError


def _load(tmp_path: str, text: str) -> config_mod.Config:
    path = os.path.join(tmp_path, "c.toml")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return config_mod.load(path)


def test_defaults_mean_no_fleet(tmp_path: str) -> None:
    config = _load(tmp_path, "")
    assert (config.fleet.dsn, config.fleet.stale_after_s) == ("", 60.0)
    assert config_mod.fleet_dsn(config) == ""


def test_the_environment_wins_and_an_empty_value_turns_the_fleet_off(
    tmp_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _load(tmp_path, '[fleet]\ndsn = "host=db.example dbname=ocidx"\nstale_after_s = 5\n')
    assert config_mod.fleet_dsn(config) == "host=db.example dbname=ocidx"
    assert config.fleet.stale_after_s == 5.0
    monkeypatch.setenv("OCIDX_FLEET_DSN", "host=other")
    assert config_mod.fleet_dsn(config) == "host=other"
    monkeypatch.setenv("OCIDX_FLEET_DSN", "")
    assert config_mod.fleet_dsn(config) == ""


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "604801", '"60"', "true"])
def test_stale_after_s_must_be_a_sane_number(tmp_path: str, value: str) -> None:
    with pytest.raises(ConfigError, match=r"fleet\.stale_after_s"):
        _load(tmp_path, f"[fleet]\nstale_after_s = {value}\n")


@pytest.mark.parametrize(
    "dsn",
    [
        "host=db user=h1 password=hunter2",
        "host=db password = hunter2",
        "postgresql://h1:hunter2@db/ocidx",
        "postgres://db/ocidx?user=h1&password=hunter2",
    ],
)
def test_a_password_in_the_config_file_is_refused(tmp_path: str, dsn: str) -> None:
    with pytest.raises(ConfigError, match=r"fleet\.dsn holds a password") as raised:
        _load(tmp_path, f'[fleet]\ndsn = "{dsn}"\n')
    assert "hunter2" not in raised.value.message


@pytest.mark.parametrize(
    "dsn", ["host=db user=h1 passfile=/etc/ocidx/pgpass", "postgresql://h1@db/ocidx", "service=fleet"]
)
def test_a_dsn_without_a_password_is_accepted(tmp_path: str, dsn: str) -> None:
    assert _load(tmp_path, f'[fleet]\ndsn = "{dsn}"\n').fleet.dsn == dsn


def test_unknown_fleet_keys_are_named(tmp_path: str) -> None:
    with pytest.raises(ConfigError, match=r"unknown key fleet\.password"):
        _load(tmp_path, '[fleet]\npassword = "x"\n')


def test_find_fleet_without_a_dsn_says_how_to_set_one(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = ocidx(capsys, "find", "--fleet", "--json", ":latest")
    assert code == 4
    assert "[fleet] dsn" in err and "OCIDX_FLEET_DSN" in err
    assert '"error": "fleet_unavailable"' in out


def test_a_bad_reference_is_exit_2_before_any_connection(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OCIDX_FLEET_DSN", "host=/nonexistent port=1 dbname=x user=y")
    for ref in ("Bad:Ref", ":", "@sha256:short"):
        code, _out, err = ocidx(capsys, "find", "--fleet", ref)
        assert code == 2, (ref, err)
