"""The fleet's answers: what ``find --fleet``, ``referrers --fleet`` and ``hosts`` give, made from the
checked rows of :class:`~indexer.fleet.reads.Reads` by the rules each host's own lookups follow.

A fleet answer is the host's own answer (:class:`indexer.query.Answer`, :class:`indexer.query.Referrer`)
plus the host that holds it: the references are parsed by :func:`indexer.query.parse_ref`, matched by
the rules of :func:`indexer.store.read.lookups`, a layer's or config's uses grouped by
:func:`indexer.store.read.blob_uses`, and an image's fields are those its host computed from its
content graph and published with its entry or child (:func:`indexer.query.with_image`).
"""

from __future__ import annotations

from indexer.errors import NotFound
from indexer.layout import INDEX_MEDIA_TYPES
from indexer.query import INDEXED, STALE, Answer, Referrer, blob_use_answer, mismatch, with_image
from indexer.store import read as db

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

    from indexer.fleet.checks import BlobUse, Hit, Referring
    from indexer.fleet.reads import Reads
    from indexer.query import Query

    HostStates = dict[str, tuple[str, float | None, object]]
    Layouts = dict[tuple[str, int], tuple[str, str]]


class _OnHost:
    """What a fleet answer adds to a local one: the host that holds it, and how live that host is."""

    __slots__ = ()
    host: str
    host_state: str
    heartbeat_age_s: float | None

    def _host_keys(self, local: dict[str, object]) -> dict[str, object]:
        """*local* (the local answer's keys), then ``host``, ``host_state`` and ``heartbeat_age_s``."""
        return {**local, "host": self.host, "host_state": self.host_state, "heartbeat_age_s": self.heartbeat_age_s}


class FleetAnswer(Answer, _OnHost):
    """One ``find --fleet`` match: a local find's answer plus the host that holds it."""

    __slots__ = ("heartbeat_age_s", "host", "host_state")

    def __init__(self, answer: Answer, *, host: str, host_state: str, heartbeat_age_s: float | None) -> None:
        super().__init__(**{name: getattr(answer, name) for name in Answer.__slots__})
        self.host, self.host_state, self.heartbeat_age_s = host, host_state, heartbeat_age_s

    def to_json(self) -> dict[str, object]:
        """``find --json``'s keys, then ``host``, ``host_state`` and ``heartbeat_age_s``."""
        return self._host_keys(super().to_json())


class FleetReferrer(Referrer, _OnHost):
    """One ``referrers --fleet`` answer: a local ``referrers`` answer plus the host that holds it."""

    __slots__ = ("heartbeat_age_s", "host", "host_state")

    def __init__(self, referrer: Referrer, *, host: str, host_state: str, heartbeat_age_s: float | None) -> None:
        super().__init__(**{name: getattr(referrer, name) for name in Referrer.__slots__})
        self.host, self.host_state, self.heartbeat_age_s = host, host_state, heartbeat_age_s

    def to_json(self) -> dict[str, object]:
        """``referrers --json``'s keys, then ``host``, ``host_state`` and ``heartbeat_age_s``."""
        return self._host_keys(super().to_json())


class FleetReferrers(list[FleetReferrer]):
    """What :meth:`Fleet.referrers` found: the referrers, the digests looked for (``subjects``), and
    warnings about rows dropped as malformed."""

    def __init__(
        self, referrers: Sequence[FleetReferrer] = (), subjects: Sequence[str] = (), warnings: Sequence[str] = ()
    ) -> None:
        super().__init__(referrers)
        self.subjects = list(subjects)
        self.warnings = list(warnings)


class FleetMatches(list[FleetAnswer]):
    """What :meth:`Fleet.find` found: the answers, and warnings about rows dropped as malformed."""

    def __init__(self, answers: Sequence[FleetAnswer] = (), warnings: Sequence[str] = ()) -> None:
        super().__init__(answers)
        self.warnings = list(warnings)


class HostRows(list[dict[str, object]]):
    """What :meth:`Fleet.hosts` found: one dict per host, and warnings about values dropped as malformed."""

    def __init__(self, rows: Sequence[dict[str, object]] = (), warnings: Sequence[str] = ()) -> None:
        super().__init__(rows)
        self.warnings = list(warnings)


def _state(states: HostStates, host: str) -> tuple[str, float | None]:
    """*host*'s state and heartbeat age, for its answers (a host with no heartbeat is stale)."""
    host_state, age, _backlog = states.get(host, (STALE, None, None))
    return host_state, age


