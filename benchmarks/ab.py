"""Two versions of ocidx timed against each other in the same run, interleaved.

``python -m benchmarks.ab {rescan,resolve,cold} ROOT --tree OLD --tree NEW [--reps N]`` runs the same
whole ``ocidx`` process with each code tree on ``PYTHONPATH`` (a checkout, or ``git archive REV |
tar -x -C DIR``), one run of each in turn, so that load on a shared machine hits both alike, and
prints the median wall time and the median CPU time (user + system of the process and the
processes it waited for: its forked shares, its worker processes) of each, and their ratio. CPU
time moves far less than wall time when other jobs share the cores.

* ``rescan``: a no-change ``ocidx scan ROOT`` (each tree has its own database, built first);
* ``resolve``: ``ocidx resolve oci-layout://PATH:TAG`` for one tag that resolves uniquely, beside
  ``python -c "import sqlite3, json, argparse"`` (the lookup budget's baseline);
* ``cold``: ``ocidx scan ROOT`` into a new database each time.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time


def _run(argv: list[str], tree: str | None) -> tuple[float, float]:
    """Wall and CPU seconds of one process (and of the processes it waited for)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    if tree is not None:
        env["PYTHONPATH"] = tree
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, cwd=tempfile.gettempdir(), check=False)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode not in (0, 3):  # 3: an ambiguity is an answer too
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.decode()[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _unique_tag(db: str, tree: str) -> tuple[str, str]:
    """A (layout, tag) of *db* that resolves to one image, found with the code of *tree*."""
    code = "import sys\nfrom benchmarks.run import pick_tag_probe\nprint(*pick_tag_probe(sys.argv[1]), sep='\\n')\n"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = os.pathsep.join([tree, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))])
    out = subprocess.run([sys.executable, "-c", code, db], env=env, capture_output=True, text=True, check=True)
    path, tag = out.stdout.splitlines()
    return path, tag


def main(argv: list[str] | None = None) -> int:
    """Print each tree's medians."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ab", description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("rescan", "resolve", "cold"))
    parser.add_argument("root", help="a tree of layouts (python -m benchmarks.generate ROOT 10000)")
    parser.add_argument("--tree", action="append", required=True, help="a code tree (give two or more)")
    parser.add_argument("--reps", type=int, default=21)
    args = parser.parse_args(argv)
    ocidx = [sys.executable, "-m", "indexer"]
    work = tempfile.mkdtemp(prefix="ocidx-ab-")
    dbs = {tree: os.path.join(work, f"{number}.db") for number, tree in enumerate(args.tree)}
    commands: dict[str, tuple[list[str], str | None]] = {}
    for tree, db in dbs.items():
        if args.what != "cold":
            _run([*ocidx, "scan", "--db", db, "--no-progress", args.root], tree)
        if args.what in ("cold", "rescan"):
            commands[tree] = ([*ocidx, "scan", "--db", db, "--no-progress", args.root], tree)
    if args.what == "resolve":
        # One probe for every tree (they index the same root), found by the last, the newest code:
        # an older tree's benchmarks may not have the probe, and the newest one's code must not open
        # (and migrate) an older tree's database.
        path, tag = _unique_tag(dbs[args.tree[-1]], args.tree[-1])
        for tree, db in dbs.items():
            commands[tree] = ([*ocidx, "resolve", "--db", db, f"oci-layout://{path}:{tag}"], tree)
    if args.what == "resolve":
        commands["baseline"] = ([sys.executable, "-c", "import sqlite3, json, argparse"], None)
    time.sleep(3.5)  # the databases' files out of the racy window: the re-scans prove, not read
    for argv_, tree in commands.values():  # warm: bytecode, page cache
        _run(argv_, tree)
    walls: dict[str, list[float]] = {name: [] for name in commands}
    cpus: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.reps):
        for name, (argv_, tree) in commands.items():
            if args.what == "cold":
                for suffix in ("", "-wal", "-shm"):
                    if os.path.exists(dbs[name] + suffix):
                        os.unlink(dbs[name] + suffix)
            wall, cpu = _run(argv_, tree)
            walls[name].append(wall)
            cpus[name].append(cpu)
    first = args.tree[0]
    for name in commands:
        wall, cpu = statistics.median(walls[name]), statistics.median(cpus[name])
        versus = f" ({wall / statistics.median(walls[first]):.2f}x, cpu {cpu / statistics.median(cpus[first]):.2f}x)"
        print(f"{name}: wall median {wall * 1000:.1f} ms, cpu median {cpu * 1000:.1f} ms{versus}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
