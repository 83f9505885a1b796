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
from indexer.errors import Ambiguous, DatabaseError, OcidxError, UsageError, printable

# How many candidates of an ambiguity the text output lists.
SHOWN = 5

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
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

    p = sub.add_parser(
        "resolve", help="resolve oci-layout://PATH[:TAG][@DIGEST] (or --layout PATH REF); several at once, or '-'"
    )
    p.add_argument(
        "targets",
        nargs="+",
        metavar="TARGET",
        help="oci-layout://PATH[:TAG][@DIGEST] or oci-layout://PATH/NAME[:TAG]; with --layout, a REF; "
        "'-' reads one per line from stdin (several targets: one answer line each, JSON Lines with --json)",
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

    p = sub.add_parser("wait", help="block until oci-layout://... resolves (an export landing), then print it")
    p.add_argument("target", metavar="TARGET", help="oci-layout://PATH[:TAG][@DIGEST] or oci-layout://PATH/NAME[:TAG]")
    p.add_argument(
        "--timeout",
        type=_seconds,
        metavar="S",
        help="give up after S seconds: exit 1, error timeout (default: wait as long as it takes)",
    )
    p.add_argument(
        "--platform",
        metavar="OS/ARCH[/VARIANT]",
        help="wait for the manifest of this platform (linux/arm64, linux/arm/v7), as resolve --platform",
    )
    p.add_argument("--strict", action="store_true", help="as resolve --strict: a tag mismatch is not an answer")
    p.add_argument(
        "--format",
        choices=("digest", "json", "context"),
        default=None,
        help="as resolve: digest (the default), json (as --json), or context (oci-layout://PATH@DIGEST)",
    )
    _options(p)

    p = sub.add_parser("find", help="find :TAG, @DIGEST or NAME[:TAG][@DIGEST] across every indexed layout")
    p.add_argument(
        "refs",
        nargs="+",
        metavar="REF",
        help=":TAG, @DIGEST, NAME[:TAG] or NAME@DIGEST (NAME as docker run reads it); '-' reads one per line "
        "from stdin (several: each line starts with the REF, JSON Lines with --json)",
    )
    p.add_argument("--verify-all", action="store_true", help="re-check every layout, not just those that match")
    p.add_argument("--fleet", action="store_true", help="look across every host of the fleet database (PostgreSQL)")
    p.add_argument("--dsn", metavar="DSN", help=f"with --fleet: the {_DSN_HELP}")
    _options(p)

    p = sub.add_parser("lint", help="what BuildKit, containerd, skopeo, regclient, zot and ocidx call each entry")
    p.add_argument("paths", nargs="+", metavar="PATH", help="layouts to read (no database is used)")
    _options(p, db=False, config=False)

    p = sub.add_parser("ls", help="list indexed layouts, or one layout's entries")
    p.add_argument("path", nargs="?", metavar="PATH", help="a layout (its entries), or a directory (its layouts)")
    _options(p)

    p = sub.add_parser("status", help="index counts, errors, daemon heartbeat")
    _options(p)

    p = sub.add_parser("referrers", help="the signatures, SBOMs and attestations that refer to an image")
    p.add_argument(
        "target", metavar="TARGET", help="oci-layout://PATH[:TAG][@DIGEST], @DIGEST, or a name (alpine:3.16)"
    )
    p.add_argument("--fleet", action="store_true", help="look across every host of the fleet database (PostgreSQL)")
    p.add_argument("--dsn", metavar="DSN", help=f"with --fleet: the {_DSN_HELP}")
    _options(p)

    p = sub.add_parser("du", help="bytes each layout references, shares, holds unreferenced; missing blobs")
    p.add_argument("paths", nargs="*", metavar="PATH", help="layouts, or directories holding layouts (default: all)")
    _options(p)

    p = sub.add_parser("gc", help="the blobs nothing in a layout references; --delete removes them safely")
    p.add_argument("layout", metavar="LAYOUT", help="the layout directory (read directly: no database needed)")
    p.add_argument(
        "--delete", action="store_true", help="remove them, under BuildKit's index.json.lock (default: only list)"
    )
    p.add_argument(
        "--grace",
        metavar="S",
        type=_seconds,
        default=None,
        help="keep blobs younger than S seconds: a writer puts blobs before index.json (default: [gc] grace_s, 3600)",
    )
    _options(p, db=False)

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


_DSN_HELP = "libpq connection string of the fleet database (default: $OCIDX_FLEET_DSN, then [fleet] dsn)"


def _fleet_parsers(sub: argparse._SubParsersAction[_Parser]) -> None:
    """``hosts`` and ``fleet migrate|add-host|remove-host`` (docs/fleet.md)."""
    p = sub.add_parser("hosts", help="every host of the fleet database with its heartbeat, counts and backlog")
    p.add_argument("--dsn", metavar="DSN", help=_DSN_HELP)
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
        action.add_argument("--dsn", metavar="ADMIN_DSN", help=f"an admin role's {_DSN_HELP}")
        _options(action, db=False)


def _fleet_dsn(args: argparse.Namespace) -> str:
    """One rule for every fleet command: ``--dsn``, then ``$OCIDX_FLEET_DSN``, then ``[fleet] dsn``."""
    from indexer import config as config_mod

    dsn = (args.dsn or "").strip() or config_mod.fleet_dsn(config_mod.load(args.config))
    if not dsn:
        from indexer.errors import FleetUnavailable

        raise FleetUnavailable(
            "no fleet database is configured: give --dsn, or set $OCIDX_FLEET_DSN or [fleet] dsn in the config file"
        )
    return dsn


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return its exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    want_json = "--json" in args_list or "--format=json" in args_list
    try:
        parser = build_parser()
        args, extras = parser.parse_known_args(args_list)
        if extras:  # argparse would point at the top-level help; the subcommand's says what it takes
            prog = " ".join(["ocidx", *(v for k in ("command", "fleet_command") if (v := getattr(args, k, None)))])
            raise UsageError(f"unrecognized arguments: {' '.join(extras)} (see '{prog} --help')")
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


def _index(args: argparse.Namespace) -> Index:
    from indexer.query import Index

    index = Index(args.db, config=args.config)
    index.speaks_cli = True
    return index


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


def _targets(given: Sequence[str]) -> Iterator[str]:
    """The targets of a command line, ``-`` read from stdin one per line (lazily: a script may feed
    one line and wait for its answer); blank lines are skipped."""
    for text in given:
        if text != "-":
            yield text
            continue
        for line in sys.stdin:
            target = line.rstrip("\r\n")
            if target:
                yield target


def _is_batch(given: Sequence[str]) -> bool:
    """Several targets, or targets from stdin: one answer line per target (docs/semantics.md, Batches)."""
    return len(given) > 1 or "-" in given


def _emit_line(document: dict[str, object]) -> None:
    """One JSON Lines record, flushed: a script reading answers as it feeds targets gets each at once."""
    sys.stdout.write(json.dumps(document, ensure_ascii=True) + "\n")
    sys.stdout.flush()


def cmd_resolve(args: argparse.Namespace) -> int:
    """``ocidx resolve``: one image per target, printed as a digest, JSON, or a build context."""
    if args.json and args.format not in (None, "json"):
        raise UsageError(f"--json and --format {args.format} ask for two different outputs: give one of them")
    fmt = "json" if args.json else (args.format or "digest")
    batch = _is_batch(args.targets)
    worst = 0
    with _index(args) as index:
        results = index.resolve_many(
            _targets(args.targets), layout=args.layout, platform=args.platform, strict=args.strict
        )
        for target, result in results:
            if isinstance(result, OcidxError):
                if not batch:
                    raise result
                worst = max(worst, _failed(result, fmt == "json", target))
                continue
            for warning in result.warnings:
                _warn(f"ocidx: warning: {target}: {warning}" if batch else f"ocidx: warning: {warning}")
            if fmt == "json":
                if batch:
                    _emit_line({"target": target, **result.to_json()})
                else:
                    _emit(result.to_json())
                continue
            value = result.context() if fmt == "context" else result.digest
            if batch:
                _line(target, value)
                sys.stdout.flush()
            else:
                _line(value)
    return worst


def _seconds(text: str) -> float:
    """A ``--timeout`` or ``--grace``: a finite number of seconds, 0 or more (else exit 2, saying so)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0 or more)")
    return value


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


def cmd_wait(args: argparse.Namespace) -> int:
    """``ocidx wait``: block until the target resolves (inotify, no daemon), then print it as resolve does."""
    if args.json and args.format not in (None, "json"):
        raise UsageError(f"--json and --format {args.format} ask for two different outputs: give one of them")
    from indexer.wait import wait

    if args.platform:
        from indexer.layout import parse_platform_spec

        parse_platform_spec(args.platform)  # a bad platform is exit 2 now, not after the wait
    with _index(args) as index:
        answer = wait(
            index,
            args.target,
            timeout=args.timeout,
            platform=args.platform,
            strict=args.strict,
            waiting=lambda why: _warn(f"ocidx: waiting for {args.target} ({why})"),
        )
    _print_answer(answer, "json" if args.json else (args.format or "digest"))
    return 0


def _name_text(name: str, tag: str) -> str:
    return f"{name}:{tag}" if name and tag else name or f":{tag}"


def _describe_answer(answer: Answer) -> tuple[str, str, str]:
    names = ",".join(_name_text(n.name, n.tag) for n in answer.names)
    return answer.layout, answer.digest, names or "-"


def cmd_find(args: argparse.Namespace) -> int:
    """``ocidx find``: every match across the index, one line each; one answer per REF of a batch."""
    if args.fleet:
        return cmd_find_fleet(args)
    if args.dsn is not None:
        raise UsageError("--dsn names the fleet database: it goes with --fleet")
    batch = _is_batch(args.refs)
    worst = 0
    said: set[str] = set()  # the warnings about a whole answer, said once for the batch
    with _index(args) as index:
        for ref, result in index.find_many(_targets(args.refs), verify_all=args.verify_all):
            if isinstance(result, OcidxError):
                if not batch:
                    raise result
                worst = max(worst, _failed(result, args.json, ref))
                continue
            # What holds for the whole answer (the index could not be proven exact, layouts in scope
            # could not be read now) is said once, not with each answer.
            overall = [w for w in [result.unverified, *result.warnings] if w is not None]
            for warning in overall:
                if warning not in said:
                    said.add(warning)
                    _warn(f"ocidx: warning: {warning}")
            for answer in result:
                for warning in answer.warnings:
                    if warning not in overall:
                        _warn(f"ocidx: warning: {warning}")
            if args.json:
                if batch:
                    _emit_line({"target": ref, "matches": [a.to_json() for a in result]})
                else:
                    _emit([a.to_json() for a in result])
            else:
                for answer in result:
                    _line(*([ref] if batch else []), *_describe_answer(answer))
                if batch:
                    sys.stdout.flush()
            if not result:
                _warn(f"ocidx: {result.query.describe()} not found in any indexed layout{result.hint}")
                worst = max(worst, 1)
    return worst


def cmd_find_fleet(args: argparse.Namespace) -> int:
    """``ocidx find --fleet``: every match on every host; a stale host's lines say so."""
    from indexer.fleet import Fleet

    batch = _is_batch(args.refs)
    worst = 0
    with Fleet(_fleet_dsn(args), config=args.config) as fleet:
        for ref in _targets(args.refs):
            try:
                answers = fleet.find(ref)
            except OcidxError as exc:
                if not batch:
                    raise
                worst = max(worst, _failed(exc, args.json, ref))
                if isinstance(exc, DatabaseError):
                    return worst  # unreachable: every REF after it would wait out the same timeout
                continue
            for warning in answers.warnings:  # a host's malformed rows, dropped
                _warn(f"ocidx: warning: {warning}")
            if args.json:
                if batch:
                    _emit_line({"target": ref, "matches": [a.to_json() for a in answers]})
                else:
                    _emit([a.to_json() for a in answers])
            else:
                for answer in answers:
                    _line(*([ref] if batch else []), answer.host, *_describe_answer(answer), answer.host_state)
            if not answers:
                _warn(f"ocidx: {ref} not found on any host of the fleet")
                worst = max(worst, 1)
    return worst


def cmd_hosts(args: argparse.Namespace) -> int:
    """``ocidx hosts``: every host with its state, heartbeat age, counts and backlog."""
    from indexer.fleet import Fleet

    with Fleet(_fleet_dsn(args), config=args.config) as fleet:
        rows = fleet.hosts()
    for warning in rows.warnings:
        _warn(f"ocidx: warning: {warning}")
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
                _plural(row["layouts"], "layout"),
                "entries unknown" if row["entries"] is None else _plural(row["entries"], "entry"),
                f"backlog {backlog}",
            )
    return 0


