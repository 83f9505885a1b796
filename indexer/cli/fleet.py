"""The fleet's commands (docs/fleet.md): ``find --fleet``, ``referrers --fleet``, ``hosts`` and
``fleet migrate|add-host|remove-host``."""

from __future__ import annotations

import argparse

from indexer.cli.lookups import _index, _is_batch, _targets
from indexer.cli.output import _describe_answer, _emit, _emit_line, _failed, _line, _plural, _warn
from indexer.errors import DatabaseError, OcidxError


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
