"""What to write for one layout: the ``stat`` proof that its stored rows are current, and the
outcome of a read against its stored row (:mod:`indexer.store.outcomes`)."""

from __future__ import annotations

import os

from indexer import layout as layout_mod
from indexer.scan import workers
from indexer.store import read as db
from indexer.store.outcomes import Failed, Gone, Outcome, Read, Same

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable

    from indexer.config import Config
    from indexer.store.rows import LayoutRows


def examine(path: str, stored: db.StoredLayout | None, *, config: Config, full: bool = False) -> Outcome | None:
    """Look at one layout: None when its stored state is provably current, else what to write."""
    if not full and stored is not None and _is_current(path, stored):
        return None
    return decide(workers.read_one(path, config.familiar, config.limits), stored, full=full)


def _is_current(path: str, stored: db.StoredLayout) -> bool:
    """Whether one ``stat`` of the layout's ``index.json``, one of each directory of ``blobs/`` its
    graph was listed from, and one of each nested index blob its rows depend on besides, when any
    (``read.depends_hold``), prove its stored rows current."""
    try:
        st = os.stat(os.path.join(path, "index.json"))
    except OSError:
        return False  # gone, or unreadable: the read says which
    return (
        stored.is_current(layout_mod.FileIdentity.of(st))
        and stored.presence_current()
        and db.depends_hold(path, stored.depends)
    )


def decide(
    result: workers.Result, stored: db.StoredLayout | None, *, full: bool, epoch: int | None = None
) -> Outcome | None:
    """What to write for one read layout (a worker's :data:`workers.Result`), against *stored*;
    *epoch* is the graph epoch of the pass the read belongs to (``store.outcomes.Read``)."""
    path, read_ns, kind, detail = result
    if kind == workers.GONE:
        return Gone(path, stored) if stored is not None else None
    if kind == workers.FAILED:
        error, ident = workers.failed_error(detail)
        identity = layout_mod.FileIdentity(*ident) if ident is not None else None
        return Failed(path, error, identity, read_ns, stored)
    rows: LayoutRows = detail  # type: ignore[assignment]
    graph = rows[6]
    if (
        not full
        and stored is not None
        and stored.state == "ok"
        and stored.content_hash == rows[1]
        and graph is not None
        and stored.graph_hash == graph[2]
        and db.same_rows_depend(stored.depends, rows[7])
    ):
        return Same(path, layout_mod.FileIdentity(*rows[0]), read_ns, stored, graph[0], rows[8], rows[7])
    return Read(path, rows, read_ns, stored, epoch)


def examine_batch(
    paths: Iterable[str], stored: dict[str, db.StoredLayout], *, config: Config, full: bool
) -> list[Outcome]:
    """Examine a batch of layouts in this process."""
    out = []
    for path in paths:
        outcome = examine(path, stored.get(path), config=config, full=full)
        if outcome is not None:
            out.append(outcome)
    return out


def _unsettled(paths: list[str], stored: dict[str, db.StoredLayout]) -> list[str]:
    """The layouts of *paths* that one ``stat`` does not prove unchanged: those to read (all of those
    read on a mount that is no longer there, whatever their ``stat`` says: ``read.remounted``)."""
    mounts = {
        path: (known.identity.dev, known.mnt_id)
        for path in paths
        if (known := stored.get(path)) is not None and known.identity is not None
    }
    gone = db.remounted(db.mount_members(mounts, 0, 1))
    return [
        path
        for path in paths
        if (known := stored.get(path)) is None
        or not _is_current(path, known)
        or (gone and known.identity is not None and (known.identity.dev, known.mnt_id) in gone)
    ]
