"""The benchmark runner: every figure beside its baseline, measured in the same run, as a ratio.

``python -m benchmarks`` (quick mode) or ``python -m benchmarks --full`` (the
issue's sizes: 10,000 layouts, huge layouts of 10,000 and 50,000 entries,
lookups at 1k, 100k and 1M names). It prints a table; with ``--write-results``
it also rewrites the results section of ``benchmarks/RESULTS.md`` (text outside
the markers is kept), which a casual run must not do: the file is tracked.

Whole-process figures run the ``ocidx`` console script of the running
interpreter's environment (its shebang is the real interpreter, not a pyenv
shim) and take the median of several runs; peak RSS comes from ``os.wait4``.
Every ``index.json`` gets an mtime one hour in the past, and the runner waits
until the files' ctime (which ``os.utime`` cannot set) is older than the
racily-clean window before any scan, so lookups answer from the index instead
of reading through. The page cache is warm in every run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

from benchmarks import generate as gen

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "RESULTS.md")
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
TARGET_TAG = "bench-target"
RACY_WAIT_S = 3.5  # indexer/store/read/identity.py RACY_WINDOW_NS is 3 s
BASELINE_SCAN = os.path.join(HERE, "baseline_scan.py")

# A bare pass over a tree: what any tool has to do at least once to see every index.json.
BARE_PASS = r"""
import json, os, sys
n = 0
for dirpath, dirnames, filenames in os.walk(sys.argv[1]):
    if "blobs" in dirnames:
        dirnames.remove("blobs")
    if "index.json" in filenames:
        with open(os.path.join(dirpath, "index.json"), "rb") as fh:
            json.loads(fh.read())
        n += 1
print(n)
"""

# What a script without ocidx does to find a tag in every layout.
FIND_SCRIPT = r"""
import json, os, sys
root, tag = sys.argv[1], sys.argv[2]
for dirpath, dirnames, filenames in os.walk(root):
    if "blobs" in dirnames:
        dirnames.remove("blobs")
    if "index.json" not in filenames:
        continue
    with open(os.path.join(dirpath, "index.json"), "rb") as fh:
        doc = json.loads(fh.read())
    for m in doc.get("manifests") or ():
        notes = m.get("annotations") or {}
        for key in ("org.opencontainers.image.ref.name", "io.containerd.image.name"):
            value = notes.get(key) or ""
            for part in value.split(","):
                if part == tag or part.split("@")[0].rpartition(":")[2] == tag:
                    print(dirpath, m["digest"], value, sep="\t")
"""

# What a script without ocidx does to resolve one tag in one layout.
LINEAR_SCRIPT = r"""
import json, sys
with open(sys.argv[1] + "/index.json", "rb") as fh:
    doc = json.loads(fh.read())
for m in doc["manifests"]:
    if (m.get("annotations") or {}).get("org.opencontainers.image.ref.name") == sys.argv[2]:
        print(m["digest"])
        break
else:
    sys.exit(1)
"""


# -- measuring ---------------------------------------------------------------------------------


@dataclass
class Proc:
    """One finished child process."""

    seconds: float
    maxrss_kb: int
    returncode: int
    stdout: str
    stderr: str
    cpu_s: float = 0.0  # user + system time of the process and its children


TIME = "/usr/bin/time"


def run_process(
    argv: list[str], *, env: dict[str, str] | None = None, rss: bool = False, stdin: str | None = None
) -> Proc:
    """Run *argv* to completion (reading the file *stdin*, if given): wall time, output, and with *rss*
    its peak RSS.

    Peak RSS comes from ``/usr/bin/time``, not from ``os.wait4`` here: Python starts children
    with vfork, and Linux carries the parent's high-water RSS into the child's ``ru_maxrss`` at
    exec, so a large runner would inflate every child's figure.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.NamedTemporaryFile() as rss_file:
        command = [TIME, "-f", "%M", "-o", rss_file.name, *argv] if rss and os.path.exists(TIME) else argv
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        with open(stdin or os.devnull, "rb") as source:
            started = time.perf_counter()
            proc = subprocess.run(command, stdin=source, stdout=out, stderr=err, env=env, check=False)
            seconds = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
        out.seek(0)
        err.seek(0)
        maxrss = 0
        if command is not argv:
            text = rss_file.read().decode().strip().splitlines()
            maxrss = int(text[-1]) if text and text[-1].isdigit() else 0
        return Proc(seconds, maxrss, proc.returncode, out.read().decode(errors="replace"), err.read().decode(), cpu)


