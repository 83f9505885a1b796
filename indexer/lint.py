"""``ocidx lint PATH...``: what each major reader of a layout would call each entry, and what will
surprise someone (docs/lint.md).

Each reader below is a rule taken from that tool's source (docs/lint.md cites the files): which
annotation it reads, what it accepts there, how it picks among entries that answer to the same
reference. A reader gives an entry a *reading* (the reference a user types to reach it through
that tool, split into name and tag as the tool matches them), or None when no reference of that
tool reaches it but its digest. Findings compare the readings.

Readers, by key:

* ``buildkit``: BuildKit's ``oci-layout://`` source as buildx resolves a tag: the first entry whose
  ``io.containerd.image.name`` equals the tag, else the first whose ``ref.name`` does; only a
  tag can be written there.
* ``containerd``: ``ctr``/``nerdctl`` import: ``io.containerd.image.name`` as it is, else
  ``ref.name``: kept as it is when it holds ``/``, ``:`` or ``@``, else ``BASE:TAG`` (``ctr
  import --base-name``, by default ``import-DATE``); the last entry with a name wins it.
* ``skopeo``: containers/image ``oci:DIR:REF`` (skopeo, podman, buildah): the first OCI manifest
  or index whose ``ref.name`` is REF exactly; REF must match the OCI ref.name grammar.
* ``regclient``: ``ocidir://DIR:TAG``: the first entry whose ``ref.name`` is TAG, else the first
  whose ``ref.name`` ends in ``:TAG``; the layout must have an ``oci-layout`` file of version 1.0.0.
* ``zot``: the registry serving the layout as a repository: the first entry whose ``ref.name``
  is the tag a client asks for; only distribution tags can be asked for.
* ``ocidx``: docs/semantics.md, Names: every name normalized; several digests are an ambiguity.

Standard library only, and no database: it reads the layouts themselves.
"""

from __future__ import annotations

import json
import os
import re

from indexer import layout as layout_mod
from indexer import reference
from indexer._record import Record
from indexer.errors import LayoutNotFound, OcidxError, printable
from indexer.names import CONTAINERD_NAME, OCI_REF_NAME, read_names

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

READERS = ("buildkit", "containerd", "skopeo", "regclient", "zot", "ocidx")
TITLES = {
    "buildkit": "BuildKit (oci-layout://)",
    "containerd": "containerd import",
    "skopeo": "skopeo/podman (oci:)",
    "regclient": "regclient (ocidir://)",
    "zot": "zot",
    "ocidx": "ocidx",
}
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
# containers/image's ref.name grammar (oci/internal/oci_util.go), the OCI annotation's.
_OCI_COMPONENT = r"[A-Za-z0-9]+(?:(?:[-._:@+]|--)[A-Za-z0-9]+)*"
OCI_REF_NAME_RE = re.compile(rf"\A{_OCI_COMPONENT}(?:/{_OCI_COMPONENT})*\Z")
# Annotations of entries that are not images of their own (referrers, attestations): no name expected.
_NOT_IMAGES = ("io.containerd.manifest.subject", "vnd.docker.reference.type")

# The codes of findings, in the order they are reported for an entry.
AMBIGUOUS, DISAGREE, INVALID, NO_NAME, UNADDRESSABLE = (
    "ambiguous",
    "readers_disagree",
    "invalid_ref_name",
    "tag_without_name",
    "unaddressable",
)
NO_LAYOUT_FILE, COLON_IN_PATH = "no_oci_layout_file", "colon_in_path"


class Reading(Record):
    """How one reader reaches one entry: the name and tag it matches, and the reference to type."""

    __slots__ = ("name", "ref", "tag")

    def __init__(self, name: str, tag: str, ref: str) -> None:
        self.name = name
        self.tag = tag
        self.ref = ref

    def to_json(self) -> dict[str, str]:
        """``{"name", "tag", "ref"}``."""
        return {"name": self.name, "tag": self.tag, "ref": self.ref}


class Finding(Record):
    """One thing that will surprise someone, with the writer option or annotation that fixes it."""

    __slots__ = ("code", "digest", "fix", "message", "readers")

    def __init__(self, code: str, digest: str | None, message: str, fix: str, readers: Sequence[str] = ()) -> None:
        self.code = code
        self.digest = digest
        self.message = message
        self.fix = fix
        self.readers = tuple(readers)

    def to_json(self) -> dict[str, object]:
        """``{"code", "digest", "message", "fix", "readers"}``."""
        return {
            "code": self.code,
            "digest": self.digest,
            "message": self.message,
            "fix": self.fix,
            "readers": list(self.readers),
        }


