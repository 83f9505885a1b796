"""Docker image references: the distribution/reference grammar, normalization and digests.

This is a from-scratch port of the behaviour described in
``research/reference-spec.md`` (distribution/reference v0.6.0 and go-digest
v1.0.0); the vectors in ``research/reference_vectors.json`` are its tests.

Two ways of finding the domain coexist, exactly as upstream:

* :func:`parse` splits by the grammar: the first component is the domain
  whenever it matches the domain grammar and a ``/`` follows it
  (``foo/bar`` has domain ``foo``).
* the normalizing functions (:func:`parse_normalized_named` and friends) split
  at the first ``/`` by Docker's rules (a ``.`` or ``:``, ``localhost``, or upper
  case makes a domain; otherwise ``docker.io``, with ``library/`` for one
  component), then hand the result to :func:`parse`, which splits again.

This module is on the lookup path (a 26 ms budget for the whole process), so it
imports only ``re``, which ``argparse`` loads anyway, and its value type is a
:class:`~indexer._record.Record`. Every pattern is matched with ``fullmatch``
(and anchored with ``\\A``/``\\Z`` as well, never ``$``), compiled with
``re.ASCII``, and written so that a backtracking engine stays linear: two
separators never touch and every repetition is delimited.
"""

from __future__ import annotations

import re

from indexer._record import Record
from indexer.errors import InvalidReference

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = [
    "ANCHORED_IDENTIFIER_RE",
    "ANCHORED_NAME_RE",
    "DEFAULT_ALGORITHMS",
    "DEFAULT_DOMAIN",
    "DIGEST_RE",
    "DOMAIN_AND_PORT_RE",
    "NAME_TOTAL_LENGTH_MAX",
    "REFERENCE_RE",
    "TAG_RE",
    "Reference",
    "describe",
    "familiar_match",
    "is_digest",
    "is_identifier",
    "is_tag",
    "parse",
    "parse_any_reference",
    "parse_docker_ref",
    "parse_named",
    "parse_normalized_named",
    "sort_references",
    "tag_name_only",
    "trim_named",
    "validate_digest",
    "with_digest",
    "with_name",
    "with_tag",
]

DEFAULT_ALGORITHMS = frozenset({"sha256", "sha384", "sha512"})
"""Digest algorithms go-digest accepts in a real docker or containerd binary."""

DEFAULT_DOMAIN = "docker.io"
_LEGACY_DEFAULT_DOMAIN = "index.docker.io"
_OFFICIAL_PREFIX = "library/"
_LOCALHOST = "localhost"
_DEFAULT_TAG = "latest"

NAME_TOTAL_LENGTH_MAX = 255
"""The longest repository path (the domain does not count; ``library/`` does)."""

# The hex length go-digest requires of each algorithm it knows.
_HEX_LENGTHS = {"sha256": 64, "sha384": 96, "sha512": 128}

# --- the grammar (reference-spec.md §1), as pattern text --------------------
# A path component: lowercase alphanumeric runs joined by exactly one separator.
# The separator is one dot, one or two underscores, or one-or-more dashes; with
# zero-or-more dashes the separator could be empty and matching turns exponential.
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH = rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
_DOMAIN_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_NAME = rf"{_DOMAIN_LABEL}(?:\.{_DOMAIN_LABEL})*"
_IPV6_LITERAL = r"\[[a-fA-F0-9:]+\]"
_DOMAIN_AND_PORT = rf"(?:{_DOMAIN_NAME}|{_IPV6_LITERAL})(?::[0-9]+)?"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9A-Fa-f]{32,}"
_NAME = rf"(?:(?P<domain>{_DOMAIN_AND_PORT})/)?(?P<path>{_PATH})"

REFERENCE_RE = re.compile(
    rf"\A(?P<name>{_NAME})(?::(?P<tag>{_TAG}))?(?:@(?P<digest>{_DIGEST}))?\Z",
    re.ASCII,
)
"""A whole reference; groups ``name``, ``domain``, ``path``, ``tag`` and ``digest`` (None when absent)."""
ANCHORED_IDENTIFIER_RE = re.compile(r"\A[a-f0-9]{64}\Z", re.ASCII)
"""An image ID: exactly 64 lowercase hex digits."""
TAG_RE = re.compile(rf"\A{_TAG}\Z", re.ASCII)
"""A tag: a word character, then up to 127 word characters, dots and dashes."""

