"""The content graph across the fleet: real daemons publishing as real PostgreSQL roles (docs/fleet.md).

``find --fleet @DIGEST`` of a layer or a config, ``referrers --fleet``, the image fields of fleet
answers: on every host, what the fleet answers for that host equals what the host's own ``find`` and
``referrers`` answer. A host's graph rows are its own (they go with the last of its layouts naming
them, and never answer for another host's layouts), and a host's malformed graph rows are dropped
with a warning naming it, hiding no other host's answers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from cli_run import ocidx
from fleet_hosts import CONVERGE_S, fleet_api, local_answers, start_host, wait_converged
from harness import REPO, Daemon, wait_for
from layouts import (
    LINUX_AMD64,
    LINUX_ARM64,
    OCI_CONFIG,
    OCI_MANIFEST,
    UNKNOWN_PLATFORM,
    Layout,
    built_image,
    document,
    named,
    referrer,
    with_platform,
)
from needs import module
from pg_cluster import FleetDb, admin_connect

from indexer.config import Config
from indexer.query import Index

psycopg = module("psycopg", "pip install 'ocidx[fleet]'")

pytestmark = [pytest.mark.fleet, pytest.mark.integration]

TYPE_CHECKING = False
if TYPE_CHECKING:
    from layouts import Descriptor

BASE_LAYER = b"a base layer every host holds"
BASE = "sha256:" + hashlib.sha256(BASE_LAYER).hexdigest()
SBOM = "application/spdx+json"
HOST_KEYS = ("host", "host_state", "heartbeat_age_s")


def own(answers: list[dict[str, object]], host: str) -> list[dict[str, object]]:
    """The answers of *host*, without the keys the fleet adds."""
    return [{k: v for k, v in a.items() if k not in HOST_KEYS} for a in answers if a["host"] == host]


def local_referrers(daemon: Daemon, target: str) -> list[dict[str, object]]:
    """What ``referrers TARGET`` answers on the host itself (nothing when nothing refers to it)."""
    with Index(daemon.db, config=Config()) as index:
        return [r.to_json() for r in index.referrers(target)]


def graph_digests(fleet_db: FleetDb, host: str) -> list[str]:
    """The digests of the host's rows in graph_manifests."""
    with admin_connect(fleet_db.admin_dsn) as conn:
        rows = conn.execute("SELECT digest FROM graph_manifests WHERE host = %s ORDER BY digest", (host,))
        return [str(row[0]) for row in rows.fetchall()]


def attested(layout: Layout, images: list[Descriptor]) -> Descriptor:
    """A BuildKit-style index: *images* with their platforms and an attestation manifest for each."""
    listed = [with_platform(image, LINUX_AMD64 if n == 0 else LINUX_ARM64) for n, image in enumerate(images)]
    for image in images:
        statement = built_image(layout, UNKNOWN_PLATFORM, f"provenance {image['digest']}", [b"in-toto"])
        listed.append(
            {
                **with_platform(statement, UNKNOWN_PLATFORM),
                "annotations": {
                    "vnd.docker.reference.digest": str(image["digest"]),
                    "vnd.docker.reference.type": "attestation-manifest",
                },
            }
        )
    return layout.index(listed)


