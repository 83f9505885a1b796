"""The ``ocidx`` command line: argparse, one exit-code mapping, JSON on stdout.

Lookup commands (``ref``, ``resolve``, ``find``, ``ls``, ``status``) import
only the standard library; ``scan`` and ``daemon`` import their async
machinery inside their own functions. Human messages and warnings go to
stderr, JSON documents to stdout, one per command. Exit codes (SPEC.md §4):
0 found, 1 not found, 2 bad usage or invalid reference, 3 ambiguous, 4 no
usable index database, 5 the layout is unreadable with no last good state.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from indexer import __version__
from indexer.errors import OcidxError, UsageError, printable

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

    from indexer.query import Answer, Index


def _formatter(prog: str) -> argparse.HelpFormatter:
    """argparse's formatter with the width given, so argparse does not import shutil (2 ms)."""
    try:
        width = os.get_terminal_size(2).columns - 2
    except OSError:
        width = 78
    return argparse.HelpFormatter(prog, width=max(width, 40))


class _Parser(argparse.ArgumentParser):
    """argparse whose errors become UsageError (exit 2, JSON when asked)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", help="index database (default: $OCIDX_DB, [database] path, per-user default)")
    parser.add_argument("--config", help="config file (default: $OCIDX_CONFIG, ~/.config/ocidx/config.toml)")
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")


def build_parser() -> argparse.ArgumentParser:
    """The whole command line."""
    parser = _Parser(prog="ocidx", description="Index and query OCI image layouts.")
    parser.add_argument("--version", action="version", version=f"ocidx {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("ref", help="parse references as Docker does")
    p.add_argument("refs", nargs="+", metavar="REF", help="references; '-' reads one per line from stdin")
    _common(p)

    p = sub.add_parser("resolve", help="resolve oci-layout://PATH[:TAG][@DIGEST] (or --layout PATH REF)")
    p.add_argument("target", metavar="TARGET|REF")
    p.add_argument("--layout", metavar="PATH", help="the layout; TARGET is then :TAG, @DIGEST or NAME[:TAG][@DIGEST]")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]")
    p.add_argument("--strict", action="store_true", help="tag mismatch and stale answers are errors")
    p.add_argument("--format", choices=("digest", "json", "context"), default=None)
    _common(p)

    p = sub.add_parser("find", help="find :TAG, @DIGEST or NAME[:TAG] across every indexed layout")
    p.add_argument("ref", metavar="REF")
    p.add_argument("--verify-all", action="store_true", help="re-check every layout, not just those that match")
    p.add_argument("--fleet", action="store_true", help="look across every host of the fleet database (PostgreSQL)")
    _common(p)

    p = sub.add_parser("ls", help="list indexed layouts, or one layout's entries")
    p.add_argument("path", nargs="?", metavar="PATH")
    _common(p)

    p = sub.add_parser("status", help="index counts, errors, daemon heartbeat")
    _common(p)

    p = sub.add_parser("scan", help="one batch pass over the roots")
    p.add_argument("roots", nargs="*", metavar="ROOT")
    p.add_argument("--full", action="store_true", help="re-read every index.json even if unchanged")
    p.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    _common(p)

    p = sub.add_parser("daemon", help="watch the roots and keep the index fresh")
    p.add_argument("roots", nargs="*", metavar="ROOT")
    p.add_argument("--log-format", choices=("text", "json"), default=None)
    _common(p)
    _fleet_parsers(sub)
    return parser


def _fleet_parsers(sub: argparse._SubParsersAction[_Parser]) -> None:
    """``hosts`` and ``fleet migrate|add-host|remove-host`` (docs/fleet.md)."""
    p = sub.add_parser("hosts", help="every host of the fleet database with its heartbeat, counts and backlog")
    _common(p)
    p = sub.add_parser("fleet", help="set up the fleet database (run as its administrator, never as a host)")
    actions = p.add_subparsers(dest="fleet_command", required=True, parser_class=_Parser)
    for name, help_text in (
        ("migrate", "create or upgrade the fleet schema and the roles ocidx_publisher and ocidx_reader"),
        ("add-host", "create login role NAME (when missing) and let it publish as host NAME"),
        ("remove-host", "delete every row host NAME published and stop it publishing"),
    ):
        action = actions.add_parser(name, help=help_text)
        if name != "migrate":
            action.add_argument("name", metavar="NAME")
        action.add_argument(
            "--dsn", required=True, metavar="ADMIN_DSN", help="libpq connection string of an admin role"
        )
        action.add_argument("--json", action="store_true", help="print one JSON document on stdout")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return its exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    want_json = "--json" in args_list or "--format=json" in args_list
    try:
        args = build_parser().parse_args(args_list)
        want_json = bool(getattr(args, "json", False)) or getattr(args, "format", None) == "json"
        return _COMMANDS[args.command](args)
    except OcidxError as exc:
        if want_json:
            _emit(exc.to_json())
        _warn(f"ocidx: {exc.message}")
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


def _emit(document: object) -> None:
    sys.stdout.write(json.dumps(document, indent=2, ensure_ascii=True) + "\n")


def _warn(message: str) -> None:
    sys.stderr.write(printable(message) + "\n")


def _line(*fields: object) -> None:
    """One line of tab-separated fields on stdout, each field safe for a terminal."""
    sys.stdout.write("\t".join(printable(str(f)) for f in fields) + "\n")


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
            digest = f" digest={result['digest']}" if result["digest"] else ""
            tag = f" tag={result['tag']}" if result["tag"] else ""
            _line(
                result["input"],
                f"canonical={result['canonical']}",
                f"familiar={result['familiar']}{tag}{digest}",
            )
    return 0 if all(r["error"] is None for r in results) else 2


def cmd_resolve(args: argparse.Namespace) -> int:
    """``ocidx resolve``: one image, printed as a digest, JSON, or a build context."""
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
    for answer in answers:
        for warning in answer.warnings:
            _warn(f"ocidx: warning: {warning}")
    if args.json:
        _emit([a.to_json() for a in answers])
    else:
        for answer in answers:
            _line(*_describe_answer(answer))
    if not answers:
        _warn(f"ocidx: {args.ref} not found in any indexed layout")
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

    with _index(args) as index:
        rows = None
        if args.path is not None:
            try:
                detail = index.layout_detail(args.path)
            except NotFound:
                rows = index.layouts(args.path)  # a directory holding layouts, such as a root
                if not rows:
                    raise
        if args.path is None or rows is not None:
            rows = index.layouts() if rows is None else rows
            if args.json:
                _emit(rows)
            else:
                for row in rows:
                    error = [f"{row['error']}: {row['message']}"] if row["error"] else []
                    _line(row["layout"], row["state"], f"{row['entries']} entries", *error)
            return 0
    if args.json:
        _emit([detail])
        return 0
    _line(detail["layout"], detail["state"], detail["freshness"])
    for warning in detail["warnings"]:  # type: ignore[attr-defined]
        _line(f"  warning: {warning}")
    for entry in detail["entries"]:  # type: ignore[attr-defined]
        platform = entry["platform"]
        plat = [f"{platform['os']}/{platform['architecture']}"] if platform else []
        _line(f"  {entry['digest']}", entry["mediaType"], *plat)
        for name in entry["names"]:
            _line(f"    {_name_text(name['name'], name['tag'])}", f"({name['how']})")
        for raw in entry["invalid_names"]:
            _line(f"    {raw!r}", "(invalid)")
        for warning in entry["warnings"]:
            _line(f"    warning: {warning}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """``ocidx status``: counts, errors, daemon heartbeat, last reconcile."""
    with _index(args) as index:
        status = index.status()
    if args.json:
        _emit(status)
        return 0
    for key, value in status.items():
        if isinstance(value, dict):
            for sub_key, sub_value in value.items():
                _line(f"{key}.{sub_key}: {sub_value}")
        else:
            _line(f"{key}: {value}")
    return 0


def cmd_scan(args: argparse.Namespace) -> int:
    """``ocidx scan``: one batch pass (async, imported here, off the lookup path)."""
    from indexer.scanner import run_scan

    summary = run_scan(
        db=args.db, config_path=args.config, roots=args.roots, full=args.full, progress=not args.no_progress
    )
    if args.json:
        _emit(summary)
    return 0


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