# Compiling a pattern costs 0.05-0.4 ms, and the lookup path has a few ms to
# spare in all: the patterns that no lookup needs are compiled on first access
# (PEP 562), and are then ordinary module attributes holding an re.Pattern.
_LAZY_PATTERNS = {
    # A registry host (DNS name or bracketed IPv6) with an optional numeric port.
    "DOMAIN_AND_PORT_RE": rf"\A{_DOMAIN_AND_PORT}\Z",
    # A repository name; groups ``domain`` (None when absent) and ``path``.
    "ANCHORED_NAME_RE": rf"\A{_NAME}\Z",
    # The grammar's digest: any algorithm name, 32 or more hex digits of either case.
    "DIGEST_RE": rf"\A{_DIGEST}\Z",
    # go-digest's own loose pattern, consulted only for an algorithm it does not have.
    "_LOOSE_DIGEST_RE": r"\A[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+\Z",
}
if TYPE_CHECKING:
    DOMAIN_AND_PORT_RE: re.Pattern[str]
    ANCHORED_NAME_RE: re.Pattern[str]
    DIGEST_RE: re.Pattern[str]
else:

    def __getattr__(name: str) -> object:
        if name in _LAZY_PATTERNS:
            return _pattern(name)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _pattern(name: str) -> re.Pattern[str]:
    """The compiled pattern *name* of :data:`_LAZY_PATTERNS`, compiled once."""
    compiled: re.Pattern[str] | None = globals().get(name)
    if compiled is None:
        compiled = re.compile(_LAZY_PATTERNS[name], re.ASCII)
        globals()[name] = compiled
    return compiled


_LOWER_HEX_DIGITS = "0123456789abcdef"

# Docker's error texts (reference-spec.md §5).
_MSG_INVALID_FORMAT = "invalid reference format"
_MSG_NAME_EMPTY = "repository name must have at least one component"
_MSG_CONTAINS_UPPERCASE = "repository name must be lowercase"
_MSG_NAME_TOO_LONG = f"repository name must not be more than {NAME_TOTAL_LENGTH_MAX} characters"
_MSG_NOT_CANONICAL = "repository name must be canonical"
_MSG_TAG_INVALID = "invalid tag format"
_MSG_DIGEST_GRAMMAR = "invalid digest format"
_MSG_CHECKSUM_FORMAT = "invalid checksum digest format"
_MSG_CHECKSUM_LENGTH = "invalid checksum digest length"
_MSG_UNSUPPORTED = "unsupported digest algorithm"
_MSG_BAD_PATTERN = "syntax error in pattern"

_QUOTE_MAX = 200


def _quote(text: str) -> str:
    """*text* in double quotes for a message, shortened when it is huge (hostile input)."""
    if len(text) > _QUOTE_MAX:
        return f'"{text[:_QUOTE_MAX]}..." ({len(text)} characters)'
    return f'"{text}"'


def _error(message: str, subject: str, category: str) -> InvalidReference:
    return InvalidReference(f"{message}: {_quote(subject)}", category=category)


class Reference(Record):
    """A parsed reference ``[domain/]path[:tag][@digest]``, or a digest alone (``path == ""``)."""

    __slots__ = ("domain", "path", "tag", "digest")  # noqa: RUF023 - the order of repr() and of Reference(...)

    domain: str
    path: str
    tag: str | None
    digest: str | None

    def __init__(self, domain: str, path: str, tag: str | None = None, digest: str | None = None) -> None:
        self.domain = domain
        self.path = path
        self.tag = tag
        self.digest = digest

    @property
    def name(self) -> str:
        """The repository: ``domain/path``, or ``path`` without a domain; ``""`` for a digest alone."""
        return f"{self.domain}/{self.path}" if self.domain else self.path

    @property
    def is_digest_only(self) -> bool:
        """True for a bare digest (``ParseAnyReference`` of an ID or ``algo:hex``): no name at all."""
        return not self.path and not self.domain

    def __str__(self) -> str:
        """``name[:tag][@digest]``, which for any input :func:`parse` accepts is that input."""
        return _join(self.name, self.tag, self.digest)

    def familiar_name(self) -> str:
        """Docker's short name: ``docker.io`` dropped, and ``library/`` for a one-level Hub path."""
        if self.domain != DEFAULT_DOMAIN:
            return self.name
        rest = self.path[len(_OFFICIAL_PREFIX) :] if self.path.startswith(_OFFICIAL_PREFIX) else ""
        return rest if rest and "/" not in rest else self.path

    def familiar_string(self) -> str:
        """The familiar name with the tag and digest (a bare digest stays as it is)."""
        if self.is_digest_only:
            return self.digest or ""
        return _join(self.familiar_name(), self.tag, self.digest)


