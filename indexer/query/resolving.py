"""Resolving one target in its layout: ``oci-layout://`` targets, ``resolve``, ``resolve --layout``, ``wait``."""

from __future__ import annotations

import os

from indexer import layout as layout_mod
from indexer import reference
from indexer.errors import Ambiguous, InvalidReference, LayoutNotFound, NotFound, OcidxError, UsageError
from indexer.query.answers import SCHEME, Answer, Query, View, parse_ref
from indexer.query.matching import _answer, _match
from indexer.query.messages import SHOWN, _candidates, _from_skopeo, _no_nul, _tag_hint, describe_missing
from indexer.query.platforms import _select_platform
from indexer.query.views import Views, _database_errors
from indexer.store import read as db

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator


class Resolving(Views):
    """Targets and the lookups of one image in one layout."""

    # -- target parsing ------------------------------------------------------------------------------

    def parse_target(self, target: str) -> tuple[str, Query]:
        """Split ``oci-layout://...`` into a layout path and a query (docs/semantics.md, Targets)."""
        _no_nul(target, "target")
        if not target.startswith(SCHEME):
            if target.startswith("oci:") and len(target) > 4:
                raise UsageError(
                    f"target {target!r} is skopeo's oci:PATH:REF; here it is written {_from_skopeo(target)}"
                )
            plain = self._option("'resolve --layout PATH REF' or 'find REF'", "resolve_in(layout, ref) or find(ref)")
            raise UsageError(
                f"target {target!r} is not oci-layout://PATH[:TAG][@DIGEST]; for a plain reference use {plain}"
            )
        rest = target[len(SCHEME) :]
        if not rest:
            raise UsageError(f"target {target!r} names no layout")
        digest = None
        head, at, tail = rest.rpartition("@")
        if at and "/" not in tail:
            try:
                digest = reference.validate_digest(tail)
            except InvalidReference as exc:
                raise InvalidReference(f"{exc.message} in {target!r}", category=exc.category) from None
            rest = head
        store, colon, store_tag = rest.partition(":")
        if store in self.config.stores and "/" not in store:
            if colon and not store_tag:
                raise InvalidReference(f"empty tag in {target!r}", category="tag_invalid_format")
            if colon and not reference.is_tag(store_tag):
                raise InvalidReference(f"invalid tag {store_tag!r} in {target!r}", category="tag_invalid_format")
            return self.config.stores[store], self._tag_query(target, store_tag or None, digest)
        path, colon, tag = rest.rpartition(":")
        bad_tag = None
        if colon and "/" not in tag and self._is_layout(path or "/"):
            if tag == "":
                raise InvalidReference(f"empty tag in {target!r}", category="tag_invalid_format")
            if reference.is_tag(tag):
                return path, self._tag_query(target, tag, digest)
            bad_tag = tag
        if self._is_layout(rest):
            return rest, self._tag_query(target, None, digest)
        parts = rest.split("/")
        for cut in range(len(parts) - 1, 0, -1):
            prefix = "/".join(parts[:cut]) or "/"
            if self._is_layout(prefix):
                name_text = "/".join(parts[cut:])
                query = parse_ref(name_text + (f"@{digest}" if digest else ""))
                if query.name is None:
                    raise InvalidReference(f"{name_text!r} in {target!r} is not an image name")
                return prefix, Query(target, name=query.name, tag=query.tag, digest=query.digest, word=query.word)
        if bad_tag is not None:  # PATH is a layout, and no longer prefix is: the tag is what is wrong
            raise InvalidReference(f"invalid tag {bad_tag!r} in {target!r}", category="tag_invalid_format")
        head_path, colon, tail_tag = rest.rpartition(":")
        tried = head_path if colon and "/" not in tail_tag and head_path else rest
        raise LayoutNotFound(f"no OCI layout found in {target!r}: {describe_missing(tried)}")

    @staticmethod
    def _tag_query(target: str, tag: str | None, digest: str | None) -> Query:
        if tag is None and digest is None:
            tag = "latest"  # buildx: oci-layout://PATH means :latest
        return Query(target, tag=tag, digest=digest)

    # -- lookups ----------------------------------------------------------------------------------------

    @_database_errors
    def resolve(self, target: str, *, platform: str | None = None, strict: bool = False) -> Answer:
        """Resolve ``oci-layout://...`` to one image, or raise NotFound / Ambiguous / LayoutError."""
        path, query = self.parse_target(target)
        return self._resolve(path, query, platform=platform, strict=strict)

    @_database_errors
    def resolve_in(self, layout: str, ref: str, *, platform: str | None = None, strict: bool = False) -> Answer:
        """Resolve REF (``:TAG``, ``@DIGEST``, ``NAME[:TAG][@DIGEST]``) in the layout at *layout*."""
        return self._resolve(layout, parse_ref(ref), platform=platform, strict=strict)

    def _resolve(self, path: str, query: Query, *, platform: str | None, strict: bool) -> Answer:
        want = layout_mod.parse_platform_spec(platform) if platform else None
        view = self.view(path, strict=strict)
        hits, warnings = _match(view, query, strict=strict, blobs=True)
        if not hits:
            raise NotFound(self._not_found_message(view, query))
        digests = {hit.digest for hit in hits}
        if len(digests) > 1:
            raise Ambiguous(
                f"{query.describe()} is ambiguous in {view.path}: {len(digests)} different digests match",
                _candidates(view.conn, hits, view.path),
            )
        answer = _answer(view, hits, warnings)
        if want is not None:
            answer = _select_platform(self, view, hits[0], answer, want)
        (answer,) = self.with_graph([(view, answer)])
        return answer

    def _is_layout(self, path: str) -> bool:
        real = os.path.realpath(path)
        return db.layout(self.conn, real) is not None or layout_mod.is_layout_dir(real)

    def _not_found_message(self, view: View, query: Query) -> str:
        held = db.sample_names(view.conn, view.layout_id, limit=SHOWN + 1)
        more = ""
        if len(held) > SHOWN:
            more = f" and {db.count_names(view.conn, view.layout_id) - SHOWN} more (ocidx ls {view.path})"
            held = held[:SHOWN]
        held_text = f"; it holds {', '.join(held)}{more}" if held else "; it holds no named images"
        hint = _tag_hint(view.conn, query, view.layout_id, lambda tag: f"{SCHEME}{view.path}:{tag}")
        return f"{query.describe()} not found in {view.path}{held_text}{hint}"

    def resolve_many(
        self,
        targets: Iterable[str],
        *,
        layout: str | None = None,
        platform: str | None = None,
        strict: bool = False,
    ) -> Iterator[tuple[str, Answer | OcidxError]]:
        """:meth:`resolve` (or, with *layout*, :meth:`resolve_in`) of each target, in order, on this one
        connection: ``(target, answer)``, or ``(target, error)`` for a target that failed (the others
        go on). A bad *platform* raises at once, before any target."""
        if platform:
            layout_mod.parse_platform_spec(platform)
        for target in targets:
            try:
                if layout is not None:
                    answer = self.resolve_in(layout, target, platform=platform, strict=strict)
                else:
                    answer = self.resolve(target, platform=platform, strict=strict)
            except OcidxError as exc:
                yield target, exc
            else:
                yield target, answer
