"""What a lookup's errors say: hints for a tag typed as a name, a relative path, skopeo's spelling,
and an ambiguity's candidates."""

from __future__ import annotations

import os
import sqlite3

from indexer import reference
from indexer.errors import InvalidReference, UsageError
from indexer.names import Name
from indexer.query.answers import SCHEME, Query
from indexer.store import read as db

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable


# How many candidates an ambiguity, and how many names a not-found message, lists in text.
SHOWN = 5


def _tag_hint(
    conn: sqlite3.Connection, query: Query, layout_id: int | None, instead: Callable[[str], str] | None = None
) -> str:
    """Why a name found nothing where a tag would have (in the layout, or anywhere in the index for
    ``find``): `` (did you mean the tag ':v1'?)`` for a bare word read as a name; for ``NAME:TAG``
    whose tag is held without that name (``skopeo copy ... oci:DIR:TAG`` writes the tag only), that
    the tag is there, with *instead*: how to look the tag up."""
    if query.digest is not None:
        return ""
    if query.word is not None:
        return f" (did you mean the tag ':{query.word}'?)" if db.by_tag(conn, query.word, layout_id) else ""
    if query.name is None or not query.tag or instead is None or not db.by_tag(conn, query.tag, layout_id):
        return ""
    held = "a layout holds" if layout_id is None else "the layout holds"
    how = instead(query.tag)
    return f" ({held} the tag {query.tag} without that name, as skopeo's oci:DIR:TAG writes it: {how})"


def _from_skopeo(target: str) -> str:
    """``oci:PATH[:REF]`` (skopeo's: the path ends at the first colon) as the ``oci-layout://`` target
    that means the same: ``PATH:TAG`` for a tag, ``PATH/NAME[:TAG]`` for a name."""
    path, colon, ref = target[len("oci:") :].partition(":")
    if not colon or not ref:
        return f"{SCHEME}{path}"
    return f"{SCHEME}{path}:{ref}" if reference.is_tag(ref) else f"{SCHEME}{path}/{ref}"


def describe_missing(text: str) -> str:
    """What is at the path *text* (relative to the working directory), for a "no layout there" message."""
    path = os.path.abspath(text)
    if os.path.isdir(path):
        return f"{path} is not an OCI layout (no index.json or oci-layout)"
    if os.path.lexists(path):
        return f"{path} is not a directory, so not an OCI layout"
    return f"{path} does not exist" + _absolute_hint(text, target=True)


def _absolute_hint(text: str, *, target: bool = False) -> str:
    """``; did you mean /PATH?`` when *text* is a relative path that does not exist but ``/PATH`` does
    (with how to write it in an ``oci-layout://`` *target*, where one slash too few is easy to miss)."""
    if os.path.isabs(text) or os.path.lexists(text) or not os.path.lexists("/" + text):
        return ""
    tip = f" (oci-layout:///{text}, with three slashes, names an absolute path)" if target else ""
    return f"; did you mean /{text}?{tip}"


def _no_nul(text: str, what: str) -> None:
    """No path holds a NUL character; os functions would raise ValueError on one."""
    if "\0" in text:
        raise UsageError(f"the {what} {text!r} contains a NUL character")


def _candidates(conn: sqlite3.Connection, hits: list[db.Hit], path: str) -> list[dict[str, object]]:
    """Each digest of an ambiguity with its names, and ``pick``: the target that resolves to it alone."""
    names_of = db.names(conn, [h.entry_id for h in hits if h.source == "entry"])
    out: dict[str, dict[Name, None]] = {}
    for hit in hits:
        listed = out.setdefault(hit.digest, {})
        for name in names_of.get(hit.entry_id, []) if hit.source == "entry" else []:
            listed[name] = None
    owners: dict[tuple[str, str], set[str]] = {}
    for digest, names in out.items():
        for name in names:
            owners.setdefault((name.name, name.tag), set()).add(digest)
    found: list[dict[str, object]] = []
    for digest, names in out.items():
        # A full name held by this digest alone picks it (oci-layout://PATH/alpine:3.16); else the digest.
        unique = [n for n in names if n.name and n.tag and owners[(n.name, n.tag)] == {digest}]
        pick = f"{SCHEME}{path}/{_familiar(unique[0].name)}:{unique[0].tag}" if unique else f"{SCHEME}{path}@{digest}"
        found.append({"digest": digest, "names": [n.to_json() for n in names], "pick": pick})
    return found


def _familiar(name: str) -> str:
    """``docker.io/library/alpine`` as ``alpine``: what a person types after ``oci-layout://PATH/``."""
    try:
        return reference.parse_normalized_named(name).familiar_name()
    except InvalidReference:
        return name