def cmd_fleet(args: argparse.Namespace) -> int:
    """``ocidx fleet migrate|add-host|remove-host``: the administrator's set-up of the fleet database."""
    from indexer.errors import NotFound
    from indexer.fleet import admin

    dsn = _fleet_dsn(args)
    result: dict[str, object]
    if args.fleet_command == "migrate":
        applied = admin.migrate(dsn)
        result = {"applied": applied}
        message = f"applied {', '.join(applied)}" if applied else "the fleet schema is up to date"
    elif args.fleet_command == "add-host":
        result = admin.add_host(dsn, args.name)
        message = f"host {args.name} can publish" + (" (login role created)" if result["role_created"] else "")
    else:
        result = admin.remove_host(dsn, args.name)
        if not result["removed"]:
            raise NotFound(f"{args.name} is not a host of the fleet: nothing to remove ('ocidx hosts' lists them)")
        message = f"host {args.name}: {_plural(result['layouts'], 'layout')} removed; it can no longer publish"
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
            if rows.unverified is not None:
                _warn(f"ocidx: warning: {rows.unverified}")
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
        _line(f"  {entry['digest']}", entry["mediaType"], *_image_fields(entry, platform=True))
        for name in entry["names"]:
            _line(f"    {_name_text(name['name'], name['tag'])}", f"({name['how']})")
        for raw in entry["invalid_names"]:
            # Shortened and quoted as a warning quotes it: a name may be as long as index.json allows.
            _line(_Said(f"    {quote_value(str(raw))}"), "(invalid)")
        for child in entry["children"]:
            _line(
                f"    {_platform(child['platform'])}",
                child["digest"],
                child["mediaType"],
                *_image_fields(child, platform=False),
            )
        for warning in entry["warnings"]:
            _line(_Said(f"    warning: {warning}"))
    return 0


