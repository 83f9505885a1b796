"""The ``ocidx`` command line: argparse, one exit-code mapping, JSON on stdout.

Lookup commands (``ref``, ``resolve``, ``find``, ``ls``, ``status``) import
only the standard library; ``scan`` and ``daemon`` import their async
machinery inside their own functions. Human messages and warnings go to
stderr, JSON documents to stdout, one per command. Exit codes (docs/semantics.md):
0 found, 1 not found, 2 bad usage or invalid reference, 3 ambiguous, 4 no
usable index database, 5 the layout is unreadable with no last good state, 6 out
of open files or memory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from indexer import __version__
from indexer.errors import Ambiguous, OcidxError, UsageError, printable

# How many candidates of an ambiguity the text output lists.
SHOWN = 5

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

    from indexer.query import Answer, Index


def _width() -> int:
    """The terminal's width, found without importing shutil (2 ms), as argparse would."""
    try:
        width = os.get_terminal_size(2).columns - 2
    except OSError:
        width = 78
    return max(width, 40)


def _formatter(prog: str) -> argparse.HelpFormatter:
    """argparse's formatter with the width given, so argparse does not import shutil."""
    return argparse.HelpFormatter(prog, width=_width())


class _Parser(argparse.ArgumentParser):
    """argparse whose errors become UsageError (exit 2, JSON when asked)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _options(parser: argparse.ArgumentParser, *, db: bool = True, config: bool = True, json: bool = True) -> None:
    """The options shared by the commands; each command takes only those it uses."""
    if db:
        parser.add_argument("--db", help="index database (default: $OCIDX_DB, [database] path, per-user default)")
    if config:
        parser.add_argument("--config", help="config file (default: $OCIDX_CONFIG, ~/.config/ocidx/config.toml)")
    if json:
        parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")


_EPILOG = """\
first steps:
  ocidx resolve oci-layout:///srv/exports/app:v1   one layout, no index needed
  ocidx scan /srv/exports                          index every layout below a root
  ocidx find :v1                                   every indexed layout holding the tag
