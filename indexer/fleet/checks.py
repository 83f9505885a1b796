"""Checking what the fleet holds: every row a reader reads, held to what ocidx's publisher writes.

A row is published by its host, or left by a restore, or planted by hand: a reader trusts none of
it. Each row is checked against what ocidx's own publisher writes (the SQLite index's rows, whose
JSON columns ocidx's writer encoded); a row that fails raises :class:`Malformed`, and the reader drops
it and counts it against its host (:class:`Dropped`), so that it never hides another host's answers.
"""

from __future__ import annotations

import json
import os

from indexer import names as names_mod
from indexer import reference
from indexer.errors import printable
from indexer.graph.manifests import MAX_CREATED
from indexer.names import Name

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any


MAX_PATH_BYTES = 4096  # PATH_MAX: no layout directory has a longer absolute path
_HOWS = frozenset((names_mod.HOW_CONTAINERD, names_mod.HOW_TAG, names_mod.HOW_FULL, names_mod.HOW_FAMILIAR))
_STATES = frozenset(("ok", "error"))


class Malformed(Exception):
    """A row of the fleet that is not what a publisher writes; the message says what is wrong with it,
    ``table`` (when given) where the wrong column comes from."""

    def __init__(self, message: str, table: str | None = None) -> None:
        super().__init__(message)
        self.table = table


def _integer(value: object, what: str, low: int = 0) -> int:
    if type(value) is not int or not low <= value < 2**63:
        raise Malformed(f"{what} is {value!r}, not an integer from {low}")
    return value


def _text(value: object, what: str) -> str:
    if type(value) is not str:
        raise Malformed(f"{what} is not text")
    return value


def _json(value: object, what: str) -> object:
    try:
        return json.loads(_text(value, what))
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        raise Malformed(f"{what} is not valid JSON") from None


def _strings(value: object, what: str) -> list[str]:
    """A JSON column holding NULL or a list of strings (invalid names, warnings)."""
    if value is None:
        return []
    found = _json(value, what)
    if type(found) is not list or not all(type(item) is str for item in found):
        raise Malformed(f"{what} is not a JSON list of strings")
    return found


def annotations_of(value: object, what: str = "annotations") -> dict[str, str]:
    """The annotations column: a JSON object of strings."""
    found = _json(value, what)
    if type(found) is not dict or not all(type(item) is str for item in found.values()):
        raise Malformed(f"{what} is not a JSON object of strings")
    return found


def platform_of(value: object, what: str = "platform") -> dict[str, object] | None:
    """The platform column: NULL, or a JSON object whose ``os`` and ``architecture`` are strings and whose
    ``variant`` is a string or null (keys a later ocidx may add are left alone)."""
    if value is None:
        return None
    return _platform(_json(value, what), what)


def _platform(found: object, what: str) -> dict[str, object]:
    if (
        type(found) is not dict
        or type(found.get("os")) is not str
        or type(found.get("architecture")) is not str
        or type(found.get("variant")) not in (str, type(None))
    ):
        raise Malformed(f"{what} is not a JSON object with os and architecture strings")
    return found


_IMAGE_KEYS = frozenset(("config", "layers", "image_size", "created", "platform"))


def image_of(value: object, what: str = "image") -> dict[str, object] | None:
    """The image column of an entry or child: NULL, or the JSON object the publisher writes
    (:func:`indexer.query.image_fields`): ``config`` a digest or null, ``layers`` and ``image_size``
    counts or null, ``created`` a time (a short string) or null, ``platform`` null or as the platform
    column."""
    if value is None:
        return None
    found = _json(value, what)
    if type(found) is not dict or set(found) != _IMAGE_KEYS:
        raise Malformed(f"{what} is not a JSON object of {', '.join(sorted(_IMAGE_KEYS))}")
    if found["config"] is not None:
        digest_of(found["config"], f"{what} config")
    for key in ("layers", "image_size"):
        if found[key] is not None:
            _integer(found[key], f"{what} {key}")
    created = found["created"]
    if created is not None and (type(created) is not str or len(created) > MAX_CREATED):
        raise Malformed(f"{what} created is not a time")
    if found["platform"] is not None:
        _platform(found["platform"], f"{what} platform")
    return found


