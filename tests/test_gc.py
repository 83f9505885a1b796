"""``ocidx gc``: unreferenced blobs, listed and removed beside live writers (indexer/gc.py, docs/semantics.md)."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import textwrap
import time

import pytest
from layouts import (
    LINUX_AMD64,
    LINUX_ARM64,
    OCI_INDEX,
    OCI_LAYER,
    OCI_MANIFEST,
    Layout,
    canonical_json,
    digest_of,
    named,
)

from indexer.cli import main
from indexer.errors import LayoutBusy, LayoutUnreadable
from indexer.gc import LOCK_FILE, collect
from indexer.watch.inotify import IN_OPEN, Inotify

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

    from layouts import Descriptor

HOUR = 3600


def age(layout: Layout, descriptor: Descriptor, seconds: float = 2 * HOUR) -> None:
    """Make a blob look written *seconds* ago."""
    when = time.time() - seconds
    os.utime(layout.blob_path(str(descriptor["digest"])), (when, when))


def age_all(layout: Layout, seconds: float = 2 * HOUR) -> None:
    directory = os.path.join(layout.path, "blobs", "sha256")
    when = time.time() - seconds
    for name in os.listdir(directory):
        os.utime(os.path.join(directory, name), (when, when), follow_symlinks=False)


def blobs_of(layout: Layout) -> set[str]:
    return {"sha256:" + name for name in os.listdir(os.path.join(layout.path, "blobs", "sha256"))}


def closure(layout: Layout, descriptor: Descriptor) -> set[str]:
    """The digests an image references, its own included (read from the blobs themselves)."""
    digest = str(descriptor["digest"])
    found = {digest}
    with open(layout.blob_path(digest), "rb") as f:
        document = json.load(f)
    for child in document.get("manifests") or ():
        found |= closure(layout, child)
    if "config" in document:
        found.add(document["config"]["digest"])
    found |= {layer["digest"] for layer in document.get("layers") or ()}
    return found


def run(*args: str, capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    """``ocidx gc ARGS --json``, which must exit 0: its document."""
    capsys.readouterr()
    code = main(["gc", *args, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    result: dict[str, object] = json.loads(out)
    return result


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return Layout(tmp_path / "layout")


def built(layout: Layout) -> tuple[set[str], list[Descriptor]]:
    """A layout with a single image, a two-platform index and old and young garbage: (kept, garbage)."""
    single = layout.manifest(platform=LINUX_AMD64, label="single")
    multi = layout.multiarch([LINUX_AMD64, LINUX_ARM64])
    layout.write_index([named(single, ref="v1"), named(multi, ref="v2")])
    referenced = closure(layout, single) | closure(layout, multi)
    old = [layout.blob(b"old garbage %d" % i, OCI_LAYER) for i in range(3)]
    old.append(layout.manifest(label="an image whose entry was removed"))
    age_all(layout)
    layout.blob(b"young garbage", OCI_LAYER)  # just written: a writer may be about to list it
    return referenced, old


def test_gc_lists_what_nothing_references_and_changes_nothing(
    layout: Layout, capsys: pytest.CaptureFixture[str]
) -> None:
    referenced, old = built(layout)
    before = blobs_of(layout)
    garbage = {str(d["digest"]) for d in old[:3]} | closure(layout, old[3])
    result = run(layout.path, capsys=capsys)
    assert {b["digest"] for b in result["blobs"]} == garbage  # type: ignore[attr-defined]
    assert result["kept_young"] == 1 and result["deleted"] == 0 and result["unproven"] == []
    assert result["bytes"] == sum(os.path.getsize(layout.blob_path(d)) for d in garbage)
    assert all(b["age_s"] >= 2 * HOUR - 60 for b in result["blobs"])  # type: ignore[attr-defined]
    assert blobs_of(layout) == before and referenced <= before


def test_gc_delete_removes_old_garbage_and_keeps_the_rest(layout: Layout, capsys: pytest.CaptureFixture[str]) -> None:
    referenced, old = built(layout)
    garbage = {str(d["digest"]) for d in old[:3]} | closure(layout, old[3])
    result = run(layout.path, "--delete", capsys=capsys)
    assert result["deleted"] == len(garbage)
    assert isinstance(result["lock_held_s"], float) and result["lock_held_s"] < 1
    left = blobs_of(layout)
    assert referenced <= left and not (garbage & left)
    assert len(left - referenced) == 1  # the young one
    assert not os.path.lexists(os.path.join(layout.path, LOCK_FILE))  # removed after the hold, as BuildKit does
    again = run(layout.path, "--delete", "--grace", "0", capsys=capsys)
    assert (again["deleted"], again["kept_young"]) == (1, 0)
    assert blobs_of(layout) == referenced


def test_grace_comes_from_the_config(layout: Layout, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    built(layout)
    config = tmp_path / "config.toml"
    config.write_text("[gc]\ngrace_s = 10800\n")  # three hours: even the old garbage is young
    result = run(layout.path, "--config", str(config), capsys=capsys)
    assert (result["blobs"], result["kept_young"]) == ([], 7)
    result = run(layout.path, "--config", str(config), "--grace", "60", capsys=capsys)
    assert len(result["blobs"]) == 6  # type: ignore[arg-type]
    config.write_text("[gc]\ngrace_s = -1\n")
    capsys.readouterr()
    assert main(["gc", layout.path, "--config", str(config)]) == 2
    assert "gc.grace_s" in capsys.readouterr().err


def test_a_subject_keeps_nothing_alive(layout: Layout, capsys: pytest.CaptureFixture[str]) -> None:
    image = layout.manifest(platform=LINUX_AMD64, label="signed, then untagged")
    empty = layout.blob(b"{}", "application/vnd.oci.empty.v1+json")
    signature = layout.blob(b"a signature", "application/vnd.dev.cosign.simplesigning.v1+json")
    referrer = layout.blob(
        canonical_json(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "artifactType": "application/vnd.dev.cosign.artifact.sig.v1+json",
                "config": empty,
                "layers": [signature],
                "subject": image,
            }
        ),
        OCI_MANIFEST,
    )
    layout.write_index([referrer])  # the referrer stays listed; the image it signs does not
    age_all(layout)
    result = run(layout.path, capsys=capsys)
    assert {b["digest"] for b in result["blobs"]} == closure(layout, image)  # type: ignore[attr-defined]


@pytest.mark.parametrize("what", ["manifest", "nested index", "config only"])
def test_a_layout_missing_a_referenced_manifest_or_index_proves_nothing(
    layout: Layout, capsys: pytest.CaptureFixture[str], what: str
) -> None:
    single = layout.manifest(label="single")
    multi = layout.multiarch([LINUX_AMD64, LINUX_ARM64])
    layout.write_index([named(single, ref="v1"), named(multi, ref="v2")])
    layout.blob(b"garbage", OCI_LAYER)
    age_all(layout)
    if what == "manifest":
        layout.remove_blob(single)
    elif what == "nested index":
        layout.remove_blob(multi)
    else:  # a missing config or layer is a partial export, not a gap in what is known
        with open(layout.blob_path(str(single["digest"])), "rb") as f:
            layout.remove_blob(json.load(f)["config"])
    result = run(layout.path, "--delete", capsys=capsys)
    if what == "config only":
        assert result["deleted"] == 1 and result["unproven"] == []
        return
    assert (result["blobs"], result["deleted"]) == ([], 0)
    assert result["unproven"] and "is not in blobs/" in str(result["unproven"])
    assert len(blobs_of(layout)) == len(os.listdir(os.path.join(layout.path, "blobs", "sha256")))
    assert "sha256:" + digest_of(b"garbage").split(":")[1] in blobs_of(layout)


def test_a_manifest_with_an_unreadable_layer_descriptor_proves_nothing(
    layout: Layout, capsys: pytest.CaptureFixture[str]
) -> None:
    layer = layout.blob(b"a layer named badly", OCI_LAYER)
    config = layout.blob(canonical_json(LINUX_AMD64), "application/vnd.oci.image.config.v1+json")
    bad = {**layer, "size": "big"}  # its blob is still meant: it must not be taken for garbage
    manifest = layout.blob(
        canonical_json({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": [bad]}),
        OCI_MANIFEST,
    )
    layout.write_index([manifest])
    age_all(layout)
    result = run(layout.path, "--delete", capsys=capsys)
    assert result["deleted"] == 0 and "could not be read" in str(result["unproven"])
    assert os.path.exists(layout.blob_path(str(layer["digest"])))


def test_a_buildkit_cache_index_keeps_the_layers_it_lists(layout: Layout, capsys: pytest.CaptureFixture[str]) -> None:
    """BuildKit's local cache export: an index whose descriptors are layers and a cache config."""
    layers = [layout.blob(b"cache layer %d" % i, OCI_LAYER) for i in range(3)]
    cache_config = layout.blob(b'{"layers":[]}', "application/vnd.buildkit.cacheconfig.v0")
    index = layout.index([*layers, cache_config])
    layout.write_index([named(index, ref="latest")])
    orphan = layout.blob(b"an orphaned cache layer", OCI_LAYER)
    age_all(layout)
    result = run(layout.path, "--delete", capsys=capsys)
    assert [b["digest"] for b in result["blobs"]] == [orphan["digest"]]  # type: ignore[attr-defined]
    assert blobs_of(layout) == {str(d["digest"]) for d in [*layers, cache_config, index]}


