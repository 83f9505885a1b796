"""The reconcile duty: the full pass that guarantees completeness, whatever the watcher missed.

A plain loop: the start-up pass, then one pass whenever a reason arrives on the ``requests``
stream (events were lost, a root vanished or appeared, the configuration was reloaded, the database
was rebuilt, a database error is being retried) or the period runs out: ``daemon.reconcile_interval_s``
while inotify watches, the poll interval while it does not (:func:`indexer.daemon.watching.poll_interval`).
The pass (:meth:`indexer.scan.scanner.Scanner.full_pass`) stats every ``index.json`` below the
roots, reads what changed, and drops what vanished; the changes duty keeps indexing beside it.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import time

import anyio

from indexer.daemon.database import guarded
from indexer.daemon.logs import fields
from indexer.daemon.shared import PassReport
from indexer.daemon.watching import poll_interval
from indexer.store import state

TYPE_CHECKING = False
if TYPE_CHECKING:
    from anyio.abc import TaskStatus

    from indexer.daemon.shared import Shared

log = logging.getLogger("ocidx.daemon")


class Reconcile:
    """The reconcile duty (see the module)."""

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self._passed = False

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The start-up pass, then a pass per request or period, until cancelled."""
        task_status.started()
        shared = self.shared
        while not self._passed:  # the start-up pass (tried again after a database error)
            await guarded(shared, functools.partial(self._pass, "start-up"))
        # What the start-up pass left alive (modules, caches) lives as long as the daemon: kept out of
        # the collector's full passes, which a later pass's temporaries set off every few passes.
        gc.collect()
        gc.freeze()
        shared.ready.set()
        log.info("ready: %s", shared.mode, extra=fields(event="ready", watch_mode=shared.mode, pid=os.getpid()))
        while True:
            why = ", ".join(await self._wait())
            await guarded(shared, functools.partial(self._pass, why))

    async def _wait(self) -> list[str]:
        """The reasons for the next pass (the period's own when none came before it ran out)."""
        shared = self.shared
        inotify = shared.mode.startswith("inotify")
        period = shared.config.daemon.reconcile_s if shared.mode == "inotify" else poll_interval(shared)
        reasons: list[str] = []
        with anyio.move_on_after(period):
            reasons.append(await shared.requests_in.receive())
        while True:
            try:
                reasons.append(shared.requests_in.receive_nowait())
            except anyio.WouldBlock:
                break
        if not reasons:
            reasons.append("periodic" if inotify else "polling")
        return list(dict.fromkeys(reasons))

    async def _pass(self, why: str) -> None:
        shared = self.shared
        covers = shared.lost
        full, shared.full_pass_due = shared.full_pass_due, False
        started = time.perf_counter()
        try:
            counts = await shared.scanner.full_pass(shared.roots, full=full)
        except BaseException:
            shared.full_pass_due = shared.full_pass_due or full
            raise
        shared.last_pass_s = time.perf_counter() - started
        ended_ns = time.time_ns()
        await shared.store.unit(state.update_daemon, last_reconcile_ns=ended_ns)
        shared.lost_reconciled = max(shared.lost_reconciled, covers)
        self._passed = True
        shared.report(PassReport("reconcile", counts, shared.last_pass_s, why))
        shared.recheck()
