"""The reports duty: what each pass did, in the log and in the metrics, as soon as it is written.

It reads :class:`~indexer.daemon.shared.PassReport` from the ``reports`` stream: one log line per
pass (INFO when something changed or the pass was not routine, DEBUG otherwise; the first few
layouts named), the layouts that failed, and, with ``[metrics]``, the counters and the gauges
(layouts, entries, errors, the WAL), refreshed from the index right after the pass that changed
them, and the textfile rewritten. It also serves ``/metrics`` when ``[metrics] listen`` is set,
within the bounds of :mod:`indexer.daemon.serving`. A standing problem (a missing root) is said once.
"""

from __future__ import annotations

import logging
import sqlite3

import anyio
import anyio.to_thread

from indexer.daemon.logs import fields
from indexer.scan.counts import LOGGED_PATHS
from indexer.scan.workers import INCOMPLETE
from indexer.store import state

TYPE_CHECKING = False
if TYPE_CHECKING:
    from anyio.abc import TaskStatus

    from indexer.daemon.metrics import Metrics
    from indexer.daemon.shared import PassReport, Shared

log = logging.getLogger("ocidx.daemon")

# A log line names the changed layouts of a batch up to LOGGED_PATHS, else the first this many.
LOGGED_PATHS_SHOWN = 3


class Reports:
    """The reports duty (see the module); it outlives a rebuilt database, and so do its counters."""

    def __init__(self, metrics: Metrics | None) -> None:
        self.metrics = metrics
        self.shared: Shared | None = None  # the generation being reported (app.py sets it)
        self.said: set[str] = set()

    async def run(self, shared: Shared, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve the metrics (when asked to) and report every pass, until cancelled."""
        self.shared = shared
        async with anyio.create_task_group() as tg:
            if self.metrics is not None:
                url = await tg.start(self.metrics.serve)
                where = ", ".join(w for w in (url, self.metrics.settings.textfile) if w)
                log.info(
                    "metrics: %s",
                    where,
                    extra=fields(event="metrics", url=url, textfile=self.metrics.settings.textfile),
                )
            await self.refresh()  # the index as it is now, before the first pass is written
            task_status.started()
            async for report in shared.reports_in:
                self._log(report)
                if self.metrics is not None:
                    self.metrics.passed(report.counts, report.seconds, reconcile=report.kind == "reconcile")
                    await self.refresh()

    async def refresh(self) -> None:
        """Set the gauges from the index and rewrite the textfile; a failure is said once."""
        metrics, shared = self.metrics, self.shared
        if metrics is None or shared is None:
            return
        try:
            counts = await shared.store.read(state.counts, rows=False)
            metrics.counted(counts)
            await anyio.to_thread.run_sync(metrics.write_textfile)
        except (OSError, sqlite3.Error) as exc:
            self.problem(f"metrics not updated: {exc}")

    # -- what other duties report --------------------------------------------------------------------

    def problem(self, message: str) -> None:
        """Log a standing problem once, not on every check."""
        if message not in self.said:
            self.said.add(message)
            log.warning("%s", message)

    def forget(self, prefix: str) -> None:
        """Problems starting with *prefix* are over: said again if they come back."""
        self.said = {m for m in self.said if not m.startswith(prefix)}

    def watched(self, events: int) -> None:
        """The watcher has read *events* events since it started."""
        if self.metrics is not None:
            self.metrics.watched_total(events)

    def lost(self, times: int) -> None:
        """Events were lost *times* times."""
        if self.metrics is not None:
            self.metrics.lost(times)

    def mode(self, mode: str, watches: int, unwatched: int) -> None:
        """The watch mode changed."""
        if self.metrics is not None:
            self.metrics.watching(mode, watches, unwatched)

    async def beat(self, when_ns: int) -> None:
        """The heartbeat was written: its gauge, and the textfile (node_exporter reports its age)."""
        if self.metrics is not None:
            self.metrics.beat(when_ns)
            try:
                await anyio.to_thread.run_sync(self.metrics.write_textfile)
            except OSError as exc:
                self.problem(f"metrics not updated: {exc}")

    def backlog(self, pending: int) -> None:
        """The fleet publisher's backlog."""
        if self.metrics is not None:
            self.metrics.set_publish_backlog(pending)

    # -- the log -------------------------------------------------------------------------------------

    def _log(self, report: PassReport) -> None:
        counts, what, why = report.counts, report.kind, report.why
        for message in counts.error_messages[:20]:
            self._layout_problem(message)
        changed = counts.changed or counts.removed or counts.errors
        routine = what != "reconcile" or why in ("periodic", "polling")
        level = logging.INFO if (changed or not routine) else logging.DEBUG
        reason = f" ({why})" if why else ""
        named = "".join(
            f"; {label}: {_some(paths, count)}"
            for label, paths, count in (
                ("changed", counts.changed_paths, counts.changed),
                ("removed", counts.removed_paths, counts.removed),
            )
            if count
        )
        seconds = report.seconds if report.seconds is not None else 0.0
        log.log(
            level,
            "%s%s: %s looked at in %.3fs: %d changed, %d unchanged, %d with errors, %d removed%s",
            what,
            reason,
            _layouts(counts.seen),
            seconds,
            counts.changed,
            counts.unchanged,
            counts.errors,
            counts.removed,
            named,
            extra=fields(
                event=what,
                reason=why,
                **counts.to_json(seconds),
                changed_layouts=counts.changed_paths[:LOGGED_PATHS],
                removed_layouts=counts.removed_paths[:LOGGED_PATHS],
            ),
        )

    def _layout_problem(self, message: str) -> None:
        if message.endswith(INCOMPLETE):
            # Every skopeo copy passes through this state: said, not warned (ocidx ls shows it if it stays).
            log.info("%s (being written?)", message, extra=fields(event="layout_incomplete"))
        elif message.startswith("root ") and ("No such file" in message or message.endswith(" is not a directory")):
            from indexer.daemon.watching import root_problem

            # A missing root: said once (the same words as the watching duty's), not on every poll.
            path = message[len("root ") :].rpartition(": ")[0] or message[len("root ") : -len(" is not a directory")]
            self.problem(root_problem(path) or message)
        else:
            log.warning("%s", message, extra=fields(event="layout_error"))


def _layouts(count: int) -> str:
    """``1 layout``, ``3 layouts``."""
    return f"{count} layout" if count == 1 else f"{count} layouts"


def _some(paths: list[str], count: int) -> str:
    """The paths of a small batch, or the first few and how many more for a big one."""
    shown = paths[:LOGGED_PATHS_SHOWN] if count > LOGGED_PATHS else paths
    more = count - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more else "")
