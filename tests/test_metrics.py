"""The daemon's Prometheus metrics: scraped from its real HTTP endpoint and read from its textfile."""

from __future__ import annotations

import os
import re
import urllib.request

import pytest
from harness import FRESH_S, Daemon, wait_for
from layouts import Layout, named
from prometheus_client.parser import text_string_to_metric_families

from indexer import config as config_mod
from indexer.errors import ConfigError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pg_cluster import FleetDb

pytestmark = pytest.mark.integration


def _samples(text: str) -> dict[str, float]:
    """``name{labels}`` → value for every sample of an exposition."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            found[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return found


def _with_metrics(tmp: str, roots: list[str], table: str) -> Daemon:
    daemon = Daemon(tmp, roots)
    with open(daemon.config, "a", encoding="utf-8") as f:
        f.write(f"\n[metrics]\n{table}\n")
    return daemon


def _scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        return _samples(response.read().decode())


def test_the_http_endpoint_serves_the_metrics(daemons: list[Daemon], tmp: str) -> None:
    root = os.path.join(tmp, "root")
    good, broken = Layout(os.path.join(root, "good")), Layout(os.path.join(root, "broken"))
    good.write_index([named(good.manifest(), ref="v1"), named(good.manifest(), ref="v2")])
    broken.write_index_bytes(b"{not json")
    daemon = _with_metrics(tmp, [root], 'listen = "127.0.0.1:0"')  # any free port; the log names it
    daemons.append(daemon)
    daemon.start().wait_ready()
    match = re.search(r"metrics: (http://127\.0\.0\.1:\d+/metrics)", daemon.log())
    assert match is not None, daemon.log()
    url = match.group(1)

    first = wait_for(
        lambda: (
            (s := _scrape(url)).get("ocidx_heartbeat_timestamp_seconds", 0) > 0
            and s.get("ocidx_reconcile_duration_seconds_count") == 1
            and s
        ),
        "a beat and the start-up pass",
    )
    assert isinstance(first, dict)
    assert (first["ocidx_layouts"], first["ocidx_entries"], first["ocidx_layouts_with_errors"]) == (2, 2, 1)
    assert first["ocidx_reconcile_duration_seconds_count"] == 1
    assert first["ocidx_layout_errors_total"] == 1
    assert first["ocidx_layouts_changed_total"] == 1
    assert first["ocidx_lost_events_total"] == 0
    assert first["ocidx_wal_bytes"] >= 0
    assert first["ocidx_last_reconcile_timestamp_seconds"] > 0
    assert "ocidx_publish_backlog" not in first  # the fleet's gauge appears when the fleet reports

    good.write_index([named(good.manifest(), ref="v3")])

    def updated() -> dict[str, float] | None:
        now = _scrape(url)
        return now if now["ocidx_update_latency_seconds_count"] >= 1 and now["ocidx_entries"] == 1 else None

    after = wait_for(updated, "the update is counted")
    assert isinstance(after, dict)
    assert after["ocidx_layouts_changed_total"] == 2
    assert after["ocidx_watch_events_total"] >= 1
    assert after['ocidx_update_latency_seconds_bucket{le="+Inf"}'] == after["ocidx_update_latency_seconds_count"]
    assert daemon.stop() == 0
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=2)  # stopped with the daemon


def test_the_gauges_follow_each_pass_not_the_heartbeat(daemons: list[Daemon], tmp: str) -> None:
    # Before: the gauges were refreshed at each heartbeat, so they lagged the change they count by up
    # to an interval. With a heartbeat of a minute, only the pass itself can have refreshed them.
    root = os.path.join(tmp, "root")
    lay = Layout(os.path.join(root, "lay"))
    lay.write_index([named(lay.manifest(), ref="v1")])
    daemon = _with_metrics(tmp, [root], 'listen = "127.0.0.1:0"')
    with open(daemon.config, encoding="utf-8") as f:
        text = f.read().replace("heartbeat_interval_s = 0.2", "heartbeat_interval_s = 60")
    with open(daemon.config, "w", encoding="utf-8") as f:
        f.write(text)
    daemons.append(daemon)
    daemon.start().wait_ready()
    match = re.search(r"metrics: (http://127\.0\.0\.1:\d+/metrics)", daemon.log())
    assert match is not None, daemon.log()
    url = match.group(1)
    wait_for(lambda: _scrape(url)["ocidx_entries"] == 1, "the start-up pass counted", FRESH_S)
    lay.write_index([named(lay.manifest(), ref="v1"), named(lay.manifest(label="two"), ref="v2")])
    wait_for(lambda: _scrape(url)["ocidx_entries"] == 2, "the update counted at once", FRESH_S)
    assert daemon.stop() == 0


def test_the_textfile_is_replaced_atomically_and_never_through_a_symlink(daemons: list[Daemon], tmp: str) -> None:
    root = os.path.join(tmp, "root")
    lay = Layout(os.path.join(root, "lay"))
    lay.write_index([named(lay.manifest(), ref="v1")])
    collector = os.path.join(tmp, "node-exporter")
    os.mkdir(collector)
    victim = os.path.join(tmp, "victim")
    with open(victim, "w", encoding="utf-8") as f:
        f.write("keep me\n")
    textfile = os.path.join(collector, "ocidx.prom")
    os.symlink(victim, textfile)  # planted where the daemon will write
    daemon = _with_metrics(tmp, [root], f'textfile = "{textfile}"')
    daemons.append(daemon)
    daemon.start().wait_ready()

    def written() -> dict[str, float] | None:
        if os.path.islink(textfile):
            return None
        with open(textfile, encoding="utf-8") as f:
            samples = _samples(f.read())
        beat = samples.get("ocidx_heartbeat_timestamp_seconds", 0) > 0
        return samples if beat and samples.get("ocidx_reconcile_duration_seconds_count") == 1 else None

    samples = wait_for(written, "the textfile is written")
    assert isinstance(samples, dict)
    assert (samples["ocidx_layouts"], samples["ocidx_entries"]) == (1, 1)
    with open(victim, encoding="utf-8") as f:
        assert f.read() == "keep me\n"
    assert os.listdir(collector) == ["ocidx.prom"]  # no temporary file left, none named *.prom
    assert daemon.stop() == 0


def test_metrics_are_off_unless_configured_and_loopback_by_default(tmp_path: str) -> None:
    def load(text: str) -> config_mod.Config:
        path = os.path.join(tmp_path, "config.toml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return config_mod.load(path)

    assert not load("").metrics.enabled
    metrics = load('[metrics]\nlisten = ":9464"\n').metrics
    assert (metrics.host, metrics.port, metrics.textfile) == ("127.0.0.1", 9464, None)
    assert load('[metrics]\nlisten = "9464"\n').metrics.host == "127.0.0.1"
    assert load('[metrics]\nlisten = "[::1]:9464"\n').metrics.host == "::1"
    assert load('[metrics]\nlisten = "0.0.0.0:9464"\n').metrics.host == "0.0.0.0"
    assert load('[metrics]\ntextfile = "m/ocidx.prom"\n').metrics.textfile == os.path.join(tmp_path, "m", "ocidx.prom")
    for bad in ('listen = "localhost"', 'listen = "1.2.3.4:99999"', 'textfile = "ocidx.txt"', "port = 1"):
        with pytest.raises(ConfigError, match="metrics"):
            load(f"[metrics]\n{bad}\n")


def test_a_port_in_use_is_a_clear_error(daemons: list[Daemon], tmp: str) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = _with_metrics(tmp, [os.path.join(tmp, "root")], f'listen = "127.0.0.1:{port}"')
        daemons.append(daemon)
        daemon.start()
        assert daemon.wait() == 1
    assert f"metrics.listen 127.0.0.1:{port} cannot be served" in daemon.log()


def test_the_fleet_reports_its_publish_backlog(fleet_db: FleetDb, daemons: list[Daemon], tmp: str) -> None:
    root = os.path.join(tmp, "root")
    lay = Layout(os.path.join(root, "lay"))
    lay.write_index([named(lay.manifest(), ref="v1")])
    daemon = Daemon(tmp, [root], env={"OCIDX_FLEET_DSN": fleet_db.add_host("metrics-host")})
    with open(daemon.config, "a", encoding="utf-8") as f:
        f.write('\n[metrics]\nlisten = "127.0.0.1:0"\n')
    daemons.append(daemon)
    daemon.start().wait_ready()
    match = re.search(r"metrics: (http://127\.0\.0\.1:\d+/metrics)", daemon.log())
    assert match is not None, daemon.log()
    # Published: the backlog gauge is there, and drains to 0 once the layout reached PostgreSQL.
    wait_for(lambda: _scrape(match.group(1)).get("ocidx_publish_backlog") == 0, "the backlog is reported, 0")
    assert daemon.stop() == 0