def _split(ref: str) -> tuple[str, str]:
    """A reference as a tool writes it, split into name and tag (no normalization): ``alpine:3.16``
    is (``alpine``, ``3.16``), ``3.16`` is (``""``, ``3.16``), ``localhost:5000/app`` has no tag."""
    head = ref.split("@", 1)[0]
    name, colon, tag = head.rpartition(":")
    if not colon or "/" in tag:
        return (head, "") if ("/" in head or not reference.is_tag(head)) else ("", head)
    return name, tag


class _Entry:
    """One top-level entry and its annotations, as every reader sees it."""

    __slots__ = ("c", "digest", "media_type", "position", "r")

    def __init__(self, entry: layout_mod.Entry) -> None:
        self.position = entry.position
        self.digest = entry.digest
        self.media_type = entry.media_type
        notes = entry.annotations
        self.c = notes.get(CONTAINERD_NAME) or ""
        self.r = notes.get(OCI_REF_NAME) or ""


class LayoutReadings:
    """What each reader calls each entry of one layout, and the entries each address of a reader could
    mean (the readers: see the module)."""

    def __init__(self, path: str, entries: Sequence[layout_mod.Entry], has_layout_file: bool) -> None:
        self.path = path
        self.raw = list(entries)
        self.entries = [_Entry(e) for e in entries]
        self.readings: list[dict[str, Reading | None]] = [{} for _ in self.entries]
        self.has_layout_file = has_layout_file
        # reader: address: positions of the entries it could mean, in index order
        self.claims: dict[str, dict[str, list[int]]] = {reader: {} for reader in READERS}
        for reader in READERS:
            getattr(self, f"_{reader}")()

    def _claim(self, reader: str, address: str, i: int) -> None:
        self.claims[reader].setdefault(address, []).append(i)

    def _set(self, reader: str, i: int, reading: Reading | None) -> None:
        self.readings[i][reader] = reading

    def _winner(self, reader: str, address: str, *, last: bool = False) -> int:
        """The entry the reader picks for *address*: the first claimant, or the last (containerd)."""
        claimants = self.claims[reader][address]
        return claimants[-1] if last else claimants[0]

    def _buildkit(self) -> None:
        # Two passes, as client/ociindex Get: the containerd name first, then ref.name, each the first match.
        for i, e in enumerate(self.entries):
            if e.c and reference.is_tag(e.c):
                self._claim("buildkit", "c:" + e.c, i)
        for i, e in enumerate(self.entries):
            if e.r and reference.is_tag(e.r):
                self._claim("buildkit", "r:" + e.r, i)
        for i, e in enumerate(self.entries):
            tags = [t for t in (e.c, e.r) if t and reference.is_tag(t)]
            reachable = [t for t in tags if self._buildkit_pick(t) == i]
            tag = reachable[0] if reachable else (tags[0] if tags else "")
            self._set("buildkit", i, Reading("", tag, f"oci-layout://{self.path}:{tag}") if tag else None)

    def _buildkit_pick(self, tag: str) -> int:
        by_c = self.claims["buildkit"].get("c:" + tag)
        return by_c[0] if by_c else self.claims["buildkit"]["r:" + tag][0]

    def _containerd(self) -> None:
        for i, e in enumerate(self.entries):
            if e.c:
                image = e.c
            elif e.r:
                image = e.r if any(ch in e.r for ch in "/:@") else f"BASE:{e.r}"
            else:
                self._set("containerd", i, None)
                continue
            self._claim("containerd", image, i)
            name, tag = _split(image)
            self._set("containerd", i, Reading(name, tag, image))

    def _skopeo(self) -> None:
        usable = self.has_colonless_path
        for i, e in enumerate(self.entries):
            ok = usable and e.r and OCI_REF_NAME_RE.match(e.r) and e.media_type in (OCI_MANIFEST, OCI_INDEX)
            if ok:
                self._claim("skopeo", e.r, i)
            name, tag = _split(e.r)
            self._set("skopeo", i, Reading(name, tag, f"oci:{self.path}:{e.r}") if ok else None)

    @property
    def has_colonless_path(self) -> bool:
        """containers/image ends the path at the first ``:``: a layout whose path holds one is out of reach."""
        return ":" not in self.path

    def _regclient(self) -> None:
        if not self.has_layout_file:
            for i in range(len(self.entries)):
                self._set("regclient", i, None)
            return
        exact = {e.r for e in self.entries if e.r}
        for i, e in enumerate(self.entries):
            if e.r and reference.is_tag(e.r):
                self._claim("regclient", e.r, i)
        for i, e in enumerate(self.entries):
            tag = ""
            if e.r and reference.is_tag(e.r):
                tag = e.r
            elif e.r and "@" not in e.r and ":" in e.r:
                suffix = e.r.rpartition(":")[2]
                if reference.is_tag(suffix) and suffix not in exact:  # the fallback only where no exact match
                    tag = suffix
                    self._claim("regclient", "~" + suffix, i)
            self._set("regclient", i, Reading("", tag, f"ocidir://{self.path}:{tag}") if tag else None)

    def _regclient_pick(self, tag: str) -> int:
        exact = self.claims["regclient"].get(tag)
        return exact[0] if exact else self.claims["regclient"]["~" + tag][0]

    def _zot(self) -> None:
        for i, e in enumerate(self.entries):
            ok = bool(e.r) and reference.is_tag(e.r)
            if ok:
                self._claim("zot", e.r, i)
            self._set("zot", i, Reading("", e.r, f"REPO:{e.r}") if ok else None)

    def _ocidx(self) -> None:
        for i, entry in enumerate(self.raw):
            reading = read_names(entry.annotations)
            if not reading.names:
                self._set("ocidx", i, None)
                continue
            first = reading.names[0]
            for name in reading.names:
                self._claim("ocidx", f"{name.name}:{name.tag}", i)
                if name.name:
                    self._claim("ocidx", f":{name.tag}", i)  # oci-layout://PATH:TAG matches any repository
            if first.name:
                familiar = reference.parse_normalized_named(first.name).familiar_name()
                ref = f"oci-layout://{self.path}/{familiar}" + (f":{first.tag}" if first.tag else "")
            else:
                ref = f"oci-layout://{self.path}:{first.tag}"
            self._set("ocidx", i, Reading(first.name, first.tag, ref))

    def _pick(self, reader: str, address: str, *, last: bool) -> int:
        if reader == "buildkit":
            return self._buildkit_pick(address.split(":", 1)[1])
        if reader == "regclient":
            return self._regclient_pick(address.lstrip("~"))
        return self._winner(reader, address, last=last)


