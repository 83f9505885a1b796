"""What a lookup asks and answers: the query forms, the answer types (docs/json.md), and
where a layout's rows come from."""

from __future__ import annotations

import sqlite3

from indexer import layout as layout_mod
from indexer import reference
from indexer._record import Record
from indexer.errors import InvalidReference, UsageError
from indexer.names import Name
from indexer.store import read as db

SCHEME = "oci-layout://"
INDEXED, READ_THROUGH, STALE = "indexed", "read-through", "stale"


class Query(Record):
    """What to look for in a layout: a tag, a canonical name and tag, and/or a digest."""

    __slots__ = ("digest", "name", "tag", "text", "word")

    def __init__(
        self,
        text: str,
        *,
        tag: str | None = None,
        name: str | None = None,
        digest: str | None = None,
        word: str | None = None,
    ) -> None:
        self.text = text
        self.tag = tag  # None: no tag given; with name: '' means the untagged name
        self.name = name  # canonical repository, None for tag-only and digest-only queries
        self.digest = digest
        self.word = word  # the bare word typed as a name (``v1``), which could have meant the tag ``:v1``

    def describe(self) -> str:
        """The query as a user would write it, for messages."""
        head = self.name or ""
        if self.tag:
            head += f":{self.tag}"
        if self.digest:
            head += f"@{self.digest}"
        return head or self.text


class Answer(Record):
    """One resolved image: what ``resolve --json`` prints, and one item of ``find``."""

    __slots__ = (
        "annotations",
        "config",
        "created",
        "digest",
        "freshness",
        "image_size",
        "layers",
        "layout",
        "media_type",
        "names",
        "platform",
        "size",
        "source",
        "used_by",
        "warnings",
    )

    def __init__(
        self,
        *,
        layout: str,
        digest: str,
        media_type: str,
        size: int,
        names: list[Name],
        annotations: dict[str, str],
        platform: dict[str, object] | None,
        source: str,
        freshness: str,
        warnings: list[str],
        config: str | None = None,
        layers: int | None = None,
        image_size: int | None = None,
        created: str | None = None,
        used_by: list[str] | None = None,
    ) -> None:
        self.layout = layout
        self.digest = digest
        self.media_type = media_type
        self.size = size
        self.names = names
        self.annotations = annotations
        self.platform = platform
        self.source = source
        self.freshness = freshness
        self.warnings = warnings
        self.config = config
        self.layers = layers
        self.image_size = image_size
        self.created = created
        self.used_by = used_by

    def to_json(self) -> dict[str, object]:
        """The keys of docs/json.md (``resolve --json``), in a stable order."""
        return {
            "layout": self.layout,
            "digest": self.digest,
            "mediaType": self.media_type,
            "size": self.size,
            "names": [n.to_json() for n in self.names],
            "annotations": self.annotations,
            "platform": _platform_out(self.platform),
            "config": self.config,
            "layers": self.layers,
            "image_size": self.image_size,
            "created": self.created,
            "source": self.source,
            "used_by": self.used_by,
            "freshness": self.freshness,
            "warnings": self.warnings,
        }

    def replaced(self, **fields: object) -> Answer:
        """This answer with *fields* replaced."""
        data = {name: getattr(self, name) for name in Answer.__slots__}
        data.update(fields)
        return Answer(**data)

    def context(self) -> str:
        """``oci-layout://ABS_PATH@DIGEST`` for ``docker buildx build --build-context``."""
        return f"{SCHEME}{self.layout}@{self.digest}"


def _platform_out(platform: dict[str, object] | None) -> dict[str, object] | None:
    if platform is None:
        return None
    return {
        "os": platform.get("os"),
        "architecture": platform.get("architecture"),
        "variant": platform.get("variant") or None,
    }


class Matches(list[Answer]):
    """What :meth:`Index.find` found: a list of answers, and what a person should know about it."""

    def __init__(self, query: Query, unverified: str | None) -> None:
        super().__init__()
        self.query = query
        self.unverified = unverified  # why the index could not be proven exact (each answer warns too)
        # Other things a person should know about the whole answer (layouts in scope that could not be
        # read now); each answer carries them among its warnings too.
        self.warnings: list[str] = []
        self.hint = ""  # for no answer: " (did you mean the tag ':v1'?)" when that would have matched


