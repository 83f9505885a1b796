"""From an entry's annotations to the (name, tag) pairs it answers to (docs/semantics.md, Names).

Two annotations carry names. C = ``io.containerd.image.name`` and
R = ``org.opencontainers.image.ref.name``, each read only when it is a
non-empty string. C is parsed with ``ParseNormalizedNamed``; R is classified:

======================================  =====================================  ==============
R                                       pair                                   ``how``
======================================  =====================================  ==============
``3.16``, ``latest``, ``alpine``        (C's repository if C's tag is R, tag)  ``tag-only``
``3.16@sha256:…`` (C present)           as above, the digest is dropped        ``tag-only``
``@sha256:…``, ``sha256:…`` alone       nothing: the digest is the entry's     –
``localhost:5000/app:v2``, ``x.io/a``   canonical repository and tag           ``full``
``alpine:3.16``, ``team/app:v2``        normalized as ``docker run`` does      ``familiar``
``a:1,b:2``                             each part on its own                   –
anything else                           kept raw in ``invalid``, warned        ``invalid``
======================================  =====================================  ==============

Choices where the writers' conventions are silent:

* ``names`` is unique by (name, tag): the first reading wins, so a tag-only
  R that repeats C's pair is reported once, as ``containerd``.
* ``WORD@DIGEST`` is ambiguous: containerd writes its tag that way
  (``3.16@sha256:…``), while a user of skopeo who typed
  ``oci:DIR:alpine@sha256:…`` meant a familiar name. With a valid C on the
  entry (containerd's writers always write both) it is a tag; without one it
  is a familiar reference (``alpine@sha256:…`` → ``docker.io/library/alpine``,
  tag ``""``).
* A bare word (no ``/``, ``:`` or ``@``) that is not a valid tag (too
  long, ``v1.0+build``) is invalid; it is never read as a repository.
* A bare valid digest (``sha256:<hex>``) in R names nothing, like
  ``@DIGEST``; ``ParseNormalizedNamed`` would read it as the repository
  ``docker.io/library/sha256``, which no writer means.
* Under ``familiar="tag-only"`` a familiar reference keeps only its tag,
  with name ``""`` (it does not join C's repository), and one with no tag
  keeps nothing.
* Parts of a comma-joined list are stripped of surrounding blanks; empty
  parts are skipped.
* A value longer than 200 characters is shortened in warnings (never in
  ``invalid``), and warnings escape control characters.
"""

from __future__ import annotations

from indexer import reference
from indexer._record import Record
from indexer.errors import InvalidReference, printable

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

CONTAINERD_NAME = "io.containerd.image.name"
OCI_REF_NAME = "org.opencontainers.image.ref.name"

HOW_CONTAINERD = "containerd"
HOW_TAG = "tag-only"
HOW_FULL = "full"
HOW_FAMILIAR = "familiar"
HOW_INVALID = "invalid"

FAMILIAR_POLICIES = ("normalize", "tag-only", "ignore")
DEFAULT_FAMILIAR_POLICY = "normalize"

_WARNING_VALUE_CHARS = 200


class Name(Record):
    """One name an entry answers to: canonical repository (or ``""``), tag (or ``""``), how it was read."""

    __slots__ = ("how", "name", "tag")

    name: str
    tag: str
    how: str

    def __init__(self, name: str, tag: str, how: str) -> None:
        self.name = name
        self.tag = tag
        self.how = how

    def to_json(self) -> dict[str, str]:
        """The ``{"name", "tag", "how"}`` object of ``--json`` output."""
        return {"name": self.name, "tag": self.tag, "how": self.how}


class NameReading(Record):
    """What :func:`read_names` found: names in reading order, raw invalid values, warnings."""

    __slots__ = ("invalid", "names", "warnings")

    names: tuple[Name, ...]
    invalid: tuple[str, ...]
    warnings: tuple[str, ...]

    def __init__(self, names: tuple[Name, ...], invalid: tuple[str, ...], warnings: tuple[str, ...]) -> None:
        self.names = names
        self.invalid = invalid
        self.warnings = warnings


def quote_value(value: str) -> str:
    """*value* quoted for a human message: control characters escaped, long values shortened."""
    if len(value) > _WARNING_VALUE_CHARS:
        value = value[:_WARNING_VALUE_CHARS] + f"…({len(value)} chars)"
    return '"' + printable(value) + '"'


