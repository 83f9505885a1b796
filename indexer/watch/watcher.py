"""Watching the roots with inotify: recursive watches, events routed to layouts and trees.

One :class:`Watcher` holds one inotify descriptor (:mod:`indexer.watch.inotify`) with a watch on
every directory below the roots in which a layout can be found: each root down to its depth limit,
never a layout's own ``blobs/``. The daemon reads it on its event loop, when the descriptor is
readable, with :meth:`Watcher.read`, which never waits; what the events mean piles up in
:attr:`Watcher.pending` until the daemon takes it (:meth:`Watcher.take`):

* ``index.json`` or ``oci-layout`` closed after a write, created, deleted, renamed in or out, or
  its attributes changed (a ``chmod`` that makes it unreadable): that *layout* is examined again;
* a blob added to or removed from a layout's ``blobs/ALG`` (a partial export completed, a nested
  index blob that arrives after ``index.json``, garbage collected): that *layout* too, since what its
  answers depend on (its children, the blobs it holds) changed;
* a directory created, deleted or renamed in or out (a whole layout renamed into place, ``rm -r``):
  the *tree* below it is rediscovered (the watches for a new directory are placed first, then it is
  listed, so nothing made in it in between is missed);
* the kernel's queue overflowed: events were *lost*, and a reconcile pass finds what they said;
* a root's own directory deleted or renamed: lost too (the daemon's health duty watches it again
  when it is back).

A directory that cannot be watched (the watch limit in force is reached: ``ENOSPC``; a directory
this user cannot read) is kept in :attr:`Watcher.unwatched` with the reason: the daemon then no
longer proves freshness by events for that tree, says so, and rediscovers it on a timer and before
answering a lookup's barrier (docs/operations.md, "inotify limits").

Why not watchdog, which earlier versions used (docs/design.md, "The watcher"): its pipeline of
three threads (reader, per-watch emitter, dispatcher) cannot be drained on demand, so a lookup
could not be told "every event queued before you asked is written"; it holds a rename's first half
for 0.5 s; and it swallows ``ENOSPC`` below a root, watching part of a tree without saying so.
Reading the one descriptor until it is empty is an exact barrier: inotify queues an event when the
change happens.
"""

from __future__ import annotations

import os

from indexer._record import Record
from indexer.config import Root
from indexer.scan.discovery import in_layout_blobs
from indexer.watch import inotify
from indexer.watch.watches import (
    BLOB_ALGORITHMS,
    LAYOUT_FILES,
    Watches,
    _Dir,
    _inside,
    blobs_owner,
    relative_parts,
)

_LAYOUT_CHANGE = (
    inotify.IN_CLOSE_WRITE
    | inotify.IN_ATTRIB
    | inotify.IN_CREATE
    | inotify.IN_DELETE
    | inotify.IN_MOVED_FROM
    | inotify.IN_MOVED_TO
)
_TREE_CHANGE = inotify.IN_CREATE | inotify.IN_DELETE | inotify.IN_MOVED_FROM | inotify.IN_MOVED_TO | inotify.IN_ATTRIB
_APPEARED = inotify.IN_CREATE | inotify.IN_MOVED_TO
_WENT = inotify.IN_DELETE | inotify.IN_MOVED_FROM
_SELF_GONE = inotify.IN_DELETE_SELF | inotify.IN_MOVE_SELF

OVERFLOW = "inotify queue overflow"


class Pending(Record):
    """What the watcher saw since it was last taken: layouts to examine again, trees to rediscover,
    why events were lost (a reconcile is due), and whether the mount table changed."""

    __slots__ = ("blobs", "layouts", "lost", "mounts", "trees")

    def __init__(
        self,
        layouts: set[str] | None = None,
        trees: dict[str, Root] | None = None,
        lost: list[str] | None = None,
        mounts: bool = False,
        blobs: set[str] | None = None,
    ) -> None:
        self.layouts = layouts if layouts is not None else set()
        self.trees = trees if trees is not None else {}
        self.lost = lost if lost is not None else []
        self.mounts = mounts
        # Layouts whose blobs/ changed: read again even when index.json is as stored.
        self.blobs = blobs if blobs is not None else set()

    def __bool__(self) -> bool:
        return bool(self.layouts or self.trees or self.lost or self.mounts or self.blobs)

    def add_tree(self, tree: Root) -> None:
        """File a directory below which layouts may have appeared or vanished (the deepest reach wins)."""
        known = self.trees.get(tree.path)
        if known is None or known.max_depth < tree.max_depth:
            self.trees[tree.path] = tree

    def add_lost(self, why: str) -> None:
        """Events were lost: a reconcile pass must find what they said."""
        if why not in self.lost:
            self.lost.append(why)

    def merge(self, other: Pending) -> None:
        """Add everything *other* holds to this one."""
        self.layouts |= other.layouts
        self.blobs |= other.blobs
        for tree in other.trees.values():
            self.add_tree(tree)
        for why in other.lost:
            self.add_lost(why)
        self.mounts = self.mounts or other.mounts


