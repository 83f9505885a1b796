"""Configuration: where it comes from, what each key does, and clear errors that name the key."""

from __future__ import annotations

import json
import os
import tomllib

import pytest
from cli_run import ocidx
from layouts import Layout, named

from indexer import config as config_mod
from indexer.errors import ConfigError

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(CHECKOUT, "config.example.toml")


def write(path: str, text: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path


def test_no_config_file_is_the_defaults() -> None:
    config = config_mod.load(None)
    assert config.source is None
    assert config.roots == ()
    assert config.stores == {}
    assert config.familiar == "normalize"


def test_example_config_loads_and_shows_every_key() -> None:
    config = config_mod.load(EXAMPLE)
    assert [r.path for r in config.roots] == [os.path.join(CHECKOUT, "layouts")]
    with open(EXAMPLE, "rb") as f:
        text = f.read().decode()
    tomllib.loads(text)
    for key in (
        "path",
        "max_depth",
        "follow_symlinks",
        "familiar_ref_names",
        "max_index_bytes",
        "max_blob_bytes",
        "max_nested_depth",
        "debounce_ms",
        "reconcile_interval_s",
        "batch_size",
        "heartbeat_interval_s",
        "log_format",
    ):
        assert f"{key} =" in text, key
    for table in ("[database]", "[[roots]]", "[stores]", "[names]", "[limits]", "[daemon]"):
        assert table in text


def test_relative_paths_are_relative_to_the_config_file(tmp_path: str) -> None:
    path = write(
        os.path.join(tmp_path, "etc", "ocidx", "config.toml"),
        '[database]\npath = "state/index.db"\n[[roots]]\npath = "../layouts"\n[stores]\ncache = "cache"\n',
    )
    config = config_mod.load(path)
    here = os.path.join(tmp_path, "etc", "ocidx")
    assert config.database == os.path.join(here, "state", "index.db")
    assert [r.path for r in config.roots] == [os.path.join(tmp_path, "etc", "layouts")]
    assert config.stores == {"cache": os.path.join(here, "cache")}


def test_config_file_from_environment_and_xdg(tmp_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    xdg = write(os.path.join(tmp_path, "xdg-config", "ocidx", "config.toml"), '[stores]\nx = "/x"\n')
    assert config_mod.load(None).source == xdg
    env = write(os.path.join(tmp_path, "env.toml"), '[stores]\ny = "/y"\n')
    monkeypatch.setenv("OCIDX_CONFIG", env)
    assert config_mod.load(None).stores == {"y": "/y"}


def test_database_precedence(tmp_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(os.path.join(tmp_path, "c.toml"), '[database]\npath = "/from/config.db"\n')
    config = config_mod.load(path)
    assert config_mod.database_path("/from/flag.db", config) == "/from/flag.db"
    monkeypatch.setenv("OCIDX_DB", "/from/env.db")
    assert config_mod.database_path(None, config) == "/from/env.db"
    monkeypatch.delenv("OCIDX_DB")
    assert config_mod.database_path(None, config) == "/from/config.db"
    assert config_mod.database_path(None, config_mod.Config()) == os.path.join(
        tmp_path, "xdg-data", "ocidx", "index.db"
    )


@pytest.mark.parametrize(
    ("text", "named_key"),
    [
        ("[database]\npath = 3\n", "database.path"),
        ("[databse]\npath = 'x'\n", "databse"),
        ("[[roots]]\nmax_depth = 2\n", "roots[0].path"),
        ("[[roots]]\npath = 'r'\nmax_depth = -1\n", "roots[0].max_depth"),
        ("[[roots]]\npath = 'r'\nmax_depth = true\n", "roots[0].max_depth"),
        ("[[roots]]\npath = 'r'\nfollow_symlinks = 'yes'\n", "roots[0].follow_symlinks"),
        ("[[roots]]\npath = 'r'\ndepth = 2\n", "roots[0].depth"),
        ("roots = 'r'\n", "roots"),
        ("[stores]\ncache = 1\n", "stores.cache"),
        ("[stores]\n'a/b' = '/x'\n", "stores.a/b"),
        ("[names]\nfamiliar_ref_names = 'sometimes'\n", "names.familiar_ref_names"),
        ("[limits]\nmax_index_bytes = 1\n", "limits.max_index_bytes"),
        ("[limits]\nmax_nested_depth = 99\n", "limits.max_nested_depth"),
        ("[daemon]\ndebounce_ms = 1.5\n", "daemon.debounce_ms"),
        ("[daemon]\nreconcile_interval_s = 0\n", "daemon.reconcile_interval_s"),
        ("[daemon]\nreconcile_interval_s = nan\n", "daemon.reconcile_interval_s"),
        ("[daemon]\nreconcile_interval_s = inf\n", "daemon.reconcile_interval_s"),
        ("[daemon]\nreconcile_interval_s = 1e-9\n", "daemon.reconcile_interval_s"),
        ("[daemon]\nreconcile_interval_s = 1e300\n", "daemon.reconcile_interval_s"),
        ("[daemon]\nheartbeat_interval_s = nan\n", "daemon.heartbeat_interval_s"),
        ("[daemon]\nheartbeat_interval_s = -inf\n", "daemon.heartbeat_interval_s"),
        ("[daemon]\nheartbeat_interval_s = 1e-9\n", "daemon.heartbeat_interval_s"),
        ("[daemon]\nheartbeat_interval_s = 86400\n", "daemon.heartbeat_interval_s"),
        ("[daemon]\nbatch_size = 0\n", "daemon.batch_size"),
        ("[limits]\nmax_blob_bytes = 99999999999999999\n", "limits.max_blob_bytes"),
        ("[daemon]\nlog_format = 'xml'\n", "daemon.log_format"),
        ('[stores]\ncache = "/var/\\u0000cache"\n', "stores.cache"),
        ('[[roots]]\npath = "a\\u0000b"\n', "roots[0].path"),
        ('[database]\npath = "x\\u0000.db"\n', "database.path"),
    ],
)
def test_bad_values_name_the_key(tmp_path: str, text: str, named_key: str) -> None:
    path = write(os.path.join(tmp_path, "bad.toml"), text)
    with pytest.raises(ConfigError) as caught:
        config_mod.load(path)
    assert named_key in caught.value.message
    assert path in caught.value.message
    assert caught.value.exit_code == 2


def test_not_toml_and_missing_file(tmp_path: str) -> None:
    bad = write(os.path.join(tmp_path, "bad.toml"), "[stores\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config_mod.load(bad)
    binary = os.path.join(tmp_path, "binary.toml")
    with open(binary, "wb") as f:
        f.write(b"\xff\xfe[stores]\n")
    with pytest.raises(ConfigError):
        config_mod.load(binary)
    with pytest.raises(ConfigError, match="not found"):
        config_mod.load(os.path.join(tmp_path, "absent.toml"))


def test_cli_reports_a_bad_config_as_usage(tmp_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(os.path.join(tmp_path, "bad.toml"), "[names]\nfamiliar_ref_names = 'sometimes'\n")
    code, out, err = ocidx(capsys, "resolve", "--config", path, "--json", "oci-layout:///x")
    assert code == 2
    assert json.loads(out)["error"] == "config"
    assert "names.familiar_ref_names" in err
    code, _, _ = ocidx(capsys, "scan", "--config", path, "--no-progress", str(tmp_path))
    assert code == 2


@pytest.mark.parametrize(
    ("policy", "by_tag", "by_name"),
    [("normalize", True, True), ("tag-only", True, False), ("ignore", False, False)],
)
def test_familiar_ref_names_policy(
    tmp_path: str, capsys: pytest.CaptureFixture[str], policy: str, by_tag: bool, by_name: bool
) -> None:
    lay = Layout(os.path.join(tmp_path, "root", "skopeo"))
    image = lay.manifest()
    lay.write_index([named(image, ref="alpine:3.15")])  # skopeo copy ... oci:DIR:alpine:3.15
    config = write(os.path.join(tmp_path, "c.toml"), f'[names]\nfamiliar_ref_names = "{policy}"\n')
    db = os.path.join(tmp_path, "index.db")
    assert ocidx(capsys, "scan", "--db", db, "--config", config, "--no-progress", "root")[0] == 0
    for read_through in (False, True):
        if read_through:  # the same policy applies when the query reads a changed index.json itself
            lay.write_index([named(image, ref="alpine:3.15"), named(lay.manifest(), ref="other")])
        tag = ocidx(capsys, "resolve", "--db", db, "--config", config, f"oci-layout://{lay.path}:3.15")
        name = ocidx(capsys, "resolve", "--db", db, "--config", config, f"oci-layout://{lay.path}/alpine:3.15")
        assert (tag[0] == 0, name[0] == 0) == (by_tag, by_name), (policy, read_through)
        if by_tag:
            assert tag[1] == f"{image['digest']}\n"


def test_limits_apply(tmp_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    lay = Layout(os.path.join(tmp_path, "root", "big"))
    lay.write_index([named(lay.manifest(label=str(i)), ref=f"v{i}") for i in range(20)])
    config = write(os.path.join(tmp_path, "c.toml"), "[limits]\nmax_index_bytes = 1000\n")
    db = os.path.join(tmp_path, "index.db")
    code, out, err = ocidx(capsys, "scan", "--db", db, "--config", config, "--no-progress", "--json", "root")
    assert code == 0
    assert json.loads(out)["errors"] == 1
    assert "limit" in err