def _join(name: str, tag: str | None, digest: str | None) -> str:
    text = name
    if tag is not None:
        text = f"{text}:{tag}"
    if digest is not None:
        text = f"{text}@{digest}" if text else digest
    return text


# --- digests (go-digest v1.0.0, reference-spec.md §4) ------------------------


def _check_digest(digest: str, algorithms: frozenset[str], whole: str) -> None:
    """go-digest's ``Validate``; errors name *digest*, and *whole* when it came from a reference."""
    colon = digest.find(":")
    algorithm, encoded = digest[:colon], digest[colon + 1 :]
    message = ""
    if colon <= 0 or not encoded:
        message, category = _MSG_CHECKSUM_FORMAT, "digest_invalid_format"
    elif algorithm not in algorithms or algorithm not in _HEX_LENGTHS:
        if _pattern("_LOOSE_DIGEST_RE").fullmatch(digest) is None:
            message, category = _MSG_CHECKSUM_FORMAT, "digest_invalid_format"
        else:
            message, category = _MSG_UNSUPPORTED, "digest_unsupported"
    elif len(encoded) != _HEX_LENGTHS[algorithm]:
        message, category = _MSG_CHECKSUM_LENGTH, "digest_invalid_length"
    elif encoded.strip(_LOWER_HEX_DIGITS):  # something other than lowercase hex is left
        message, category = _MSG_CHECKSUM_FORMAT, "digest_invalid_format"
    if message:
        where = "" if whole == digest else f" in {_quote(whole)}"
        raise InvalidReference(f"{message}: {_quote(digest)}{where}", category=category)


# Digests already accepted with the default algorithms (others read it, only validate_digest adds):
# a scan checks the same popular digests in many layouts (and each again as a blob's name), and a
# set lookup costs a tenth of the check.
VALID_DIGESTS: set[str] = set()
_VALID_DIGESTS_MAX = 16384  # about 2.4 MB when full


def validate_digest(s: str, *, algorithms: frozenset[str] = DEFAULT_ALGORITHMS) -> str:
    """Check *s* as go-digest does (algorithm available, exact length, lowercase hex); return it."""
    if algorithms is DEFAULT_ALGORITHMS:
        if s in VALID_DIGESTS:
            return s
        _check_digest(s, algorithms, s)
        if len(VALID_DIGESTS) >= _VALID_DIGESTS_MAX:
            VALID_DIGESTS.clear()
        VALID_DIGESTS.add(s)
        return s
    _check_digest(s, algorithms, s)
    return s


def is_digest(s: str, *, algorithms: frozenset[str] = DEFAULT_ALGORITHMS) -> bool:
    """True when go-digest accepts *s* as a digest of one of *algorithms*."""
    try:
        _check_digest(s, algorithms, s)
    except InvalidReference:
        return False
    return True


def is_tag(s: str) -> bool:
    """True when *s* is a Docker tag (word characters, ``.`` and ``-``; 1 to 128 long)."""
    return TAG_RE.fullmatch(s) is not None


def is_identifier(s: str) -> bool:
    """True when *s* is an image ID: exactly 64 lowercase hex digits."""
    return ANCHORED_IDENTIFIER_RE.fullmatch(s) is not None


# --- parsing -------------------------------------------------------------


def _go_lower(s: str) -> str:
    """``strings.ToLower``: Go maps ``İ`` to ``i`` alone, Python to ``i`` plus a combining dot."""
    return s.replace("\u0130", "i").lower() if "\u0130" in s else s.lower()