exit codes: 0 found, 1 not found, 2 bad usage, 3 ambiguous, 4 no usable index database,
5 layout unreadable, 6 out of open files or memory; docs/semantics.md and docs/json.md
describe every command."""


def build_parser() -> argparse.ArgumentParser:
    """The whole command line."""
    parser = _Parser(
        prog="ocidx",
        description="Index and query OCI image layouts.",
        epilog=_EPILOG,
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, width=_width()),
    )
    parser.add_argument("--version", action="version", version=f"ocidx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("ref", help="parse references as Docker does")
    p.add_argument("refs", nargs="+", metavar="REF", help="references; '-' reads one per line from stdin")
    _options(p, db=False, config=False)

    p = sub.add_parser("resolve", help="resolve oci-layout://PATH[:TAG][@DIGEST] (or --layout PATH REF)")
    p.add_argument(
        "target",
        metavar="TARGET|REF",
        help="oci-layout://PATH[:TAG][@DIGEST] or oci-layout://PATH/NAME[:TAG]; with --layout, a REF",
    )
    p.add_argument("--layout", metavar="PATH", help="the layout; TARGET is then :TAG, @DIGEST or NAME[:TAG][@DIGEST]")
    p.add_argument(
        "--platform",
        metavar="OS/ARCH[/VARIANT]",
        help="follow an image index down to the manifest for this platform (linux/arm64, linux/arm/v7)",
    )
    p.add_argument("--strict", action="store_true", help="tag mismatch and stale answers are errors")
    p.add_argument(
        "--format",
        choices=("digest", "json", "context"),
        default=None,
        help="digest (the default): the digest alone; json: as --json; context: oci-layout://PATH@DIGEST, "
        "for docker buildx build --build-context NAME=...",
    )
    _options(p)

    p = sub.add_parser("find", help="find :TAG, @DIGEST or NAME[:TAG][@DIGEST] across every indexed layout")
    p.add_argument("ref", metavar="REF", help=":TAG, @DIGEST, NAME[:TAG] or NAME@DIGEST (NAME as docker run reads it)")
    p.add_argument("--verify-all", action="store_true", help="re-check every layout, not just those that match")
    p.add_argument("--fleet", action="store_true", help="look across every host of the fleet database (PostgreSQL)")
    _options(p)

    p = sub.add_parser("ls", help="list indexed layouts, or one layout's entries")
    p.add_argument("path", nargs="?", metavar="PATH", help="a layout (its entries), or a directory (its layouts)")
    _options(p)

    p = sub.add_parser("status", help="index counts, errors, daemon heartbeat")
    _options(p)

    p = sub.add_parser("scan", help="one batch pass over the roots")
    p.add_argument("roots", nargs="*", metavar="ROOT", help="directories to index (added to the config's [[roots]])")
    p.add_argument("--full", action="store_true", help="re-read every index.json even if unchanged")
    p.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    _options(p)

    p = sub.add_parser("daemon", help="watch the roots and keep the index fresh")
    p.add_argument("roots", nargs="*", metavar="ROOT", help="directories to watch (added to the config's [[roots]])")
    p.add_argument(
        "--log-format", choices=("text", "json"), default=None, help="log lines (default: [daemon] log_format)"
    )
    _options(p, json=False)
    _fleet_parsers(sub)
    return parser


def _fleet_parsers(sub: argparse._SubParsersAction[_Parser]) -> None:
    """``hosts`` and ``fleet migrate|add-host|remove-host`` (docs/fleet.md)."""
    p = sub.add_parser("hosts", help="every host of the fleet database with its heartbeat, counts and backlog")
    _options(p, db=False)
    p = sub.add_parser("fleet", help="set up the fleet database (run as its administrator, never as a host)")
    actions = p.add_subparsers(dest="fleet_command", required=True, parser_class=_Parser)
    for name, help_text in (
        ("migrate", "create or upgrade the fleet schema and the roles ocidx_publisher and ocidx_reader"),
        ("add-host", "create login role NAME (when missing) and let it publish as host NAME"),
        ("remove-host", "delete every row host NAME published and stop it publishing"),
    ):
        action = actions.add_parser(name, help=help_text)
        if name != "migrate":
            action.add_argument("name", metavar="NAME", help="the host: its PostgreSQL login role and host name")
        action.add_argument(
            "--dsn", required=True, metavar="ADMIN_DSN", help="libpq connection string of an admin role"
        )
        action.add_argument("--json", action="store_true", help="print one JSON document on stdout")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return its exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    want_json = "--json" in args_list or "--format=json" in args_list
    try:
        parser = build_parser()
        args = parser.parse_args(args_list)
        if args.command is None:  # `ocidx` alone: what it can do, on stderr, as a usage error
            sys.stderr.write(parser.format_help())
            return UsageError.exit_code
        want_json = bool(getattr(args, "json", False)) or getattr(args, "format", None) == "json"
        return _COMMANDS[args.command](args)
    except OcidxError as exc:
        return _failed(exc, want_json)
    except (OSError, MemoryError, ImportError) as exc:
        # Out of descriptors or memory wherever it struck (a module imported late, a pipe, a file
        # beside the database): an error of its own, exit 6, never a traceback. (An extension module
        # that cannot be opened is an ImportError that keeps the errno to itself.)
        from indexer.errors import exhausted, out_of_descriptors

        doing = f"running ocidx {args_list[0] if args_list else ''}".rstrip()
        resource = exhausted(exc, doing) or (out_of_descriptors(doing) if isinstance(exc, ImportError) else None)
        if resource is None:
            raise
        return _failed(resource, want_json)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


def _failed(exc: OcidxError, want_json: bool) -> int:
    """Say what went wrong (JSON on stdout when asked, a line on stderr); the exit code."""
    if want_json:
        _emit(exc.to_json())
    _warn(f"ocidx: {exc.message}")
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


def _index(args: argparse.Namespace) -> Index:
    from indexer.query import Index

    return Index(args.db, config=args.config)


def cmd_ref(args: argparse.Namespace) -> int:
    """``ocidx ref``: canonical and familiar forms, or the error category."""
    from indexer.reference import describe

    inputs: list[str] = []
    for ref in args.refs:
        if ref == "-":
            inputs.extend(line.rstrip("\r\n") for line in sys.stdin if line.rstrip("\r\n"))
        else:
            inputs.append(ref)
    results = [describe(text) for text in inputs]
    if args.json:
        _emit(results)
    else:
        for result in results:
            if result["error"] is not None:
                _warn(f"{result['input']}: error {result['error']}")
                continue
            fields = [f"canonical={result['canonical']}", f"familiar={result['familiar']}"]
            fields += [f"{key}={result[key]}" for key in ("tag", "digest") if result[key]]
            _line(result["input"], *fields)
    return 0 if all(r["error"] is None for r in results) else 2


def cmd_resolve(args: argparse.Namespace) -> int:
    """``ocidx resolve``: one image, printed as a digest, JSON, or a build context."""
    if args.json and args.format not in (None, "json"):
        raise UsageError(f"--json and --format {args.format} ask for two different outputs: give one of them")
    with _index(args) as index:
        if args.layout is not None:
            answer = index.resolve_in(args.layout, args.target, platform=args.platform, strict=args.strict)
        else:
            answer = index.resolve(args.target, platform=args.platform, strict=args.strict)
    for warning in answer.warnings:
        _warn(f"ocidx: warning: {warning}")
    fmt = "json" if args.json else (args.format or "digest")
    if fmt == "json":
        _emit(answer.to_json())
    elif fmt == "context":
        _line(answer.context())
    else:
        _line(answer.digest)
    return 0


def _name_text(name: str, tag: str) -> str:
    return f"{name}:{tag}" if name and tag else name or f":{tag}"


def _describe_answer(answer: Answer) -> tuple[str, str, str]:
    names = ",".join(_name_text(n.name, n.tag) for n in answer.names)
    return answer.layout, answer.digest, names or "-"


def cmd_find(args: argparse.Namespace) -> int:
    """``ocidx find``: every match across the index, one line each."""
    if args.fleet:
        return cmd_find_fleet(args)
    with _index(args) as index:
        answers = index.find(args.ref, verify_all=args.verify_all)
    overall = [w for w in [answers.unverified, *answers.warnings] if w is not None]
    for warning in overall:
        _warn(f"ocidx: warning: {warning}")
    for answer in answers:
        for warning in answer.warnings:
            if warning not in overall:
                _warn(f"ocidx: warning: {warning}")
    if args.json:
        _emit([a.to_json() for a in answers])
    else:
        for answer in answers:
            _line(*_describe_answer(answer))
    if not answers:
        _warn(f"ocidx: {answers.query.describe()} not found in any indexed layout{answers.hint}")
        return 1
    return 0


def cmd_find_fleet(args: argparse.Namespace) -> int:
    """``ocidx find --fleet``: every match on every host; a stale host's lines say so."""
    from indexer.fleet import Fleet

    with Fleet(config=args.config) as fleet:
        answers = fleet.find(args.ref)
    if args.json:
        _emit([a.to_json() for a in answers])
    else:
        for answer in answers:
            _line(answer.host, *_describe_answer(answer), answer.host_state)
    if not answers:
        _warn(f"ocidx: {args.ref} not found on any host of the fleet")
        return 1
    return 0


