"""How fast a watcher hears of an ``index.json`` renamed into place: ocidx's own inotify watcher
beside watchdog 7's observer, the baseline, measured in the same run.

``python -m benchmarks.renames [--seconds 60] [--layouts 50] [--pause-ms 1]`` (the baseline needs
watchdog: ``pip install -e '.[bench]'``)

Each mode runs in a process of its own. A root of *--layouts* layout directories is watched, and
one thread renames a temporary file over a layout's ``index.json`` (as umoci and regclient write),
then waits until the watcher has reported that layout, and records the time:

* ``watchdog``: an ``InotifyObserver`` with one recursive, filtered schedule, as ocidx used before
  (events pass a reader thread, the watch's emitter thread and the dispatcher thread; a rename's
  first half is held up to 0.5 s for its second, and every event queued behind it waits);
* ``ocidx``: :class:`indexer.watch.watcher.Watcher`, whose one descriptor is read where the daemon
  reads it (here a thread polling it, in the daemon its event loop).

Printed per mode: renames, p50, p99, max, how many took over 400 ms, and the threads the watcher
needs.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import subprocess
import sys
import tempfile
import threading
import time

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.latency import percentile

SLOW_S = 0.4

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any


def _tree(root: str, layouts: int) -> list[str]:
    paths = []
    for i in range(layouts):
        path = os.path.join(root, f"l{i:04d}")
        os.makedirs(os.path.join(path, "blobs", "sha256"))
        with open(os.path.join(path, "oci-layout"), "w", encoding="utf-8") as fh:
            fh.write('{"imageLayoutVersion":"1.0.0"}')
        with open(os.path.join(path, "index.json"), "w", encoding="utf-8") as fh:
            fh.write('{"schemaVersion":2,"manifests":[]}')
        paths.append(path)
    return paths


class _Seen:
    """The layouts a watcher reported, filled from its thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.layouts: set[str] = set()
        self.event = threading.Event()

    def add(self, path: str) -> None:
        with self.lock:
            self.layouts.add(path)
        self.event.set()

    def take(self, path: str) -> bool:
        with self.lock:
            found = path in self.layouts
            self.layouts.clear()
        return found


def _watch_with_watchdog(root: str, seen: _Seen) -> tuple[Callable[[], None], int]:
    from watchdog.events import FileClosedEvent, FileCreatedEvent, FileMovedEvent
    from watchdog.observers.inotify import InotifyObserver

    class Handler:  # what the observer calls: dispatch
        def dispatch(self, event: object) -> None:
            for path in (getattr(event, "src_path", ""), getattr(event, "dest_path", "")):
                if os.path.basename(os.fsdecode(path)) == "index.json":
                    seen.add(os.path.dirname(os.fsdecode(path)))

    observer = InotifyObserver()
    observer.start()
    handler: Any = Handler()
    observer.schedule(handler, root, recursive=True, event_filter=[FileClosedEvent, FileMovedEvent, FileCreatedEvent])

    def stop() -> None:
        observer.stop()
        observer.join()

    return stop, threading.active_count()


def _watch_with_ocidx(root: str, seen: _Seen) -> tuple[Callable[[], None], int]:
    from indexer.config import Root
    from indexer.watch.watcher import Watcher

    watcher = Watcher()
    watcher.watch_root(Root(root))
    stop = threading.Event()

    def read() -> None:
        poller = select.poll()
        poller.register(watcher.fileno(), select.POLLIN)
        while not stop.is_set():
            if poller.poll(100):
                watcher.read()
                for path in watcher.take().layouts:
                    seen.add(path)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()

    def end() -> None:
        stop.set()
        thread.join()
        watcher.close()

    return end, threading.active_count()


def measure(seconds: float, layouts: int, pause_s: float, mode: str) -> dict[str, float]:
    """Rename ``index.json`` into place over and over for *seconds*; the latency figures."""
    with tempfile.TemporaryDirectory(prefix="ocidx-renames-") as root:
        paths = _tree(root, layouts)
        seen = _Seen()
        start = _watch_with_watchdog if mode == "watchdog" else _watch_with_ocidx
        stop, threads = start(root, seen)
        try:
            time.sleep(0.5)  # the watches are in place
            seen.take("")
            latencies: list[float] = []
            end = time.monotonic() + seconds
            serial = 0
            while time.monotonic() < end:
                path = paths[serial % layouts]
                tmp = os.path.join(path, ".index.json.tmp")
                with open(tmp, "w", encoding="utf-8") as fh:
                    fh.write(f'{{"schemaVersion":2,"manifests":[],"annotations":{{"serial":"{serial}"}}}}')
                seen.event.clear()
                written = time.monotonic()
                os.replace(tmp, os.path.join(path, "index.json"))
                while True:
                    seen.event.wait(5.0)
                    seen.event.clear()
                    if seen.take(path) or time.monotonic() - written > 5.0:
                        break
                latencies.append(time.monotonic() - written)
                serial += 1
                time.sleep(pause_s)
        finally:
            stop()
    return {
        "renames": len(latencies),
        "p50_ms": percentile(latencies, 0.5) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "max_ms": percentile(latencies, 1.0) * 1000,
        "slow": sum(1 for latency in latencies if latency > SLOW_S),
        "threads": threads - 1,
    }


def main(argv: list[str] | None = None) -> int:
    """Run both modes, each in a child process, and print them side by side."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.renames", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="seconds of renames per mode (default 60)")
    parser.add_argument("--layouts", type=int, default=50, help="layout directories renamed into in turn")
    parser.add_argument("--pause-ms", type=float, default=1.0, help="pause after each rename is seen (default 1)")
    parser.add_argument("--mode", choices=("watchdog", "ocidx"), help=argparse.SUPPRESS)  # one child's part
    args = parser.parse_args(argv)
    if args.mode:
        print(json.dumps(measure(args.seconds, args.layouts, args.pause_ms / 1000, args.mode)))
        return 0
    results = {}
    for mode in ("watchdog", "ocidx"):
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.renames", "--mode", mode, *(argv or sys.argv[1:])],
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            check=True,
            capture_output=True,
            text=True,
        )
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"renames into place, seen by the watcher ({args.seconds:g} s each, {args.layouts} layouts)")
    print(f"{'mode':<34}{'renames':>9}{'p50':>10}{'p99':>10}{'max':>10}{'> 400 ms':>10}{'threads':>9}")
    labels = {"watchdog": "baseline: watchdog 7's observer", "ocidx": "ocidx's watcher"}
    for mode, figures in results.items():
        print(
            f"{labels[mode]:<34}{figures['renames']:>9.0f}"
            + "".join(f"{figures[key]:>8.2f}ms" for key in ("p50_ms", "p99_ms", "max_ms"))
            + f"{figures['slow']:>10.0f}{figures['threads']:>9.0f}"
        )
    for key in ("p50_ms", "p99_ms", "max_ms"):
        print(f"{key[:-3]}: {results['ocidx'][key] / results['watchdog'][key]:.3f}x the baseline's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