def _parse(s: str, algorithms: frozenset[str], shown: str) -> Reference:
    """``Parse`` of *s*, naming *shown* (what the user typed) in any error."""
    if not s:
        raise _error(_MSG_NAME_EMPTY, shown, "name_empty")
    match = REFERENCE_RE.fullmatch(s)
    if match is None:
        lowered = _go_lower(s)
        if lowered != s and REFERENCE_RE.fullmatch(lowered) is not None:
            raise _error(_MSG_CONTAINS_UPPERCASE, shown, "name_contains_uppercase")
        raise _error(_MSG_INVALID_FORMAT, shown, "invalid_format")
    path = match["path"]
    if len(path) > NAME_TOTAL_LENGTH_MAX:
        raise _error(_MSG_NAME_TOO_LONG, shown, "name_too_long")
    digest = match["digest"]
    if digest is not None:
        _check_digest(digest, algorithms, shown)
    return Reference(match["domain"] or "", path, match["tag"], digest)


def parse(s: str, *, algorithms: frozenset[str] = DEFAULT_ALGORITHMS) -> Reference:
    """``Parse``: the grammar alone; no default domain, no ``library/``, no lowercasing."""
    return _parse(s, algorithms, s)


def _split_docker_domain(s: str) -> tuple[str, str]:
    """``splitDockerDomain``: Docker's domain rules applied at the first ``/``."""
    slash = s.find("/")
    first = s[:slash]
    if slash == -1 or ("." not in first and ":" not in first and first != _LOCALHOST and first.lower() == first):
        domain, remainder = DEFAULT_DOMAIN, s
    else:
        domain, remainder = first, s[slash + 1 :]
        if domain == _LEGACY_DEFAULT_DOMAIN:
            domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in remainder:
        remainder = _OFFICIAL_PREFIX + remainder
    return domain, remainder


def parse_normalized_named(s: str, *, algorithms: frozenset[str] = DEFAULT_ALGORITHMS) -> Reference:
    """``ParseNormalizedNamed``: what ``docker pull`` accepts, as a canonical reference."""
    if ANCHORED_IDENTIFIER_RE.fullmatch(s) is not None:
        raise InvalidReference(
            f"invalid repository name ({s}), cannot specify 64-byte hexadecimal strings", category="hex_name"
        )
    domain, remainder = _split_docker_domain(s)
    remote = remainder.partition(":")[0]
    if remote.lower() != remote:
        raise InvalidReference(
            f"invalid reference format: repository name ({remote}) must be lowercase",
            category="name_contains_uppercase",  # one category for upper case, whichever check saw it
        )
    return _parse(f"{domain}/{remainder}", algorithms, s)


def parse_docker_ref(s: str, *, algorithms: frozenset[str] = DEFAULT_ALGORITHMS) -> Reference:
    """``ParseDockerRef``: normalized; a tag beside a digest is dropped, ``:latest`` added to a bare name."""
    ref = parse_normalized_named(s, algorithms=algorithms)
    if ref.tag is not None and ref.digest is not None:
        return Reference(ref.domain, ref.path, None, ref.digest)
    return tag_name_only(ref)


def parse_any_reference(s: str, *, algorithms: frozenset[str] = DEFAULT_ALGORITHMS) -> Reference:
    """``ParseAnyReference``: a 64-hex ID or a valid ``algo:hex`` is a bare digest, anything else a name."""
    if ANCHORED_IDENTIFIER_RE.fullmatch(s) is not None:
        return Reference("", "", None, f"sha256:{s}")
    if is_digest(s, algorithms=algorithms):
        return Reference("", "", None, s)
    return parse_normalized_named(s, algorithms=algorithms)


def parse_named(s: str, *, algorithms: frozenset[str] = DEFAULT_ALGORITHMS) -> Reference:
    """``ParseNamed``: accept only a reference that is already in canonical form."""
    ref = parse_normalized_named(s, algorithms=algorithms)
    if str(ref) != s:
        raise _error(_MSG_NOT_CANONICAL, s, "name_not_canonical")
    return ref


# --- builders ---------------------------------------------------------------


