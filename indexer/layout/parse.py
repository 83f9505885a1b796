"""Parsing ``index.json`` (pure: bytes in, entries and warnings out).

Choices where the OCI image-layout specification is silent (docs/semantics.md restates them for users):

* **A bad descriptor does not hide the good ones.** A ``manifests`` item that
  is not an object, or whose ``digest`` (validated as go-digest does),
  ``size`` (an integer 0 … 2⁶³-1; ``true`` and ``1.0`` are not) or
  ``mediaType`` (a string, missing → ``""``) is wrong, is skipped with a
  layout warning. Optional parts are dropped, the entry kept: annotations
  that are not an object, annotation values that are not strings, and a
  ``platform`` that is not an object of strings. Go's decoder would refuse
  the whole file; a layout with one hand-edited entry should not vanish.
* **The document itself is strict.** Not UTF-8, a UTF-8 BOM, ``NaN`` or
  ``Infinity``, trailing data, a top level that is not an object,
  ``manifests`` that is not a list (``null`` and missing are an empty
  layout), nesting too deep for the decoder, more than
  ``Limits.max_entries`` entries, or more than ``Limits.max_index_bytes``
  bytes: :class:`~indexer.errors.IndexParseError`. Duplicate keys keep the
  last value, as Go does. Lone UTF-16 surrogates (``"\\ud800"``) become
  U+FFFD, as Go does, so every kept string can be stored.
* ``Entry.position`` is the item's index in ``manifests``, so skipped items
  leave gaps. Entry warnings are repeated in the layout's warnings, prefixed
  with ``manifests[N]``.
"""

from __future__ import annotations

import json
import sys

from indexer import reference
from indexer.errors import IndexParseError, InvalidReference
from indexer.layout.platforms import Platform
from indexer.layout.records import DEFAULT_LIMITS, INDEX_FILE, Entry, Limits
from indexer.names import DEFAULT_FAMILIAR_POLICY, quote_value, read_names

TYPE_CHECKING = False
if TYPE_CHECKING:
    _Descriptor = tuple[str, str, int, dict[str, str], Platform | None]

_MAX_SIZE = 2**63 - 1  # a Go int64: what every writer's descriptor size is


def parse_index(
    data: bytes,
    *,
    familiar: str = DEFAULT_FAMILIAR_POLICY,
    limits: Limits = DEFAULT_LIMITS,
    source: str = INDEX_FILE,
) -> tuple[tuple[Entry, ...], tuple[str, ...]]:
    """Parse ``index.json`` bytes into entries and layout warnings; :class:`IndexParseError` if unusable.

    *source* names the file in error messages (its path, when there is one).
    """
    entries, warnings, _skipped = _parse_index(data, familiar=familiar, limits=limits, source=source)
    return entries, warnings


def _parse_index(
    data: bytes, *, familiar: str, limits: Limits, source: str
) -> tuple[tuple[Entry, ...], tuple[str, ...], int]:
    """:func:`parse_index`, and how many descriptors were skipped."""
    if len(data) > limits.max_index_bytes:
        raise IndexParseError(f"{source} is {len(data)} bytes, over the limit of {limits.max_index_bytes} bytes")
    items = _manifests(_load_json(data, source), source)
    if len(items) > limits.max_entries:
        raise IndexParseError(f"{source} lists {len(items)} manifests, over the limit of {limits.max_entries}")
    entries: list[Entry] = []
    warnings: list[str] = []
    for position, item in enumerate(items):
        own: list[str] = []
        descriptor = _descriptor(item, own)
        if descriptor is not None:
            digest, media_type, size, annotations, platform = descriptor
            reading = read_names(annotations, familiar=familiar)
            own.extend(reading.warnings)
            entries.append(
                Entry(
                    position,
                    digest,
                    media_type,
                    size,
                    annotations,
                    platform,
                    reading.names,
                    reading.invalid,
                    tuple(own),
                )
            )
        if own:
            warnings.extend(f"manifests[{position}]: {text}" for text in own)
    return tuple(entries), tuple(warnings), len(items) - len(entries)


def _load_json(data: bytes, what: str) -> object:
    if not data or data.isspace():
        raise IndexParseError(f"{what} is empty")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise IndexParseError(f"{what} is not valid UTF-8 (byte {exc.start})") from None
    try:
        if text.startswith("\ufeff"):  # as json.loads says it
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        return _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":
            detail = (
                f"trailing data after the JSON document at line {exc.lineno} column {exc.colno}"
                " (old bytes left by an in-place rewrite?)"
            )
        elif exc.pos >= len(text) or exc.msg.startswith("Unterminated string"):
            detail = "truncated: the JSON document ends early"
        else:
            reason = exc.msg.removesuffix(" at")  # json says "Invalid control character at"
            detail = f"not valid JSON: {reason} at line {exc.lineno} column {exc.colno}"
        raise IndexParseError(f"{what} is {detail}") from None
    except RecursionError:
        raise IndexParseError(f"{what} is nested too deeply to parse") from None
    except ValueError as exc:  # NaN/Infinity, or an integer longer than Python converts
        if "int_max_str_digits" in str(exc) or "Exceeds the limit" in str(exc):
            raise IndexParseError(f"{what} is not valid JSON: a number has more than 4,300 digits") from None
        raise IndexParseError(f"{what} is not valid JSON: {exc}") from None


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON number")