def test_the_fleet_finds_a_layer_and_a_config_on_every_host_as_each_host_does(
    fleet_db: FleetDb,
    daemons: list[Daemon],
    base: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h1 = start_host(daemons, fleet_db, base, "h1")
    h2 = start_host(daemons, fleet_db, base, "h2")
    app = Layout(os.path.join(h1.roots[0], "app"))
    amd = built_image(app, LINUX_AMD64, "app", [BASE_LAYER, b"app"])
    app.write_index([named(amd, ref="v1")])
    copy = Layout(os.path.join(h1.roots[0], "copy"))  # the same image in a second layout of h1
    built_image(copy, LINUX_AMD64, "app", [BASE_LAYER, b"app"])
    copy.write_index([named(amd, ref="v1")])
    svc = Layout(os.path.join(h2.roots[0], "svc"))
    arm = built_image(svc, LINUX_ARM64, "svc", [BASE_LAYER, b"svc"])
    svc.write_index([named(svc.index([with_platform(arm, LINUX_ARM64)]), ref="v1")])
    partial = Layout(os.path.join(h2.roots[0], "partial"))  # an export that left the base layer out
    lean = built_image(partial, LINUX_AMD64, "lean", [BASE_LAYER, b"lean"])
    partial.write_index([named(lean, ref="v2")])
    partial.remove_blob(document(partial, lean)["layers"][0])
    wait_converged(fleet_db, "h1", h1)
    wait_converged(fleet_db, "h2", h2)

    config = str(document(app, amd)["config"]["digest"])
    refs = [f"@{BASE}", f"@{config}", ":v1", ":v2", f"@{amd['digest']}", f"@{arm['digest']}", f"@{lean['digest']}"]
    with fleet_api(fleet_db) as fleet:
        found = fleet.find(f"@{BASE}")
        assert [(a.host, a.layout, a.source, a.used_by) for a in found] == [
            ("h1", app.path, "layer", [amd["digest"]]),
            ("h1", copy.path, "layer", [amd["digest"]]),
            ("h2", partial.path, "layer", [lean["digest"]]),
            ("h2", svc.path, "layer", [arm["digest"]]),
        ]
        assert found.warnings == []
        # Every answer, on every host, as the host's own find gives it: the image fields, the layer
        # and config answers, the partial export's warning.
        for ref in refs:
            answers = [a.to_json() for a in fleet.find(ref)]
            for host, daemon in (("h1", h1), ("h2", h2)):
                assert own(answers, host) == local_answers(daemon, ref), (host, ref)
        (image,) = fleet.find(f"@{arm['digest']}")
        assert (image.source, image.layers, image.created, image.to_json()["platform"]) == (
            "child",
            2,
            "2025-03-04T05:06:07Z",
            {"os": "linux", "architecture": "arm64", "variant": None},
        )
        (lacking,) = [a for a in found if a.layout == partial.path]
        assert lacking.warnings == [f"{BASE} is not in {partial.path}/blobs (a partial export?)"]
        assert [(a.host, a.source, a.used_by) for a in fleet.find(f"@{config}")] == [
            ("h1", "config", [amd["digest"]]),
            ("h1", "config", [amd["digest"]]),
        ]

    monkeypatch.setenv("OCIDX_FLEET_DSN", fleet_db.admin_dsn)
    code, out, err = ocidx(capsys, "find", "--fleet", "--json", f"@{BASE}")
    assert code == 0, err
    assert [(a["host"], a["source"]) for a in json.loads(out)] == [("h1", "layer")] * 2 + [("h2", "layer")] * 2

    # The graph's rows go with the last layout of the host that names them, and only the host's.
    both = graph_digests(fleet_db, "h1")
    assert amd["digest"] in both
    shutil.rmtree(copy.path)
    wait_converged(fleet_db, "h1", h1)
    assert graph_digests(fleet_db, "h1") == both
    shutil.rmtree(app.path)
    wait_for(lambda: graph_digests(fleet_db, "h1") == [], "h1's graph rows go with its last layout", CONVERGE_S)
    with fleet_api(fleet_db) as fleet:
        assert [a.host for a in fleet.find(f"@{BASE}")] == ["h2", "h2"]
    assert arm["digest"] in graph_digests(fleet_db, "h2")


def test_referrers_across_the_fleet_as_each_host_finds_them(
    fleet_db: FleetDb,
    daemons: list[Daemon],
    base: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h1 = start_host(daemons, fleet_db, base, "h1")
    h2 = start_host(daemons, fleet_db, base, "h2")
    app = Layout(os.path.join(h1.roots[0], "app"))
    amd = built_image(app, LINUX_AMD64, "app", [b"app"])
    sbom = referrer(app, amd, SBOM, b"spdx", **{"org.opencontainers.image.created": "2025-06-07T08:09:10Z"})
    app.write_index([named(amd, ref="v1"), sbom])  # the OCI layout way: the referrer listed in index.json
    buildx = Layout(os.path.join(h1.roots[0], "buildx"))
    arm = built_image(buildx, LINUX_ARM64, "arm", [b"arm"])
    built_image(buildx, LINUX_AMD64, "app", [b"app"])
    buildx.write_index([named(attested(buildx, [amd, arm]), ref="latest")])
    copy = Layout(os.path.join(h2.roots[0], "copy"))  # the same image on h2, signed there by cosign's tags
    built_image(copy, LINUX_AMD64, "app", [b"app"])
    hexes = str(amd["digest"]).split(":")[1]
    signature = built_image(copy, {"os": "", "architecture": ""}, "cosign signature", [b"sig"])
    spdx = referrer(copy, amd, SBOM, b"spdx on h2")
    copy.write_index(
        [
            named(amd, ref="v1"),
            named(signature, ref=f"sha256-{hexes}.sig"),
            named(copy.index([spdx]), ref=f"sha256-{hexes}"),  # the OCI fallback: an index of the referrers
        ]
    )
    wait_converged(fleet_db, "h1", h1)
    wait_converged(fleet_db, "h2", h2)

    with fleet_api(fleet_db) as fleet:
        for target in (f"@{amd['digest']}", f"@{arm['digest']}", ":v1", ":latest", f"@{sbom['digest']}"):
            found = [r.to_json() for r in fleet.referrers(target)]
            for host, daemon in (("h1", h1), ("h2", h2)):
                if target.startswith(":"):  # a name: its digests on every host, as find --fleet finds them
                    digests = {a.digest for a in fleet.find(target)}
                    mine = [r for d in sorted(digests) for r in local_referrers(daemon, f"@{d}")]
                    mine.sort(key=lambda r: (r["layout"], r["subject"], r["how"], r["digest"]))
                else:
                    mine = local_referrers(daemon, target)
                assert own(found, host) == mine, (host, target)
        by_amd = fleet.referrers(f"@{amd['digest']}")
        assert [(r.host, r.layout, r.digest, r.how) for r in by_amd] == sorted(
            [
                ("h1", app.path, sbom["digest"], "subject"),
                ("h1", buildx.path, next(iter(attestation_of(buildx, amd))), "attestation"),
                ("h2", copy.path, signature["digest"], "fallback-tag"),
                ("h2", copy.path, spdx["digest"], "fallback-tag"),
                ("h2", copy.path, spdx["digest"], "subject"),
            ],
            key=lambda r: (r[0], r[1], r[3], r[2]),
        )
        assert by_amd.subjects == [amd["digest"]] and by_amd.warnings == []

    monkeypatch.setenv("OCIDX_FLEET_DSN", fleet_db.admin_dsn)
    code, out, err = ocidx(capsys, "referrers", "--fleet", "--json", f"@{amd['digest']}")
    assert code == 0, err
    documents = json.loads(out)
    assert [list(d) for d in documents] == [
        ["layout", "digest", "mediaType", "artifactType", "subject", "annotations", "how", *HOST_KEYS]
    ] * 5
    assert documents[0]["annotations"] == {"org.opencontainers.image.created": "2025-06-07T08:09:10Z"}
    assert documents[0]["artifactType"] == SBOM
    assert {d["artifactType"] for d in documents if d["how"] == "attestation"} == {OCI_CONFIG}
    # An oci-layout:// target is resolved in the local index (--db), then looked for on every host.
    code, out, err = ocidx(capsys, "referrers", "--fleet", "--db", h1.db, "--json", f"oci-layout://{app.path}:v1")
    assert code == 0, err
    assert [(d["host"], d["digest"], d["how"]) for d in json.loads(out)] == [
        (d["host"], d["digest"], d["how"]) for d in documents
    ]
    code, out, _err = ocidx(capsys, "referrers", "--fleet", f"@{amd['digest']}")
    assert out.splitlines()[0].split("\t") == [
        "h1",
        app.path,
        str(sbom["digest"]),
        SBOM,
        "subject",
        str(amd["digest"]),
        "live",
    ]
    code, _out, err = ocidx(capsys, "referrers", "--fleet", f"@{spdx['digest']}")
    assert code == 1 and "nothing refers to" in err and "on any host of the fleet" in err
    code, _out, err = ocidx(capsys, "referrers", "--fleet", "nosuch:1")
    assert code == 1 and "not found on any host of the fleet" in err


def attestation_of(layout: Layout, image: Descriptor) -> list[str]:
    """The digests of the attestation manifests the layout's index lists for *image*."""
    with open(layout.index_path, encoding="utf-8") as f:
        (entry,) = json.load(f)["manifests"]
    listed = document(layout, entry)["manifests"]
    return [
        str(d["digest"])
        for d in listed
        if d.get("annotations", {}).get("vnd.docker.reference.digest") == str(image["digest"])
    ]


def test_a_hosts_malformed_graph_rows_are_dropped_with_a_warning_and_hide_no_other_host(
    fleet_db: FleetDb,
    daemons: list[Daemon],
    base: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h1 = start_host(daemons, fleet_db, base, "h1")
    app = Layout(os.path.join(h1.roots[0], "app"))
    amd = built_image(app, LINUX_AMD64, "app", [BASE_LAYER, b"app"])
    sbom = referrer(app, amd, SBOM, b"spdx")
    app.write_index([named(amd, ref="v1"), sbom])
    wait_converged(fleet_db, "h1", h1)

    # Mallory, a registered host, sends rows about h1's image and base layer the only way it can:
    # through the publishing functions, which keep it to its own rows but do not judge them.
    mallory = fleet_db.add_host("mallory")
    good = "sha256:" + "1" * 64
    bad_image = "sha256:" + "2" * 64
    bad_layers = "sha256:" + "3" * 64
    bad_notes = "sha256:" + "4" * 64
    image = {"config": None, "layers": 2, "image_size": None, "created": None, "platform": None}
    entries = [
        [1, 0, good, OCI_MANIFEST, 10, None, "{}", None, None, json.dumps(image)],
        [2, 0, bad_image, OCI_MANIFEST, 10, None, "{}", None, None, json.dumps({**image, "config": 7})],
        [3, 0, bad_layers, OCI_MANIFEST, 10, None, "{}", None, None, None],
        [4, 0, bad_notes, OCI_MANIFEST, 10, None, "{}", None, None, None],
        [5, 0, "sha256:../../etc/passwd", OCI_MANIFEST, 10, None, "{}", None, None, None],
    ]
    names = [[lid, 0, 0, "", tag, "tag-only"] for lid, tag in ((1, "v1"), (2, "v1"), (5, f"sha256-{amd_hex(amd)}"))]
    manifests = [
        [good, "", None, None, None, None, None, [BASE], ["application/octet-stream"], [len(BASE_LAYER)]],
        [bad_layers, "", None, None, None, None, None, [BASE], [], []],  # BASE's media type and size lost
        [bad_notes, SBOM, str(amd["digest"]), "[1, 2]", None, None, None, [], [], []],  # a referrer of h1's image
    ]
    with psycopg.connect(mallory, autocommit=True) as conn, conn.transaction():
        conn.execute(
            "SELECT ocidx.put_layouts(%s::bigint[], %s::bytea[], %s::bigint[], %s::text[], %s::text[], %s::text[], "
            "%s::text[], %s::integer[])",
            (
                [1, 2, 3, 4, 5],
                [f"/srv/mallory/{n}".encode() for n in range(1, 6)],
                [1] * 5,
                ["ok"] * 5,
                [None] * 5,
                [None] * 5,
                [None] * 5,
                [1] * 5,
            ),
        )
        conn.execute("SELECT ocidx.put_rows(%s, %s, '[]', '[]')", (json.dumps(entries), json.dumps(names)))
        conn.execute("SELECT ocidx.put_graph(%s, '[]', '[]', '{}')", (json.dumps(manifests),))
        conn.execute("SELECT ocidx.beat(0, 1, 1, 'mallory-index')")
    monkeypatch.setenv("OCIDX_FLEET_DSN", fleet_db.add_reader("dash"))

    # By tag: h1's answer as h1's own; mallory's good row answered with its image, the bad image dropped.
    code, out, err = ocidx(capsys, "find", "--fleet", "--json", ":v1")
    assert code == 0, err
    answers = json.loads(out)
    assert own(answers, "h1") == local_answers(h1, ":v1")
    assert [(a["layout"], a["layers"]) for a in answers if a["host"] == "mallory"] == [("/srv/mallory/1", 2)]
    assert "ocidx: warning: host mallory: 1 malformed row dropped (the first: entries: image config" in err
    assert "h1" not in err

    # A layer: h1's answer stands; mallory's use with lost types and sizes is dropped, said so.
    code, out, err = ocidx(capsys, "find", "--fleet", "--json", f"@{BASE}")
    assert code == 0, err
    assert own(json.loads(out), "h1") == local_answers(h1, f"@{BASE}")
    assert [(a["host"], a["layout"]) for a in json.loads(out) if a["host"] == "mallory"] == [
        ("mallory", "/srv/mallory/1")
    ]
    assert "host mallory: 1 malformed row dropped (the first: graph_manifests: the layer's mediaType" in err

    # Referrers: h1's as h1's own; mallory's referrer with annotations that are not an object, and its
    # fallback-tagged entry whose digest is not one, are dropped.
    code, out, err = ocidx(capsys, "referrers", "--fleet", "--json", f"@{amd['digest']}")
    assert code == 0, err
    assert own(json.loads(out), "h1") == local_referrers(h1, f"@{amd['digest']}")
    assert [r["host"] for r in json.loads(out)] == ["h1"]
    assert "host mallory: 2 malformed rows dropped (the first: " in err

    # The same from processes of their own: exit codes, and no traceback anywhere.
    for argv in (["find", "--fleet", f"@{BASE}"], ["referrers", "--fleet", f"@{amd['digest']}"]):
        done = subprocess.run(
            [sys.executable, "-m", "indexer", *argv], capture_output=True, text=True, cwd=REPO, timeout=60
        )
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr and "host mallory" in done.stderr


def amd_hex(image: Descriptor) -> str:
    return str(image["digest"]).split(":")[1]


def test_the_python_example_of_docs_fleet_runs_as_written(fleet_db: FleetDb, daemons: list[Daemon], base: str) -> None:
    """docs/fleet.md's example of the Python API, run as a reader in a process of its own."""
    with open(os.path.join(REPO, "docs", "fleet.md"), encoding="utf-8") as fh:
        (example,) = re.findall(r"^```python\n(.*?)^```$", fh.read(), re.S | re.M)
    h1 = start_host(daemons, fleet_db, base, "h1")
    app = Layout(os.path.join(h1.roots[0], "app"))
    image = built_image(app, LINUX_AMD64, "alpine", [BASE_LAYER])
    sbom = referrer(app, image, SBOM, b"spdx")
    app.write_index([named(image, ref="3.16", containerd="docker.io/library/alpine:3.16"), sbom])
    wait_converged(fleet_db, "h1", h1)
    done = subprocess.run(
        [sys.executable, "-c", example],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        env={**os.environ, "OCIDX_FLEET_DSN": fleet_db.add_reader("dash")},
    )
    assert done.returncode == 0, done.stderr
    with Index(h1.db, config=Config()) as index:
        (mine,) = index.find("alpine:3.16")
    assert mine.config == document(app, image)["config"]["digest"] and mine.image_size
    assert done.stdout.splitlines() == [
        f"h1 live {app.path} {image['digest']} {mine.layers} {mine.image_size}",
        f"h1 {app.path} config ['{image['digest']}']",
        f"h1 subject {SBOM} {sbom['digest']}",
        "h1 live 1",
    ]
