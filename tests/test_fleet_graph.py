"""The content graph across the fleet: real daemons publishing as real PostgreSQL roles (docs/fleet.md).

``find --fleet @DIGEST`` of a layer or config, ``referrers --fleet``, the image fields of fleet
answers (as each host's own find gives them), and a host's own rows never answering for another's.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from cli_run import ocidx
from layouts import LINUX_AMD64, LINUX_ARM64, OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, Layout, canonical_json, named
from needs import module
from pg_cluster import FleetDb
from test_daemon import Daemon, wait_until
from test_fleet import CONVERGE_S, base, daemons, fleet_api, local_answers, start_host, wait_converged

psycopg = module("psycopg", "pip install 'ocidx[fleet]'")

pytestmark = [pytest.mark.fleet, pytest.mark.integration]

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

    from layouts import Descriptor

__all__ = ["base", "daemons"]  # the fixtures, shared with test_fleet

BASE_LAYER = b"a base layer every host holds"


def image(layout: Layout, platform: Mapping[str, object], label: str) -> Descriptor:
    """An image of the shared base layer and one of its own, its config saying *platform*."""
    config = layout.blob(canonical_json({**platform, "created": "2025-06-07T08:09:10Z", "l": label}), OCI_CONFIG)
    layers = [layout.blob(BASE_LAYER, OCI_LAYER), layout.blob(label.encode(), OCI_LAYER)]
    document = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": layers}
    return layout.blob(canonical_json(document), OCI_MANIFEST)


def sbom(layout: Layout, subject: Descriptor) -> Descriptor:
    empty = layout.blob(b"{}", "application/vnd.oci.empty.v1+json")
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/spdx+json",
        "config": empty,
        "layers": [layout.blob(b"spdx of " + str(subject["digest"]).encode(), "application/spdx+json")],
        "subject": {k: subject[k] for k in ("mediaType", "digest", "size")},
        "annotations": {"org.opencontainers.image.created": "2025-06-07T08:09:10Z"},
    }
    return layout.blob(canonical_json(document), OCI_MANIFEST)


def base_layer_digest() -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(BASE_LAYER).hexdigest()


def graph_rows(fleet_db: FleetDb, host: str) -> list[tuple[object, ...]]:
    with psycopg.connect(fleet_db.admin_dsn) as conn:
        rows = conn.execute("SELECT digest FROM graph_manifests WHERE host = %s ORDER BY digest", (host,))
        return [tuple(row) for row in rows.fetchall()]


def test_the_fleet_finds_a_layer_and_the_images_of_every_host(
    fleet_db: FleetDb,
    daemons: list[Daemon],
    base: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h1 = start_host(daemons, fleet_db, base, "h1")
    h2 = start_host(daemons, fleet_db, base, "h2")
    one = Layout(os.path.join(h1.roots[0], "app"))
    amd = image(one, LINUX_AMD64, "app")
    one.write_index([named(amd, ref="v1")])
    two = Layout(os.path.join(h2.roots[0], "svc"))
    arm = image(two, LINUX_ARM64, "svc")
    two.write_index([named(two.index([{**arm, "platform": LINUX_ARM64}]), ref="v1")])
    wait_converged(fleet_db, "h1", h1)
    wait_converged(fleet_db, "h2", h2)
    layer = base_layer_digest()
    with fleet_api(fleet_db) as fleet:
        found = fleet.find(f"@{layer}")
        assert [(a.host, a.source, a.used_by) for a in found] == [
            ("h1", "layer", [amd["digest"]]),
            ("h2", "layer", [arm["digest"]]),
        ]
        # Every answer as each host's own find gives it, the image fields too.
        for host, daemon in (("h1", h1), ("h2", h2)):
            for ref in (f"@{layer}", ":v1", f"@{amd['digest']}", f"@{arm['digest']}"):
                mine = [
                    {k: v for k, v in a.to_json().items() if k not in ("host", "host_state", "heartbeat_age_s")}
                    for a in fleet.find(ref)
                    if a.host == host
                ]
                assert mine == local_answers(daemon, ref), (host, ref)
        (answer,) = [a for a in fleet.find(f"@{amd['digest']}")]
        assert (answer.layers, answer.created, answer.platform) == (
            2,
            "2025-06-07T08:09:10Z",
            {"os": "linux", "architecture": "amd64", "variant": None},
        )
    monkeypatch.setenv("OCIDX_FLEET_DSN", fleet_db.admin_dsn)
    code, out, err = ocidx(capsys, "find", "--fleet", "--json", f"@{layer}")
    assert code == 0, err
    assert [(a["host"], a["source"]) for a in json.loads(out)] == [("h1", "layer"), ("h2", "layer")]
    # A layout removed takes the graph rows only it named.
    shutil.rmtree(one.path)
    wait_until(lambda: graph_rows(fleet_db, "h1") == [], "h1's graph rows are gone with its layout", CONVERGE_S)
    assert graph_rows(fleet_db, "h2") != []


def test_referrers_across_the_fleet(
    fleet_db: FleetDb,
    daemons: list[Daemon],
    base: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h1 = start_host(daemons, fleet_db, base, "h1")
    h2 = start_host(daemons, fleet_db, base, "h2")
    one = Layout(os.path.join(h1.roots[0], "app"))
    amd = image(one, LINUX_AMD64, "app")
    signed = sbom(one, amd)
    one.write_index([named(amd, ref="v1"), signed])
    two = Layout(os.path.join(h2.roots[0], "copy"))
    image(two, LINUX_AMD64, "app")  # the same image on the second host, signed there by a cosign tag
    signature = image(two, {"os": "", "architecture": ""}, "cosign")
    two.write_index([named(amd, ref="v1"), named(signature, ref=f"sha256-{str(amd['digest']).split(':')[1]}.sig")])
    wait_converged(fleet_db, "h1", h1)
    wait_converged(fleet_db, "h2", h2)
    monkeypatch.setenv("OCIDX_FLEET_DSN", fleet_db.admin_dsn)
    code, out, err = ocidx(capsys, "referrers", "--fleet", "--json", f"@{amd['digest']}")
    assert code == 0, err
    found = json.loads(out)
    assert [(r["host"], r["digest"], r["how"], r["artifactType"], r["subject"]) for r in found] == [
        ("h1", signed["digest"], "subject", "application/spdx+json", amd["digest"]),
        ("h2", signature["digest"], "fallback-tag", OCI_CONFIG, amd["digest"]),
    ]
    assert found[0]["annotations"] == {"org.opencontainers.image.created": "2025-06-07T08:09:10Z"}
    assert list(found[0])[-3:] == ["host", "host_state", "heartbeat_age_s"]


def test_a_hosts_malformed_image_rows_answer_nothing_and_hide_no_other_host(
    fleet_db: FleetDb, daemons: list[Daemon], base: str
) -> None:
    h1 = start_host(daemons, fleet_db, base, "h1")
    h2 = start_host(daemons, fleet_db, base, "h2")
    for daemon, name in ((h1, "a"), (h2, "b")):
        lay = Layout(os.path.join(daemon.roots[0], name))
        lay.write_index([named(image(lay, LINUX_AMD64, "same"), ref="v1")])
    wait_converged(fleet_db, "h1", h1)
    wait_converged(fleet_db, "h2", h2)
    # A host may write its own rows directly: h1 writes nonsense into its image column.
    with psycopg.connect(fleet_db.dsn("h1")) as conn:
        conn.execute('UPDATE entries SET image = \'{"config": 7, "layers": "many"}\'')
    with fleet_api(fleet_db) as fleet:
        answers = {a.host: a for a in fleet.find(":v1")}
    assert set(answers) == {"h1", "h2"}
    assert (answers["h1"].config, answers["h1"].layers) == (None, None)
    assert answers["h2"].layers == 2 and answers["h2"].config is not None
