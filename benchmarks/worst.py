"""Worst cases a single hostile file can make: every step must stay linear in its size.

``python -m benchmarks.worst [--n N]`` builds, for each case, one layout at size N and one at
4N, times the step in this process (median of a few runs), and prints the time at N, at 4N, and
their ratio: about 4 for a linear step, about 16 for a quadratic one. Beside each, the baseline
measured in the same run: a bare read + ``json.loads`` of the same ``index.json`` (what any reader
of the file pays), as a ratio too. The cases:

* ``identical``: N identical descriptors in one ``index.json`` (the writer numbers repeats);
* ``names``: one digest carrying N names that share a tag (a comma-joined ``ref.name``), looked up
  by ``:TAG`` (resolve), by digest, and with ``find``;
* ``platforms``: a nested index of N nested indexes, each with one manifest, searched by
  ``resolve --platform`` for a platform that is not there (every child is visited);
* ``fan-out``: four levels of nested indexes, each listing the next one F times (the last, one
  manifest F times), searched the same way: a walk of every path took F^10 steps and stored
  F+F^2+F^3+F^4 children (issue 17); each distinct index is walked once now.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

from indexer import Index
from indexer.errors import NotFound
from indexer.scan.command import run_scan

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"


def _blob(layout: str, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    with open(os.path.join(layout, "blobs", "sha256", digest), "wb") as f:
        f.write(data)
    return "sha256:" + digest


def _layout(path: str, manifests: list[dict[str, object]]) -> str:
    os.makedirs(os.path.join(path, "blobs", "sha256"), exist_ok=True)
    with open(os.path.join(path, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion":"1.0.0"}')
    with open(os.path.join(path, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}, f)
    old = time.time() - 3600  # not racily clean: lookups answer from the index
    os.utime(os.path.join(path, "index.json"), (old, old))
    return path


def _manifest(layout: str, label: str) -> dict[str, object]:
    config = _blob(layout, json.dumps({"label": label}).encode())
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {"digest": config}}).encode()
    return {"mediaType": OCI_MANIFEST, "digest": _blob(layout, body), "size": len(body)}


def build_identical(path: str, n: int) -> str:
    """N identical descriptors."""
    os.makedirs(os.path.join(path, "blobs", "sha256"), exist_ok=True)
    one = {**_manifest(path, "same"), "annotations": {REF_NAME: "v1"}}
    return _layout(path, [one] * n)


def build_names(path: str, n: int) -> str:
    """One descriptor whose ref.name lists N repositories, all with tag ``t``."""
    os.makedirs(os.path.join(path, "blobs", "sha256"), exist_ok=True)
    one = {**_manifest(path, "named"), "annotations": {REF_NAME: ",".join(f"team/repo{i}:t" for i in range(n))}}
    return _layout(path, [one])


def build_platforms(path: str, n: int) -> str:
    """A top-level index of N nested indexes, each listing one linux/amd64 manifest."""
    os.makedirs(os.path.join(path, "blobs", "sha256"), exist_ok=True)
    inner = []
    for i in range(n):
        child = {**_manifest(path, f"child{i}"), "platform": {"os": "linux", "architecture": "amd64"}}
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [child]}).encode()
        inner.append({"mediaType": OCI_INDEX, "digest": _blob(path, body), "size": len(body)})
    top = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": inner}).encode()
    entry = {"mediaType": OCI_INDEX, "digest": _blob(path, top), "size": len(top), "annotations": {REF_NAME: "v1"}}
    return _layout(path, [entry])


def build_fanout(path: str, f: int) -> str:
    """Four levels of nested indexes, each listing the next one F times; the last, one manifest F times."""
    os.makedirs(os.path.join(path, "blobs", "sha256"), exist_ok=True)
    level: dict[str, object] = {**_manifest(path, "leaf"), "platform": {"os": "linux", "architecture": "amd64"}}
    for _ in range(4):
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [level] * f}).encode()
        level = {"mediaType": OCI_INDEX, "digest": _blob(path, body), "size": len(body)}
    return _layout(path, [{**level, "annotations": {REF_NAME: "v1"}}])


def _median(step: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _bare(path: str) -> None:
    with open(os.path.join(path, "index.json"), "rb") as f:
        json.loads(f.read())


def _scan(tmp: str, root: str) -> Callable[[], object]:
    def step() -> object:
        return _quiet_scan(os.path.join(tmp, f"scan-{time.monotonic_ns()}.db"), root)

    return step


def _quiet_scan(db: str, root: str) -> object:
    with contextlib.redirect_stderr(io.StringIO()):  # the scan's one-line summary
        return run_scan(db=db, config_path=None, roots=[root], progress=False)


def _lookup(db: str, call: Callable[[Index], object]) -> Callable[[], object]:
    def step() -> object:
        with Index(db) as index:
            return call(index)

    return step


def _absent_platform(layout: str) -> Callable[[Index], object]:
    def call(index: Index) -> object:
        try:
            return index.resolve_in(layout, ":v1", platform="linux/s390x")
        except NotFound as exc:  # the platform is absent on purpose: every child is visited
            return exc

    return call


def measure(n: int, reps: int) -> list[tuple[str, float, float, float, float]]:
    """Rows of (case, time at n, time at 4n, bare read at n, bare read at 4n)."""
    rows: list[tuple[str, float, float, float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for case, build, size in (
            ("N identical descriptors", build_identical, 4 * n),
            ("one digest, N names sharing a tag", build_names, n),
            ("N nested indexes, --platform absent", build_platforms, n // 4),
            ("4 levels of nested indexes each listing the next F times, --platform absent", build_fanout, n // 100),
        ):
            times: list[float] = []
            bare: list[float] = []
            lookups: dict[str, list[float]] = {}
            for scale in (1, 4):
                root = os.path.join(tmp, f"{build.__name__}-{scale}")
                layout = build(os.path.join(root, "layout"), size * scale)
                layout = os.path.realpath(layout)
                bare.append(_median(lambda layout=layout: _bare(layout), reps))  # type: ignore[misc]
                times.append(_median(_scan(tmp, root), reps))
                if build is build_identical:
                    continue
                db = os.path.join(tmp, f"{build.__name__}-{scale}.db")
                _quiet_scan(db, root)
                if build is build_names:
                    with Index(db) as index:
                        digest = index.resolve_in(layout, ":t").digest
                    calls: dict[str, Callable[[Index], object]] = {
                        "resolve :t": lambda index, layout=layout: index.resolve_in(layout, ":t"),  # type: ignore[misc]
                        "resolve @digest": lambda index, layout=layout, d=digest: index.resolve_in(layout, "@" + d),  # type: ignore[misc]
                        "find :t": lambda index: index.find(":t"),
                    }
                else:
                    calls = {"resolve --platform (absent)": _absent_platform(layout)}
                for label, call in calls.items():
                    lookups.setdefault(label, []).append(_median(_lookup(db, call), reps))
            label = f"{case} ({'F' if build is build_fanout else 'N'} = {size:,})"
            rows.append((f"{label}: scan", times[0], times[1], bare[0], bare[1]))
            for what, pair in lookups.items():
                rows.append((f"{label}: {what}", pair[0], pair[1], bare[0], bare[1]))
    return rows


def main(argv: list[str] | None = None) -> int:
    """Print the worst-case table (markdown)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.worst", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000, help="the base size N (each case runs at N and 4N)")
    parser.add_argument("--reps", type=int, default=3, help="runs per figure (the median is shown)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    rows = measure(args.n, args.reps)
    print("| case | at N | at 4N | 4N / N (linear ≈ 4) | bare read+json.loads at 4N | 4N vs bare |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for case, small, large, _bare_small, bare_large in rows:
        print(
            f"| {case} | {small * 1000:.1f} ms | {large * 1000:.1f} ms | {large / small:.1f}x | "
            f"{bare_large * 1000:.2f} ms | {large / bare_large:.0f}x |"
        )
    print(f"\n(`python -m benchmarks.worst --n {args.n} --reps {args.reps}`, {time.perf_counter() - started:.0f} s)")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
