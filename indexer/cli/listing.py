"""The commands that list what the index holds: ``ls``, ``status``, ``referrers`` and ``du``."""

from __future__ import annotations

import argparse
import os

from indexer.cli.lookups import _index
from indexer.cli.output import (
    SHOWN,
    _age,
    _bytes,
    _emit,
    _image_fields,
    _line,
    _name_text,
    _platform,
    _plural,
    _Said,
    _warn,
)
from indexer.errors import UsageError


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
        from indexer.cli.fleet import cmd_referrers_fleet  # the fleet's commands load with --fleet only

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
