"""Figures of the content graph that need only the generator and the baseline script.

``python -m benchmarks.graph [--layouts 10000] [--seed 1] [--reps 3] [--data DIR] [--write-results]``
generates (or reuses) the runner's graph tree and prints, each beside its baseline as the runner
does:

* the plain single-threaded script doing the graph's reads (``benchmarks/baseline_scan.py --graph``:
  index.json, nested indexes, every manifest and config blob hashed, parsed and written as rows, a
  listing per layout): its wall time and peak RSS, beside the same script without the graph's reads.
  It is the baseline of ocidx's cold scan with the graph;
* the tree: its size on disk beside its blobs' sizes summed (big layers are sparse), blobs per layout
  beside the corpus without the graph, and how blobs are shared: blob files per distinct blob,
  bytes held per distinct byte, and the share of the referenced bytes that another layout holds too.

It also writes what ``ocidx du --json`` must answer for the tree, computed by a plain walk
(``DATA/du-reference-TREE.json``, the keys of ``ocidx du --json``), to check ocidx against. With
``--write-results`` it rewrites its own section of ``benchmarks/RESULTS.md`` (between ``graph:begin`` and
``graph:end``); the runner's section is left alone.
"""

from __future__ import annotations

import argparse
import array
import json
import os
import sqlite3
import statistics
import sys
import time
from dataclasses import dataclass, field

from benchmarks import generate as gen
from benchmarks.run import (
    BASELINE_SCAN,
    REPO,
    RESULTS,
    Figure,
    Proc,
    code_version,
    ensure_tree,
    machine,
    median_of,
    run_process,
    table,
    tree_path,
)

BEGIN, END = "<!-- graph:begin -->", "<!-- graph:end -->"
INDEX_TYPES = frozenset({gen.OCI_INDEX, gen.DOCKER_LIST})
MANIFEST_TYPES = frozenset({gen.OCI_MANIFEST, gen.DOCKER_MANIFEST})


@dataclass
class TreeStats:
    """What a walk of a tree finds: its disk use, its blobs, and per layout what ``ocidx du`` answers."""

    layouts: int = 0
    disk_bytes: int = 0  # st_blocks of every file and directory, in bytes
    blob_files: int = 0
    blob_bytes: int = 0  # st_size of every blob file (sparse layers at their full size)
    distinct_blobs: int = 0
    distinct_bytes: int = 0
    blobs_per_layout: list[int] = field(default_factory=list)
    du: list[dict[str, object]] = field(default_factory=list)
    seconds: float = 0.0

    def total(self) -> dict[str, int]:
        """The du rows summed, as ``ocidx du``'s ``total``."""
        keys = (
            "referenced_bytes",
            "unique_bytes",
            "shared_bytes",
            "unreferenced_bytes",
            "unreferenced_blobs",
            "missing_blobs",
        )
        return {key: sum(int(str(row[key])) for row in self.du) for key in keys}


class _Reader:
    """Parses of index and manifest blobs, by digest: blobs are content-addressed, so a parse made
    from one layout's copy serves every layout that holds the digest."""

    def __init__(self) -> None:
        self.indexes: dict[str, list[tuple[str, str]]] = {}
        self.manifests: dict[str, list[str]] = {}

    def _load(self, layout: str, digest: str) -> dict[str, object]:
        with open(os.path.join(layout, "blobs", "sha256", digest.partition(":")[2]), "rb") as fh:
            document = json.loads(fh.read())
        assert isinstance(document, dict)
        return document

    def referenced(self, layout: str, held: dict[str, tuple[int, int]]) -> set[str]:
        """Every digest the layout references: index.json, the indexes and manifests it holds, their
        configs and layers (a ``subject`` keeps nothing alive)."""
        with open(os.path.join(layout, "index.json"), "rb") as fh:
            pending = [(str(d["digest"]), str(d.get("mediaType", ""))) for d in json.loads(fh.read())["manifests"]]
        out: set[str] = set()
        while pending:
            digest, media_type = pending.pop()
            if digest in out:
                continue
            out.add(digest)
            if digest.partition(":")[2] not in held:
                continue
            if media_type in INDEX_TYPES:
                children = self.indexes.get(digest)
                if children is None:
                    listed = self._load(layout, digest).get("manifests") or []
                    assert isinstance(listed, list)
                    children = self.indexes[digest] = [(str(d["digest"]), str(d.get("mediaType", ""))) for d in listed]
                pending.extend(children)
            elif media_type in MANIFEST_TYPES:
                parts = self.manifests.get(digest)
                if parts is None:
                    document = self._load(layout, digest)
                    config, layers = document.get("config"), document.get("layers") or []
                    assert isinstance(config, dict) and isinstance(layers, list)
                    parts = self.manifests[digest] = [str(config["digest"]), *(str(d["digest"]) for d in layers)]
                out.update(parts)
        return out


