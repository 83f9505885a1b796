"""What the duties of one daemon share, and the messages they send each other.

Each duty is a task of one task group (``indexer.daemon.app``), a plain loop over its own trigger;
they talk through anyio memory object streams:

* ``changes`` (to :mod:`.changes`): :data:`WAKE` (the watcher read events, the mount table changed,
  an unwatched tree is due for a look), :class:`Sync` (a lookup's barrier), :data:`RECHECK` (a pass
  ended: look up which layouts are racily clean again);
* ``requests`` (to :mod:`.reconcile`): why a reconcile pass is wanted;
* ``reports`` (to :mod:`.reports`): :class:`PassReport`, what a pass or an update did.

:class:`Shared` holds what every duty may read; each attribute says which duty writes it.
"""

from __future__ import annotations

import math
import os

import anyio

from indexer._record import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from indexer.config import Config, Root
    from indexer.scan.counts import Counts
    from indexer.scan.scanner import Scanner
    from indexer.store.writer import Store


class Sync(Record):
    """A lookup's barrier: set *done* once every event queued before it was taken is written."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = anyio.Event()


WAKE = "wake"
RECHECK = "recheck"
Message = Sync | str


class PassReport(Record):
    """What one pass (``reconcile``) or update (``update``) did, for the log and the metrics.

    *seconds*: a reconcile's duration; an update's latency from the change that woke the daemon to
    its batch committed (None for the daemon's own re-checks, which no change woke).
    """

    __slots__ = ("counts", "kind", "seconds", "why")

    def __init__(self, kind: str, counts: Counts, seconds: float | None, why: str | None = None) -> None:
        self.kind = kind
        self.counts = counts
        self.seconds = seconds
        self.why = why


class Shared:
    """The state the duties of one daemon share (written by the duty named, read by any)."""

    def __init__(self, db_path: str, config: Config, roots: list[Root], store: Store, scanner: Scanner) -> None:
        self.pid = os.getpid()
        self.db_path = db_path
        self.config = config  # the reload in app.py
        self.roots = roots  # the reload in app.py
        self.store = store  # app.py, once per generation (a rebuilt database is a new one)
        self.scanner = scanner  # app.py, with the store
        self.mode = "starting"  # watching.py: "inotify", "inotify: N unwatched ...", "polling: why"
        self.ready = anyio.Event()  # reconcile.py, once the start-up pass is written
        self.owed = 0  # any duty (owe_pass): reconcile passes asked for that the index waits for
        self.owed_why = ""  # why the last of them was asked for
        self.settled = 0  # reconcile.py: how many of those a finished pass covered
        self.full_pass_due = False  # app.py's reload (names or limits changed), reconcile.py clears it
        self.last_pass_s = 0.0  # reconcile.py
        send_changes, self.changes_in = anyio.create_memory_object_stream[Message](math.inf)
        send_requests, self.requests_in = anyio.create_memory_object_stream[str](math.inf)
        send_reports, self.reports_in = anyio.create_memory_object_stream[PassReport](math.inf)
        self._changes, self._requests, self._reports = send_changes, send_requests, send_reports
        self._woken = False

    def close(self) -> None:
        """Close the streams (the generation is over)."""
        for end in (
            self._changes,
            self.changes_in,
            self._requests,
            self.requests_in,
            self._reports,
            self.reports_in,
        ):
            end.close()

    # -- sending ------------------------------------------------------------------------------------

    def wake(self) -> None:
        """Tell the changes duty there is something to take (once until it takes it)."""
        if not self._woken:
            self._woken = True
            self._changes.send_nowait(WAKE)

    def taken(self) -> None:
        """The changes duty took what was pending: the next :meth:`wake` sends again."""
        self._woken = False

    def sync(self, request: Sync) -> None:
        """Ask the changes duty for a barrier."""
        self._changes.send_nowait(request)

    def recheck(self) -> None:
        """Ask the changes duty to look up the racily clean layouts again (a pass wrote many)."""
        self._changes.send_nowait(RECHECK)

    def request_reconcile(self, why: str) -> None:
        """Ask the reconcile duty for a pass (a routine one: the index vouches for itself meanwhile)."""
        self._requests.send_nowait(why)

    def owe_pass(self, why: str) -> None:
        """Ask for a pass without which the index may miss a change (events were lost, a step failed):
        until one that started after this ends, barriers are answered ``inexact``."""
        self.owed += 1
        self.owed_why = why
        self._requests.send_nowait(why)

    def report(self, report: PassReport) -> None:
        """Hand what a pass did to the reports duty."""
        self._reports.send_nowait(report)

    # -- reading ------------------------------------------------------------------------------------

    def inexact(self) -> str | None:
        """Why the index may miss a change a lookup's barrier would otherwise vouch for, or None."""
        if not self.ready.is_set():
            return "the daemon's start-up pass is not written yet"
        if not self.mode.startswith("inotify"):
            return f"the daemon is {self.mode}"
        if self.owed != self.settled:
            return f"a reconcile pass is owed and not done ({self.owed_why})"
        return None
