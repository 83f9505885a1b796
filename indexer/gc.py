"""``ocidx gc LAYOUT``: the blobs nothing in a layout references, and their removal beside live writers.

It needs no database: it reads the layout itself. What the layout references is followed from
``index.json`` through nested indexes to manifests, their configs and layers
(:func:`indexer.graph.reach`); a ``subject`` link keeps nothing alive. A layout whose references are
not wholly known (a referenced manifest or index absent or refused, a descriptor that could not be
read) proves nothing unreferenced: nothing of it is garbage, and the answer says why.

Without ``--delete`` nothing changes. With it, the blobs are removed under the lock BuildKit's
layout writer takes (``index.json.lock``, ``flock``: its ``client/ociindex`` takes it to rewrite
``index.json`` and removes the file after), so no writer can list a blob in ``index.json`` while
it goes:

* ``index.json`` is read again under the lock; a blob it now references is kept;
* a blob younger than the grace period (default one hour: ``[gc] grace_s``, ``--grace``) is kept,
  because a writer puts its blobs before it lists them in ``index.json`` (and takes the lock only
  for that last step);
* a blob is removed only if it is still the file listed (same inode and mtime), by ``unlinkat``
  relative to its ``blobs/ALG`` directory opened with ``O_NOFOLLOW``: no symlink is followed, no
  name leaves ``blobs/ALG`` (a name is a validated digest's hex), and a symlink, FIFO or directory
  named like a blob is reported, never touched;
* the lock is held for at most about :data:`HOLD_BUDGET_S` of removals at a time, then released
  and taken again, and each hold is measured (``lock_held_s``): BuildKit's readers and writers fail
  at once when it is held.

What it cannot see: a writer that reuses a blob already present (content-addressed stores skip
writing it, so its mtime stays old) and lists it in ``index.json`` only after the removal. No lock
protects that; ``--grace`` does not either. docs/operations.md says when it is safe to run.
"""

from __future__ import annotations

import errno
import os
import stat
import time

from indexer.errors import LayoutBusy, LayoutUnreadable, NotFound
from indexer.graph import BlobDirs, graph_key, reach
from indexer.layout import DEFAULT_LIMITS, Limits, is_layout_dir, read_index_bytes, read_layout

TYPE_CHECKING = False
if TYPE_CHECKING:
    from indexer.graph import Reach
    from indexer.layout import Snapshot

DEFAULT_GRACE_S = 3600.0
LOCK_FILE = "index.json.lock"
# How long --delete waits for a writer's hold of the lock to end (BuildKit holds it while it
# rewrites index.json: milliseconds).
LOCK_WAIT_S = 10.0
# How long one hold of the lock may go on removing blobs before it is released and taken again
# (at least one blob per hold). An unlinkat costs 15 µs on ext4 for a blob written long ago, but
# 0.3 ms for one whose data is still being written back; a bound in time, not in blobs, keeps each
# hold short either way (benchmarks/RESULTS.md, gc).
HOLD_BUDGET_S = 0.02


class _Candidate:
    __slots__ = ("age_s", "digest", "ino", "mtime_ns", "size")

    def __init__(self, digest: str, st: os.stat_result, now_ns: int) -> None:
        self.digest = digest
        self.size = st.st_size
        self.ino = st.st_ino
        self.mtime_ns = st.st_mtime_ns
        self.age_s = (now_ns - st.st_mtime_ns) / 1e9


class _OnDisk:
    """The blobs present, as listed, or (for a digest the listing did not see) as ``blobs/`` holds now."""

    def __init__(self, dirs: BlobDirs) -> None:
        self.dirs = dirs

    def __contains__(self, digest: object) -> bool:
        if not isinstance(digest, str):
            return False
        if digest in self.dirs.files:
            return True
        st = self.dirs.stat(digest)
        return st is not None and stat.S_ISREG(st.st_mode)


def collect(
    layout: str,
    *,
    delete: bool = False,
    grace_s: float = DEFAULT_GRACE_S,
    limits: Limits = DEFAULT_LIMITS,
    lock_wait_s: float = LOCK_WAIT_S,
) -> dict[str, object]:
    """What ``ocidx gc --json`` prints for *layout* (docs/json.md); with *delete*, remove the garbage."""
    real = os.path.realpath(layout)
    if not is_layout_dir(real):
        raise NotFound(f"{real} is not an OCI layout (no index.json or oci-layout)")
    snapshot = read_layout(real, limits=limits)
    with BlobDirs(real, follow=False) as dirs:
        found = reach(real, snapshot, dirs.files, limits)
        unproven = [*found.unknown, *dirs.problems]
        skipped = [{"name": digest, "why": kind} for digest, kind in sorted(dirs.odd.items())]
        now = time.time_ns()
        candidates: list[_Candidate] = []
        if not unproven:
            for digest in sorted(dirs.files):
                if graph_key(digest) in found.refs:  # by key: a blob whose key is taken is kept
                    continue
                st = dirs.stat(digest)
                if st is not None and stat.S_ISREG(st.st_mode):
                    candidates.append(_Candidate(digest, st, now))
        garbage = [c for c in candidates if c.age_s >= grace_s]
        deleted, holds = 0, list[float]()
        if delete and garbage:
            deleted, holds, late = _delete(real, dirs, garbage, snapshot, limits, lock_wait_s)
            unproven.extend(late)
    return {
        "layout": real,
        "blobs": [{"digest": c.digest, "size": c.size, "age_s": round(c.age_s, 3)} for c in garbage],
        "bytes": sum(c.size for c in garbage),
        "kept_young": len(candidates) - len(garbage),
        "deleted": deleted,
        "unproven": unproven,
        "skipped": skipped,
        "lock_held_s": round(max(holds), 6) if holds else None,
    }


