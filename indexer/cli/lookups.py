"""The lookup commands that answer one reference or many: ``ref``, ``resolve`` (a target, or a batch on
stdin), ``wait`` and ``find``."""

from __future__ import annotations

import argparse
import sys

from indexer.cli.output import _describe_answer, _emit, _emit_line, _failed, _line, _print_answer, _warn
from indexer.errors import OcidxError, UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from indexer.query import Index


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


def cmd_find(args: argparse.Namespace) -> int:
    """``ocidx find``: every match across the index, one line each; one answer per REF of a batch."""
    if args.fleet:
        from indexer.cli.fleet import cmd_find_fleet  # the fleet's commands load with --fleet only

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
