"""What the commands print: failures (JSON on stdout when asked, a line on stderr), answers, lines of
fields escaped for a terminal, sizes, platforms and ages."""

from __future__ import annotations

import json
import sys

from indexer.errors import Ambiguous, OcidxError, printable

TYPE_CHECKING = False
if TYPE_CHECKING:
    from indexer.query import Answer


# How many candidates of an ambiguity the text output lists.
SHOWN = 5


def _failed(exc: OcidxError, want_json: bool, target: str | None = None) -> int:
    """Say what went wrong (JSON on stdout when asked, a line on stderr); the exit code. With *target*,
    one target's error in a batch: its JSON Lines record, its message prefixed with the target."""
    if want_json:
        if target is None:
            _emit(exc.to_json())
        else:
            _emit_line({"target": target, **exc.to_json()})
    _warn(f"ocidx: {exc.message}" if target is None else f"ocidx: {target}: {exc.message}")
    if isinstance(exc, Ambiguous) and not want_json:
        _show_candidates(exc)
    return exc.exit_code


def _show_candidates(exc: Ambiguous) -> None:
    """The candidates of an ambiguity, a line each, with the target that picks each one."""
    for candidate in exc.candidates[:SHOWN]:
        names = candidate.get("names")
        listed = names if isinstance(names, list) else []
        held = ", ".join(_name_text(str(n["name"]), str(n["tag"])) for n in listed) or "no names"
        _warn(f"  {candidate['digest']}  {held}  (pick it: {candidate['pick']})")
    if len(exc.candidates) > SHOWN:
        _warn(f"  and {len(exc.candidates) - SHOWN} more (--json lists them all)")


def _plural(count: object, word: str) -> str:
    """``1 layout``, ``2 layouts``, ``1 entry``, ``3 entries``."""
    if count == 1:
        return f"1 {word}"
    return f"{count} {word[:-1]}ies" if word.endswith("y") else f"{count} {word}s"


def _emit(document: object) -> None:
    sys.stdout.write(json.dumps(document, indent=2, ensure_ascii=True) + "\n")


def _warn(message: str) -> None:
    sys.stderr.write(printable(message) + "\n")


class _Said(str):
    """A field that is a message (a warning, an error), escaped when it was made: not escaped again."""

    __slots__ = ()


def _line(*fields: object) -> None:
    """One line of tab-separated fields on stdout: values escaped reversibly, messages as they were made."""
    sys.stdout.write(
        "\t".join(printable(f) if isinstance(f, _Said) else printable(str(f), reversible=True) for f in fields) + "\n"
    )


def _emit_line(document: dict[str, object]) -> None:
    """One JSON Lines record, flushed: a script reading answers as it feeds targets gets each at once."""
    sys.stdout.write(json.dumps(document, ensure_ascii=True) + "\n")
    sys.stdout.flush()


def _print_answer(answer: Answer, fmt: str) -> None:
    """One answer as ``resolve`` prints it: the digest, the JSON document, or the build context."""
    for warning in answer.warnings:
        _warn(f"ocidx: warning: {warning}")
    if fmt == "json":
        _emit(answer.to_json())
    elif fmt == "context":
        _line(answer.context())
    else:
        _line(answer.digest)


def _name_text(name: str, tag: str) -> str:
    return f"{name}:{tag}" if name and tag else name or f":{tag}"


def _describe_answer(answer: Answer) -> tuple[str, str, str]:
    names = ",".join(_name_text(n.name, n.tag) for n in answer.names)
    return answer.layout, answer.digest, names or "-"


def _image_fields(image: dict[str, object], *, platform: bool) -> list[str]:
    """The text fields of an image in ``ls PATH``: its platform (with *platform*, when it has one or
    its manifest was read), then, when its manifest was read, its size (``incomplete`` when one of
    its blobs is absent from the layout) and its layer count."""
    fields = []
    known = image["layers"] is not None
    if platform and (image["platform"] or known):
        fields.append(_platform(image["platform"]))  # type: ignore[arg-type]
    if known:
        size = image["image_size"]
        fields.append(_bytes(size) if isinstance(size, int) else "incomplete")
        fields.append(_plural(image["layers"], "layer"))
    return fields


def _bytes(count: int) -> str:
    """``831 B``, ``12.4 kB``, ``27.8 MB``, ``1.2 GB``: sizes as docker prints them (powers of 1000)."""
    value = float(count)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{count} B"


def _platform(platform: dict[str, object] | None) -> str:
    """``linux/arm64/v8``, or ``-`` for a descriptor that names no platform."""
    if not platform:
        return "-"
    return "/".join(str(platform[k]) for k in ("os", "architecture", "variant") if platform.get(k))


def _age(seconds: object) -> str:
    """``4s ago``, ``3m 12s ago``, ``2h 5m ago``, ``3d 4h ago``: what a person reads at a glance."""
    if not isinstance(seconds, (int, float)):
        return "never"
    whole = max(0, int(seconds))
    for unit, size, sub_unit, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if whole >= size:
            rest = (whole % size) // sub_size
            return f"{whole // size}{unit} {rest}{sub_unit} ago" if rest else f"{whole // size}{unit} ago"
    return f"{whole}s ago"