def cmd_lint(args: argparse.Namespace) -> int:
    """``ocidx lint``: each entry as each reader names it, and the findings; exit 1 with findings."""
    from indexer.lint import READERS, lint_many

    results = lint_many(args.paths)
    worst = 0
    documents: list[dict[str, object]] = []
    findings = 0
    for result in results:
        if isinstance(result, tuple):
            path, exc = result
            documents.append({"layout": path, **exc.to_json()})
            _warn(f"ocidx: {exc.message}")
            worst = max(worst, exc.exit_code)
            continue
        documents.append(result.to_json())
        findings += len(result.findings)
        if result.findings:
            worst = max(worst, 1)
        if args.json:
            continue
        _line(result.path)
        for i, entry in enumerate(result.entries):
            _line(f"  {entry.digest}", entry.media_type)
            for reader in READERS:
                reading = result.readings[i].get(reader)
                _line(f"    {reader}", "-" if reading is None else reading.ref)
        for finding in result.findings:
            where = f" {finding.digest}" if finding.digest else ""
            _line(_Said(f"  {finding.code}{where}: {finding.message}"))
            _line(_Said(f"    fix: {finding.fix}"))
    if args.json:
        _emit(documents)
    linted = sum(1 for r in results if not isinstance(r, tuple))
    _warn(f"ocidx: {_plural(findings, 'finding')} in {_plural(linted, 'layout')}")
    return worst


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