def _delete(
    layout: str,
    dirs: BlobDirs,
    garbage: list[_Candidate],
    snapshot: Snapshot,
    limits: Limits,
    lock_wait_s: float,
) -> tuple[int, list[float], list[str]]:
    """Remove *garbage* under the lock, a chunk per hold: how many went, each hold's length, and why
    the rest was kept when ``index.json`` came to reference something unknown meanwhile."""
    layout_fd = dirs._layout_fd
    content_hash = snapshot.content_hash
    refs: Reach | None = None
    deleted = 0
    holds: list[float] = []
    remaining = garbage[::-1]  # popped from the end: in digest order
    while remaining:
        lock = _lock(layout, layout_fd, lock_wait_s)
        started = time.monotonic()
        try:
            data, _identity = read_index_bytes(layout, limits)
            import hashlib

            now_hash = "sha256:" + hashlib.sha256(data).hexdigest()
            if now_hash != content_hash:
                # A writer listed something since: follow the new index.json before removing anything.
                refs = reach(layout, read_layout(layout, limits=limits), _OnDisk(dirs), limits)
                content_hash = now_hash
                if refs.unknown:
                    return deleted, holds, [f"index.json changed during gc: {why}" for why in refs.unknown]
            if refs is not None:
                remaining = [c for c in remaining if graph_key(c.digest) not in refs.refs]
            while remaining:
                deleted += _unlink(dirs, remaining.pop())
                if time.monotonic() - started >= HOLD_BUDGET_S:
                    break
        finally:
            _unlock(layout_fd, lock)
            holds.append(time.monotonic() - started)
    return deleted, holds, []


def _unlink(dirs: BlobDirs, candidate: _Candidate) -> int:
    """Remove one blob if it is still the file listed (same inode, not rewritten or touched since)."""
    algorithm, _, name = candidate.digest.partition(":")
    directory = dirs.fds[algorithm]
    try:
        st = os.stat(name, dir_fd=directory, follow_symlinks=False)
    except OSError:
        return 0
    if not stat.S_ISREG(st.st_mode) or st.st_ino != candidate.ino or st.st_mtime_ns != candidate.mtime_ns:
        return 0
    try:
        os.unlink(name, dir_fd=directory)
    except FileNotFoundError:
        return 0
    return 1


def _lock(layout: str, layout_fd: int, wait_s: float) -> int:
    """Hold BuildKit's ``index.json.lock`` (``flock``, exclusive), waiting at most *wait_s* for a writer.

    The file is opened as a hostile user may have prepared it: never through a symlink, never
    truncated, only a regular file. BuildKit removes it after each hold, so a lock taken on a file
    that is no longer at the path (removed by the holder before us) locks nothing: it is taken again.
    """
    import fcntl

    path = os.path.join(layout, LOCK_FILE)
    deadline = time.monotonic() + wait_s
    delay = 0.002
    while True:
        try:
            fd = os.open(
                LOCK_FILE,
                os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                0o644,
                dir_fd=layout_fd,
            )
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise LayoutUnreadable(f"{path} is a symlink: refusing to follow it") from None
            raise LayoutUnreadable(f"{path} cannot be opened: {exc.strerror}") from None
        try:
            held = os.fstat(fd)
            if not stat.S_ISREG(held.st_mode):
                raise LayoutUnreadable(f"{path} is not a regular file: refusing to lock it")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LayoutBusy(
                        f"{path} stayed locked for {wait_s:g} s (a BuildKit export or another gc?): nothing deleted"
                    ) from None
                os.close(fd)
                fd = -1
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
                continue
            try:
                now = os.stat(LOCK_FILE, dir_fd=layout_fd, follow_symlinks=False)
            except FileNotFoundError:
                now = None
            if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                locked, fd = fd, -1
                return locked
        finally:
            if fd >= 0:
                os.close(fd)


def _unlock(layout_fd: int, fd: int) -> None:
    """Release the lock, removing the file first (as BuildKit does) if it is still the one locked:
    removed while held, nobody can take a lock on a file that is gone."""
    try:
        held = os.fstat(fd)
        now = os.stat(LOCK_FILE, dir_fd=layout_fd, follow_symlinks=False)
        if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
            os.unlink(LOCK_FILE, dir_fd=layout_fd)
    except OSError:
        pass
    finally:
        os.close(fd)