def _require_named(ref: Reference, what: str) -> None:
    if ref.is_digest_only:
        raise _error(f"{what} needs a repository name", str(ref), "invalid_format")


def with_name(name: str) -> Reference:
    """``WithName``: a repository name alone, checked against the grammar and the length limit."""
    # The name grammar is the reference grammar without a tag or digest.
    match = REFERENCE_RE.fullmatch(name)
    if match is None or match["tag"] is not None or match["digest"] is not None:
        raise _error(_MSG_INVALID_FORMAT, name, "invalid_format")
    if len(match["path"]) > NAME_TOTAL_LENGTH_MAX:
        raise _error(_MSG_NAME_TOO_LONG, name, "name_too_long")
    return Reference(match["domain"] or "", match["path"])


def with_tag(ref: Reference, tag: str) -> Reference:
    """``WithTag``: *ref* with its tag replaced by *tag*; a digest is kept."""
    if TAG_RE.fullmatch(tag) is None:
        raise _error(_MSG_TAG_INVALID, tag, "tag_invalid_format")
    _require_named(ref, "a tag")
    return Reference(ref.domain, ref.path, tag, ref.digest)


def with_digest(ref: Reference, digest: str) -> Reference:
    """``WithDigest``: *ref* with *digest*, checked by the grammar only (go-digest is not consulted)."""
    if _pattern("DIGEST_RE").fullmatch(digest) is None:
        raise _error(_MSG_DIGEST_GRAMMAR, digest, "digest_invalid_format")
    _require_named(ref, "a digest")
    return Reference(ref.domain, ref.path, ref.tag, digest)


def trim_named(ref: Reference) -> Reference:
    """``TrimNamed``: the repository alone, tag and digest dropped."""
    _require_named(ref, "trimming")
    return Reference(ref.domain, ref.path)


def tag_name_only(ref: Reference) -> Reference:
    """``TagNameOnly``: add ``:latest`` when *ref* has neither a tag nor a digest."""
    if ref.tag is None and ref.digest is None:
        return Reference(ref.domain, ref.path, _DEFAULT_TAG)
    return ref


# --- matching and sorting --------------------------------------------------


def _class_char(pattern: str, i: int) -> tuple[str, int]:
    """One character of a class range at *i* (``\\`` escapes it); the index after it."""
    if i >= len(pattern) or pattern[i] in "-]":
        raise _error(_MSG_BAD_PATTERN, pattern, "bad_pattern")
    if pattern[i] == "\\":
        i += 1
        if i >= len(pattern):
            raise _error(_MSG_BAD_PATTERN, pattern, "bad_pattern")
    if i + 1 >= len(pattern):  # the class is never closed
        raise _error(_MSG_BAD_PATTERN, pattern, "bad_pattern")
    return pattern[i], i + 1


def _class_regex(pattern: str, i: int) -> tuple[str, int]:
    """The Go character class opening at *i* (just past ``[``) as regex text; the index after it."""
    negated = i < len(pattern) and pattern[i] == "^"
    if negated:
        i += 1
    ranges: list[str] = []
    count = 0
    while not (count and i < len(pattern) and pattern[i] == "]"):
        lo, i = _class_char(pattern, i)
        hi = lo
        if pattern[i] == "-":
            hi, i = _class_char(pattern, i + 1)
        count += 1
        if lo <= hi:  # Go accepts an inverted range, which matches nothing
            ranges.append(re.escape(lo) if lo == hi else f"{re.escape(lo)}-{re.escape(hi)}")
    body = "".join(ranges)
    if not body:
        return ("[\\s\\S]" if negated else "(?!)"), i + 1
    return (f"[^{body}]" if negated else f"[{body}]"), i + 1


