"""The commands off the lookup path, each importing its machinery inside itself: ``lint``, ``gc``,
``scan`` and ``daemon``."""

from __future__ import annotations

import argparse

from indexer.cli.output import SHOWN, _age, _emit, _line, _plural, _Said, _warn
from indexer.errors import UsageError


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
