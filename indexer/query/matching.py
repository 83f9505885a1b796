"""Matching a query on one layout's rows or across the index, and the answers built from the hits
(with what the content graph says of an image)."""

from __future__ import annotations

import os
import sqlite3

from indexer import graph as graph_mod
from indexer import layout as layout_mod
from indexer.errors import LayoutError, TagMismatch
from indexer.names import Name
from indexer.query.answers import INDEXED, Answer, Query, View
from indexer.store import read as db


def _match(view: View, query: Query, *, strict: bool, blobs: bool) -> tuple[list[db.Hit], list[str]]:
    """Hits for *query* in one layout view, and warnings (a tag that no longer points at the digest)."""
    conn, lid = view.conn, view.layout_id
    warnings = list(view.warnings)
    if query.digest is None:
        if query.name is not None:
            return db.by_name(conn, query.name, query.tag or "", lid), warnings
        return db.by_tag(conn, query.tag or "latest", lid), warnings
    hits = db.by_digest(conn, query.digest, lid)
    entries = [h for h in hits if h.source == "entry"]
    hits = entries or hits
    if not hits and blobs:
        blob = _blob_hit(view, query.digest)
        hits = [blob] if blob is not None else []
    if hits and (query.tag or query.name):
        pointed = db.hits(conn, db.pointing_lookup(name=query.name, tag=query.tag), lid)
        message = mismatch(query, view.path, {h.digest for h in pointed})
        if message is not None:
            if strict:
                raise TagMismatch(message)
            warnings.append(message)
    return hits, warnings


def mismatch(query: Query, path: str, pointed: set[str]) -> str | None:
    """The warning when the name or tag of a ``...@DIGEST`` query points elsewhere in *path* (digests *pointed*)."""
    if query.digest is None or query.digest in pointed:
        return None
    label = (query.name or "") + (f":{query.tag}" if query.tag else "")
    now = sorted(pointed)
    return f"{label} in {path} does not point at {query.digest}" + (
        f" (it points at {', '.join(now)})" if now else " (it names nothing there)"
    )


def _match_all(conn: sqlite3.Connection, query: Query) -> tuple[dict[str, list[Answer]], dict[str, db.StoredLayout]]:
    """Matches of *query* in the whole index by layout path (not yet verified), and those layouts.

    A digest alone also matches the layouts that reference it as a layer or a config of one of
    their manifests (``source`` ``layer`` or ``config``, docs/semantics.md)."""
    hits = [
        h for lookup in db.lookups(name=query.name, tag=query.tag, digest=query.digest) for h in db.hits(conn, lookup)
    ]
    graph_hits: list[db.GraphHit] = []
    if query.digest is not None and query.name is None and query.tag is None:
        graph_hits = db.graph_hits(conn, query.digest)
    stored = db.layouts_by_id(conn, {h.layout_id for h in hits} | {h.layout_id for h in graph_hits})
    # One names query for every hit (it chunks its IN list), not one per answer.
    names_of = db.names(conn, [h.entry_id for h in hits if h.source == "entry"])
    grouped: dict[str, list[db.Hit]] = {}
    for hit in hits:
        grouped.setdefault(stored[hit.layout_id].path, []).append(hit)
    out: dict[str, list[Answer]] = {}
    for path, layout_hits in grouped.items():
        view = View(conn, layout_hits[0].layout_id, path, INDEXED, [])
        if query.digest is not None and (query.tag or query.name):
            try:
                layout_hits, warnings = _match(view, query, strict=True, blobs=False)
            except TagMismatch:
                continue  # a search: list only the layouts where the name points at the digest
        else:
            warnings = []
        out[path] = _answers_by_digest(view, layout_hits, warnings, names_of)
    by_layout: dict[int, list[db.GraphHit]] = {}
    for graph_hit in graph_hits:
        by_layout.setdefault(graph_hit.layout_id, []).append(graph_hit)
    for lid, layout_graph_hits in by_layout.items():
        path = stored[lid].path
        if path not in out:  # a digest that is an image of the layout is answered as that
            out[path] = _graph_answers(View(conn, lid, path, INDEXED, []), layout_graph_hits)
    return out, {layout.path: layout for layout in stored.values()}


def _graph_answers(view: View, hits: list[db.GraphHit]) -> list[Answer]:
    """The answers of ``find @DIGEST`` for a digest that *view*'s layout uses as a layer or config
    (:func:`blob_use_answer`)."""
    absent = db.missing(view.conn, [view.layout_id]).get(view.layout_id) or set()
    return [
        blob_use_answer(
            layout=view.path,
            hit=hit,
            freshness=view.freshness,
            warnings=view.warnings,
            lacking=graph_mod.graph_key(hit.digest) in absent,
        )
        for hit in hits
        if hit.layout_id == view.layout_id
    ]