def walk_tree(root: str) -> TreeStats:
    """Disk use, blobs, and the ``ocidx du`` rows of every layout below *root*: a listing of each
    layout's ``blobs/sha256`` with an lstat per blob, and the reads of index.json, indexes and manifests."""
    started = time.perf_counter()
    stats = TreeStats()
    reader = _Reader()
    ids: dict[str, int] = {}  # digest -> a small integer, to keep per-layout lists compact
    sizes = array.array("q")
    holders = array.array("i")  # layouts holding each digest
    per_layout: list[tuple[dict[str, object], array.array[int]]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        stats.disk_bytes += os.lstat(dirpath).st_blocks * 512
        for name in filenames:
            stats.disk_bytes += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
        if "blobs" not in dirnames:
            continue
        dirnames.remove("blobs")
        if "index.json" not in filenames:
            continue
        blob_dir = os.path.join(dirpath, "blobs", "sha256")
        stats.disk_bytes += os.lstat(os.path.join(dirpath, "blobs")).st_blocks * 512
        stats.disk_bytes += os.lstat(blob_dir).st_blocks * 512
        held: dict[str, tuple[int, int]] = {}
        with os.scandir(blob_dir) as entries:
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                held[entry.name] = (st.st_size, st.st_blocks * 512)
        stats.layouts += 1
        stats.blobs_per_layout.append(len(held))
        referenced = reader.referenced(dirpath, held)
        present = array.array("i")
        row: dict[str, object] = {"layout": os.path.realpath(dirpath)}
        referenced_bytes = unreferenced_bytes = unreferenced_blobs = 0
        for name, (size, blocks) in held.items():
            stats.blob_files += 1
            stats.blob_bytes += size
            stats.disk_bytes += blocks
            digest = "sha256:" + name
            number = ids.get(digest)
            if number is None:
                number = ids[digest] = len(sizes)
                sizes.append(size)
                holders.append(0)
                stats.distinct_blobs += 1
                stats.distinct_bytes += size
            holders[number] += 1
            if digest in referenced:
                present.append(number)
                referenced_bytes += size
            else:
                unreferenced_bytes += size
                unreferenced_blobs += 1
        row["referenced_bytes"] = referenced_bytes
        row["unreferenced_bytes"] = unreferenced_bytes
        row["unreferenced_blobs"] = unreferenced_blobs
        row["missing_blobs"] = sum(1 for digest in referenced if digest.partition(":")[2] not in held)
        per_layout.append((row, present))
    for row, present in per_layout:
        shared = sum(sizes[number] for number in present if holders[number] > 1)
        row["shared_bytes"] = shared
        row["unique_bytes"] = int(str(row["referenced_bytes"])) - shared
        stats.du.append(
            {
                key: row[key]
                for key in (
                    "layout",
                    "referenced_bytes",
                    "unique_bytes",
                    "shared_bytes",
                    "unreferenced_bytes",
                    "unreferenced_blobs",
                    "missing_blobs",
                )
            }
        )
    stats.seconds = time.perf_counter() - started
    return stats


def blobs_per_layout_without_graph(count: int, seed: str) -> float:
    """Blob files per layout of the same tree generated without the content graph (built, not written)."""
    images = gen.ImageCache()
    return statistics.fmean(len(gen.build_layout(seed, n, images, graph=False).blobs) for n in range(count))


def _say(text: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {text}\n")
    sys.stderr.flush()


def measure(layouts: int, seed: str, reps: int, data: str) -> tuple[list[Figure], list[str]]:
    """The figures and the notes of one run."""
    notes: list[str] = []
    tree = tree_path(data, layouts, seed, graph=True)
    generated = not os.path.exists(os.path.join(tree, ".complete"))
    info = ensure_tree(tree, layouts, seed, graph=True, say=_say)
    notes.append(
        f"graph tree: {len(info.layouts):,} layouts, {info.entries:,} entries, {info.names:,} names, "
        f"{info.blobs:,} blob files, {info.referrers:,} referrer entries, {info.partial_exports:,} partial exports "
        f"({info.missing_blobs:,} referenced blobs missing), {info.unreferenced_blobs:,} unreferenced blobs; "
        f"generated in {info.seconds:.1f} s{' in this run' if generated else ' (reused)'}"
    )
    dbs = os.path.join(data, "db")
    os.makedirs(dbs, exist_ok=True)
    plain_argv = [sys.executable, BASELINE_SCAN, tree, os.path.join(dbs, f"baseline-plain-{layouts}.db")]
    graph_db = os.path.join(dbs, f"baseline-graph-{layouts}.db")
    graph_argv = [sys.executable, BASELINE_SCAN, "--graph", tree, graph_db]
    _say("warming the page cache (one run of each baseline)")
    for argv in (plain_argv, graph_argv):
        run_process(argv)
    runs: tuple[list[Proc], list[Proc]] = ([], [])
    for rep in range(reps):  # interleaved, so that load on the machine hits both alike
        for argv, out in ((graph_argv, runs[0]), (plain_argv, runs[1])):
            proc = run_process(argv, rss=True)
            if proc.returncode != 0 or proc.stdout.strip() != str(layouts):
                raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr[-2000:]}")
            out.append(proc)
        _say(f"  run {rep + 1}/{reps}: with the graph {runs[0][-1].seconds:.2f} s, without {runs[1][-1].seconds:.2f} s")
    with_graph, without = median_of(runs[0]), median_of(runs[1])
    figures = [
        Figure(
            f"plain single-threaded script with the graph's reads (benchmarks/baseline_scan.py --graph), "
            f"{layouts:,} layouts",
            with_graph.seconds,
            "s",
            "the same script without them (index.json and nested indexes)",
            without.seconds,
            "-",
            None,
            f"median of {reps}; CPU {with_graph.cpu_s:.2f} s vs {without.cpu_s:.2f} s",
        ),
        Figure(
            f"peak RSS of the script with the graph's reads, {layouts:,} layouts",
            max(p.maxrss_kb for p in runs[0]) / 1024,
            "MB",
            "the same script without them",
            max(p.maxrss_kb for p in runs[1]) / 1024,
            "-",
            None,
            "/usr/bin/time",
        ),
    ]
    conn = sqlite3.connect(f"file:{graph_db}?mode=ro", uri=True)
    try:
        manifests, configs, layers = conn.execute(
            "SELECT count(*), count(DISTINCT config), sum(layers) FROM baseline_manifests"
        ).fetchone()
        distinct_layers = conn.execute("SELECT count(DISTINCT digest) FROM baseline_layers").fetchone()[0]
    finally:
        conn.close()
    notes.append(
        f"the script with the graph parsed {manifests:,} distinct manifests and {configs:,} distinct configs "
        f"({layers:,} layer descriptors, {distinct_layers:,} distinct layers), each once for the whole tree"
    )
    _say("walking the tree (disk use, blobs, du reference)")
    stats = walk_tree(tree)
    gb = 1e9
    figures.append(
        Figure(
            "the graph tree's size on disk (st_blocks of every file and directory)",
            round(stats.disk_bytes / gb, 2),
            "GB",
            "its blobs' sizes summed (big layers are sparse files)",
            round(stats.blob_bytes / gb, 1),
            "a few GB (≤ 8 GB)",
            stats.disk_bytes <= 8 * gb,
        )
    )
    per_layout = sorted(stats.blobs_per_layout)
    figures.append(
        Figure(
            "blob files per layout, mean",
            round(stats.blob_files / stats.layouts, 1),
            "blobs",
            "the same tree without the content graph (--no-graph)",
            round(blobs_per_layout_without_graph(layouts, seed), 1),
            "-",
            None,
            f"p50 {per_layout[len(per_layout) // 2]}, p99 {per_layout[len(per_layout) * 99 // 100]}, "
            f"max {per_layout[-1]}",
        )
    )
    total = stats.total()
    figures += [
        Figure(
            "blob files per distinct blob (sharing across layouts)",
            round(stats.blob_files / stats.distinct_blobs, 2),
            "x",
            "none",
            None,
            "-",
            None,
            f"{stats.blob_files:,} files, {stats.distinct_blobs:,} distinct",
        ),
        Figure(
            "bytes held per distinct byte (sharing across layouts, by size)",
            round(stats.blob_bytes / stats.distinct_bytes, 2),
            "x",
            "none",
            None,
            "-",
            None,
            f"{stats.blob_bytes / gb:,.0f} GB held, {stats.distinct_bytes / gb:,.0f} GB distinct",
        ),
        Figure(
            "referenced bytes that another layout holds too (du: shared / referenced)",
            round(100 * total["shared_bytes"] / max(1, total["referenced_bytes"]), 1),
            "%",
            "none",
            None,
            "-",
            None,
        ),
    ]
    reference = os.path.join(data, f"du-reference-{os.path.basename(tree)}.json")
    with open(reference, "w", encoding="utf-8") as fh:
        json.dump({"layouts": stats.du, "total": total}, fh)
    notes.append(
        "du totals of a plain walk (" + ", ".join(f"{key} {value:,}" for key, value in total.items()) + "); "
        f"per layout in {os.path.relpath(reference, REPO)}, the shape of `ocidx du --json`; "
        f"the walk took {stats.seconds:.1f} s"
    )
    return figures, notes


def write_results(figures: list[Figure], notes: list[str], command: str, seconds: float) -> None:
    """Rewrite this module's section of RESULTS.md (added after the runner's section the first time)."""
    lines = [
        BEGIN,
        "## The content graph: generator and baseline",
        "",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
        f"- Command: `{command}` ({seconds:.0f} s in all)",
        f"- Code measured: {code_version()}",
        *machine(),
        "",
        *table(figures),
        "",
        "Notes from this run:",
        "",
        *[f"- {note}" for note in notes],
        END,
    ]
    with open(RESULTS, encoding="utf-8") as fh:
        old = fh.read()
    if BEGIN in old:
        head, _, rest = old.partition(BEGIN)
        _, _, tail = rest.partition(END)
    else:
        marker = "<!-- results:end -->"
        head, found, tail = old.partition(marker)
        head, tail = (head + found + "\n\n", tail) if found else (old + "\n", "\n")
    with open(RESULTS, "w", encoding="utf-8") as fh:
        fh.write(head + "\n".join(lines) + tail)


def main(argv: list[str] | None = None) -> int:
    """Parse options, measure, print the table; with --write-results, write it to RESULTS.md."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.graph", description=__doc__.split("\n")[0])
    parser.add_argument("--layouts", type=int, default=10_000)
    parser.add_argument("--seed", default="1")
    parser.add_argument("--reps", type=int, default=3, help="runs of each baseline (median)")
    parser.add_argument("--data", default=os.path.join(REPO, "bench-data"), help="where generated data goes")
    parser.add_argument("--write-results", action="store_true", help="rewrite this module's section of RESULTS.md")
    args = parser.parse_args(argv)
    data = os.path.abspath(args.data)
    os.makedirs(data, exist_ok=True)
    started = time.perf_counter()
    load_before = os.getloadavg()
    figures, notes = measure(args.layouts, str(args.seed), args.reps, data)
    notes.append(
        f"load average (1, 5, 15 min) at the start {', '.join(f'{x:.1f}' for x in load_before)}, at the end "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}, on {os.cpu_count()} cores"
    )
    seconds = time.perf_counter() - started
    print("\n".join(table(figures)))
    for note in notes:
        print(f"- {note}")
    if args.write_results:
        given = sys.argv[1:] if argv is None else argv
        write_results(figures, notes, " ".join(["python -m benchmarks.graph", *given]), seconds)
        print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