def digest_of(value: object, what: str = "digest") -> str:
    """A digest go-digest accepts."""
    if type(value) is not str or not reference.is_digest(value):
        raise Malformed(f"{what} {printable(str(value)[:80])!r} is not a valid digest")
    return value


def path_of(value: object) -> str:
    """A layout's path: the bytes of a normalized absolute path, without NUL, at most PATH_MAX long."""
    if type(value) is not bytes:
        raise Malformed("path is not bytes")
    if (
        not value.startswith(b"/")
        or b"\0" in value
        or len(value) > MAX_PATH_BYTES
        or os.path.normpath(value) != value
        or value.startswith(b"//")
    ):
        raise Malformed(f"path {printable(os.fsdecode(value[:200]))!r} is not a normalized absolute path")
    return os.fsdecode(value)


def state_of(value: object) -> str:
    """A layout's state: ``ok``, or ``error`` (its last read failed; its rows are its last good ones)."""
    if value not in _STATES:
        raise Malformed(f"state {printable(str(value)[:40])!r} is not ok or error")
    return str(value)


def name_of(row: Sequence[object]) -> Name:
    """A names row's (name, tag, how): a canonical repository or '', a valid tag or '', a known way."""
    name, tag, how = row
    if type(name) is not str or (name and not reference.ANCHORED_NAME_RE.match(name)):
        raise Malformed(f"name {printable(str(name)[:80])!r} is not a repository name")
    if type(tag) is not str or (tag and not reference.is_tag(tag)):
        raise Malformed(f"tag {printable(str(tag)[:80])!r} is not a valid tag")
    if how not in _HOWS:
        raise Malformed(f"how {printable(str(how)[:80])!r} is not one of {', '.join(sorted(_HOWS))}")
    return Name(name, tag, how)


class Dropped:
    """The rows a reader dropped as malformed: per host how many and why the first was, per layout how many."""

    def __init__(self) -> None:
        self.hosts: dict[str, tuple[int, str]] = {}
        self.layouts: dict[tuple[str, int], int] = {}

    def add(self, host: object, layout_id: object, table: str, why: str) -> None:
        """Count one dropped row of *table* published by *host* (in layout *layout_id* when known)."""
        name = host if type(host) is str else repr(host)
        count, first = self.hosts.get(name, (0, f"{table}: {why}"))
        self.hosts[name] = (count + 1, first)
        if type(layout_id) is int:
            self.layouts[(name, layout_id)] = self.layouts.get((name, layout_id), 0) + 1

    def warnings(self) -> list[str]:
        """One warning per host that had rows dropped, naming it."""
        return [
            f"host {host}: {count} malformed row{'s' if count != 1 else ''} dropped (the first: {first})"
            for host, (count, first) in sorted(self.hosts.items())
        ]

    def about(self, host: str, layout_id: int) -> list[str]:
        """The warning an answer from this layout carries when rows of it were dropped."""
        count = self.layouts.get((host, layout_id))
        if not count:
            return []
        return [f"host {host} published {count} malformed row{'s' if count != 1 else ''} for this layout: dropped"]


class Hit:
    """One row a lookup reached on one host, checked."""

    __slots__ = (
        "annotations",
        "digest",
        "entry_position",
        "host",
        "image",
        "layout_id",
        "media_type",
        "platform",
        "size",
        "source",
    )

    def __init__(self, row: Sequence[Any]) -> None:
        host, layout_id, position, entry_position, digest, media_type, size, platform, annotations = row[:9]
        invalid_names, warnings, source, image = row[9:13]
        if type(host) is not str or not host:
            raise Malformed("the host is not a name")
        self.host: str = host
        self.layout_id: int = _integer(layout_id, "layout_id", -(2**63))
        _integer(position, "position")
        self.entry_position: int = _integer(entry_position, "entry_position")
        self.digest: str = digest_of(digest)
        self.media_type: str = _text(media_type, "mediaType")
        self.size: int = _integer(size, "size")
        self.platform: dict[str, object] | None = platform_of(platform)
        self.annotations: dict[str, str] = annotations_of(annotations)
        _strings(invalid_names, "invalid_names")
        _strings(warnings, "warnings")
        self.source: str = source
        self.image: dict[str, object] | None = image_of(image)