class LayoutLint(LayoutReadings):
    """The readings and findings of one layout."""

    def __init__(self, path: str, entries: Sequence[layout_mod.Entry], has_layout_file: bool) -> None:
        super().__init__(path, entries, has_layout_file)
        self.findings: list[Finding] = []
        self._find()

    def _find(self) -> None:
        if not self.has_layout_file:
            self.findings.append(
                Finding(
                    NO_LAYOUT_FILE,
                    None,
                    f"{self.path} has no oci-layout file (imageLayoutVersion 1.0.0): regclient refuses to read it",
                    'write the file: echo \'{"imageLayoutVersion": "1.0.0"}\' > oci-layout (every OCI writer does)',
                    ["regclient"],
                )
            )
        if not self.has_colonless_path:
            self.findings.append(
                Finding(
                    COLON_IN_PATH,
                    None,
                    f"{self.path} holds ':' in its path: skopeo, podman and buildah (oci:DIR:REF) end DIR at the "
                    "first ':', so they cannot name it",
                    "move or link the layout to a path without ':'",
                    ["skopeo"],
                )
            )
        for i, e in enumerate(self.entries):
            self._entry_findings(i, e)

    def _entry_findings(self, i: int, e: _Entry) -> None:
        readings = self.readings[i]
        digest = e.digest
        self._ambiguities(i, e)
        if e.r and not OCI_REF_NAME_RE.match(e.r):
            self.findings.append(
                Finding(
                    INVALID,
                    digest,
                    f"ref.name {_quote(e.r)} is not a valid OCI reference name: skopeo and podman refuse it, "
                    "ocidx keeps it as invalid",
                    "write a tag (or a full name) there; a by-digest `ctr export` of containerd before 2.1 wrote "
                    "'@sha256:...': export again with a newer containerd, or name the image",
                    ["skopeo", "ocidx"],
                )
            )
        not_image = any(key in self.raw[i].annotations for key in _NOT_IMAGES)
        if not any(readings.get(reader) is not None for reader in READERS):
            if not not_image:
                self.findings.append(
                    Finding(
                        UNADDRESSABLE,
                        digest,
                        "no reader can name this entry: it has neither io.containerd.image.name nor a usable "
                        "ref.name, so only its digest reaches it",
                        "name it when writing: skopeo copy ... oci:DIR:TAG, buildctl --output "
                        "type=oci,name=NAME:TAG, umoci tag, or delete the entry if it is a leftover",
                        [],
                    )
                )
            return
        present = {reader: got for reader in READERS if (got := readings.get(reader)) is not None}
        missing = [reader for reader in READERS if reader not in present]
        tags = {reader: got.tag for reader, got in present.items()}
        if missing and e.r:
            seen = "; ".join(f"{TITLES[r]} as {got.ref}" for r, got in present.items())
            self.findings.append(
                Finding(
                    DISAGREE,
                    digest,
                    f"readers disagree on ref.name {_quote(e.r)}: {', '.join(TITLES[r] for r in missing)} cannot "
                    f"name it; {seen}",
                    _disagree_fix(e),
                    missing,
                )
            )
        elif len(set(tags.values()) - {""}) > 1:
            listed = ", ".join(f"{TITLES[r]} {tags[r]}" for r in READERS if r in tags)
            self.findings.append(
                Finding(DISAGREE, digest, f"readers read different tags: {listed}", _disagree_fix(e), sorted(tags))
            )
        if e.r and not e.c and "/" not in e.r and ":" not in e.r and "@" not in e.r:
            self.findings.append(
                Finding(
                    NO_NAME,
                    digest,
                    f"tag {_quote(e.r)} is written without a repository: containerd imports it as "
                    f"BASE:{e.r} (ctr import --base-name BASE, else import-DATE), and no reader can find it by "
                    "its image name",
                    "also write the full name as io.containerd.image.name (buildctl --output type=oci,"
                    "name=docker.io/library/NAME:TAG; ctr export, nerdctl save and docker save write both)",
                    ["containerd"],
                )
            )

    def _ambiguities(self, i: int, e: _Entry) -> None:
        """An entry that a reader cannot tell from another one with a different digest."""
        for reader in READERS:
            reading = self.readings[i].get(reader)
            if reading is None:
                continue
            for address, claimants in self.claims[reader].items():
                if i not in claimants or len({self.entries[j].digest for j in claimants}) < 2:
                    continue
                if reader == "ocidx":
                    if claimants[0] != i:
                        continue  # said once, on the first of them
                    others = sorted({self.entries[j].digest for j in claimants} - {e.digest})
                    message = (
                        f"ocidx answers {_address_text(address)} as ambiguous (exit 3): {e.digest} and "
                        f"{', '.join(others)} both carry it"
                    )
                else:
                    last = reader == "containerd"
                    winner = self._pick(reader, address, last=last)
                    if winner == i:
                        continue  # this entry is the one the reader gets
                    by = address if reader == "containerd" else reading.ref
                    which = "the last" if last else "the first"
                    message = (
                        f"{TITLES[reader]} reaches {self.entries[winner].digest} by {by} ({which} entry with it), "
                        "never this one"
                    )
                self.findings.append(
                    Finding(
                        AMBIGUOUS,
                        e.digest,
                        message,
                        "give each image its own tag or name, or remove the entry that is stale (writers "
                        "that append rather than replace leave one behind)",
                        [reader],
                    )
                )

    def to_json(self) -> dict[str, object]:
        """``{"layout", "entries": [{"digest", "mediaType", "readers"}], "findings": [...]}``."""
        return {
            "layout": self.path,
            "entries": [
                {
                    "digest": e.digest,
                    "mediaType": e.media_type,
                    "readers": {
                        reader: (None if (got := self.readings[i].get(reader)) is None else got.to_json())
                        for reader in READERS
                    },
                }
                for i, e in enumerate(self.entries)
            ],
            "findings": [f.to_json() for f in self.findings],
        }


