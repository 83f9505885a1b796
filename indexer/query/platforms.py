"""``--platform``: following an index down to the manifest for a platform, or checking a single
manifest's (its descriptor's, else its config's)."""

from __future__ import annotations

import json

from indexer import graph as graph_mod
from indexer import layout as layout_mod
from indexer.errors import LayoutError, PlatformNotFound, printable
from indexer.query.answers import Answer, View, _platform_out
from indexer.query.matching import _has_blob, _with_warning
from indexer.store import read as db

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

    from indexer.query.views import Views


def _select_platform(index: Views, view: View, hit: db.Hit, answer: Answer, want: layout_mod.Platform) -> Answer:
    """Follow an index (or manifest list) down to the manifest for platform *want*; on a single
    manifest, check its platform: the descriptor's, else its config's (as containerd and BuildKit)."""
    if hit.media_type not in layout_mod.INDEX_MEDIA_TYPES:
        platform, problem = hit.platform, None
        if platform is None and hit.media_type in graph_mod.MANIFEST_MEDIA_TYPES:
            platform, problem = _config_platform(index, view, hit.digest, hit.size)
            if problem is not None:
                return _with_warning(
                    answer, f"the platform of {answer.digest} in {view.path} could not be checked: {problem}"
                )
        have = _platform_record(platform)
        if have is not None and layout_mod.platform_matches(want, have):
            if answer.platform is None:
                answer = _with_platform(answer, platform)
            return answer
        if have is None and hit.media_type not in graph_mod.MANIFEST_MEDIA_TYPES:
            return answer  # a bare blob, or a media type ocidx does not read: nothing to compare
        what = (
            f"a single manifest for {_platform_text(platform)}" if have is not None else "an artifact with no platform"
        )
        raise PlatformNotFound(
            f"{answer.digest} in {view.path} is {what}, not {_platform_text(want.to_json())}",
            [p for p in [_platform_out(platform)] if p is not None],
        )
    kids = db.children(view.conn, view.layout_id, hit.digest)
    by_parent: dict[str, list[db.ChildRow]] = {}
    for kid in kids:
        by_parent.setdefault(kid.parent, []).append(kid)
    seen: dict[str, dict[str, object]] = {}  # the platforms present, in index order, once each
    searched: set[str] = set()  # each index looked into once: the graph may reach one by many paths

    def matches(platform: dict[str, object] | None) -> bool:
        have = _platform_record(platform)
        return have is not None and layout_mod.platform_matches(want, have)

    def platform_of(kid: db.ChildRow) -> dict[str, object] | None:
        # A child manifest whose descriptor names no platform is matched by its config's, as
        # containerd's images.Manifest does; one whose config cannot be read is not a match.
        if kid.platform is None and kid.media_type in graph_mod.MANIFEST_MEDIA_TYPES:
            return _config_platform(index, view, kid.digest, kid.size)[0]
        return kid.platform

    def search(parent: str, depth: int) -> db.ChildRow | None:
        # As containerd's images.Manifest: a nested index is followed when its descriptor names
        # no platform or the wanted one; the first manifest for the platform, in index order, wins.
        searched.add(parent)
        level = [(kid, platform_of(kid)) for kid in by_parent.get(parent, [])]
        for _kid, platform in level:
            shown = _platform_out(platform)
            if shown is not None:
                seen.setdefault(json.dumps(shown, sort_keys=True), shown)
        for kid, platform in level:
            if kid.media_type in layout_mod.INDEX_MEDIA_TYPES:
                if depth < 16 and kid.digest not in searched and (not kid.platform or matches(kid.platform)):
                    found = search(kid.digest, depth + 1)
                    if found is not None:
                        return found
            elif matches(platform):
                return kid if platform is kid.platform else _child_with_platform(kid, platform)
        return None

    chosen = search(hit.digest, 0)
    if chosen is not None:
        if not _has_blob(view.path, chosen.digest):
            raise PlatformNotFound(
                f"{answer.digest} in {view.path} lists {_platform_text(chosen.platform)} as {chosen.digest}, "
                "but that blob is absent from the layout (a partial export?)",
                list(seen.values()),
            )
        return Answer(
            layout=answer.layout,
            digest=chosen.digest,
            media_type=chosen.media_type,
            size=chosen.size,
            names=answer.names,
            annotations=answer.annotations,
            platform=chosen.platform,
            source="child",
            freshness=answer.freshness,
            warnings=answer.warnings,
        )
    listed = ", ".join(_platform_text(p) for p in seen.values()) or "none recorded"
    raise PlatformNotFound(
        f"no manifest for {_platform_text(want.to_json())} under {answer.digest} in {view.path} "
        f"(platforms present: {listed})",
        list(seen.values()),
    )