def cmd_status(args: argparse.Namespace) -> int:
    """``ocidx status``: counts, errors, daemon heartbeat, last reconcile."""
    with _index(args) as index:
        status = index.status()
    if status["unverified"]:
        _warn(f"ocidx: warning: {status['unverified']}")
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
    if daemon["running"]:  # a stopped daemon watches nothing: what it did when it ran is history
        _line(f"watch mode: {daemon['watch_mode']}")
    fleet = status.get("fleet")
    if isinstance(fleet, dict):
        _line(_fleet_line(fleet, running=bool(daemon["running"])))
    return 0


def _fleet_line(fleet: dict[str, object], *, running: bool) -> str:
    """``fleet: publishing as host build-17 (connected 2m ago), backlog 0, last published 4s ago``."""
    if not running:
        head = f"fleet: host {fleet['host']}, not publishing (the daemon is not running)"
    elif fleet["connected"]:
        head = f"fleet: publishing as host {fleet['host']} (connected {_age(fleet['state_age_s'])})"
    else:
        lasting = _age(fleet["state_age_s"]).removesuffix(" ago")
        head = f"fleet: host {fleet['host']}, not publishing for {lasting}: {fleet['state']}"
    published = fleet["last_published_age_s"]
    last = "never published" if published is None else f"last published {_age(published)}"
    return f"{head}, {_plural(fleet['backlog'], 'change')} not yet published, {last}"