class BlobUse:
    """One row of ``ocidx.graph_users``, checked: a layout on one host whose manifest *manifest* uses the
    digest looked for as its config or a layer, with the blob's media type and size as that manifest
    says, and whether the layout lacks the blob."""

    __slots__ = ("host", "layout_id", "manifest", "media_type", "missing", "size", "source")

    def __init__(self, row: Sequence[Any]) -> None:
        host, layout_id, manifest, source, media_type, size, missing = row
        if type(host) is not str or not host:
            raise Malformed("the host is not a name")
        self.host: str = host
        self.layout_id: int = _integer(layout_id, "layout_id", -(2**63))
        self.manifest: str = digest_of(manifest, "manifest")
        if source not in ("config", "layer"):
            raise Malformed(f"source {printable(str(source)[:40])!r} is not config or layer")
        self.source: str = source
        self.media_type: str = _text(media_type, f"the {source}'s mediaType")
        self.size: int = _integer(size, f"the {source}'s size")
        self.missing: bool = missing is True


_REFERRER_HOWS = {"subject": "graph_manifests", "attestation": "graph_attestations"}
_FALLBACK_HOWS = {"fallback-tag": "entries", "fallback-child": "children"}


class Referring:
    """One row of ``ocidx.referrers``, checked: a manifest or index in a layout of one host that refers to
    a target (``how``, ``subject``), or is named by a fallback tag, with the target or tag it was found by
    (``matched``) and its graph row's artifactType and annotations when the host has one."""

    __slots__ = (
        "annotations",
        "artifact_type",
        "digest",
        "entry_position",
        "host",
        "how",
        "layout_id",
        "matched",
        "media_type",
        "subject",
    )

    def __init__(self, row: Sequence[Any]) -> None:
        host, layout_id, entry_position, digest, media_type, how, subject, matched = row[:8]
        artifact_type, config_media_type, annotations = row[8:]
        if type(host) is not str or not host:
            raise Malformed("the host is not a name")
        self.host: str = host
        self.layout_id: int = _integer(layout_id, "layout_id", -(2**63))
        self.entry_position: int = _integer(entry_position, "entry_position")
        self.digest: str = digest_of(digest)
        self.media_type: str = _text(media_type, "mediaType")
        if how not in _REFERRER_HOWS and how not in _FALLBACK_HOWS:
            raise Malformed(f"how {printable(str(how)[:40])!r} is not a way of referring")
        self.how: str = how
        self.subject: str | None = digest_of(subject, "subject") if how in _REFERRER_HOWS else None
        self.matched: str = _text(matched, "the target or tag")
        # A manifest the host read has its graph row (artifactType is never NULL there); as the OCI
        # referrers API, artifactType is the manifest's, else its config's media type.
        self.artifact_type: str | None = None
        self.annotations: dict[str, str] = {}
        if artifact_type is not None:
            try:
                self.artifact_type = _text(artifact_type, "artifactType") or (
                    _text(config_media_type, "the config's mediaType") if config_media_type is not None else ""
                )
                self.annotations = annotations_of(annotations) if annotations is not None else {}
            except Malformed as exc:
                raise Malformed(str(exc), "graph_manifests") from None

    @staticmethod
    def table(row: Sequence[Any], exc: Malformed) -> str:
        """The table a malformed row is counted against."""
        return exc.table or _REFERRER_HOWS.get(row[5]) or _FALLBACK_HOWS.get(row[5]) or "graph_manifests"
