"""The ``ocidx`` command line: argparse, one exit-code mapping, JSON on stdout.

Lookup commands (``ref``, ``resolve``, ``find``, ``ls``, ``status``) import
only the standard library; ``scan`` and ``daemon`` import their async
machinery inside their own functions. Human messages and warnings go to
stderr, JSON documents to stdout, one per command. Exit codes (docs/semantics.md):
0 found, 1 not found, 2 bad usage or invalid reference, 3 ambiguous, 4 no
usable index database, 5 the layout is unreadable with no last good state, 6 out
of open files or memory.

The package's modules, by responsibility (docs/design.md): :mod:`.parser` (argparse),
:mod:`.output` (what the commands print, failures included), :mod:`.lookups` (``ref``,
``resolve``, ``wait``, ``find``, and batches on stdin), :mod:`.listing` (``ls``, ``status``,
``referrers``, ``du``), :mod:`.fleet` (the fleet's commands) and :mod:`.admin` (``lint``, ``gc``,
``scan``, ``daemon``); :func:`main` here maps what escapes a command to its exit code.
"""

from __future__ import annotations

import sys

from indexer.cli.output import _failed
from indexer.cli.parser import build_parser
from indexer.errors import OcidxError, UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Sequence

__all__ = ["build_parser", "main"]


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
        module, function = _COMMANDS[args.command]
        __import__(module)  # the builtin: importlib is not loaded at start-up
        command: Callable[[argparse.Namespace], int] = getattr(sys.modules[module], function)
        return command(args)
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


# Each command's function, by module: a command imports its own module only when it runs, so that a
# lookup does not load the others (start-up is most of a lookup's time).
_COMMANDS = {
    "ref": ("indexer.cli.lookups", "cmd_ref"),
    "resolve": ("indexer.cli.lookups", "cmd_resolve"),
    "find": ("indexer.cli.lookups", "cmd_find"),
    "wait": ("indexer.cli.lookups", "cmd_wait"),
    "ls": ("indexer.cli.listing", "cmd_ls"),
    "lint": ("indexer.cli.admin", "cmd_lint"),
    "status": ("indexer.cli.listing", "cmd_status"),
    "referrers": ("indexer.cli.listing", "cmd_referrers"),
    "du": ("indexer.cli.listing", "cmd_du"),
    "gc": ("indexer.cli.admin", "cmd_gc"),
    "scan": ("indexer.cli.admin", "cmd_scan"),
    "daemon": ("indexer.cli.admin", "cmd_daemon"),
    "hosts": ("indexer.cli.fleet", "cmd_hosts"),
    "fleet": ("indexer.cli.fleet", "cmd_fleet"),
}
