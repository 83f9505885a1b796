"""The content graph in the index: shared rows once per host, presence per layout, the no-change proof.

Every test indexes real layouts with ``ocidx scan`` (or the scanner's pass) into a real SQLite file
and reads what a later lookup would read.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3

import pytest
from harness import Daemon, wait_for
from layouts import (
    LINUX_AMD64,
    LINUX_ARM64,
    OCI_LAYER,
    OCI_MANIFEST,
    UNKNOWN_PLATFORM,
    Layout,
    canonical_json,
    named,
)

from indexer.cli import main
from indexer.config import Root
from indexer.graph import Known, graph_key, unpack_pairs
from indexer.scan.proof import settled

TYPE_CHECKING = False
if TYPE_CHECKING:
    from layouts import Descriptor

TEN_S = 10_000_000_000


class Index:
    def __init__(self, tmp_path: str, capsys: pytest.CaptureFixture[str]) -> None:
        self.db = os.path.join(tmp_path, "index.db")
        self.root = os.path.join(tmp_path, "root")
        self.capsys = capsys
        os.makedirs(self.root, exist_ok=True)

    def scan(self, *extra: str) -> dict[str, object]:
        self.capsys.readouterr()
        code = main(["scan", "--db", self.db, "--no-progress", "--json", *extra, self.root])
        out, err = self.capsys.readouterr()
        assert code == 0, err
        summary: dict[str, object] = json.loads(out)
        return summary

    def settle(self) -> None:
        """As if the last scan had read everything 10 s later: its identities and listings prove."""
        with sqlite3.connect(self.db) as conn:
            conn.execute(
                "UPDATE layouts SET read_ns = read_ns + ?, blobs_listed_ns = blobs_listed_ns + ?", (TEN_S,) * 2
            )

    def rows(self, sql: str, *args: object) -> list[tuple[object, ...]]:
        with sqlite3.connect(self.db) as conn:
            return conn.execute(sql, args).fetchall()

    def usage(self, layout: Layout) -> dict[str, object]:
        (row,) = self.rows(
            "SELECT g.complete, g.referenced_blobs, g.referenced_bytes, g.missing_blobs, g.unreferenced_blobs, "
            "g.unreferenced_bytes, g.missing FROM layout_graph g JOIN layouts l ON l.id = g.layout_id "
            "WHERE l.path = ?",
            os.path.realpath(layout.path),
        )
        keys = ("complete", "referenced_blobs", "referenced_bytes", "missing_blobs", "unreferenced_blobs")
        found = dict(zip((*keys, "unreferenced_bytes"), row[:6], strict=True))
        found["missing"] = unpack_pairs(row[6])  # type: ignore[arg-type]
        return found


@pytest.fixture
def index(tmp_path: str, capsys: pytest.CaptureFixture[str]) -> Index:
    return Index(str(tmp_path), capsys)


def blob_bytes(layout: Layout) -> dict[str, int]:
    directory = os.path.join(layout.path, "blobs", "sha256")
    return {"sha256:" + name: os.path.getsize(os.path.join(directory, name)) for name in os.listdir(directory)}


def document(layout: Layout, descriptor: Descriptor) -> dict[str, object]:
    with open(layout.blob_path(str(descriptor["digest"])), "rb") as f:
        found: dict[str, object] = json.load(f)
    return found


def test_a_manifest_and_its_config_are_stored_once_for_every_layout_holding_them(index: Index) -> None:
    first, second = Layout(os.path.join(index.root, "first")), Layout(os.path.join(index.root, "second"))
    shared = first.manifest(platform=LINUX_ARM64, label="base")
    assert second.manifest(platform=LINUX_ARM64, label="base") == shared
    first.write_index([named(shared, ref="v1")])
    second.write_index([named(shared, ref="v2"), named(second.manifest(label="own"), ref="own")])
    index.scan()
    rows = index.rows("SELECT digest, kind, config, layer_count, image_size, complete FROM manifests ORDER BY digest")
    assert len(rows) == 2 and [r[1] for r in rows] == ["manifest", "manifest"]
    manifest = document(first, shared)
    config = manifest["config"]
    assert isinstance(config, dict)
    (row,) = [r for r in rows if r[0] == shared["digest"]]
    size = int(str(shared["size"])) + config["size"] + sum(x["size"] for x in manifest["layers"])  # type: ignore[attr-defined]
    assert row[2:] == (config["digest"], 1, size, 1)
    (conf,) = index.rows("SELECT os, architecture, variant, created FROM configs WHERE digest = ?", config["digest"])
    assert conf == ("linux", "arm64", None, None)
    users = index.rows("SELECT layer, manifest FROM layer_users WHERE manifest = ?", graph_key(str(shared["digest"])))
    assert users == [(graph_key(manifest["layers"][0]["digest"]), graph_key(str(shared["digest"])))]  # type: ignore[index]


def test_presence_per_layout_counts_referenced_missing_and_unreferenced(index: Index) -> None:
    lay = Layout(os.path.join(index.root, "lay"))
    image = lay.manifest(platform=LINUX_AMD64, label="image")
    multi = lay.multiarch([LINUX_AMD64, LINUX_ARM64])
    lay.write_index([named(image, ref="v1"), named(multi, ref="v2")])
    arm_child = document(lay, multi)["manifests"][1]  # type: ignore[index]
    lay.remove_blob(document(lay, arm_child)["layers"][0])  # type: ignore[index]  # a partial export
    junk = lay.blob(b"left by an aborted export", OCI_LAYER)
    index.scan()
    sizes = blob_bytes(lay)
    usage = index.usage(lay)
    assert usage["missing"] == [graph_key(document(lay, arm_child)["layers"][0]["digest"])]  # type: ignore[index]
    assert (usage["complete"], usage["missing_blobs"], usage["unreferenced_blobs"]) == (1, 1, 1)
    assert usage["unreferenced_bytes"] == sizes[str(junk["digest"])]
    assert usage["referenced_blobs"] == len(sizes) - 1
    assert usage["referenced_bytes"] == sum(sizes.values()) - sizes[str(junk["digest"])]


def test_a_blob_that_appears_or_disappears_is_not_proven_unchanged(index: Index) -> None:
    lay = Layout(os.path.join(index.root, "lay"))
    image = lay.manifest(label="image")
    lay.write_index([named(image, ref="v1")])
    other = Layout(os.path.join(index.root, "other"))
    other.write_index([named(other.manifest(label="other"), ref="v1")])
    index.scan()
    index.settle()
    roots = [Root(index.root)]
    assert settled(index.db, roots) == (2, 0)
    junk = lay.blob(b"a blob nothing lists", OCI_LAYER)  # index.json untouched
    assert settled(index.db, roots) is None
    summary = index.scan()
    assert (summary["changed"], summary["unchanged"]) == (1, 1)
    assert index.usage(lay)["unreferenced_blobs"] == 1
    index.settle()
    assert settled(index.db, roots) == (2, 0)
    lay.remove_blob(junk)
    config = document(lay, image)["config"]
    lay.remove_blob(config)  # type: ignore[arg-type]
    assert settled(index.db, roots) is None
    index.scan()
    usage = index.usage(lay)
    assert (usage["unreferenced_blobs"], usage["missing"]) == (0, [graph_key(config["digest"])])  # type: ignore[index]


def test_a_new_blobs_algorithm_directory_for_a_referenced_digest_is_seen(index: Index) -> None:
    lay = Layout(os.path.join(index.root, "lay"))
    data = b"a sha512 layer"
    import hashlib

    digest = "sha512:" + hashlib.sha512(data).hexdigest()
    config = lay.blob(canonical_json(LINUX_AMD64), "application/vnd.oci.image.config.v1+json")
    layer = {"mediaType": OCI_LAYER, "digest": digest, "size": len(data)}
    manifest = lay.blob(
        canonical_json({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": [layer]}),
        OCI_MANIFEST,
    )
    lay.write_index([named(manifest, ref="v1")])
    index.scan()
    assert index.usage(lay)["missing"] == [graph_key(digest)]
    index.settle()
    assert settled(index.db, [Root(index.root)]) == (1, 0)
    os.makedirs(os.path.join(lay.path, "blobs", "sha512"))
    with open(lay.blob_path(digest), "wb") as f:
        f.write(data)
    assert settled(index.db, [Root(index.root)]) is None
    index.scan()
    assert index.usage(lay)["missing"] == []


def test_a_layout_removed_takes_the_rows_only_it_referenced(index: Index) -> None:
    keep, drop = Layout(os.path.join(index.root, "keep")), Layout(os.path.join(index.root, "drop"))
    shared = keep.manifest(label="shared")
    drop.manifest(label="shared")
    only = drop.multiarch([LINUX_AMD64, LINUX_ARM64])
    keep.write_index([named(shared, ref="v1")])
    drop.write_index([named(shared, ref="v1"), named(only, ref="v2")])
    index.scan()
    assert len(index.rows("SELECT 1 FROM manifests")) == 4  # shared, the index, its two children
    assert len(index.rows("SELECT 1 FROM configs")) == 3
    (epoch,) = index.rows("SELECT value FROM ocidx_counters WHERE name = 'graph_epoch'")
    shutil.rmtree(drop.path)
    index.scan()
    assert index.rows("SELECT digest FROM manifests") == [(shared["digest"],)]
    assert len(index.rows("SELECT 1 FROM configs")) == 1
    assert len(index.rows("SELECT 1 FROM layer_users")) == 1
    assert index.rows("SELECT value FROM ocidx_counters WHERE name = 'graph_epoch'") == [(int(str(epoch[0])) + 1,)]
    keep.write_index([])  # an index.json that drops its last image
    index.scan()
    assert index.rows("SELECT count(*) FROM manifests") == [(0,)]
    assert index.rows("SELECT count(*) FROM configs") == [(0,)]


def test_a_hostile_copy_of_a_manifest_poisons_no_other_layout(index: Index) -> None:
    bad = Layout(os.path.join(index.root, "bad"))
    image = bad.manifest(platform=LINUX_ARM64, label="shared")
    with open(bad.blob_path(str(image["digest"])), "r+b") as f:
        f.write(b" ")  # same size, other bytes: its hash no longer matches
    bad.write_index([named(image, ref="v1")])
    index.scan()
    assert index.rows("SELECT count(*) FROM manifests") == [(0,)]  # refused: nothing of it is kept
    assert index.usage(bad)["complete"] == 0
    (warnings,) = index.rows("SELECT group_concat(message, '|') FROM layout_warnings")
    assert "does not match its digest" in str(warnings[0])
    index.settle()  # the bad layout is not read again below: its index.json and blobs/ are as they were
    good = Layout(os.path.join(index.root, "good"))
    good.manifest(platform=LINUX_ARM64, label="shared")
    good.write_index([named(image, ref="v1")])
    index.scan()
    (row,) = index.rows("SELECT config, complete FROM manifests WHERE digest = ?", image["digest"])
    assert row == (document(good, image)["config"]["digest"], 1)  # type: ignore[index]
    assert index.usage(good)["complete"] == 1 and index.usage(bad)["complete"] == 0


def test_blobs_that_are_not_files_are_warned_about_and_not_counted(index: Index, tmp_path: str) -> None:
    lay = Layout(os.path.join(index.root, "lay"))
    lay.write_index([named(lay.manifest(), ref="v1")])
    store = os.path.join(lay.path, "blobs", "sha256")
    os.mkfifo(os.path.join(store, "1" * 64))
    os.mkdir(os.path.join(store, "2" * 64))
    outside = os.path.join(str(tmp_path), "outside")
    with open(outside, "w") as f:
        f.write("x")
    os.symlink(outside, os.path.join(store, "3" * 64))
    index.scan()
    assert index.usage(lay)["unreferenced_blobs"] == 0
    messages = str(index.rows("SELECT group_concat(message, '|') FROM layout_warnings")[0][0])
    assert "is a FIFO" in messages and "is a directory" in messages and "symlink leading outside" in messages


def test_attestation_links_and_subjects_are_stored_with_their_index(index: Index) -> None:
    lay = Layout(os.path.join(index.root, "lay"))
    amd = lay.manifest(platform=LINUX_AMD64, label="app")
    attestation = lay.manifest(
        platform=UNKNOWN_PLATFORM,
        label="attestation of app",
    )
    attestation = {
        **attestation,
        "annotations": {
            "vnd.docker.reference.digest": str(amd["digest"]),
            "vnd.docker.reference.type": "attestation-manifest",
        },
    }
    image = lay.index([amd, attestation])
    empty = lay.blob(b"{}", "application/vnd.oci.empty.v1+json")
    signature = lay.blob(
        canonical_json(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "artifactType": "application/vnd.dev.sigstore.bundle.v0.3+json",
                "config": empty,
                "layers": [lay.blob(b"bundle", "application/vnd.dev.sigstore.bundle.v0.3+json")],
                "subject": image,
            }
        ),
        OCI_MANIFEST,
    )
    lay.write_index([named(image, ref="v1"), signature])
    index.scan()
    assert index.rows("SELECT digest, target FROM attestations") == [(attestation["digest"], amd["digest"])]
    assert index.rows("SELECT digest FROM manifests WHERE subject = ?", image["digest"]) == [(signature["digest"],)]
    (kind,) = index.rows("SELECT kind, artifact_type FROM manifests WHERE digest = ?", image["digest"])
    assert kind == ("index", "")


def test_a_pass_with_worker_processes_stores_every_shared_row_once(index: Index) -> None:
    """Workers send each shared row once per pass and claim it after: none may be lost."""
    for n in range(150):  # more than POOL_MIN_LAYOUTS: read by the worker processes
        lay = Layout(os.path.join(index.root, f"l{n:03d}"))
        shared = lay.manifest(platform=LINUX_AMD64, label=f"shared-{n % 7}")
        own = lay.manifest(platform=LINUX_ARM64, label=f"own-{n}")
        lay.write_index([named(shared, ref="base"), named(own, ref="own")])
    config = os.path.join(os.path.dirname(index.root), "config.toml")
    with open(config, "w") as f:
        f.write("[daemon]\nworkers = 2\nbatch_size = 20\n")
    index.scan("--config", config)
    referenced = {row[0] for row in index.rows("SELECT digest FROM entries UNION SELECT digest FROM children")}
    stored = {row[0] for row in index.rows("SELECT digest FROM manifests")}
    assert referenced <= stored
    assert len(index.rows("SELECT 1 FROM manifests")) == len(referenced)
    configs = {row[0] for row in index.rows("SELECT config FROM manifests WHERE config IS NOT NULL")}
    assert configs == {row[0] for row in index.rows("SELECT digest FROM configs")}


def test_a_layout_indexed_before_the_graph_existed_is_read_again(index: Index) -> None:
    lay = Layout(os.path.join(index.root, "lay"))
    lay.write_index([named(lay.manifest(), ref="v1")])
    index.scan()
    index.settle()
    with sqlite3.connect(index.db) as conn:  # what the migration leaves on a database of an older ocidx
        conn.execute("UPDATE layouts SET blobs_dir = NULL, graph_hash = NULL")
        conn.execute("DELETE FROM layout_graph")
        conn.execute("DELETE FROM manifests")
    assert settled(index.db, [Root(index.root)]) is None
    summary = index.scan()
    assert summary["changed"] == 1
    assert len(index.rows("SELECT 1 FROM manifests")) == 1 and len(index.rows("SELECT 1 FROM layout_graph")) == 1


def test_only_presence_changed_rewrites_the_graph_and_keeps_the_entries(index: Index) -> None:
    lay = Layout(os.path.join(index.root, "lay"))
    lay.write_index([named(lay.manifest(), ref="v1")])
    index.scan()
    before = index.rows("SELECT id, row_key FROM entries")
    (version,) = index.rows("SELECT version FROM layouts")
    lay.blob(b"junk", OCI_LAYER)
    index.scan()
    assert index.rows("SELECT id, row_key FROM entries") == before
    assert index.usage(lay)["unreferenced_blobs"] == 1
    assert index.rows("SELECT version FROM layouts")[0][0] > version[0]  # type: ignore[operator]


def test_a_touch_of_blobs_alone_refreshes_the_identity_only(index: Index) -> None:
    lay = Layout(os.path.join(index.root, "lay"))
    lay.write_index([named(lay.manifest(), ref="v1")])
    index.scan()
    (version,) = index.rows("SELECT version FROM layouts")
    tmp = os.path.join(lay.path, "blobs", "sha256", "tmp-upload")
    with open(tmp, "w") as f:
        f.write("partial")
    os.remove(tmp)  # the directory changed; what it holds did not
    index.scan()
    assert index.rows("SELECT version FROM layouts") == [version]
    (identity,) = index.rows("SELECT blobs_mtime_ns FROM layouts")
    assert identity[0] == os.stat(os.path.join(lay.path, "blobs", "sha256")).st_mtime_ns


def test_a_read_claiming_shared_rows_that_are_gone_is_read_again(index: Index) -> None:
    """A worker claims rows it sent earlier in its pass; if a GC removed them since, the read is a
    conflict (read again, rows sent), never stored with its manifests missing."""
    from indexer.config import Config
    from indexer.scan import workers
    from indexer.scan.decide import decide
    from indexer.store import open_writer
    from indexer.store import read as db
    from indexer.store.write import apply

    lay = Layout(os.path.join(index.root, "lay"))
    image = lay.manifest(platform=LINUX_AMD64)
    lay.write_index([named(image, ref="v1")])
    config = Config()
    # What a worker sends once it has sent this layout's shared rows with an earlier layout: claims only.
    known = Known()
    workers.read_batch([os.path.realpath(lay.path)], config.familiar, config.limits, known)
    (result,) = workers.read_batch([os.path.realpath(lay.path)], config.familiar, config.limits, known)
    rows = result[3]
    assert rows[6][3][0] == [] and rows[6][4]  # type: ignore[index]  # no manifests row, claims instead
    conn = open_writer(index.db)
    try:
        outcome = decide(result, None, full=False, epoch=None)
        applied = apply(conn, [outcome])  # type: ignore[list-item]
        assert applied.conflicts == [os.path.realpath(lay.path)] and not applied.written
        assert db.layout(conn, os.path.realpath(lay.path)) is None
        (fresh,) = workers.read_batch([os.path.realpath(lay.path)], config.familiar, config.limits)
        applied = apply(conn, [decide(fresh, None, full=False)])  # type: ignore[list-item]
        assert applied.written and not applied.conflicts
        assert conn.execute("SELECT digest FROM manifests").fetchall() == [(image["digest"],)]
        # Claims of rows that are stored are founded, whatever the epoch says.
        again = decide(result, db.layout(conn, os.path.realpath(lay.path)), full=True, epoch=None)
        assert apply(conn, [again]).written  # type: ignore[list-item]
    finally:
        conn.close()


@pytest.mark.integration
@pytest.mark.skipif(not os.path.isdir("/proc/sys/fs/inotify"), reason="needs Linux inotify")
def test_the_daemon_indexes_a_blob_that_appears_or_disappears(tmp_path: str) -> None:
    """index.json untouched: the watch on blobs/ALG is what tells the daemon (its racy re-check and
    reconcile come later than this test waits)."""
    root = os.path.join(str(tmp_path), "root")
    lay = Layout(os.path.join(root, "lay"))
    image = lay.manifest(platform=LINUX_AMD64)
    lay.write_index([named(image, ref="v1")])
    db = os.path.join(str(tmp_path), "index.db")

    def usage() -> tuple[object, ...] | None:
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
                row = conn.execute("SELECT unreferenced_blobs, missing_blobs FROM layout_graph").fetchone()
        except sqlite3.Error:
            return None
        return tuple(row) if row is not None else None

    with Daemon(str(tmp_path), [root], db=db).start() as daemon:
        wait_for(lambda: usage() == (0, 0) or daemon.exited(), "the layout is indexed with its graph", 20.0)
        lay.blob(b"a blob nothing lists", OCI_LAYER)
        wait_for(lambda: usage() == (1, 0) or daemon.exited(), "an unreferenced blob added is counted", 2.0)
        config_digest = document(lay, image)["config"]["digest"]  # type: ignore[index]
        os.remove(lay.blob_path(str(config_digest)))
        wait_for(lambda: usage() == (1, 1) or daemon.exited(), "a referenced blob removed is missing", 2.0)
        assert daemon.stop() == 0