class Watcher(Watches):
    """inotify watches on every directory below the roots where a layout can be, and what their events
    mean (see the module)."""

    def __init__(self) -> None:
        super().__init__()
        self.pending = Pending()
        self.events = 0  # events read so far (the metrics count them)

    # -- reading ------------------------------------------------------------------------------------

    def read(self) -> bool:
        """Read every event queued now (never waits) into :attr:`pending`; whether there was any."""
        events = self._inotify.read()
        for event in events:
            self._route(event)
        self.events += len(events)
        return bool(events)

    def take(self) -> Pending:
        """What was seen since the last take, leaving nothing pending."""
        pending, self.pending = self.pending, Pending()
        return pending

    def _route(self, event: inotify.Event) -> None:
        mask = event.mask
        if mask & inotify.IN_Q_OVERFLOW:
            # Events were dropped: directories may have appeared with no watch placed. Every watch is
            # placed again (the reconcile pass requested for the loss finds the layouts).
            self.pending.add_lost(OVERFLOW)
            for top in list(self._roots):
                self.rewatch(top)
            return
        watched = self._dirs.get(event.wd)
        if watched is None:
            return  # a watch dropped since the event was queued
        if mask & inotify.IN_IGNORED:
            del self._dirs[event.wd]
            if self._wd_of.get(watched.path) == event.wd:
                del self._wd_of[watched.path]
            if watched.path in self._roots:
                self.pending.add_lost(f"root {watched.path} vanished or was replaced")
            return
        if mask & _SELF_GONE:
            if watched.path in self._roots:
                self.pending.add_lost(f"root {watched.path} vanished or was replaced")
            return  # any other directory: its parent's event says so
        if not event.name:
            return
        name = os.fsdecode(event.name)
        path = (watched.path if watched.path.endswith("/") else watched.path + "/") + name
        if watched.blobs_of is None and (layout := blobs_owner(watched.path)) is not None:
            # Watched before its layout had index.json (a writer makes blobs/ first): its role now.
            watched = self._dirs[event.wd] = _Dir(watched.path, watched.root, watched.depth, layout)
        if watched.blobs_of is not None:
            self._blob_changed(watched, name, path, mask)
            return
        if mask & inotify.IN_ISDIR:
            if mask & _TREE_CHANGE and watched.depth < watched.root.max_depth:
                # An attribute change (chmod, touch, cp -a restoring times) leaves the directory there:
                # its watches are placed again (it may have become readable) and it is rediscovered.
                self._tree_changed(path, watched, appeared=not mask & _WENT)
            return
        if name in LAYOUT_FILES:
            if mask & _LAYOUT_CHANGE:
                self.pending.layouts.add(watched.path)
        elif mask & _APPEARED and watched.depth < watched.root.max_depth:
            # A symbolic link made or renamed here may lead to a directory of layouts.
            try:
                leads_to_directory = os.path.islink(path) and os.path.isdir(path)
            except OSError:
                leads_to_directory = False
            root = watched.root
            if leads_to_directory and (root.follow_symlinks or _inside(path, root.path)):
                self._tree_changed(path, watched, appeared=True)

    def _blob_changed(self, watched: _Dir, name: str, path: str, mask: int) -> None:
        """A blob (or a ``blobs/ALG/`` directory) added or removed: the layout is read again, whatever
        its ``index.json`` says (what its answers depend on changed)."""
        layout = watched.blobs_of
        assert layout is not None
        self.pending.blobs.add(layout)
        is_blobs_dir = os.path.basename(watched.path) == "blobs"
        if is_blobs_dir and mask & inotify.IN_ISDIR and name in BLOB_ALGORITHMS:
            if mask & _WENT:
                self._forget_below(path, remove=True)
            else:
                self._add(path, watched.root, watched.depth + 1, blobs_of=layout)

    def _tree_changed(self, path: str, parent: _Dir, *, appeared: bool) -> None:
        root = parent.root
        parts = relative_parts(path, root.path)
        if parts is not None and "blobs" in parts and in_layout_blobs(root.path, parts):
            if appeared and parts[-1] == "blobs":  # a layout's blobs/ made after its index.json
                self._watch_blobs(path, parent.path, root, parent.depth)
            return
        if appeared:
            target = path
            if os.path.islink(path):
                if not (root.follow_symlinks or _inside(path, root.path)):
                    return  # a link leading out of a root that does not follow links: never watched
                target = os.path.realpath(path)
            if self._add(target, root, parent.depth + 1):
                self._watch_below(target, root, parent.depth + 1)
        else:
            self._forget_below(path, remove=True)
        left = root.max_depth - parent.depth - 1
        self.pending.add_tree(Root(path, max_depth=left, follow_symlinks=root.follow_symlinks))