def test_gc_of_a_path_that_is_not_a_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["gc", str(tmp_path), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["error"] == "not_found"


# -- hostile trees -------------------------------------------------------------------------------


def test_entries_named_like_blobs_that_are_not_files_are_left_alone(
    layout: Layout, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layout.write_index([layout.manifest()])
    victim = tmp_path / "victim"
    victim.write_bytes(b"not yours")
    store = os.path.join(layout.path, "blobs", "sha256")
    link, fifo, directory = "1" * 64, "2" * 64, "3" * 64
    os.symlink(victim, os.path.join(store, link))
    os.mkfifo(os.path.join(store, fifo))
    os.mkdir(os.path.join(store, directory))
    with open(os.path.join(store, directory, "x"), "w") as f:
        f.write("inside")
    age_all(layout)
    os.utime(victim, (0, 0))
    result = run(layout.path, "--delete", "--grace", "0", capsys=capsys)  # a FIFO never blocks it
    assert result["deleted"] == 0
    assert result["skipped"] == [
        {"name": "sha256:" + link, "why": "a symlink"},
        {"name": "sha256:" + fifo, "why": "a FIFO"},
        {"name": "sha256:" + directory, "why": "a directory"},
    ]
    assert victim.read_bytes() == b"not yours" and os.path.islink(os.path.join(store, link))
    assert os.path.exists(os.path.join(store, directory, "x"))


@pytest.mark.parametrize("which", ["blobs", "blobs/sha256"])
def test_a_symlinked_blob_directory_is_never_entered(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], which: str
) -> None:
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "sha256").mkdir(parents=True)
    victim = elsewhere / "sha256" / ("4" * 64)
    victim.write_bytes(b"someone else's file")
    os.utime(victim, (0, 0))
    root = tmp_path / "layout"
    root.mkdir()
    (root / "index.json").write_bytes(canonical_json({"schemaVersion": 2, "manifests": []}))
    if which == "blobs":
        os.symlink(elsewhere, root / "blobs")
    else:
        (root / "blobs").mkdir()
        os.symlink(elsewhere / "sha256", root / "blobs" / "sha256")
    result = run(str(root), "--delete", "--grace", "0", capsys=capsys)
    assert result["deleted"] == 0 and result["blobs"] == []
    assert "not a directory" in str(result["unproven"])
    assert victim.exists()


