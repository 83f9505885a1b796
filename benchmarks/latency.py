"""Daemon latency: from a writer finishing ``index.json`` to the index (not a read-through) answering it.

``python -m benchmarks.latency [--layouts 10000] [--duration 30] [--rate 20]``
(or ``python benchmarks/latency.py ...``) writes a realistic tree of layouts
(``benchmarks.generate``, modification times an hour old so nothing is racily
clean), starts ``ocidx daemon`` on it as a subprocess, then rewrites random
layouts' ``index.json`` at a steady rate (the new image's blobs written
first), alternating the two ways real writers do it (temporary file + rename
as umoci and regclient; open, write at 0 and truncate as BuildKit and skopeo). After each write it polls
``Index.resolve_in(layout, ":ocidx-latency")`` until the new digest comes back
with ``freshness == "indexed"``, and records the time.

Printed: start-up (the daemon's first full pass), p50/p90/p99/max latency
overall and per writer style, the daemon's RSS (``VmRSS``/``VmHWM`` from
``/proc/PID/status``) and its CPU while idle (``/proc/PID/stat`` over a few
seconds with no writes). The baseline, measured in the same run, is one warm
``ocidx scan`` of the same tree: what a script would pay to be fresh without
the daemon.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.generate import generate_tree, past_mtime_ns
from indexer.config import Config
from indexer.errors import OcidxError
from indexer.query import Index

TAG = "ocidx-latency"
REF_NAME = "org.opencontainers.image.ref.name"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def percentile(values: list[float], q: float) -> float:
    """The *q*-quantile (0..1) of *values*, nearest rank."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(0, min(len(ordered) - 1, round(q * (len(ordered) - 1))))
    return ordered[rank]


def new_index(layout: str, current: bytes, serial: int) -> tuple[bytes, str]:
    """*current* with its ``ocidx-latency`` entry replaced by a new image; (bytes, the new digest).

    The image's blobs (a layer, its config, its manifest) are written into the layout first, as every
    writer puts blobs before ``index.json``, so that a reader of the content graph finds them."""
    layer = hashlib.sha256(f"latency layer {serial}".encode()).digest() * 8
    layer_digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = json.dumps(
        {
            "architecture": "amd64",
            "config": {"Env": [f"SERIAL={serial}"]},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        },
        separators=(",", ":"),
    ).encode()
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    blob = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": [{"mediaType": OCI_LAYER, "digest": layer_digest, "size": len(layer)}],
        },
        separators=(",", ":"),
    ).encode()
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    for data, blob_digest in ((layer, layer_digest), (config, config_digest), (blob, digest)):
        with open(os.path.join(layout, "blobs", "sha256", blob_digest.partition(":")[2]), "wb") as fh:
            fh.write(data)
    document = json.loads(current)
    manifests = [m for m in document.get("manifests") or [] if (m.get("annotations") or {}).get(REF_NAME) != TAG]
    manifests.append({"mediaType": OCI_MANIFEST, "digest": digest, "size": len(blob), "annotations": {REF_NAME: TAG}})
    document["manifests"] = manifests
    return json.dumps(document, separators=(",", ":")).encode(), digest