def _compile_glob(pattern: str) -> list[tuple[bool, re.Pattern[str], int]]:
    """A Go ``path.Match`` pattern as chunks: (a ``*`` before it, its regex, its width).

    Every item of a chunk matches exactly one character, so a chunk has a fixed
    width. The whole pattern is checked up front: Go reports ErrBadPattern for a
    malformed pattern whatever the name, and so does this.
    """
    chunks: list[tuple[bool, re.Pattern[str], int]] = []
    i, end = 0, len(pattern)
    while i < end:
        star = False
        while i < end and pattern[i] == "*":
            star, i = True, i + 1
        items: list[str] = []
        while i < end and pattern[i] != "*":
            c = pattern[i]
            if c == "?":
                items.append("[^/]")
                i += 1
            elif c == "\\":
                if i + 1 >= end:
                    raise _error(_MSG_BAD_PATTERN, pattern, "bad_pattern")
                items.append(re.escape(pattern[i + 1]))
                i += 2
            elif c == "[":
                item, i = _class_regex(pattern, i + 1)
                items.append(item)
            else:
                items.append(re.escape(c))
                i += 1
        chunks.append((star, re.compile("".join(items)), len(items)))
    return chunks


def _glob_match(chunks: list[tuple[bool, re.Pattern[str], int]], name: str) -> bool:
    """Go ``path.Match``: each chunk takes its first fit; ``*`` and ``?`` never match ``/``."""
    pos = 0
    last = len(chunks) - 1
    for index, (star, chunk, width) in enumerate(chunks):
        if star and not width:  # a trailing star takes the rest unless it holds a "/"
            return "/" not in name[pos:]
        if not star:
            if chunk.match(name, pos) is None:
                return False
            pos += width
            continue
        # The star may skip characters up to the next "/", not past it.
        limit = name.find("/", pos)
        if limit < 0:
            limit = len(name)
        if index == last:  # the last chunk must end the name, so it has one place to be
            start = len(name) - width
            return pos <= start <= limit and chunk.match(name, start) is not None
        found = chunk.search(name, pos, limit + width)
        if found is None:
            return False
        pos = found.end()
    return pos == len(name)


def familiar_match(pattern: str, ref: Reference) -> bool:
    """``FamiliarMatch``: Go ``path.Match`` of *pattern* on the familiar string, then the familiar name."""
    chunks = _compile_glob(pattern)
    if _glob_match(chunks, ref.familiar_string()):
        return True
    return not ref.is_digest_only and _glob_match(chunks, ref.familiar_name())


def _rank(ref: Reference) -> int:
    if ref.is_digest_only:
        return 5
    if ref.tag is not None:
        return 1 if ref.digest is not None else 2
    return 3 if ref.digest is not None else 4


def sort_references(refs: Iterable[str], *, algorithms: frozenset[str] = DEFAULT_ALGORITHMS) -> list[str]:
    """``Sort``: tag+digest, tag, name+digest, name, digest (each by string), then the unparseable."""
    # As upstream, a parsable string comes back normalized (alpine -> docker.io/library/alpine)
    # and an unparseable one as it was given.
    parsed: list[tuple[int, str]] = []
    bad: list[str] = []
    for text in refs:
        try:
            ref = parse_any_reference(text, algorithms=algorithms)
        except InvalidReference:
            bad.append(text)
        else:
            parsed.append((_rank(ref), str(ref)))
    parsed.sort()
    bad.sort()
    return [text for _, text in parsed] + bad


# --- `ocidx ref --json` ------------------------------------------------------


def describe(s: str) -> dict[str, object]:
    """One object of ``ocidx ref --json`` (docs/json.md) for *s*; ``error`` names the category on failure.

    ``ocidx ref`` normalizes names as ``docker`` does (``ParseNormalizedNamed``): a bare 64-hex
    string is the ``hex_name`` error, as ``docker pull`` says, and ``sha256:<hex>`` is a repository
    with a tag. Upper case in a repository is ``name_contains_uppercase``, the category docs/json.md
    names; it covers Docker's ad-hoc "repository name must be lowercase" error of normalization.
    """
    try:
        ref = parse_normalized_named(s)
    except InvalidReference as exc:
        category = exc.category
        return {
            "input": s,
            "name": None,
            "domain": None,
            "path": None,
            "tag": None,
            "digest": None,
            "canonical": None,
            "familiar": None,
            "error": category,
        }
    named = not ref.is_digest_only
    return {
        "input": s,
        "name": ref.name if named else None,
        "domain": ref.domain if named else None,
        "path": ref.path if named else None,
        "tag": ref.tag,
        "digest": ref.digest,
        "canonical": str(ref),
        "familiar": ref.familiar_string(),
        "error": None,
    }
