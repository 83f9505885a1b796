"""What one pass did: layouts seen, changed, unchanged, failed and removed, for ``ocidx scan`` and the
daemon's log and metrics."""

from __future__ import annotations

from indexer.store.outcomes import Failed, Gone, Read, Same

TYPE_CHECKING = False
if TYPE_CHECKING:
    from indexer.store import read as db
    from indexer.store.outcomes import Outcome

# How many changed (and removed) layouts a pass remembers by path, for the daemon's log.
LOGGED_PATHS = 10


class Counts:
    """What one pass did."""

    def __init__(self) -> None:
        self.seen = 0
        self.changed = 0
        self.unchanged = 0
        self.errors = 0
        self.removed = 0
        self.still_broken = 0  # unchanged since a scan found them broken: skipped, still in error
        self.error_messages: list[str] = []
        # The first few layouts written or dropped, for the daemon's log (the counts say how many).
        self.changed_paths: list[str] = []
        self.removed_paths: list[str] = []
        # Layouts whose read failed for a reason outside their bytes (LayoutError.transient): stored with
        # no identity, read again (by this pass after a backoff, then by the next pass).
        self.transient: dict[str, Failed] = {}
        # Directories a full pass could not list (path: errno); the layouts below them were kept.
        self.unlisted: dict[str, int] = {}

    def add(self, outcomes: list[Outcome], looked_at: int, still_broken: int = 0) -> None:
        """Account for one written batch."""
        self.seen += looked_at
        self.still_broken += still_broken
        written = 0
        for outcome in outcomes:
            if isinstance(outcome, Read):
                self.changed += 1
                if len(self.changed_paths) < LOGGED_PATHS:
                    self.changed_paths.append(outcome.path)
            elif isinstance(outcome, Failed):
                self.errors += 1
                self.error_messages.append(outcome.error.message)
                if outcome.error.transient:
                    self.transient[outcome.path] = outcome
            elif isinstance(outcome, Gone):
                self.removed += 1
                if len(self.removed_paths) < LOGGED_PATHS:
                    self.removed_paths.append(outcome.path)
            if not isinstance(outcome, Same):
                written += 1
        self.unchanged += max(0, looked_at - written)

    def merge(self, other: Counts) -> None:
        """Add what *other* (another pass's counts) did to these."""
        self.seen += other.seen
        self.changed += other.changed
        self.unchanged += other.unchanged
        self.errors += other.errors
        self.removed += other.removed
        self.still_broken += other.still_broken
        self.error_messages.extend(other.error_messages)
        self.transient.update(other.transient)
        self.unlisted.update(other.unlisted)
        self.changed_paths.extend(other.changed_paths[: max(0, LOGGED_PATHS - len(self.changed_paths))])
        self.removed_paths.extend(other.removed_paths[: max(0, LOGGED_PATHS - len(self.removed_paths))])

    def retried(self, again: Counts, paths: list[str]) -> None:
        """Replace what this pass counted for the transient failures at *paths* by *again*, the pass
        that read them again: they count once, as what that read found."""
        for path in paths:
            failed = self.transient.pop(path)
            self.errors -= 1
            if failed.error.message in self.error_messages:
                self.error_messages.remove(failed.error.message)
        self.transient.update(again.transient)
        self.changed += again.changed
        self.unchanged += again.unchanged
        self.errors += again.errors
        self.removed += again.removed
        self.error_messages.extend(again.error_messages)
        self.changed_paths.extend(again.changed_paths[: max(0, LOGGED_PATHS - len(self.changed_paths))])
        self.removed_paths.extend(again.removed_paths[: max(0, LOGGED_PATHS - len(self.removed_paths))])

    def to_json(self, seconds: float) -> dict[str, object]:
        """The summary ``ocidx scan --json`` prints."""
        return {
            "layouts": self.seen,
            "changed": self.changed,
            "unchanged": self.unchanged,
            "errors": self.errors,
            "removed": self.removed,
            "still_broken": self.still_broken,
            "read_again": len(self.transient),
            "unlisted": len(self.unlisted),
            "seconds": round(seconds, 3),
            "error_messages": self.error_messages[:50],
        }


def _count_skipped(
    counts: Counts, batch: list[str], stored: dict[str, db.StoredLayout], written: list[Outcome], read: int
) -> None:
    """Account for the layouts of *batch* that were skipped unread (proven unchanged)."""
    skipped = len(batch) - read
    if not skipped:
        return
    counts.seen += skipped
    counts.unchanged += skipped
    examined = {outcome.path for outcome in written}
    # A skipped layout last found broken is still broken (the full pass counts it apart).
    counts.still_broken += sum(
        1
        for path in batch
        if path not in examined and (known := stored.get(path)) is not None and known.state == "error"
    )