def median_process(argv: list[str], reps: int, *, env: dict[str, str] | None = None, ok: int = 0) -> Proc:
    """The median-time run of *argv* over *reps* runs (each must exit *ok*)."""
    runs = []
    for _ in range(reps):
        proc = run_process(argv, env=env)
        if proc.returncode != ok:
            raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
        runs.append(proc)
    runs.sort(key=lambda p: p.seconds)
    return runs[len(runs) // 2]


def paired(
    figure: list[str], baseline: list[str], reps: int, *, env: dict[str, str] | None = None, warm: int = 2
) -> tuple[Proc, Proc]:
    """Median runs of *figure* and *baseline*, interleaved so that load on the machine hits both alike."""
    for _ in range(warm):  # page cache, and the bytecode caches of a first run
        run_process(figure, env=env)
        run_process(baseline, env=env)
    runs: tuple[list[Proc], list[Proc]] = ([], [])
    for _ in range(reps):
        for argv, out in ((figure, runs[0]), (baseline, runs[1])):
            proc = run_process(argv, env=env)
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
            out.append(proc)
    for out in runs:
        out.sort(key=lambda p: p.seconds)
    return runs[0][reps // 2], runs[1][reps // 2]


def median_of(runs: list[Proc]) -> Proc:
    """The run of median wall time."""
    return sorted(runs, key=lambda p: p.seconds)[len(runs) // 2]


def tree_rss_kb(pid: int, *, skip_self: bool = False) -> int:
    """The summed VmRSS (KiB) of *pid* and its descendants (without *pid* itself when *skip_self*)."""
    total = 0
    stack = [pid]
    while stack:
        current = stack.pop()
        if not (skip_self and current == pid):
            try:
                with open(f"/proc/{current}/status", encoding="ascii") as fh:
                    for line in fh:
                        if line.startswith("VmRSS:"):
                            total += int(line.split()[1])
                            break
            except OSError:
                continue
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children", encoding="ascii") as fh:
                    stack.extend(int(child) for child in fh.read().split())
        except OSError:
            continue
    return total


def percentile(sorted_values: list[float], q: float) -> float:
    """The *q* quantile (0..1) of already-sorted values, nearest rank."""
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


# -- generated data ----------------------------------------------------------------------------


def tree_path(data: str, layouts: int, seed: str, *, graph: bool) -> str:
    """Where the runner keeps a generated tree: content graphs under a name that says the generator's
    graph version (a tree of another version is never reused), the corpus before the graph as before."""
    suffix = f"-graph{gen.GRAPH_VERSION}" if graph else ""
    return os.path.join(data, f"tree-{layouts}-s{seed}{suffix}")


def ensure_tree(path: str, layouts: int, seed: str, *, graph: bool, say: Callable[[str], None]) -> gen.TreeInfo:
    """The tree at *path*: reused when complete (generation is deterministic), else generated afresh."""
    marker = os.path.join(path, ".complete")
    if os.path.exists(marker):
        with open(marker) as fh:
            info = gen.TreeInfo(**json.load(fh))
        say(f"reusing {path}: {len(info.layouts)} layouts, {info.names} names")
        return info
    shutil.rmtree(path, ignore_errors=True)
    say(f"generating {layouts} layouts under {path}")
    info = gen.generate_tree(path, layouts, seed, mtime_ns=gen.past_mtime_ns(), graph=graph)
    with open(marker, "w") as fh:
        json.dump(info.__dict__, fh)
    say(
        f"  {info.entries} entries, {info.names} names, {info.files} files in {info.seconds:.1f}s "
        f"({info.names / max(1, len(info.layouts)):.1f} names per layout)"
    )
    return info


# -- the table ---------------------------------------------------------------------------------


@dataclass
class Figure:
    """One row: a measured value, its baseline from the same run, and the target on their ratio."""

    name: str
    value: float
    unit: str
    baseline_name: str
    baseline: float | None
    target: str
    met: bool | None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        """value / baseline."""
        if self.baseline is None or self.baseline == 0:
            return None
        return self.value / self.baseline


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value:.3f} s" if value < 10 else f"{value:.1f} s"
    if unit == "ms":
        return f"{value:.1f} ms"
    if unit == "µs":
        return f"{value:.1f} µs" if value < 1000 else f"{value / 1000:.2f} ms"
    if unit == "MB":
        return f"{value:.0f} MB"
    return f"{value:g} {unit}"


def table(figures: list[Figure]) -> list[str]:
    """The figures as a Markdown table."""
    rows = [
        "| figure | value | baseline | baseline value | ratio | target | met |",
        "| --- | ---: | --- | ---: | ---: | --- | --- |",
    ]
    for f in figures:
        ratio = "-" if f.ratio is None else (f"{f.ratio:.2f}x" if f.ratio >= 0.01 else f"{f.ratio:.4f}x")
        met = "-" if f.met is None else ("yes" if f.met else "**NO**")
        note = f" ({f.note})" if f.note else ""
        rows.append(
            f"| {f.name}{note} | {_fmt(f.value, f.unit)} | {f.baseline_name} | {_fmt(f.baseline, f.unit)} "
            f"| {ratio} | {f.target} | {met} |"
        )
    return rows


# -- the setting -------------------------------------------------------------------------------


@dataclass
class Settings:
    """Sizes and places for one run."""

    layouts: int
    huge: list[int]
    names: list[int]
    seed: str
    data: str
    process_reps: int
    scan_reps: int
    batch_reps: int
    lookup_iterations: int
    mode: str
    what_if: bool
    graph: bool = True  # content-graph layouts (the generator's default); False: the corpus before the graph
    notes: list[str] = field(default_factory=list)


class Bench:
    """One run of the suite."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.figures: list[Figure] = []
        self.notes = settings.notes
        self.ocidx = os.path.join(os.path.dirname(sys.executable), "ocidx")
        if not os.path.exists(self.ocidx):
            raise SystemExit(f"no ocidx console script next to {sys.executable}: pip install -e . first")
        self.python = sys.executable
        self.home = tempfile.mkdtemp(prefix="ocidx-bench-home-")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("OCIDX_")}
        self.env["XDG_CONFIG_HOME"] = self.home  # no config file: the lookup path as users run it
        self.env["XDG_DATA_HOME"] = self.home
        # An installed package has its bytecode compiled (pip does it); this environment may say
        # PYTHONDONTWRITEBYTECODE, which would make every ocidx process compile its modules anew.
        self.env.pop("PYTHONDONTWRITEBYTECODE", None)
        self.tree = tree_path(self.s.data, self.s.layouts, self.s.seed, graph=self.s.graph)
        self.dbs = os.path.join(self.s.data, "db")
        os.makedirs(self.dbs, exist_ok=True)
        self.last_write = 0.0
        self.code = ""

    def say(self, text: str) -> None:
        """Progress on stderr."""
        sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {text}\n")
        sys.stderr.flush()

    def add(self, figure: Figure) -> None:
        """Record a figure and show it at once."""
        self.figures.append(figure)
        ratio = "-" if figure.ratio is None else f"{figure.ratio:.3f}x"
        self.say(
            f"  {figure.name}: {_fmt(figure.value, figure.unit)} vs {figure.baseline_name} "
            f"{_fmt(figure.baseline, figure.unit)} = {ratio} (target {figure.target})"
        )

    def settle(self) -> None:
        """Wait until every file written so far is older (ctime too) than the racily-clean window."""
        wait = self.last_write + RACY_WAIT_S - time.time()
        if wait > 0:
            self.say(f"waiting {wait:.1f}s for the racily-clean window to pass")
            time.sleep(wait)

    # -- data ----------------------------------------------------------------------------------

    def ensure_tree(self) -> gen.TreeInfo:
        """Generate the main tree (kept between runs: generation is deterministic)."""
        generated = not os.path.exists(os.path.join(self.tree, ".complete"))
        info = ensure_tree(self.tree, self.s.layouts, self.s.seed, graph=self.s.graph, say=self.say)
        if generated:
            self.last_write = time.time()
        return info

    def scan(self, db: str, root: str, *, fresh: bool, rss: bool = False) -> tuple[Proc, dict[str, object]]:
        """One ``ocidx scan`` as a whole process; its summary."""
        if fresh:
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(db + suffix):
                    os.remove(db + suffix)
        proc = run_process([self.ocidx, "scan", "--db", db, "--no-progress", "--json", root], env=self.env, rss=rss)
        if proc.returncode != 0:
            raise RuntimeError(f"ocidx scan failed ({proc.returncode}): {proc.stderr[-2000:]}")
        summary: dict[str, object] = json.loads(proc.stdout)
        return proc, summary

    # -- figures -------------------------------------------------------------------------------

    def bench_scan(self, info: gen.TreeInfo) -> str:
        """Cold scan (against the bare pass and the plain single-threaded script), its scaling from one
        core to two, the share of its steps, re-scan and peak RSS; returns the scanned database."""
        self.settle()
        n = len(info.layouts)
        bare_argv = [self.python, "-c", BARE_PASS, self.tree]
        bare_runs = [run_process(bare_argv, env=self.env) for _ in range(2)]  # warm
        if bare_runs[0].stdout.strip() != str(n):
            raise RuntimeError(f"bare pass saw {bare_runs[0].stdout.strip()} layouts, not {n}")
        db = os.path.join(self.dbs, f"tree-{n}.db")
        script_db = os.path.join(self.dbs, f"baseline-{n}.db")
        script_argv = [self.python, BASELINE_SCAN, self.tree, script_db]
        run_process(script_argv, env=self.env)  # warm
        cold_runs = []
        bare_runs = []
        script_runs = []
        peaks: list[int] = []
        for _ in range(self.s.scan_reps):  # interleaved with the baselines
            bare_runs.append(run_process(bare_argv, env=self.env))
            script = run_process(script_argv, env=self.env)
            if script.returncode != 0 or script.stdout.strip() != str(n):
                raise RuntimeError(f"the baseline script failed: {script.stderr[-2000:]}")
            script_runs.append(script)
            proc, summary, peak = self.scan_sampled(db, self.tree)
            if summary["changed"] != n or summary["errors"] != 0:
                raise RuntimeError(f"cold scan summary is off: {summary}")
            cold_runs.append(proc)
            peaks.append(peak)
        bare_runs.append(run_process(bare_argv, env=self.env))
        cold = median_of(cold_runs)
        bare = median_of(bare_runs)
        script = median_of(script_runs)
        label = f"{n:,} layouts, {info.names:,} names"
        self.add(
            Figure(
                f"cold `ocidx scan`, {label}",
                cold.seconds,
                "s",
                "bare read + json.loads pass",
                bare.seconds,
                "≤ 5x",
                cold.seconds <= 5 * bare.seconds,
                f"median of {len(cold_runs)}",
            )
        )
        self.add(
            Figure(
                f"cold `ocidx scan`, {label}",
                cold.seconds,
                "s",
                "plain single-threaded script doing the same work (benchmarks/baseline_scan.py)",
                script.seconds,
                "≤ 1.0x",
                cold.seconds <= script.seconds,
                f"median of {len(cold_runs)}, {os.cpu_count()} cores",
            )
        )
        self.bench_scaling(n)
        self.bench_shares(n)
        rescan, bare_again = paired(
            [self.ocidx, "scan", "--db", db, "--no-progress", "--json", self.tree],
            bare_argv,
            self.s.process_reps,
            env=self.env,
        )
        if json.loads(rescan.stdout)["changed"] != 0:
            self.notes.append(f"a re-scan re-read layouts (racily clean?): {rescan.stdout.strip()}")
        self.add(
            Figure(
                "re-scan, nothing changed",
                rescan.seconds,
                "s",
                "bare read + json.loads pass",
                bare_again.seconds,
                "≤ 0.25x",
                rescan.seconds <= 0.25 * bare_again.seconds,
                f"median of {self.s.process_reps}",
            )
        )
        peak_mb = max(peaks) / 1024
        name = f"peak RSS of cold `ocidx scan`, {n:,} layouts, the scan and its worker processes together"
        self.add(Figure(name, peak_mb, "MB", "none", None, "< 200 MB", peak_mb < 200, "sampled every 10 ms"))
        largest = max(p.maxrss_kb for p in cold_runs) / 1024
        self.notes.append(f"the largest single process of the cold scans peaked at {largest:.0f} MB (/usr/bin/time)")
        racy = count_racy(db)
        self.notes.append(f"{racy} of {n} layouts in the scanned database are racily clean (0 expected)")
        return db

    def scan_sampled(self, db: str, root: str) -> tuple[Proc, dict[str, object], int]:
        """One cold ``ocidx scan`` (GNU time around it) with the peak RSS of its whole process tree (KiB),
        sampled from /proc every 10 ms: its worker processes are separate processes."""
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(db + suffix):
                os.remove(db + suffix)
        argv = [self.ocidx, "scan", "--db", db, "--no-progress", "--json", root]
        peak = 0
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.wait(0.01):
                peak = max(peak, tree_rss_kb(os.getpid(), skip_self=True))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            proc = run_process(argv, env=self.env, rss=True)
        finally:
            stop.set()
            sampler.join()
        if proc.returncode != 0:
            raise RuntimeError(f"ocidx scan failed ({proc.returncode}): {proc.stderr[-2000:]}")
        summary: dict[str, object] = json.loads(proc.stdout)
        return proc, summary, peak

    def bench_scaling(self, n: int) -> None:
        """The cold scan on one core (taskset -c 0: one worker, read in-process) and on two (-c 0,1)."""
        taskset = shutil.which("taskset")
        if taskset is None or (os.cpu_count() or 1) < 2:
            self.notes.append("no taskset or fewer than 2 cores: the scaling figure was not measured")
            return
        db = os.path.join(self.dbs, f"scaling-{n}.db")
        one: list[Proc] = []
        two: list[Proc] = []
        for _ in range(self.s.scan_reps):
            for cores, out in (("0", one), ("0,1", two)):
                for suffix in ("", "-wal", "-shm"):
                    if os.path.exists(db + suffix):
                        os.remove(db + suffix)
                argv = [taskset, "-c", cores, self.ocidx, "scan", "--db", db, "--no-progress", "--json", self.tree]
                proc = run_process(argv, env=self.env)
                if proc.returncode != 0:
                    raise RuntimeError(f"taskset scan failed: {proc.stderr[-2000:]}")
                out.append(proc)
        on_one, on_two = median_of(one), median_of(two)
        self.add(
            Figure(
                f"cold `ocidx scan`, {n:,} layouts, on 2 cores (taskset -c 0,1)",
                on_two.seconds,
                "s",
                "the same on 1 core (taskset -c 0)",
                on_one.seconds,
                "≤ 0.625x (speed-up ≥ 1.6x)",
                on_two.seconds * 1.6 <= on_one.seconds,
                f"speed-up {on_one.seconds / on_two.seconds:.2f}x, median of {len(one)}",
            )
        )

    def bench_shares(self, n: int) -> None:
        """CPU time of the cold scan's steps, each alone (benchmarks.profile shares), and what they
        predict for more cores: parse runs in the workers, the rest in the one writer process."""
        proc = run_process([self.python, "-m", "benchmarks.profile", "shares", self.tree], env=self.env)
        if proc.returncode != 0:
            raise RuntimeError(f"benchmarks.profile shares failed: {proc.stderr[-2000:]}")
        got: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
        parse, pack, unpack, write = got["parse_s"], got["pack_s"], got["unpack_s"], got["write_s"]
        total = parse + pack + unpack + write
        serial = unpack + write  # the parent's part; packing happens in the workers
        parallel = parse + pack

        def estimate(cores: int) -> float:
            # The parent needs one core of its own once the workers outnumber the rest.
            return max(serial, (serial + parallel) / cores, parallel / max(1, cores - 1))

        self.notes.append(
            f"cold scan steps of {n:,} layouts, CPU time each alone in one process: parse (read, hash, "
            f"json.loads, names, nested blobs, row keys; in the workers) {parse:.2f} s = {parse / total:.0%}, "
            f"transfer (marshal in the worker {pack:.2f} s, load in the writer {unpack:.2f} s; "
            f"{got['transfer_bytes'] / 2**20:.0f} MiB) {(pack + unpack) / total:.0%}, write (decide, "
            f"compare-and-set, diff, insert, indexes at the end; in the writer) {write:.2f} s = {write / total:.0%}. "
            f"The writer's part ({serial:.2f} s) bounds the scan: estimated wall time "
            + ", ".join(f"{c} cores {estimate(c):.1f} s" for c in (1, 2, 4, 8, 16))
            + " (CPU only; file reads from a cold page cache are not in it)"
        )

    def bench_rescan_large(self, count: int) -> None:
        """The no-change re-scan of a larger tree (generated once, kept like the main tree)."""
        # The corpus before the content graph: 50,000 graph layouts are 14 million files, most of the
        # inodes of a build host's file system (and of this machine's).
        tree = tree_path(self.s.data, count, self.s.seed, graph=False)
        if not os.path.exists(os.path.join(tree, ".complete")):
            ensure_tree(tree, count, self.s.seed, graph=False, say=self.say)
            self.last_write = time.time()
        self.settle()
        db = os.path.join(self.dbs, f"tree-{count}.db")
        started = time.perf_counter()
        self.scan(db, tree, fresh=True)
        self.notes.append(
            f"the {count:,}-layout tree's cold scan (to fill its database) took {time.perf_counter() - started:.1f} s"
        )
        rescan, bare = paired(
            [self.ocidx, "scan", "--db", db, "--no-progress", "--json", tree],
            [self.python, "-c", BARE_PASS, tree],
            self.s.process_reps,
            env=self.env,
        )
        self.add(
            Figure(
                f"re-scan, nothing changed, {count:,} layouts",
                rescan.seconds,
                "s",
                "bare read + json.loads pass",
                bare.seconds,
                "≤ 0.5 s and ≤ 0.25x",
                rescan.seconds <= 0.5 and rescan.seconds <= 0.25 * bare.seconds,
                f"median of {self.s.process_reps}",
            )
        )

    def bench_latency(self) -> None:
        """The daemon's change-to-queryable latency (benchmarks.latency), alone and beside reconciles."""
        for label, extra in (("", []), (", a reconcile pass every 5 s", ["--reconcile-s", "5"])):
            argv = [
                self.python,
                "-m",
                "benchmarks.latency",
                "--layouts",
                str(self.s.layouts),
                "--duration",
                "20",
                "--rate",
                "20",
                "--idle",
                "2",
                "--json",
                *extra,
            ]
            proc = run_process(argv, env=self.env)
            if proc.returncode not in (0, 1):
                raise RuntimeError(f"benchmarks.latency failed: {proc.stderr[-2000:]}")
            got = json.loads(proc.stdout.strip().splitlines()[-1])
            self.add(
                Figure(
                    f"daemon change → queryable, p99, {self.s.layouts:,} layouts, 20 changes/s{label}",
                    got["p99_ms"],
                    "ms",
                    "one warm `ocidx scan` of the tree",
                    got["warm_scan_s"] * 1000,
                    "< 300 ms",
                    got["p99_ms"] < 300 and got["missed"] == 0,
                    f"p50 {got['p50_ms']:.0f} ms, max {got['max_ms']:.0f} ms, {got['writes']} writes, "
                    f"{got['missed']} not seen within 10 s",
                )
            )

    def bench_resolve_process(self, db: str) -> None:
        """Whole-process ``ocidx resolve`` against bare interpreter start-up with the same imports."""
        path, tag = pick_tag_probe(db)
        target = f"oci-layout://{path}:{tag}"
        reps = self.s.process_reps * 6
        argv = [self.ocidx, "resolve", "--db", db, target]
        base_argv = [self.python, "-c", "import sqlite3, json, argparse"]
        proc, base_proc = paired(argv, base_argv, reps, env=self.env, warm=3)
        value, base = proc.seconds, base_proc.seconds
        self.add(
            Figure(
                "`ocidx resolve oci-layout://PATH:TAG`, whole process",
                value * 1000,
                "ms",
                '`python -c "import sqlite3, json, argparse"`',
                base * 1000,
                "≤ 1.5x",
                value <= 1.5 * base,
                f"median of {reps}, database of {self.s.layouts:,} layouts",
            )
        )

    def bench_find(self, db: str, info: gen.TreeInfo) -> None:
        """Whole-process ``ocidx find :TAG`` against a script reading every index.json."""
        n = len(info.layouts)
        for tag, layouts_with in pick_find_tags(db, n):
            argv = [self.ocidx, "find", "--db", db, f":{tag}"]
            script_argv = [self.python, "-c", FIND_SCRIPT, self.tree, tag]
            found, script = paired(argv, script_argv, self.s.process_reps, env=self.env, warm=1)
            self.add(
                Figure(
                    f"`ocidx find :{tag}`, whole process",
                    found.seconds,
                    "s",
                    "script reading every index.json",
                    script.seconds,
                    "≤ 0.1x (≥ 10x faster)",
                    found.seconds * 10 <= script.seconds,
                    f"{n:,} layouts, tag in {layouts_with:,} of them, {found.stdout.count(chr(10)):,} matches",
                )
            )

    def bench_batch(self, db: str, count: int = 1000) -> None:
        """*count* ``oci-layout://PATH:TAG`` lookups: one ``ocidx resolve -`` reading them on stdin,
        against the loop of *count* ``ocidx resolve TARGET`` processes a shell script would run."""
        pairs = pick_probes(db, limit=count, kinds=("tag",))["tag"]
        if not pairs:
            raise RuntimeError("no tag resolves uniquely")
        targets = [f"oci-layout://{path}{ref}" for path, ref in (pairs * (count // len(pairs) + 1))[:count]]
        listing = os.path.join(self.home, "targets.txt")
        with open(listing, "w", encoding="utf-8") as fh:
            fh.write("".join(f"{target}\n" for target in targets))
        batch_argv = [self.ocidx, "resolve", "--db", db, "-"]

        def loop() -> Proc:
            started = time.perf_counter()
            digests = []
            for target in targets:
                proc = run_process([self.ocidx, "resolve", "--db", db, target], env=self.env)
                if proc.returncode != 0:
                    raise RuntimeError(f"ocidx resolve {target} exited {proc.returncode}: {proc.stderr[-2000:]}")
                digests.append(f"{target}\t{proc.stdout}")
            return Proc(time.perf_counter() - started, 0, 0, "".join(digests), "")

        batches: list[Proc] = []
        loops: list[Proc] = []
        run_process(batch_argv, env=self.env, stdin=listing)  # warm: page cache, bytecode
        for _ in range(self.s.batch_reps):
            batch = run_process(batch_argv, env=self.env, stdin=listing)
            if batch.returncode != 0:
                raise RuntimeError(f"ocidx resolve - exited {batch.returncode}: {batch.stderr[-2000:]}")
            batches.append(batch)
            loops.append(loop())
        batch, looped = median_of(batches), median_of(loops)
        if batch.stdout != looped.stdout:
            raise RuntimeError("the batch and the loop of processes answered differently")
        self.add(
            Figure(
                f"`ocidx resolve -`, {count:,} `oci-layout://PATH:TAG` targets on stdin, whole process",
                batch.seconds,
                "s",
                f"{count:,} `ocidx resolve TARGET` processes, one after another",
                looped.seconds,
                "≤ 0.04x (≥ 25x faster)",
                batch.seconds * 25 <= looped.seconds,
                f"median of {self.s.batch_reps} each, interleaved; {len(set(targets)):,} distinct targets in "
                f"{len({p for p, _ in pairs}):,} layouts, database of {self.s.layouts:,} layouts; same answers",
            )
        )

    def bench_lookups(self) -> None:
        """In-process resolve_in by tag, name and digest at each database size, warm."""
        probe_root = os.path.join(
            self.s.data, f"probe-s{self.s.seed}" + (f"-graph{gen.GRAPH_VERSION}" if self.s.graph else "")
        )
        marker = os.path.join(probe_root, ".complete")
        if not os.path.exists(marker):
            shutil.rmtree(probe_root, ignore_errors=True)
            images = gen.ImageCache()
            names = number = 0
            mtime = gen.past_mtime_ns()
            while names < 1000:
                model = gen.build_layout(self.s.seed, number, images, kind="probe", graph=self.s.graph)
                gen.write_layout(gen.layout_path(probe_root, number), model, mtime_ns=mtime)
                names += model.expected_names
                number += 1
            self.last_write = time.time()
            with open(marker, "w") as fh:
                fh.write(f"{number} {names}\n")
        self.settle()
        base_db = os.path.join(self.dbs, "names-probe.db")
        _, summary = self.scan(base_db, probe_root, fresh=True)
        probes = pick_probes(base_db)
        self.notes.append(
            f"lookup probes: {summary['layouts']} real layouts, {len(probes['tag'])} tag, "
            f"{len(probes['name'])} name and {len(probes['digest'])} digest references that resolve uniquely"
        )
        dbs: dict[int, str] = {}
        built_from = base_db
        for size in sorted(self.s.names):
            db = os.path.join(self.dbs, f"names-{size}.db")
            started = time.perf_counter()
            total = fill_database(built_from, db, size, self.s.seed)
            built = time.perf_counter() - started
            self.say(f"database of {total:,} names built in {built:.1f}s")
            self.notes.append(f"the {_names_label(size)}-name database ({total:,} names) was built in {built:.1f}s")
            built_from = dbs[size] = db
        results = measure_lookups(dbs, probes, self.s.lookup_iterations)
        self.add_lookup_rows(results, "")
        if self.s.what_if and not digest_index_is_scoped(dbs[max(dbs)]):
            # The fix recommended in RESULTS.md, measured on copies: scoped digest lookups seek
            # (digest, layout_id) instead of walking every row that holds a popular digest.
            patched = {}
            for size, db in dbs.items():
                patched[size] = db.removesuffix(".db") + "-whatif.db"
                started = time.perf_counter()
                what_if_digest_indexes(db, patched[size])
                self.say(
                    f"what-if copy of the {_names_label(size)}-name database in {time.perf_counter() - started:.1f}s"
                )
            digest_only = {"digest": probes["digest"]}
            self.add_lookup_rows(
                measure_lookups(patched, digest_only, self.s.lookup_iterations),
                " (what-if: entries and children indexed on (digest, layout_id))",
            )

    def add_lookup_rows(self, results: dict[int, dict[str, Quantiles]], suffix: str) -> None:
        """One row per size above the smallest, kind and percentile, against the smallest size."""
        smallest = min(results)
        for size in sorted(results):
            if size == smallest:
                continue
            for kind in ("tag", "name", "digest"):
                if kind not in results[size]:
                    continue
                for q_index, q_name in ((0, "p50"), (1, "p99")):
                    value = results[size][kind]["cpu"][q_index]
                    base = results[smallest][kind]["cpu"][q_index]
                    wall_value = results[size][kind]["wall"][q_index]
                    wall_base = results[smallest][kind]["wall"][q_index]
                    self.add(
                        Figure(
                            f"Index.resolve_in by {kind}, {q_name}, {_names_label(size)} names{suffix}, CPU time",
                            value,
                            "µs",
                            f"same at {_names_label(smallest)} names",
                            base,
                            "≤ 1.3x",
                            value <= 1.3 * base,
                            f"wall clock {_fmt(wall_value, 'µs')} vs {_fmt(wall_base, 'µs')}: "
                            f"{wall_value / wall_base:.2f}x",
                        )
                    )

    def bench_huge(self) -> None:
        """Resolving one tag in a huge layout: ocidx (process, in-process) vs linear scan and skopeo."""
        root = os.path.join(
            self.s.data, f"huge-s{self.s.seed}" + (f"-graph{gen.GRAPH_VERSION}" if self.s.graph else "")
        )
        paths = {}
        for entries in self.s.huge:
            path = os.path.join(root, f"huge-{entries}")
            marker = os.path.join(root, f".complete-{entries}")
            if not os.path.exists(marker):
                shutil.rmtree(path, ignore_errors=True)
                self.say(f"generating a layout of {entries:,} entries")
                gen.generate_huge(
                    path,
                    entries,
                    self.s.seed,
                    target_tag=TARGET_TAG,
                    mtime_ns=gen.past_mtime_ns(),
                    graph=self.s.graph,
                )
                self.last_write = time.time()
                with open(marker, "w") as fh:
                    fh.write("ok\n")
            paths[entries] = path
        self.settle()
        db = os.path.join(self.dbs, "huge.db")
        proc, _ = self.scan(db, root, fresh=True)
        self.notes.append(
            f"scanning the huge layouts ({', '.join(f'{e:,}' for e in self.s.huge)} entries) took {proc.seconds:.1f}s"
        )
        skopeo = shutil.which("skopeo")
        reps = self.s.process_reps * 2
        for entries, path in paths.items():
            resolve_argv = [self.ocidx, "resolve", "--db", db, f"oci-layout://{path}:{TARGET_TAG}"]
            baselines = [("linear-scan script", [self.python, "-c", LINEAR_SCRIPT, path, TARGET_TAG])]
            if skopeo is not None:
                baselines.append(
                    ("`skopeo inspect --raw oci:DIR:TAG`", [skopeo, "inspect", "--raw", f"oci:{path}:{TARGET_TAG}"])
                )
            else:
                self.notes.append("skopeo is not installed: its baseline was skipped")
            digest = ""
            label = f"{entries:,}-entry layout"
            for base_name, base_argv in baselines:
                ocidx_proc, base = paired(resolve_argv, base_argv, reps, env=self.env)
                digest = ocidx_proc.stdout.strip()
                seen = base.stdout.strip() if base_argv[0] != skopeo else _digest_text(base.stdout)
                if seen != digest:
                    raise RuntimeError(f"{base_name} found {seen}, ocidx {digest}")
                self.add(
                    Figure(
                        f"`ocidx resolve` in a {label}, whole process",
                        ocidx_proc.seconds * 1000,
                        "ms",
                        base_name,
                        base.seconds * 1000,
                        "< 1x (faster)",
                        ocidx_proc.seconds < base.seconds,
                        f"median of {reps}",
                    )
                )
            inproc, scan_in = measure_huge_in_process(db, path, digest, self.s.lookup_iterations // 10)
            self.add(
                Figure(
                    f"Index.resolve_in(:{TARGET_TAG}) in a {label}, in-process p50",
                    inproc,
                    "µs",
                    "linear scan in-process (read + json.loads + loop)",
                    scan_in,
                    "≤ 0.01x (≥ 100x faster)",
                    inproc * 100 <= scan_in,
                )
            )

    def run(self, only: set[str] | None) -> None:
        """Every figure, in order."""
        if only is None or only & {"scan", "resolve", "find", "batch"}:
            info = self.ensure_tree()
            self.notes.append(
                f"main tree: {len(info.layouts):,} layouts, {info.entries:,} entries, {info.names:,} names, "
                f"{info.files:,} files (generated in {info.seconds:.1f}s; reused when already present)"
            )
            db = os.path.join(self.dbs, f"tree-{len(info.layouts)}.db")
            if only is None or "scan" in only:
                db = self.bench_scan(info)
            elif not os.path.exists(db):
                self.settle()
                self.scan(db, self.tree, fresh=True)
            if only is None or "resolve" in only:
                self.bench_resolve_process(db)
            if only is None or "find" in only:
                self.bench_find(db, info)
            if only is None or "batch" in only:
                self.bench_batch(db)
        if (only is None and self.s.mode == "full") or (only is not None and "rescan50k" in only):
            self.bench_rescan_large(50_000)
        if (only is None and self.s.mode == "full") or (only is not None and "latency" in only):
            self.bench_latency()
        if only is None or "huge" in only:
            self.bench_huge()
        if only is None or "lookup" in only:
            self.bench_lookups()


def _names_label(size: int) -> str:
    if size >= 1_000_000 and size % 1_000_000 == 0:
        return f"{size // 1_000_000}M"
    if size >= 1000 and size % 1000 == 0:
        return f"{size // 1000}k"
    return f"{size:,}"


def _digest_text(data: str) -> str:
    return "sha256:" + hashlib.sha256(data.encode()).hexdigest()


# -- database helpers --------------------------------------------------------------------------


def count_racy(db: str) -> int:
    """Layouts whose stored identity is within the racily-clean window of their read."""
    from indexer.store import read as db_read

    conn = sqlite3.connect(db)
    try:
        return int(
            conn.execute(
                "SELECT count(*) FROM layouts WHERE max(mtime_ns, ctime_ns) >= read_ns - ?",
                (db_read.RACY_WINDOW_NS,),
            ).fetchone()[0]
        )
    finally:
        conn.close()


def _index(db: str) -> object:
    from indexer.config import Config
    from indexer.query import Index

    return Index(db, config=Config())


def pick_probes(
    db: str, limit: int = 300, kinds: tuple[str, ...] = ("tag", "name", "digest")
) -> dict[str, list[tuple[str, str]]]:
    """(layout, ref) pairs of each kind that resolve to one image in *db*, answered from the index."""
    from indexer.errors import OcidxError
    from indexer.query import Index

    conn = sqlite3.connect(db)
    try:
        rows = conn.execute(
            "SELECT l.path, n.name, n.tag, e.digest FROM names n JOIN entries e ON e.id = n.entry_id "
            "JOIN layouts l ON l.id = e.layout_id ORDER BY l.path, e.position, n.rowid"
        ).fetchall()
    finally:
        conn.close()
    candidates: dict[str, list[tuple[str, str]]] = {"tag": [], "name": [], "digest": []}
    for path, name, tag, digest in rows:
        if tag:
            candidates["tag"].append((path, f":{tag}"))
        if name and tag:
            candidates["name"].append((path, f"{name}:{tag}"))
        candidates["digest"].append((path, f"@{digest}"))
    rng = random.Random(0)
    index = _index(db)
    assert isinstance(index, Index)
    probes: dict[str, list[tuple[str, str]]] = {}
    with index:
        for kind, pairs in candidates.items():
            if kind not in kinds:
                continue
            unique = sorted(set(pairs))
            rng.shuffle(unique)
            kept = []
            for path, ref in unique:
                try:
                    answer = index.resolve_in(path, ref)
                except OcidxError:
                    continue  # ambiguous in its layout: not a lookup we time
                if answer.freshness == "indexed":
                    kept.append((path, ref))
                if len(kept) >= limit:
                    break
            probes[kind] = kept
    return probes


def pick_tag_probe(db: str) -> tuple[str, str]:
    """One (layout, tag) that resolves uniquely in *db*, for the whole-process figure."""
    from indexer.errors import OcidxError
    from indexer.query import Index

    conn = sqlite3.connect(db)
    try:
        rows = conn.execute(
            "SELECT l.path, n.tag FROM names n JOIN layouts l ON l.id = n.layout_id "
            "WHERE n.tag != '' ORDER BY l.id DESC, n.rowid LIMIT 200"
        ).fetchall()
    finally:
        conn.close()
    index = _index(db)
    assert isinstance(index, Index)
    with index:
        for path, tag in rows:
            try:
                index.resolve_in(path, f":{tag}")
            except OcidxError:
                continue
            return path, tag
    raise RuntimeError("no tag resolves uniquely")


def pick_find_tags(db: str, layouts: int) -> list[tuple[str, int]]:
    """A tag held by about 1% of the layouts, and ``latest`` (held by most): (tag, layouts holding it)."""
    conn = sqlite3.connect(db)
    try:
        counts = conn.execute(
            "SELECT tag, count(DISTINCT layout_id) FROM names WHERE tag != '' GROUP BY tag ORDER BY tag"
        ).fetchall()
    finally:
        conn.close()
    want = max(1, layouts // 100)
    tag, held = min(counts, key=lambda row: (abs(row[1] - want), row[0]))
    latest = next((row[1] for row in counts if row[0] == "latest"), 0)
    return [(tag, held), ("latest", latest)]


def fill_database(source: str, target: str, names: int, seed: str, *, graph: bool = False) -> int:
    """Copy *source* to *target* and add filler layouts until it holds at least *names* names (rows
    only: the filler layouts are not on disk). Their index.json is the corpus before the content graph
    unless *graph*: name lookups need names, and a graph layout takes six times longer to build."""
    from indexer.layout import Child, FileIdentity, Platform, Snapshot, parse_index
    from indexer.store import open_writer
    from indexer.store.outcomes import Read
    from indexer.store.write import apply

    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(target + suffix):
            os.remove(target + suffix)
    src = sqlite3.connect(source)
    dst = sqlite3.connect(target)
    src.backup(dst)
    src.close()
    dst.close()
    conn = open_writer(target)
    try:
        have = int(conn.execute("SELECT count(*) FROM names").fetchone()[0])
        number = int(conn.execute("SELECT count(*) FROM layouts WHERE path LIKE '/nonexistent/%'").fetchone()[0])
        images = gen.ImageCache()
        old = gen.past_mtime_ns()
        batch: list[Read] = []
        while have < names:
            model = gen.build_layout(seed, number, images, kind="filler", graph=graph)
            entries, warnings = parse_index(model.index_bytes)
            children = []
            for position, index_digest, kids, present in model.nested:
                if not present:
                    continue
                for kid in kids:
                    plat = kid.get("platform")  # none for the referrers a referrers tag index lists
                    kid_platform = None
                    if isinstance(plat, dict):
                        kid_platform = Platform(
                            plat["os"], plat["architecture"], plat.get("variant", ""), plat.get("os.version", "")
                        )
                    notes = kid.get("annotations")
                    children.append(
                        Child(
                            index_digest,
                            position,
                            1,
                            str(kid["digest"]),
                            str(kid["mediaType"]),
                            int(str(kid["size"])),
                            kid_platform,
                            dict(notes) if isinstance(notes, dict) else {},
                        )
                    )
            identity = FileIdentity(0, number, len(model.index_bytes), old, old)
            content = "sha256:" + hashlib.sha256(model.index_bytes).hexdigest()
            snapshot = Snapshot(entries, tuple(children), warnings, content, identity)
            batch.append(Read.of(f"/nonexistent/bench-filler/{number:06d}", snapshot, time.time_ns(), None))
            have += sum(len(e.names) for e in entries)
            number += 1
            if len(batch) >= 500:
                apply(conn, batch)
                batch = []
        if batch:
            apply(conn, batch)
        conn.execute("ANALYZE")
        return have
    finally:
        conn.close()


Quantiles = dict[str, tuple[float, float]]  # clock -> (p50, p99) in µs


def measure_lookups(
    dbs: dict[int, str], probes: dict[str, list[tuple[str, str]]], iterations: int
) -> dict[int, dict[str, Quantiles]]:
    """p50 and p99 (µs) of Index.resolve_in per database size and kind of probe, databases warm.

    Each lookup is timed twice over: wall clock and the thread's CPU time. Each probe is timed
    on every database in turn before the next probe, so that a burst of load on the machine
    (other processes) hits every size alike.
    """
    from indexer.query import Index

    indexes: dict[int, Index] = {}
    for size, db in dbs.items():
        index = _index(db)
        assert isinstance(index, Index)
        indexes[size] = index
        for pairs in probes.values():
            for path, ref in pairs:  # warm: every probe once, and the page cache
                answer = index.resolve_in(path, ref)
                if answer.freshness != "indexed":
                    raise RuntimeError(f"{path} {ref} answered {answer.freshness}, not from the index")
    samples: dict[tuple[int, str], tuple[list[float], list[float]]] = {}
    wall, cpu = time.perf_counter_ns, time.thread_time_ns
    order = list(indexes.items())
    try:
        for kind, pairs in probes.items():
            if not pairs:
                continue
            outs = [(index, samples.setdefault((size, kind), ([], []))) for size, index in order]
            for i in range(iterations):
                path, ref = pairs[i % len(pairs)]
                for index, (walls, cpus) in outs if i % 2 else reversed(outs):
                    started, started_cpu = wall(), cpu()
                    index.resolve_in(path, ref)
                    cpus.append((cpu() - started_cpu) / 1000)
                    walls.append((wall() - started) / 1000)
    finally:
        for index in indexes.values():
            index.close()
    results: dict[int, dict[str, Quantiles]] = {}
    for (size, kind), (walls, cpus) in samples.items():
        walls.sort()
        cpus.sort()
        results.setdefault(size, {})[kind] = {
            "wall": (percentile(walls, 0.5), percentile(walls, 0.99)),
            "cpu": (percentile(cpus, 0.5), percentile(cpus, 0.99)),
        }
    return results


def digest_index_is_scoped(db: str) -> bool:
    """Whether the schema already indexes entries on (digest, layout_id) (migration 0002 and later)."""
    conn = sqlite3.connect(db)
    try:
        columns = [row[2] for row in conn.execute("PRAGMA index_info(entries_digest)")]
    finally:
        conn.close()
    return columns[:2] == ["digest", "layout_id"]


def what_if_digest_indexes(source: str, target: str) -> None:
    """Copy *source* to *target* with the digest indexes on (digest, layout_id), as RESULTS.md recommends."""
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(target + suffix):
            os.remove(target + suffix)
    shutil.copyfile(source, target)
    conn = sqlite3.connect(target)
    try:
        conn.executescript(
            "DROP INDEX entries_digest; CREATE INDEX entries_digest ON entries (digest, layout_id);"
            "DROP INDEX children_digest; CREATE INDEX children_digest ON children (digest, layout_id);"
            "ANALYZE;"
        )
    finally:
        conn.close()


def measure_huge_in_process(db: str, path: str, digest: str, iterations: int) -> tuple[float, float]:
    """p50 (µs) of Index.resolve_in for the target tag, and of a linear scan of index.json for it."""
    from indexer.query import Index

    index = _index(db)
    assert isinstance(index, Index)
    clock = time.perf_counter_ns
    with index:
        answer = index.resolve_in(path, f":{TARGET_TAG}")
        if answer.digest != digest or answer.freshness != "indexed":
            raise RuntimeError(f"in-process answer {answer.digest} ({answer.freshness}) differs")
        ours = []
        for _ in range(max(20, iterations)):
            started = clock()
            index.resolve_in(path, f":{TARGET_TAG}")
            ours.append((clock() - started) / 1000)
    linear = []
    for _ in range(max(5, iterations // 20)):
        started = clock()
        found = linear_scan(path, TARGET_TAG)
        linear.append((clock() - started) / 1000)
        if found != digest:
            raise RuntimeError("in-process linear scan found another digest")
    return statistics.median(ours), statistics.median(linear)


def linear_scan(path: str, tag: str) -> str | None:
    """Read index.json and return the digest of the first entry whose ref.name is *tag*."""
    with open(os.path.join(path, "index.json"), "rb") as fh:
        doc = json.loads(fh.read())
    for m in doc["manifests"]:
        if (m.get("annotations") or {}).get(gen.REF_NAME) == tag:
            return str(m["digest"])
    return None


# -- the report --------------------------------------------------------------------------------


def code_version() -> str:
    """The commit measured, and whether indexer/ or migrations/ had uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", REPO, "status", "--porcelain", "--", "indexer", "migrations"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{head}" + (" with uncommitted changes in indexer/ or migrations/" if dirty else "")


def machine() -> list[str]:
    """What the figures were measured on."""
    mem_kb = 0
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    mem_kb = int(line.split()[1])
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return [
        f"- CPU: {os.cpu_count()} cores (nproc), {cpu}",
        f"- RAM: {mem_kb / 1024 / 1024:.1f} GiB",
        f"- Python {platform.python_version()} ({sys.executable}), SQLite {sqlite3.sqlite_version}",
        f"- OS: {platform.platform()}",
    ]


def write_results(bench: Bench, command: str, seconds: float) -> list[str]:
    """Rewrite the results section of RESULTS.md; return it."""
    lines = [
        BEGIN,
        f"## Latest run ({bench.s.mode} mode)",
        "",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
        f"- Command: `{command}` ({seconds:.0f} s in all)",
        f"- Code measured: {bench.code}",
        *machine(),
        "",
        *table(bench.figures),
        "",
        "Notes from this run:",
        "",
        *[f"- {note}" for note in bench.notes],
        "- The page cache is warm in every run (the data was just generated or scanned): "
        "no figure is a cold-cache one.",
        "- Every index.json got an mtime one hour in the past (os.utime) and the runner waited until its ctime, "
        "which os.utime cannot set, was older than the 3 s racily-clean window before scanning, so lookups "
        "answer from the index (each timed lookup is checked to say `freshness: indexed`).",
        "- Peak RSS is measured by /usr/bin/time -f %M around the scan: os.wait4 in the runner would report the "
        "runner's own high-water mark (a vforked child inherits it at exec).",
        "- Child processes run without PYTHONDONTWRITEBYTECODE, as an installed package runs (pip compiles its "
        "bytecode), after warm-up runs; with it set, every ocidx process compiles its modules (about 20 ms here).",
        "- In-process lookup rows give the thread CPU time of each lookup (time.thread_time_ns): on a shared "
        "2-core machine a lookup that is preempted waits a whole time slice (about 4 ms), which swamps a p99 "
        "of wall time. The wall-clock p50 and p99 are in each row's parentheses.",
        END,
    ]
    try:
        with open(RESULTS, encoding="utf-8") as fh:
            old = fh.read()
    except FileNotFoundError:
        old = "# ocidx benchmark results\n\n" + BEGIN + "\n" + END + "\n"
    head, _, rest = old.partition(BEGIN)
    _, _, tail = rest.partition(END)
    with open(RESULTS, "w", encoding="utf-8") as fh:
        fh.write(head + "\n".join(lines) + tail)
    return lines


def main(argv: list[str] | None = None) -> int:
    """Parse options, run the suite, print the table; write RESULTS.md when asked."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description="ocidx benchmarks")
    parser.add_argument("--full", action="store_true", help="the issue's sizes (about 10 minutes on 2 cores)")
    parser.add_argument("--layouts", type=int, help="layouts in the main tree (quick 1000, full 10000)")
    parser.add_argument("--huge", help="entries of the huge layouts, comma-separated (quick 10000, full 10000,50000)")
    parser.add_argument(
        "--names", help="database sizes for lookups (quick 1000,10000,100000; full 1000,100000,1000000)"
    )
    parser.add_argument("--seed", default="1")
    parser.add_argument("--data", default=os.path.join(REPO, "bench-data"), help="where generated data goes")
    parser.add_argument(
        "--only",
        help="comma-separated subset of: scan,resolve,find,batch,rescan50k,latency (these two: full mode),huge,lookup",
    )
    parser.add_argument("--no-what-if", action="store_true", help="skip the what-if digest index measurement")
    parser.add_argument(
        "--write-results",
        action="store_true",
        help="rewrite the results section of benchmarks/RESULTS.md with this run (only a full run should)",
    )
    parser.add_argument(
        "--no-graph",
        action="store_true",
        help="layouts without the content graph (index.json and nested indexes), the corpus before the graph",
    )
    args = parser.parse_args(argv)
    full = args.full
    settings = Settings(
        layouts=args.layouts or (10_000 if full else 1000),
        huge=[int(x) for x in (args.huge or ("10000,50000" if full else "10000")).split(",")],
        names=[int(x) for x in (args.names or ("1000,100000,1000000" if full else "1000,10000,100000")).split(",")],
        seed=str(args.seed),
        data=os.path.abspath(args.data),
        process_reps=5,
        scan_reps=3,
        batch_reps=3,
        lookup_iterations=2000,
        mode="full" if full else "quick",
        what_if=not args.no_what_if,
        graph=not args.no_graph,
    )
    os.makedirs(settings.data, exist_ok=True)
    only = set(args.only.split(",")) if args.only else None
    bench = Bench(settings)
    bench.code = code_version()
    started = time.perf_counter()
    load_before = os.getloadavg()
    try:
        bench.run(only)
    finally:
        shutil.rmtree(bench.home, ignore_errors=True)
    load_after = os.getloadavg()
    code_after = code_version()
    if code_after != bench.code:
        bench.notes.append(
            f"the code changed during the run (other engineers commit to this checkout): {bench.code} at the "
            f"start, {code_after} at the end; each ocidx process ran whatever was on disk when it started"
        )
    bench.notes.append(
        f"load average (1, 5, 15 min) at the start {', '.join(f'{x:.1f}' for x in load_before)}, "
        f"at the end {', '.join(f'{x:.1f}' for x in load_after)}, on {os.cpu_count()} cores: other work on the "
        "machine shares the CPUs; each figure and its baseline run interleaved so that it hits both alike"
    )
    seconds = time.perf_counter() - started
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python -m benchmarks", *given])
    print("\n".join(table(bench.figures)))
    for note in bench.notes:
        print(f"- {note}")
    missed = [f.name for f in bench.figures if f.met is False]
    print(f"\n{len(bench.figures)} figures, {len(missed)} targets missed, {seconds:.0f} s")
    if args.write_results:
        write_results(bench, command, seconds)
        print(f"wrote {RESULTS}")
    else:
        print(f"(not written to {os.path.relpath(RESULTS)}: --write-results does that)")
    return 0