def blob_use_answer(*, layout: str, hit: db.GraphHit, freshness: str, warnings: list[str], lacking: bool) -> Answer:
    """The answer of ``find @DIGEST`` (and ``find --fleet``) for a digest that a layout's manifests use as
    a layer or config (*hit*); a warning when the layout's ``blobs/`` lacks it (*lacking*: a partial
    export). *warnings* come first."""
    said = list(warnings)
    if lacking:
        said.append(f"{hit.digest} is not in {layout}/blobs (a partial export?)")
    return Answer(
        layout=layout,
        digest=hit.digest,
        media_type=hit.media_type,
        size=hit.size,
        names=[],
        annotations={},
        platform=None,
        source=hit.source,
        freshness=freshness,
        warnings=said,
        used_by=hit.used_by,
    )


def _answers_by_digest(
    view: View, hits: list[db.Hit], warnings: list[str], names_of: dict[int, list[Name]] | None = None
) -> list[Answer]:
    by_digest: dict[str, list[db.Hit]] = {}
    for hit in hits:
        by_digest.setdefault(hit.digest, []).append(hit)
    return [_answer(view, group, warnings, names_of) for group in by_digest.values()]


def _answer(
    view: View, hits: list[db.Hit], warnings: list[str], names_of: dict[int, list[Name]] | None = None
) -> Answer:
    """One answer from hits that all share a digest: the first hit, with every entry's names.

    *names_of* holds the names of these hits' entries when the caller fetched them already.
    """
    first = hits[0]
    entry_hits = [h for h in hits if h.source == "entry"]
    if names_of is None:
        names_of = db.names(view.conn, [h.entry_id for h in entry_hits])
    # Ordered and without repeats, in linear time: one entry can carry thousands of names.
    names = list(dict.fromkeys(name for hit in entry_hits for name in names_of.get(hit.entry_id, [])))
    return Answer(
        layout=view.path,
        digest=first.digest,
        media_type=first.media_type,
        size=first.size,
        names=names,
        annotations=first.annotations,
        platform=first.platform,
        source=first.source,
        freshness=view.freshness,
        warnings=list(warnings),
    )


def _child_hit(entry: db.Hit, child: db.ChildRow) -> db.Hit:
    """A child manifest of *entry*'s nested indexes, as the hit a lookup of its digest would give."""
    return db.Hit(
        entry_id=entry.entry_id,
        layout_id=entry.layout_id,
        position=entry.position,
        digest=child.digest,
        media_type=child.media_type,
        size=child.size,
        platform=child.platform,
        annotations={},
        source="child",
    )


def _with_warning(answer: Answer, warning: str) -> Answer:
    data = {name: getattr(answer, name) for name in Answer.__slots__}
    data["warnings"] = [*answer.warnings, warning]
    return Answer(**data)


def _blob_hit(view: View, digest: str) -> db.Hit | None:
    """A bare blob under ``blobs/`` with *digest* (single-layout lookups only)."""
    try:
        path = layout_mod.blob_path(view.path, digest)
        st = os.stat(path)
    except (LayoutError, OSError):
        return None
    return db.Hit(
        entry_id=0,
        layout_id=view.layout_id,
        position=-1,
        digest=digest,
        media_type="",
        size=st.st_size,
        platform=None,
        annotations={},
        source="blob",
    )


def _graph_current(stored: db.StoredLayout | None) -> bool:
    """Whether the index's content graph of an indexed layout is its ``blobs/`` as it is now."""
    return stored is not None and stored.presence_current()


def image_fields(image: db.Image | None, absent: set[int] | None) -> dict[str, object] | None:
    """What the content graph says of one image in one layout (whose absent blobs are *absent*):
    ``config``, ``layers``, ``image_size``, ``created`` and ``platform`` (the config's), or None
    when it knows no such image. The config's ``created`` and platform count only where the layout
    holds the config (else they could not be checked there)."""
    if image is None:
        return None
    config_here = absent is not None and (image.config is None or graph_mod.graph_key(image.config) not in absent)
    return {
        "config": image.config,
        "layers": image.layer_count,
        "image_size": db.image_size(image, absent),
        "created": image.created if config_here else None,
        "platform": image.platform if config_here else None,
    }


def with_image(answer: Answer, fields: dict[str, object] | None) -> Answer:
    """*answer* with the fields of :func:`image_fields`; a descriptor's platform wins over the config's,
    as in containerd's matcher. Its ``freshness`` stays that of the rows it was matched on."""
    if fields is None:
        return answer
    return answer.replaced(
        config=fields["config"],
        layers=fields["layers"],
        image_size=fields["image_size"],
        created=fields["created"],
        platform=answer.platform if answer.platform is not None else fields["platform"],
    )


def _graph_fields(answer: Answer, image: db.Image | None, absent: set[int] | None) -> Answer:
    """*answer* with what the content graph says of its image (:func:`image_fields`, :func:`with_image`)."""
    return with_image(answer, image_fields(image, absent))


def _has_blob(layout: str, digest: str) -> bool:
    """Whether *layout*'s ``blobs/`` holds a blob named *digest* (an invalid digest names none)."""
    try:
        return os.path.exists(layout_mod.blob_path(layout, digest))
    except LayoutError:
        return False