def write_renamed(path: str, data: bytes) -> None:
    """umoci / regclient: a temporary file in the same directory, renamed over ``index.json``."""
    tmp = os.path.join(os.path.dirname(path), ".index.json.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def write_in_place(path: str, data: bytes) -> None:
    """BuildKit / skopeo: the same inode, written from offset 0, the tail truncated."""
    with open(path, "r+b") as fh:
        fh.write(data)
        fh.truncate()


def proc_status(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` of *pid*, in KiB."""
    found = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0])
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of *pid* so far (``/proc/PID/stat`` fields 14 and 15)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        fields = fh.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed_scan(db: str, root: str) -> float:
    """Seconds for one ``ocidx scan`` subprocess over *root* into *db*."""
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "indexer", "scan", "--no-progress", "--db", db, root],
        check=True,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.latency", description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", type=int, default=10_000, help="layouts in the tree (default 10000)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of writing (default 30)")
    parser.add_argument("--rate", type=float, default=20.0, help="writes per second (default 20)")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of idle CPU measurement (default 5)")
    parser.add_argument("--debounce-ms", type=int, default=100, help="daemon.debounce_ms (default 100)")
    parser.add_argument(
        "--reconcile-s",
        type=float,
        default=300.0,
        help="daemon.reconcile_interval_s (default 300; 1 keeps a reconcile pass running beside the writes)",
    )
    parser.add_argument("--workers", type=int, default=0, help="daemon.workers (default 0: one per core)")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line at the end")
    parser.add_argument("--seed", default="latency")
    parser.add_argument(
        "--dir", help="work directory, kept afterwards with the daemon's log (default: a new temporary one, removed)"
    )
    parser.add_argument(
        "--trace",
        metavar="FILE",
        help="write one JSON line per write (wall-clock time written, latency, layout, writer style) to FILE, "
        "to set slow writes against the daemon's log lines of the same moment (the log: DIR/daemon.log with --dir)",
    )
    args = parser.parse_args(argv)

    work = args.dir or tempfile.mkdtemp(prefix="ocidx-latency-")
    os.makedirs(work, exist_ok=True)
    root = os.path.join(work, "root")
    db = os.path.join(work, "index.db")
    config = os.path.join(work, "ocidx.toml")
    log_path = os.path.join(work, "daemon.log")
    daemon: subprocess.Popen[bytes] | None = None
    try:
        tree = generate_tree(root, args.layouts, args.seed, mtime_ns=past_mtime_ns())
        print(f"tree: {len(tree.layouts)} layouts, {tree.entries} entries, {tree.files} files in {tree.seconds:.1f}s")

        baseline_db = os.path.join(work, "baseline.db")
        cold = timed_scan(baseline_db, root)
        warm = timed_scan(baseline_db, root)
        print(f"baseline: ocidx scan cold {cold:.3f}s, warm {warm:.3f}s")

        with open(config, "w", encoding="utf-8") as fh:
            fh.write(
                f"[daemon]\ndebounce_ms = {args.debounce_ms}\nreconcile_interval_s = {args.reconcile_s}\n"
                f"workers = {args.workers}\n"
            )
        env = {k: v for k, v in os.environ.items() if k not in ("OCIDX_DB", "OCIDX_CONFIG", "OCIDX_WATCH_MODE")}
        started = time.perf_counter()
        with open(log_path, "wb") as log:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "indexer", "daemon", "--config", config, "--db", db, root],
                cwd=REPO,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        while True:
            with open(log_path, encoding="utf-8", errors="replace") as fh:
                text = fh.read()
            if "ready:" in text:
                break
            if daemon.poll() is not None:
                raise SystemExit(f"the daemon exited {daemon.returncode}:\n{text}")
            time.sleep(0.01)
        startup = time.perf_counter() - started
        print(f"daemon ready after {startup:.2f}s (first full pass included)")
        status = proc_status(daemon.pid)
        print(f"daemon RSS after start-up: {status.get('VmRSS', 0) / 1024:.1f} MiB")

        rng = random.Random(args.seed)
        latencies: dict[str, list[float]] = {"rename": [], "in-place": []}
        missed = superseded = 0
        interval = 1.0 / args.rate
        index = Index(db, config=Config())
        # layout -> (digest written, writer style, when written, wall clock then): the writes not yet seen indexed
        outstanding: dict[str, tuple[str, str, float, float]] = {}
        traced: list[dict[str, object]] = []
        end = time.monotonic() + args.duration
        next_write = time.monotonic()
        serial = 0
        while time.monotonic() < end or outstanding:
            if time.monotonic() >= next_write and time.monotonic() < end:
                next_write += interval
                path = rng.choice(tree.layouts)
                index_path = os.path.join(path, "index.json")
                with open(index_path, "rb") as fh:
                    data, digest = new_index(path, fh.read(), serial)
                style = "rename" if serial % 2 == 0 else "in-place"
                serial += 1
                (write_renamed if style == "rename" else write_in_place)(index_path, data)
                if path in outstanding:
                    superseded += 1
                outstanding[path] = (digest, style, time.perf_counter(), time.time())
            for path, (digest, style, written, wall) in list(outstanding.items()):
                try:
                    answer = index.resolve_in(path, f":{TAG}")
                    seen = answer.digest == digest and answer.freshness == "indexed"
                except OcidxError:
                    seen = False
                now = time.perf_counter()
                if seen:
                    latencies[style].append(now - written)
                    del outstanding[path]
                elif now - written > 10.0:
                    missed += 1
                    del outstanding[path]
                else:
                    continue
                if args.trace:
                    stamp = time.strftime("%H:%M:%S", time.localtime(wall)) + f".{int(wall * 1000) % 1000:03d}"
                    latency_ms = round((now - written) * 1000, 1) if seen else None
                    traced.append({"written": stamp, "latency_ms": latency_ms, "layout": path, "style": style})
            time.sleep(0.001)
        index.close()
        if args.trace:
            with open(args.trace, "w", encoding="utf-8") as fh:
                fh.writelines(json.dumps(record) + "\n" for record in traced)

        status = proc_status(daemon.pid)
        time.sleep(4.0)  # let the racy re-check of the last writes pass before measuring idle
        cpu_before, wall_before = cpu_seconds(daemon.pid), time.perf_counter()
        time.sleep(args.idle)
        idle_cpu = (cpu_seconds(daemon.pid) - cpu_before) / (time.perf_counter() - wall_before)

        every = latencies["rename"] + latencies["in-place"]
        with open(log_path, encoding="utf-8", errors="replace") as fh:
            # A periodic pass that changed nothing logs at debug level: only those that met a write count.
            reconciles = [
                line for line in fh if "reconcile (" in line and "start-up" not in line and "looked at" in line
            ]
        took = [float(line.split(" looked at in ")[1].split("s")[0]) for line in reconciles]
        if took:
            print(
                f"reconcile passes that met a write: {len(took)}, "
                f"{statistics.median(took) * 1000:.0f} ms median, {max(took) * 1000:.0f} ms longest"
            )
        print(
            f"writes: {serial} at {args.rate:g}/s over {args.duration:g}s; {missed} not seen within 10s, "
            f"{superseded} rewritten again before they were seen"
        )
        print(f"{'latency':<12}{'n':>6}{'p50':>10}{'p90':>10}{'p99':>10}{'max':>10}   p50 / warm scan")
        for label, values in (("all", every), *latencies.items()):
            p50 = percentile(values, 0.5)
            print(
                f"{label:<12}{len(values):>6}"
                + "".join(f"{percentile(values, q) * 1000:>8.1f}ms" for q in (0.5, 0.9, 0.99, 1.0))
                + f"   {p50 / warm:.3f}x"
            )
        print(
            f"daemon RSS: {status.get('VmRSS', 0) / 1024:.1f} MiB (peak {status.get('VmHWM', 0) / 1024:.1f} MiB); "
            f"idle CPU: {idle_cpu * 100:.2f}% of one core over {args.idle:g}s"
        )
        if args.json:
            figures = {
                "writes": serial,
                "missed": missed,
                "p50_ms": percentile(every, 0.5) * 1000,
                "p99_ms": percentile(every, 0.99) * 1000,
                "max_ms": percentile(every, 1.0) * 1000,
                "warm_scan_s": warm,
                "reconciles_meeting_a_write": len(took),
                "rss_mib": status.get("VmRSS", 0) / 1024,
            }
            print(json.dumps(figures))
        return 0 if missed == 0 else 1
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
