"""How long ``ocidx gc --delete`` holds BuildKit's ``index.json.lock``, beside a writer's own hold.

``python -m benchmarks.gc_hold [--images 200] [--garbage 10000] [--reps 5]``

Builds one layout of *--images* images (a manifest, a config and two layers each) and *--garbage*
old unreferenced blobs, then runs :func:`indexer.gc.collect` with ``delete=True`` and prints the
longest single hold of the lock (each hold removes blobs for at most about
:data:`indexer.gc.HOLD_BUDGET_S`) and the whole run. Every file is written back to disk first
(``sync``), as garbage that has waited out the grace period is. The baseline, measured in the
same run on the same layout, is the hold of a writer as BuildKit's ``client/ociindex`` ``Put``
makes it: take the lock, read ``index.json``, add a descriptor, write it in place, truncate,
release. The ratio says how much longer than a writer's own update gc keeps other writers (which
fail at once) out. Median of *--reps* runs, each on a fresh copy of the layout.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from indexer.gc import LOCK_FILE, collect

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"


def _blob(layout: str, data: bytes, media_type: str) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    with open(os.path.join(layout, "blobs", "sha256", digest), "wb") as fh:
        fh.write(data)
    return {"mediaType": media_type, "digest": "sha256:" + digest, "size": len(data)}


def build(layout: str, images: int, garbage: int) -> None:
    """A layout of *images* images and *garbage* unreferenced blobs, every blob two hours old."""
    os.makedirs(os.path.join(layout, "blobs", "sha256"))
    with open(os.path.join(layout, "oci-layout"), "w", encoding="utf-8") as fh:
        fh.write('{"imageLayoutVersion":"1.0.0"}')
    manifests = []
    for n in range(images):
        config = _blob(layout, json.dumps({"os": "linux", "architecture": "amd64", "n": n}).encode(), OCI_CONFIG)
        layers = [_blob(layout, b"layer %d of image %d" % (k, n), OCI_LAYER) for k in range(2)]
        document = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": layers}
        manifest = _blob(layout, json.dumps(document).encode(), OCI_MANIFEST)
        manifest["annotations"] = {REF_NAME: f"v{n}"}
        manifests.append(manifest)
    for n in range(garbage):
        _blob(layout, b"garbage %d" % n, OCI_LAYER)
    with open(os.path.join(layout, "index.json"), "w", encoding="utf-8") as fh:
        json.dump({"schemaVersion": 2, "manifests": manifests}, fh)
    old = time.time() - 7200
    directory = os.path.join(layout, "blobs", "sha256")
    for name in os.listdir(directory):
        os.utime(os.path.join(directory, name), (old, old))


def writer_hold(layout: str) -> float:
    """One update of index.json as BuildKit's ociindex.Put makes it: the seconds the lock is held."""
    lock_path = os.path.join(layout, LOCK_FILE)
    fd = os.open(lock_path, os.O_RDONLY | os.O_CREAT, 0o600)
    started = time.perf_counter()
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(os.path.join(layout, "index.json"), "r+b") as fh:
        index = json.loads(fh.read())
        index["manifests"].append({**index["manifests"][0], "annotations": {REF_NAME: "added"}})
        data = json.dumps(index).encode()
        fh.seek(0)
        fh.write(data)
        fh.truncate(len(data))
    fcntl.flock(fd, fcntl.LOCK_UN)
    held = time.perf_counter() - started
    os.unlink(lock_path)
    os.close(fd)
    return held


def main(argv: list[str] | None = None) -> int:
    """Print gc's longest hold of the lock beside a writer's, as a ratio."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gc_hold", description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--garbage", type=int, default=10_000)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ocidx-gc-hold-") as tmp:
        pristine = os.path.join(tmp, "pristine")
        build(pristine, args.images, args.garbage)
        gc_holds, gc_runs, writer_holds, deleted = [], [], [], 0
        for rep in range(args.reps):
            copy = os.path.join(tmp, f"run{rep}")
            shutil.copytree(pristine, copy)
            os.sync()  # garbage is old: its data is on disk, not waiting to be written back
            writer_holds.append(writer_hold(copy))
            started = time.perf_counter()
            result = collect(copy, delete=True)
            gc_runs.append(time.perf_counter() - started)
            held = result["lock_held_s"]
            assert isinstance(held, float) and isinstance(result["deleted"], int)
            gc_holds.append(held)
            deleted = result["deleted"]
            shutil.rmtree(copy)
    gc_hold, writer = statistics.median(gc_holds), statistics.median(writer_holds)
    print(
        f"gc --delete of {deleted} blobs in a layout of {args.images} images: "
        f"longest hold of index.json.lock {gc_hold * 1000:.2f} ms "
        f"(a writer's own update: {writer * 1000:.2f} ms, ratio {gc_hold / writer:.1f}x); "
        f"whole run {statistics.median(gc_runs):.3f} s (median of {args.reps})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