def cmd_referrers(args: argparse.Namespace) -> int:
    """``ocidx referrers TARGET``: every manifest or index that refers to the image, a line each."""
    if args.fleet:
        return cmd_referrers_fleet(args)
    if args.dsn is not None:
        raise UsageError("--dsn names the fleet database: it goes with --fleet")
    with _index(args) as index:
        found = index.referrers(args.target)
    for warning in ([found.unverified] if found.unverified else []) + found.warnings:
        _warn(f"ocidx: warning: {warning}")
    if args.json:
        _emit([r.to_json() for r in found])
    else:
        for referrer in found:
            _line(referrer.layout, referrer.digest, referrer.artifact_type or "-", referrer.how, referrer.subject)
    if not found:
        _warn(f"ocidx: nothing refers to {', '.join(found.subjects)} in any indexed layout")
        return 1
    return 0


def cmd_referrers_fleet(args: argparse.Namespace) -> int:
    """``ocidx referrers --fleet TARGET``: every referrer on every host, a line each; a stale host's say so."""
    from indexer.fleet import Fleet
    from indexer.query import SCHEME

    with Fleet(_fleet_dsn(args), config=args.config) as fleet:
        if args.target.startswith(SCHEME):  # a layout of this host: its image's digest, from the local index
            with _index(args) as index:
                found = fleet.referrers(args.target, index=index)
        else:
            found = fleet.referrers(args.target)
    for warning in found.warnings:  # a host's malformed rows, dropped
        _warn(f"ocidx: warning: {warning}")
    if args.json:
        _emit([r.to_json() for r in found])
    else:
        for referrer in found:
            _line(
                referrer.host,
                referrer.layout,
                referrer.digest,
                referrer.artifact_type or "-",
                referrer.how,
                referrer.subject,
                referrer.host_state,
            )
    if not found:
        _warn(f"ocidx: nothing refers to {', '.join(found.subjects)} on any host of the fleet")
        return 1
    return 0