class Rows(list[dict[str, object]]):
    """What :meth:`Index.layouts` found: the rows, and why they may miss a change (None when exact)."""

    def __init__(self, rows: list[dict[str, object]], unverified: str | None) -> None:
        super().__init__(rows)
        self.unverified = unverified


class Referrer(Record):
    """One manifest or index that refers to an image: what ``referrers --json`` prints for it."""

    __slots__ = ("annotations", "artifact_type", "digest", "how", "layout", "media_type", "subject")

    def __init__(
        self,
        *,
        layout: str,
        digest: str,
        media_type: str,
        artifact_type: str | None,
        subject: str,
        annotations: dict[str, str],
        how: str,
    ) -> None:
        self.layout = layout
        self.digest = digest
        self.media_type = media_type
        self.artifact_type = artifact_type
        self.subject = subject
        self.annotations = annotations
        self.how = how

    def to_json(self) -> dict[str, object]:
        """The keys of docs/json.md (``referrers --json``), in a stable order."""
        return {
            "layout": self.layout,
            "digest": self.digest,
            "mediaType": self.media_type,
            "artifactType": self.artifact_type,
            "subject": self.subject,
            "annotations": self.annotations,
            "how": self.how,
        }


class Referrers(list[Referrer]):
    """What :meth:`Index.referrers` found, the digests it looked for, and what a person should know."""

    def __init__(self, subjects: list[str], unverified: str | None) -> None:
        super().__init__()
        self.subjects = subjects
        self.unverified = unverified
        self.warnings: list[str] = []


class View(Record):
    """Where one layout's rows come from for this lookup, and how fresh they are.

    ``stored`` is the layout's indexed state (None for a layout read through with no index row);
    ``snapshot`` the read just made, for a read-through; ``graph`` keeps the view that holds the
    layout's content graph once a lookup needed it (:meth:`Index.graph_view`).
    """

    __slots__ = ("conn", "freshness", "graph", "layout_id", "path", "snapshot", "stored", "warnings")

    def __init__(
        self,
        conn: sqlite3.Connection,
        layout_id: int,
        path: str,
        freshness: str,
        warnings: list[str],
        *,
        stored: db.StoredLayout | None = None,
        snapshot: layout_mod.Snapshot | None = None,
    ) -> None:
        self.conn = conn
        self.layout_id = layout_id
        self.path = path
        self.freshness = freshness
        self.warnings = warnings
        self.stored = stored
        self.snapshot = snapshot
        self.graph: list[View] = []  # filled once, by Index.graph_view


def parse_ref(text: str) -> Query:
    """A REF of ``resolve --layout`` and ``find``: ``:TAG``, ``@DIGEST``, ``NAME[:TAG][@DIGEST]``, 64-hex."""
    if text == "":
        raise UsageError("empty reference")
    if text.startswith(":") or text.startswith("@"):
        tag_part, at, digest_part = text[1:].partition("@") if text.startswith(":") else ("", "@", text[1:])
        if text.startswith(":") and tag_part == "":
            raise InvalidReference(f"empty tag in {text!r}", category="tag_invalid_format")
        if tag_part and not reference.is_tag(tag_part):
            raise InvalidReference(f"invalid tag {tag_part!r} in {text!r}", category="tag_invalid_format")
        digest = reference.validate_digest(digest_part) if at else None
        return Query(text, tag=tag_part or None, digest=digest)
    ref = reference.parse_any_reference(text)
    if not ref.path:
        return Query(text, digest=ref.digest)
    tag = ref.tag
    if tag is None and ref.digest is None:
        tag = "latest"  # ParseDockerRef: a bare name means :latest
    word = text if ref.tag is None and ref.digest is None and "/" not in text and reference.is_tag(text) else None
    return Query(text, name=ref.name, tag=tag or "", digest=ref.digest, word=word)