# Build hosts repeat the same few names across thousands of layouts (every BuildKit cache says
# "latest"): a reading depends only on the two annotation values and the policy, so it is cached.
# A full cache is dropped whole rather than tracked as an LRU: cheaper, and a scan refills it.
_CACHE_MAX = 1 << 16
_cache: dict[tuple[object, object, str], NameReading] = {}


def read_names(annotations: Mapping[str, object], *, familiar: str = DEFAULT_FAMILIAR_POLICY) -> NameReading:
    """Read the names of one ``index.json`` entry from its annotations (docs/semantics.md, Names)."""
    containerd = annotations.get(CONTAINERD_NAME)
    ref_name = annotations.get(OCI_REF_NAME)
    key = (
        containerd if isinstance(containerd, str) else None,
        ref_name if isinstance(ref_name, str) else None,
        familiar,
    )
    cached = _cache.get(key)
    if cached is None:
        if len(_cache) >= _CACHE_MAX:
            _cache.clear()
        cached = _cache[key] = _read_names(key[0], key[1], familiar)
    return cached


def _read_names(containerd: str | None, ref_name: str | None, familiar: str) -> NameReading:
    if familiar not in FAMILIAR_POLICIES:
        raise ValueError(f"familiar must be one of {FAMILIAR_POLICIES}, not {familiar!r}")
    reading = _Reading()
    c_repo: str | None = None
    c_tag = ""
    if isinstance(containerd, str) and containerd:
        try:
            ref = reference.parse_normalized_named(containerd)
        except InvalidReference as exc:
            reading.warnings.append(
                f"{CONTAINERD_NAME} {quote_value(containerd)} is not a valid reference ({exc.category}); ignored"
            )
        else:
            c_repo = ref.name
            c_tag = ref.tag or ""
            reading.add(c_repo, c_tag, HOW_CONTAINERD)
    if isinstance(ref_name, str) and ref_name:
        parts = [part.strip() for part in ref_name.split(",")] if "," in ref_name else [ref_name]
        for part in parts:
            if part:
                _classify(part, c_repo, c_tag, familiar, reading)
    return NameReading(tuple(reading.names), tuple(reading.invalid), tuple(reading.warnings))


class _Reading:
    __slots__ = ("invalid", "names", "seen", "warnings")

    def __init__(self) -> None:
        self.names: list[Name] = []
        self.invalid: list[str] = []
        self.warnings: list[str] = []
        self.seen: set[tuple[str, str]] = set()

    def add(self, name: str, tag: str, how: str) -> None:
        if (name, tag) not in self.seen:
            self.seen.add((name, tag))
            self.names.append(Name(name, tag, how))


def _classify(value: str, c_repo: str | None, c_tag: str, familiar: str, reading: _Reading) -> None:
    """Classify one ``ref.name`` value (one part of a comma-joined list) into *reading*."""
    if reference.is_tag(value):
        reading.add(c_repo if c_repo is not None and c_tag == value else "", value, HOW_TAG)
        return
    if not any(c in value for c in "/:@"):
        # A bare word is a tag, never a repository (a 129-character word would
        # otherwise parse as docker.io/library/<word>).
        _invalid(value, "not a valid tag", reading)
        return
    word, at, digest = value.partition("@")
    if at:
        if not word:
            if reference.is_digest(digest):
                return  # containerd before 2026-04: the entry is named by its own digest
            _invalid(value, "not a valid digest after '@'", reading)
            return
        if c_repo is not None and reference.is_tag(word) and reference.is_digest(digest):
            reading.add(c_repo if c_tag == word else "", word, HOW_TAG)
            return
    elif reference.is_digest(value):
        return
    try:
        ref = reference.parse_normalized_named(value)
    except InvalidReference as exc:
        _invalid(value, exc.category, reading)
        return
    first, slash, _ = value.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        reading.add(ref.name, ref.tag or "", HOW_FULL)
    elif familiar == "normalize":
        reading.add(ref.name, ref.tag or "", HOW_FAMILIAR)
    elif familiar == "tag-only" and ref.tag:
        reading.add("", ref.tag, HOW_TAG)


def _invalid(value: str, reason: str, reading: _Reading) -> None:
    reading.invalid.append(value)
    reading.warnings.append(f"{OCI_REF_NAME} {quote_value(value)} is not a tag or a reference ({reason})")