def cmd_hosts(args: argparse.Namespace) -> int:
    """``ocidx hosts``: every host with its state, heartbeat age, counts and backlog."""
    from indexer.fleet import Fleet

    with Fleet(config=args.config) as fleet:
        rows = fleet.hosts()
    if args.json:
        _emit(rows)
    else:
        for row in rows:
            age = "never" if row["heartbeat_age_s"] is None else f"{row['heartbeat_age_s']}s ago"
            backlog = "unknown" if row["backlog"] is None else row["backlog"]
            _line(
                row["host"],
                row["host_state"],
                f"heartbeat {age}",
                f"{row['layouts']} layouts",
                f"{row['entries']} entries",
                f"backlog {backlog}",
            )
    return 0


def cmd_fleet(args: argparse.Namespace) -> int:
    """``ocidx fleet migrate|add-host|remove-host``: the administrator's set-up of the fleet database."""
    from indexer.fleet import admin

    result: dict[str, object]
    if args.fleet_command == "migrate":
        applied = admin.migrate(args.dsn)
        result = {"applied": applied}
        message = f"applied {', '.join(applied)}" if applied else "the fleet schema is up to date"
    elif args.fleet_command == "add-host":
        result = admin.add_host(args.dsn, args.name)
        message = f"host {args.name} can publish" + (" (login role created)" if result["role_created"] else "")
    else:
        result = admin.remove_host(args.dsn, args.name)
        message = f"host {args.name}: {result['layouts']} layouts removed; it can no longer publish"
    if args.json:
        _emit(result)
    else:
        _warn(f"ocidx: {message}")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    """``ocidx ls [PATH]``: layouts (below PATH) with their state, or the layout PATH in detail."""
    from indexer.errors import NotFound
    from indexer.names import quote_value

    with _index(args) as index:
        rows = None
        if args.path is not None:
            try:
                detail = index.layout_detail(args.path)
            except NotFound:
                if not os.path.isdir(args.path):
                    raise  # it says what is there instead: nothing, or a file
                rows = index.layouts(args.path)  # a directory holding layouts, such as a root
                if not rows:
                    raise
        if args.path is None or rows is not None:
            rows = index.layouts() if rows is None else rows
            if args.json:
                _emit(rows)
            else:
                for row in rows:
                    error = [_Said(f"{row['error']}: {row['message']}")] if row["error"] else []
                    _line(row["layout"], row["state"], _plural(row["entries"], "entry"), *error)
            return 0
    if args.json:
        _emit([detail])
        return 0
    _line(detail["layout"], detail["state"], detail["freshness"])
    for warning in detail["warnings"]:  # type: ignore[attr-defined]
        _line(_Said(f"  warning: {warning}"))
    for entry in detail["entries"]:  # type: ignore[attr-defined]
        platform = entry["platform"]
        _line(f"  {entry['digest']}", entry["mediaType"], *([_platform(platform)] if platform else []))
        for name in entry["names"]:
            _line(f"    {_name_text(name['name'], name['tag'])}", f"({name['how']})")
        for raw in entry["invalid_names"]:
            # Shortened and quoted as a warning quotes it: a name may be as long as index.json allows.
            _line(_Said(f"    {quote_value(str(raw))}"), "(invalid)")
        for child in entry["children"]:
            _line(f"    {_platform(child['platform'])}", child["digest"], child["mediaType"])
        for warning in entry["warnings"]:
            _line(_Said(f"    warning: {warning}"))
    return 0


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