def find(reads: Reads, query: Query) -> FleetMatches:
    """Every match of *query* on every host, by host, layout and digest, as each host's own ``find``
    answers it."""
    found: list[Hit] = []
    for lookup in db.lookups(name=query.name, tag=query.tag, digest=query.digest):
        found.extend(reads.hits(lookup))
    uses: list[BlobUse] = []
    if query.digest is not None and query.name is None and query.tag is None:
        # As find: a layout where the digest is an image is answered as that, not as a layer.
        images = {(h.host, h.layout_id) for h in found}
        uses = [u for u in reads.uses(query.digest) if (u.host, u.layout_id) not in images]
    if not found and not uses:
        return FleetMatches(warnings=reads.dropped.warnings())
    keys = sorted({(h.host, h.layout_id) for h in found} | {(u.host, u.layout_id) for u in uses})
    layouts = reads.layouts(keys)
    names = reads.names(sorted({(h.host, h.layout_id, h.entry_position) for h in found if h.source == "entry"}))
    if query.digest is not None and (query.tag or query.name):
        # A search, as local find: only the layouts where the name or tag points at the digest.
        for key in _mismatches(reads, query, keys, layouts):
            layouts.pop(key, None)
    states = reads.host_states()
    grouped: dict[tuple[str, int, str], list[Hit]] = {}
    for hit in found:
        if (hit.host, hit.layout_id) in layouts:  # a layout replaced between the two reads is left out
            grouped.setdefault((hit.host, hit.layout_id, hit.digest), []).append(hit)
    answers: list[FleetAnswer] = []
    for (host, lid, _digest), group in grouped.items():
        path, layout_state = layouts[(host, lid)]
        first = group[0]
        # Ordered, without repeats, in linear time (one entry can carry thousands of names).
        merged = list(
            dict.fromkeys(
                n for hit in group if hit.source == "entry" for n in names.get((host, lid, hit.entry_position), [])
            )
        )
        answer = Answer(
            layout=path,
            digest=first.digest,
            media_type=first.media_type,
            size=first.size,
            names=merged,
            annotations=first.annotations,
            platform=first.platform,
            source=first.source,
            # A layout whose index.json is broken on its host answers from its last good rows.
            freshness=INDEXED if layout_state == "ok" else STALE,
            warnings=reads.dropped.about(host, lid),
        )
        answer = with_image(answer, first.image)  # what the host's own find adds from its content graph
        host_state, age = _state(states, host)
        answers.append(FleetAnswer(answer, host=host, host_state=host_state, heartbeat_age_s=age))
    if uses:
        answers.extend(_use_answers(reads, query.digest or "", uses, layouts, states))
    answers.sort(key=lambda a: (a.host, a.layout, a.digest))
    return FleetMatches(answers, reads.dropped.warnings())


def _use_answers(
    reads: Reads, digest: str, uses: list[BlobUse], layouts: Layouts, states: HostStates
) -> list[FleetAnswer]:
    """The answers of a layer's or config's digest, as each host's own find gives them
    (:func:`indexer.store.read.blob_uses`, :func:`indexer.query.blob_use_answer`)."""
    by_host: dict[str, tuple[dict[int, set[str]], dict[str, tuple[str, str, int]], set[int]]] = {}
    for use in uses:
        referencing, by_manifest, lacking = by_host.setdefault(use.host, ({}, {}, set()))
        referencing.setdefault(use.layout_id, set()).add(use.manifest)
        by_manifest[use.manifest] = (use.source, use.media_type, use.size)
        if use.missing:
            lacking.add(use.layout_id)
    out: list[FleetAnswer] = []
    for host, (referencing, by_manifest, lacking) in by_host.items():
        for hit in db.blob_uses(digest, referencing, by_manifest):
            if (host, hit.layout_id) not in layouts:
                continue
            path, layout_state = layouts[(host, hit.layout_id)]
            answer = blob_use_answer(
                layout=path,
                hit=hit,
                freshness=INDEXED if layout_state == "ok" else STALE,
                warnings=reads.dropped.about(host, hit.layout_id),
                lacking=hit.layout_id in lacking,
            )
            host_state, age = _state(states, host)
            out.append(FleetAnswer(answer, host=host, host_state=host_state, heartbeat_age_s=age))
    return out


