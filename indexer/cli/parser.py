"""The command line's grammar: every command's arguments and help (argparse)."""

from __future__ import annotations

import argparse
import os

from indexer import __version__
from indexer.cli.lookups import _seconds
from indexer.errors import UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


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