def cmd_du(args: argparse.Namespace) -> int:
    """``ocidx du [PATH...]``: per layout and in total, referenced, unique, shared, unreferenced, missing."""
    with _index(args) as index:
        usage = index.du(args.paths or None)
    rows, total = usage["layouts"], usage["total"]
    assert isinstance(rows, list) and isinstance(total, dict)
    for warning in usage["warnings"]:  # type: ignore[attr-defined]
        _warn(f"ocidx: warning: {warning}")
    # Each warning once, with the first layouts it concerns: a host with a thousand partial exports
    # gets a few lines, not a thousand (--json lists every layout's).
    concerned: dict[str, list[str]] = {}
    for row in rows:
        for warning in row["warnings"]:
            concerned.setdefault(warning, []).append(row["layout"])
    for warning, layouts in concerned.items():
        if len(layouts) == 1:
            _warn(f"ocidx: warning: {layouts[0]}: {warning}")
            continue
        shown = ", ".join(layouts[:SHOWN]) + (f" and {len(layouts) - SHOWN} more" if len(layouts) > SHOWN else "")
        _warn(f"ocidx: warning: {_plural(len(layouts), 'layout')} ({shown}): {warning}")
    if args.json:
        _emit(usage)
        return 0
    for row in [*rows, {**total, "layout": "total"}]:
        _line(
            _bytes(row["referenced_bytes"]),
            f"unique {_bytes(row['unique_bytes'])}",
            f"shared {_bytes(row['shared_bytes'])}",
            f"unreferenced {_bytes(row['unreferenced_bytes'])} in {_plural(row['unreferenced_blobs'], 'blob')}",
            f"{row['missing_blobs']} missing",
            row["layout"],
        )
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    """``ocidx gc LAYOUT``: list (and with --delete, remove) the blobs nothing in the layout references."""
    from indexer import config as config_mod
    from indexer.gc import collect

    config = config_mod.load(args.config)
    grace = config.gc.grace_s if args.grace is None else args.grace
    result = collect(args.layout, delete=args.delete, grace_s=grace, limits=config.limits)
    if args.json:
        _emit(result)
    else:
        for blob in result["blobs"]:  # type: ignore[attr-defined]
            _line(blob["digest"], blob["size"], f"{_age(blob['age_s'])}")
    unproven, skipped = result["unproven"], result["skipped"]
    assert isinstance(unproven, list) and isinstance(skipped, list)
    for why in unproven[:SHOWN]:
        _warn(f"ocidx: {result['layout']}: nothing is garbage: {why}")
    if len(unproven) > SHOWN:
        _warn(f"ocidx: {result['layout']}: and {len(unproven) - SHOWN} more reasons (--json lists them all)")
    for odd in skipped[:SHOWN]:
        _warn(f"ocidx: warning: {result['layout']}: {odd['name']} is {odd['why']}, not a blob file: left alone")
    if len(skipped) > SHOWN:
        _warn(f"ocidx: warning: {result['layout']}: and {len(skipped) - SHOWN} more (--json lists them all)")
    blobs = result["blobs"]
    assert isinstance(blobs, list)
    summary = f"{_plural(len(blobs), 'blob')} ({result['bytes']} bytes) nothing references"
    if result["kept_young"]:
        summary += f", {result['kept_young']} younger than {grace:g} s kept"
    if args.delete:
        held = result["lock_held_s"]
        summary += f"; {result['deleted']} deleted" + (f" (index.json.lock held {held} s at most)" if held else "")
    if not args.json:
        _warn(f"ocidx: {result['layout']}: {summary}")
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
    "wait": cmd_wait,
    "ls": cmd_ls,
    "lint": cmd_lint,
    "status": cmd_status,
    "referrers": cmd_referrers,
    "du": cmd_du,
    "gc": cmd_gc,
    "scan": cmd_scan,
    "daemon": cmd_daemon,
    "hosts": cmd_hosts,
    "fleet": cmd_fleet,
}
