"""How fast the daemon's watcher hears of an ``index.json`` renamed into place, with and without the
workaround for watchdog 7.1's move grouper (``indexer.watch.watcher._wake_on_paired_moves``).

``python -m benchmarks.renames [--seconds 60] [--layouts 50] [--pause-ms 1]``

Each mode runs in a process of its own (the workaround patches watchdog in the process that uses
it): ocidx's :class:`indexer.watch.watcher.Watcher` watches a root of *--layouts* layout directories, and
one thread renames a temporary file over a layout's ``index.json`` (as umoci and regclient write),
then waits until the watcher has filed that layout, and records the time. The baseline, measured in
the same run, is the same watcher on watchdog's own ``DelayedQueue.get``, which sleeps out the
whole 0.5 s move delay with every queued event behind it whenever it looks at a rename's first
half before the second is in. Printed per mode: renames, p50, p99, max, and how many took over
400 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.latency import percentile

SLOW_S = 0.4


def measure(seconds: float, layouts: int, pause_s: float, workaround: bool) -> dict[str, float]:
    """Rename ``index.json`` into place over and over for *seconds*; the latency figures."""
    from indexer.config import Root
    from indexer.watch.watcher import Dirty, Watcher

    if not workaround:
        # Watchdog as shipped: mark its get as already replaced, so Watcher.start leaves it alone.
        from watchdog.utils.delayed_queue import DelayedQueue

        DelayedQueue.get._ocidx = True  # type: ignore[attr-defined]
    with tempfile.TemporaryDirectory(prefix="ocidx-renames-") as root:
        paths = []
        for i in range(layouts):
            path = os.path.join(root, f"l{i:04d}")
            os.makedirs(os.path.join(path, "blobs", "sha256"))
            with open(os.path.join(path, "oci-layout"), "w", encoding="utf-8") as fh:
                fh.write('{"imageLayoutVersion":"1.0.0"}')
            with open(os.path.join(path, "index.json"), "w", encoding="utf-8") as fh:
                fh.write('{"schemaVersion":2,"manifests":[]}')
            paths.append(path)
        filed = threading.Event()
        dirty = Dirty(filed.set)
        watcher = Watcher(dirty)
        watcher.start()
        try:
            watcher.schedule(Root(root))
            time.sleep(0.5)  # the recursive watch is in place
            dirty.drain()
            latencies: list[float] = []
            end = time.monotonic() + seconds
            serial = 0
            while time.monotonic() < end:
                path = paths[serial % layouts]
                tmp = os.path.join(path, ".index.json.tmp")
                with open(tmp, "w", encoding="utf-8") as fh:
                    fh.write(f'{{"schemaVersion":2,"manifests":[],"annotations":{{"serial":"{serial}"}}}}')
                filed.clear()
                written = time.monotonic()
                os.replace(tmp, os.path.join(path, "index.json"))
                while True:
                    filed.wait(5.0)
                    filed.clear()
                    if path in dirty.drain().layouts or time.monotonic() - written > 5.0:
                        break
                latencies.append(time.monotonic() - written)
                serial += 1
                time.sleep(pause_s)
        finally:
            watcher.stop()
    return {
        "renames": len(latencies),
        "p50_ms": percentile(latencies, 0.5) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "max_ms": percentile(latencies, 1.0) * 1000,
        "slow": sum(1 for latency in latencies if latency > SLOW_S),
    }


def main(argv: list[str] | None = None) -> int:
    """Run both modes, each in a child process, and print them side by side."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.renames", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="seconds of renames per mode (default 60)")
    parser.add_argument("--layouts", type=int, default=50, help="layout directories renamed into in turn")
    parser.add_argument("--pause-ms", type=float, default=1.0, help="pause after each rename is seen (default 1)")
    parser.add_argument("--mode", choices=("workaround", "watchdog"), help=argparse.SUPPRESS)  # one child's part
    args = parser.parse_args(argv)
    if args.mode:
        figures = measure(args.seconds, args.layouts, args.pause_ms / 1000, args.mode == "workaround")
        print(json.dumps(figures))
        return 0
    results = {}
    for mode in ("watchdog", "workaround"):
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.renames", "--mode", mode, *(argv or sys.argv[1:])],
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            check=True,
            capture_output=True,
            text=True,
        )
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"renames into place, seen by the watcher ({args.seconds:g} s each, {args.layouts} layouts)")
    print(f"{'mode':<36}{'renames':>9}{'p50':>10}{'p99':>10}{'max':>10}{'> 400 ms':>10}")
    labels = {"watchdog": "baseline: watchdog's own get", "workaround": "ocidx's watcher (the workaround)"}
    for mode, figures in results.items():
        print(
            f"{labels[mode]:<36}{figures['renames']:>9.0f}"
            + "".join(f"{figures[key]:>8.1f}ms" for key in ("p50_ms", "p99_ms", "max_ms"))
            + f"{figures['slow']:>10.0f}"
        )
    ratio = results["workaround"]["max_ms"] / results["watchdog"]["max_ms"]
    print(f"max latency: {ratio:.3f}x the baseline's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