def test_a_lock_file_planted_as_a_symlink_is_refused(layout: Layout, tmp_path: Path) -> None:
    built(layout)
    victim = tmp_path / "victim"
    os.symlink(victim, os.path.join(layout.path, LOCK_FILE))
    with pytest.raises(LayoutUnreadable, match="symlink"):
        collect(layout.path, delete=True)
    assert not victim.exists()  # not created through the link


# -- beside other writers ------------------------------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import fcntl, os, sys
    fd = os.open(sys.argv[1], os.O_RDONLY | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("held", flush=True)
    sys.stdin.readline()  # hold until told
    if len(sys.argv) > 2:  # rewrite index.json under the lock, as BuildKit's ociindex.Put does
        with open(sys.argv[2], "r+b") as f:
            data = sys.argv[3].encode()
            f.write(data)
            f.truncate(len(data))
    os.unlink(sys.argv[1])
    fcntl.flock(fd, fcntl.LOCK_UN)
    """
)


def test_a_held_lock_makes_delete_fail_and_delete_nothing(layout: Layout) -> None:
    built(layout)
    before = blobs_of(layout)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, os.path.join(layout.path, LOCK_FILE)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(LayoutBusy, match="stayed locked"):
            collect(layout.path, delete=True, lock_wait_s=0.2)
        assert blobs_of(layout) == before
    finally:
        release(holder)


def release(holder: subprocess.Popen[str]) -> None:
    """Tell a HOLDER process to go on, and wait for it."""
    assert holder.stdin is not None and holder.stdout is not None
    holder.stdin.write("\n")
    holder.stdin.close()
    holder.wait(timeout=10)
    holder.stdout.close()


def test_index_json_is_read_again_under_the_lock(layout: Layout) -> None:
    """A writer that lists an old unreferenced blob while gc waits for the lock: the blob is kept."""
    single = layout.manifest(label="kept")
    revived = layout.manifest(label="revived")  # old, unreferenced: garbage when gc lists blobs/
    layout.write_index([named(single, ref="v1")])
    age_all(layout)
    rewritten = canonical_json(layout.index_document([named(single, ref="v1"), named(revived, ref="v2")]))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, os.path.join(layout.path, LOCK_FILE), layout.index_path, rewritten.decode()],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    with Inotify() as watch:
        # gc opens the lock file only after it listed blobs/ and found the revived image garbage: the
        # kernel's IN_OPEN of index.json.lock is the moment to let the writer go on.
        watch.add_watch(layout.path, IN_OPEN)
        gc = subprocess.Popen(
            [sys.executable, "-m", "indexer", "gc", "--delete", "--json", layout.path],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            while not any(event.name == LOCK_FILE.encode() for event in watch.read()):
                ready, _, _ = select.select([watch], [], [], 30)
                if not ready or gc.poll() is not None:
                    pytest.fail(f"gc did not wait for the lock: {gc.communicate()}")
        finally:
            release(holder)
    out, err = gc.communicate(timeout=30)
    assert gc.returncode == 0, err
    result = json.loads(out)
    assert closure(layout, revived) <= {b["digest"] for b in result["blobs"]}  # listed before the lock
    assert result["deleted"] == 0
    assert closure(layout, revived) | closure(layout, single) <= blobs_of(layout)


WRITER = textwrap.dedent(
    """
    # A layout writer as BuildKit's OCI exporter behaves: blobs first (each written to a temporary
    # name and renamed into blobs/sha256), then index.json rewritten in place under index.json.lock,
    # the lock file removed after. Where BuildKit fails when the lock is held, this one tries again.
    import fcntl, hashlib, json, os, sys
    layout, rounds = sys.argv[1], int(sys.argv[2])

    def blob(data, media_type):
        digest = hashlib.sha256(data).hexdigest()
        tmp = os.path.join(layout, "ingest-" + digest)
        with open(tmp, "wb") as f:
            f.write(data)
        os.rename(tmp, os.path.join(layout, "blobs", "sha256", digest))
        return {"mediaType": media_type, "digest": "sha256:" + digest, "size": len(data)}

    lock_path = os.path.join(layout, "index.json.lock")
    retries = 0
    for n in range(rounds):
        layer = blob(b"layer of round %d" % n, "application/vnd.oci.image.layer.v1.tar+gzip")
        config = blob(json.dumps({"os": "linux", "architecture": "amd64", "n": n}).encode(),
                      "application/vnd.oci.image.config.v1+json")
        manifest = blob(json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                                    "config": config, "layers": [layer]}).encode(),
                        "application/vnd.oci.image.manifest.v1+json")
        while True:
            fd = os.open(lock_path, os.O_RDONLY | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                retries += 1
                continue
            if os.fstat(fd).st_ino != os.stat(lock_path).st_ino if os.path.exists(lock_path) else True:
                os.close(fd)
                continue
            break
        with open(os.path.join(layout, "index.json"), "r+b") as f:
            index = json.loads(f.read())
            manifest["annotations"] = {"org.opencontainers.image.ref.name": "round-%d" % n}
            index["manifests"] = (index.get("manifests") or [])[-20:] + [manifest]  # old rounds drop out
            data = json.dumps(index).encode()
            f.seek(0)
            f.write(data)
            f.truncate(len(data))
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.unlink(lock_path)
        os.close(fd)
    print(retries)
    """
)


def test_gc_beside_a_real_concurrent_writer_loses_nothing(layout: Layout) -> None:
    layout.write_index([named(layout.manifest(label="base"), ref="base")])
    for i in range(1500):  # old garbage: more than one hold's worth, so the lock is taken and given back
        layout.blob(b"old garbage %d" % i, OCI_LAYER)
    age_all(layout)
    rounds = 300
    writer = subprocess.Popen([sys.executable, "-c", WRITER, layout.path, str(rounds)], stdout=subprocess.PIPE)
    runs: list[dict[str, Any]] = []
    while writer.poll() is None or not runs:
        done = subprocess.run(
            [sys.executable, "-m", "indexer", "gc", "--delete", "--grace", "120", "--json", layout.path],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        runs.append(json.loads(done.stdout))
    writer.communicate(timeout=60)
    assert writer.returncode == 0
    assert sum(int(r["deleted"]) for r in runs) >= 1500  # the old garbage went
    with open(layout.index_path) as f:
        final = json.load(f)
    assert len(final["manifests"]) == 21
    present = blobs_of(layout)
    for descriptor in final["manifests"]:
        needed = closure(layout, descriptor)
        assert needed <= present, f"{descriptor['digest']} lost {needed - present}"
        for digest in needed:
            with open(layout.blob_path(digest), "rb") as f:
                assert digest_of(f.read()) == digest
    # every round's blobs are still there (the dropped rounds' are younger than the grace period);
    # the base image, dropped from index.json by round 21 and old, went with the garbage
    assert len(present) == 3 * rounds
    holds = [r["lock_held_s"] for r in runs if r["lock_held_s"] is not None]
    assert holds and max(holds) < 1.0


def test_json_keys_and_text_output(layout: Layout, capsys: pytest.CaptureFixture[str]) -> None:
    built(layout)
    result = run(layout.path, capsys=capsys)
    assert list(result) == [
        "layout",
        "blobs",
        "bytes",
        "kept_young",
        "deleted",
        "unproven",
        "skipped",
        "lock_held_s",
    ]
    capsys.readouterr()
    assert main(["gc", layout.path]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 6 and all(line.startswith("sha256:") for line in out.splitlines())
    assert "6 blobs" in err and "nothing references" in err and "1 younger than 3600 s kept" in err


def test_an_index_json_that_lists_oci_index_media_types_directly(layout: Layout) -> None:
    nested = layout.index([layout.manifest(platform=LINUX_AMD64)])
    layout.write_index([{**nested, "mediaType": OCI_INDEX}])
    age_all(layout)
    assert collect(layout.path, grace_s=0)["blobs"] == []