# One decoder for every document: json.loads with an argument makes a new one per call, which was
# 4% of a worker's time (a pass decodes index.json, nested indexes, every manifest and config).
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _manifests(document: object, what: str) -> list[object]:
    if not isinstance(document, dict):
        raise IndexParseError(f"{what} is a JSON {_kind(document)}, not an object")
    items = document.get("manifests")
    if items is None:
        return []
    if not isinstance(items, list):
        raise IndexParseError(f'{what}: "manifests" is a JSON {_kind(items)}, not a list')
    return items


def _descriptor(item: object, warnings: list[str]) -> _Descriptor | None:
    """Check one descriptor; ``None`` (with a warning) when it cannot be used."""
    if type(item) is dict:
        # The common case first: fields of the expected types, an ASCII media type, a digest
        # already accepted (most repeat across layouts); anything else takes the checks below.
        digest, size, media_type = item.get("digest"), item.get("size"), item.get("mediaType", "")
        if (
            type(digest) is str
            and digest in reference.VALID_DIGESTS
            and type(size) is int
            and 0 <= size <= _MAX_SIZE
            and type(media_type) is str
            and media_type.isascii()
        ):
            return (
                digest,
                media_type,
                size,
                _annotations(item.get("annotations"), warnings),
                _platform(item.get("platform"), warnings),
            )
    if not isinstance(item, dict):
        warnings.append(f"descriptor is a JSON {_kind(item)}, not an object; skipped")
        return None
    digest = item.get("digest")
    if not isinstance(digest, str):
        warnings.append(f'"digest" is a JSON {_kind(digest)}, not a string; skipped')
        return None
    try:
        reference.validate_digest(digest)
    except InvalidReference as exc:
        warnings.append(f"digest {quote_value(digest)} is invalid ({exc.category}); skipped")
        return None
    size = item.get("size")
    if type(size) is not int or not 0 <= size <= _MAX_SIZE:
        shown = size if type(size) is int else f"a JSON {_kind(size)}"
        warnings.append(f'"size" is {shown}, not an integer from 0 to 2^63-1; skipped')
        return None
    media_type = item.get("mediaType", "")
    if not isinstance(media_type, str):
        warnings.append(f'"mediaType" is a JSON {_kind(media_type)}, not a string; skipped')
        return None
    return (
        digest,
        sys.intern(_clean(media_type)),  # a few distinct values: one object each, sent once (marshal)
        size,
        _annotations(item.get("annotations"), warnings),
        _platform(item.get("platform"), warnings),
    )


def _annotations(value: object, warnings: list[str]) -> dict[str, str]:
    if type(value) is dict:
        # The common case, checked in C: every value a string (join raises otherwise; JSON keys
        # always are) and all of it ASCII, so nothing needs cleaning and the parsed dict is kept.
        try:
            if "".join(value.values()).isascii() and "".join(value).isascii():
                return value
        except TypeError:
            pass
    if value is None:
        return {}
    if not isinstance(value, dict):
        warnings.append(f'"annotations" is a JSON {_kind(value)}, not an object; ignored')
        return {}
    kept: dict[str, str] = {}
    for key, text in value.items():
        if isinstance(text, str):
            kept[_clean(key)] = _clean(text)
        else:
            warnings.append(f"annotation {quote_value(key)} is a JSON {_kind(text)}, not a string; dropped")
    return kept


def _platform(value: object, warnings: list[str]) -> Platform | None:
    if type(value) is dict and "os.features" not in value:
        # The common case: plain ASCII strings, no features; few distinct platforms, shared.
        os_, arch = value.get("os", ""), value.get("architecture", "")
        variant, os_version = value.get("variant", ""), value.get("os.version", "")
        if type(os_) is str and type(arch) is str and type(variant) is str and type(os_version) is str:
            key = (os_, arch, variant, os_version)
            found = _platforms.get(key)
            if found is None and (os_ + arch + variant + os_version).isascii():
                if len(_platforms) >= _PLATFORMS_MAX:
                    _platforms.clear()
                found = _platforms[key] = Platform(os_, arch, variant, os_version)
            if found is not None:
                return found
    if value is None:
        return None
    if not isinstance(value, dict):
        warnings.append(f'"platform" is a JSON {_kind(value)}, not an object; ignored')
        return None
    fields: list[str] = []
    for field in ("os", "architecture", "variant", "os.version"):
        text = value.get(field, "")
        if not isinstance(text, str):
            warnings.append(f'platform "{field}" is a JSON {_kind(text)}, not a string; platform ignored')
            return None
        fields.append(_clean(text))
    features = value.get("os.features", [])
    if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
        warnings.append('platform "os.features" is not a list of strings; platform ignored')
        return None
    return Platform(fields[0], fields[1], fields[2], fields[3], tuple(_clean(f) for f in features))


_PLATFORMS_MAX = 1024
_platforms: dict[tuple[str, str, str, str], Platform] = {}


def _clean(text: str) -> str:
    """*text* with lone surrogates replaced, as Go's decoder does (they cannot be stored as UTF-8)."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text)
    return text


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"