def _address_text(address: str) -> str:
    name, _colon, tag = address.rpartition(":")
    return f"{name}:{tag}" if name else f":{tag}"


def _disagree_fix(e: _Entry) -> str:
    if "/" in e.r or ":" in e.r:
        return (
            "write the tag alone in ref.name and the full name in io.containerd.image.name, as containerd, docker "
            "save and BuildKit's exporter (name=...) do; with skopeo, copy to oci:DIR:TAG"
        )
    return "write the tag alone (a valid tag: letters, digits, '_', '.', '-') in ref.name"


def _quote(value: str) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return printable(text if len(text) <= 200 else text[:200] + f"…({len(value)} chars)")


def lint(path: str) -> LayoutLint:
    """The readings and findings of the layout at *path* (LayoutNotFound, LayoutError when it cannot be read)."""
    real = os.path.realpath(path)
    if not layout_mod.is_layout_dir(real):
        from indexer.query import describe_missing

        raise LayoutNotFound(describe_missing(path))
    snapshot = layout_mod.read_layout(real)
    return LayoutLint(real, snapshot.entries, _layout_file_ok(real))


def _layout_file_ok(path: str) -> bool:
    """Whether ``oci-layout`` is there with ``imageLayoutVersion`` 1.0.0, as regclient requires."""
    try:
        with open(os.path.join(path, layout_mod.LAYOUT_FILE), "rb") as f:
            document = json.loads(f.read(64 * 1024))
    except (OSError, ValueError):
        return False
    return isinstance(document, dict) and document.get("imageLayoutVersion") == "1.0.0"


def lint_many(paths: Sequence[str]) -> list[LayoutLint | tuple[str, OcidxError]]:
    """:func:`lint` of each path; a path that cannot be linted gives its error instead."""
    out: list[LayoutLint | tuple[str, OcidxError]] = []
    for path in paths:
        try:
            out.append(lint(path))
        except OcidxError as exc:
            out.append((path, exc))
    return out