def _mismatches(
    reads: Reads, query: Query, keys: list[tuple[str, int]], layouts: Layouts
) -> dict[tuple[str, int], list[str]]:
    """The layouts where the query's name or tag points elsewhere, each with the mismatch message."""
    pointed: dict[tuple[str, int], set[str]] = {key: set() for key in keys}
    for hit in reads.hits(db.pointing_lookup(name=query.name, tag=query.tag), keys):
        pointed.setdefault((hit.host, hit.layout_id), set()).add(hit.digest)
    out: dict[tuple[str, int], list[str]] = {}
    for key, digests in pointed.items():
        if key in layouts:
            message = mismatch(query, layouts[key][0], digests)
            if message is not None:
                out[key] = [message]
    return out


def referrers_of_name(reads: Reads, query: Query) -> FleetReferrers:
    """:func:`referrers` of every digest :func:`find` finds for *query* (a name) on any host."""
    found = find(reads, query)
    digests = sorted({a.digest for a in found if a.source in ("entry", "child")})
    if not digests:
        raise NotFound(f"{query.describe()} not found on any host of the fleet")
    return referrers(reads, digests)


def referrers(reads: Reads, targets: list[str]) -> FleetReferrers:
    """Every manifest or index, on every host, that refers to one of *targets*, as each host's own
    ``referrers`` finds them; by host, layout, subject, how and digest."""
    tag_targets = {tag: target for target in targets for tag in db.fallback_tags(target)}
    rows = reads.referring(targets, list(tag_targets))
    # As referrers on one host (indexer.store.read.referrer_hits), per target: what refers to it by its
    # subject, the attestation manifests listed for it, those it lists (an index), and its fallback
    # tags; the first way a referrer is found in a layout is the one answered.
    found: dict[tuple[str, str, int, str, str], tuple[Referring, str]] = {}

    def add(target: str, row: Referring, how: str, subject: str) -> None:
        found.setdefault((target, row.host, row.layout_id, row.digest, how), (row, subject))

    def order(row: Referring) -> tuple[int, int]:
        if row.how == "subject":
            return (0, row.entry_position)
        if row.how == "attestation":
            return (1 if row.subject == row.matched else 2, row.entry_position)
        return (3, row.entry_position)

    children: dict[tuple[str, int, int, str], list[Referring]] = {}
    for row in sorted(rows, key=order):
        if row.how == "fallback-child":
            children.setdefault((row.host, row.layout_id, row.entry_position, row.matched), []).append(row)
        elif row.how != "fallback-tag" and row.subject is not None:
            add(row.matched, row, row.how, row.subject)
    for row in sorted(rows, key=order):
        if row.how != "fallback-tag" or row.matched not in tag_targets:
            continue
        target = tag_targets[row.matched]
        if row.matched == db.fallback_tags(target)[0] and row.media_type in INDEX_MEDIA_TYPES:
            # The OCI fallback tag names an index whose descriptors are the referrers themselves.
            for child in children.get((row.host, row.layout_id, row.entry_position, row.matched), []):
                add(target, child, "fallback-tag", target)
        else:
            add(target, row, "fallback-tag", target)
    layouts = reads.layouts(sorted({(key[1], key[2]) for key in found}))
    states = reads.host_states()
    out: list[FleetReferrer] = []
    for key, (row, subject) in found.items():
        if (row.host, row.layout_id) not in layouts:
            continue  # replaced between the reads
        referrer = Referrer(
            layout=layouts[(row.host, row.layout_id)][0],
            digest=row.digest,
            media_type=row.media_type,
            artifact_type=row.artifact_type,
            subject=subject,
            annotations=row.annotations,
            how=key[4],
        )
        host_state, age = _state(states, row.host)
        out.append(FleetReferrer(referrer, host=row.host, host_state=host_state, heartbeat_age_s=age))
    out.sort(key=lambda r: (r.host, r.layout, r.subject, r.how, r.digest))
    return FleetReferrers(out, targets, reads.dropped.warnings())


def hosts(reads: Reads) -> HostRows:
    """Every host: ``host``, ``host_state``, ``heartbeat_age_s``, ``layouts``, ``entries``, ``backlog``."""
    states = reads.host_states()
    counts = reads.host_counts()
    out: list[dict[str, object]] = []
    for host in sorted(states):
        state, age, backlog = states[host]
        if backlog is not None and (type(backlog) is not int or backlog < 0):
            reads.dropped.add(host, None, "heartbeats", f"backlog is {backlog!r}, not a count")
            backlog = None
        layouts, entries = counts.get(host, (0, 0))
        out.append(
            {
                "host": host,
                "host_state": state,
                "heartbeat_age_s": age,
                "layouts": layouts,
                "entries": entries,
                "backlog": backlog,
            }
        )
    return HostRows(out, reads.dropped.warnings())