def _config_platform(index: Views, view: View, digest: str, size: int) -> tuple[dict[str, object] | None, str | None]:
    """The platform in the config of manifest *digest*: ``(platform, None)``; ``(None, why)`` when it
    cannot be checked (a blob absent or refused, a config naming none); and ``(None, None)`` for an
    artifact, whose config is not an image config and names no platform. From the index when it
    holds the layout's graph as it is; else read from the layout."""
    known = index._known_graph(view)
    if known is not None:
        image = db.images(known.conn, [digest]).get(digest)
        absent = db.missing(known.conn, [known.layout_id]).get(known.layout_id)
        if image is not None and absent is not None:
            if graph_mod.graph_key(digest) in absent:
                return None, f"the manifest {digest} is not in blobs/ (a partial export?)"
            if image.config is None or image.config_media_type not in graph_mod.IMAGE_CONFIG_TYPES:
                return None, None
            if graph_mod.graph_key(image.config) in absent:
                return None, f"its config {image.config} is not in blobs/ (a partial export?)"
            if image.platform is not None:
                return image.platform, None
            # A config the index could not read, or one naming no platform: the layout says which.
    limits = index.config.limits
    if not _has_blob(view.path, digest):
        return None, f"the manifest {digest} is not in blobs/ (a partial export?)"
    try:
        manifest = graph_mod.read_manifest(view.path, digest, size, limits)
    except LayoutError as exc:
        return None, exc.message
    config = manifest.config
    if config is None or config.media_type not in graph_mod.IMAGE_CONFIG_TYPES:
        return None, None
    if not _has_blob(view.path, config.digest):
        return None, f"its config {config.digest} is not in blobs/ (a partial export?)"
    try:
        found = graph_mod.read_config(view.path, config.digest, config.size, limits)
    except LayoutError as exc:
        return None, exc.message
    if found.platform is None:
        return None, f"its config {config.digest} names no os and architecture"
    return dict(found.platform.to_json()), None


def _with_platform(answer: Answer, platform: dict[str, object] | None) -> Answer:
    data = {name: getattr(answer, name) for name in Answer.__slots__}
    data["platform"] = platform
    return Answer(**data)


def _child_with_platform(kid: db.ChildRow, platform: dict[str, object] | None) -> db.ChildRow:
    return db.ChildRow(
        parent=kid.parent,
        depth=kid.depth,
        digest=kid.digest,
        media_type=kid.media_type,
        size=kid.size,
        platform=platform,
    )


def _platform_record(platform: dict[str, object] | None) -> layout_mod.Platform | None:
    if not platform:
        return None
    return layout_mod.Platform(
        os=str(platform.get("os") or ""),
        architecture=str(platform.get("architecture") or ""),
        variant=str(platform.get("variant") or ""),
    )


def _platform_text(platform: Mapping[str, object] | None) -> str:
    if not platform:
        return "an unknown platform"
    parts = [str(platform.get("os") or "?"), str(platform.get("architecture") or "?")]
    if platform.get("variant"):
        parts.append(str(platform["variant"]))
    return printable("/".join(parts))