def cmd_status(args: argparse.Namespace) -> int:
    """``ocidx status``: counts, errors, daemon heartbeat, last reconcile."""
    with _index(args) as index:
        status = index.status()
    if args.json:
        _emit(status)
        return 0
    _line(f"database: {status['database']}")
    _line(
        f"layouts: {status['layouts']} ({status['layouts_with_errors']} with errors), "
        f"{_plural(status['entries'], 'entry')}, {_plural(status['names'], 'name')}, "
        f"{_plural(status['children'], 'child manifest')}"
    )
    roots = status["roots"]
    _line(f"roots: {', '.join(roots) if isinstance(roots, list) and roots else 'none recorded'}")
    daemon = status["daemon"]
    if not isinstance(daemon, dict):
        _line("daemon: not running (none ever ran on this database; 'ocidx daemon' keeps it current)")
        return 0
    state = f"running, pid {daemon['pid']}" if daemon["running"] else "not running"
    _line(f"daemon: {state}, heartbeat {_age(daemon['heartbeat_age_s'])}")
    _line(f"last reconcile: {_age(daemon['last_reconcile_age_s'])}")
    _line(f"watch mode: {daemon['watch_mode']}")
    return 0


def cmd_scan(args: argparse.Namespace) -> int:
    """``ocidx scan``: one batch pass (async, imported here, off the lookup path)."""
    from indexer.scan.command import run_scan

    summary = run_scan(
        db=args.db, config_path=args.config, roots=args.roots, full=args.full, progress=not args.no_progress
    )
    if args.json:
        _emit(summary)
    if summary["resource_error"] is not None:  # written what it could; the rest is read again next time
        _warn(f"ocidx: {summary['resource_error']}")
        from indexer.errors import ResourceExhausted

        return ResourceExhausted.exit_code
    # A root that does not exist or is not a directory is a bad argument (the summary counts it).
    return UsageError.exit_code if summary["bad_roots"] else 0


def cmd_daemon(args: argparse.Namespace) -> int:
    """``ocidx daemon``: the watcher (imported here, off the lookup path)."""
    from indexer.daemon import run_daemon

    return run_daemon(db=args.db, config_path=args.config, roots=args.roots, log_format=args.log_format)


_COMMANDS = {
    "ref": cmd_ref,
    "resolve": cmd_resolve,
    "find": cmd_find,
    "ls": cmd_ls,
    "status": cmd_status,
    "scan": cmd_scan,
    "daemon": cmd_daemon,
    "hosts": cmd_hosts,
    "fleet": cmd_fleet,
}
