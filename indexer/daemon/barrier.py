"""The barrier: a lookup asks the daemon to take every change made before it asked, and to say when
that is written (read your own writes).

The daemon listens on a Unix socket beside its database (``<db>.sock``). A lookup connects, sends
``sync\\n``, and reads one line back: ``ok`` when every event the kernel queued before the request
was read, indexed and committed (inotify queues an event when the change happens, so this is exact),
or ``inexact <why>`` when the index cannot vouch for that now (the start-up pass is not written,
events were lost and the reconcile that finds them is not done, the daemon is polling). The lookup
then trusts the index (``ok``) or does its own walk. A daemon that does not answer within the
lookup's bound is not live to it. The endpoint answers that one question and nothing else, serves at
most :data:`MAX_CLIENTS` connections at once for at most :data:`REQUEST_DEADLINE_S` each
(:mod:`indexer.daemon.serving`), and concurrent requests share one drain.

The socket's mode follows the database's: whoever may read the database may connect (read bits
become read-write bits, since connecting needs write permission on the socket file). A socket file
left by an earlier daemon of this user is replaced; anything else at that name (another user's file,
a symbolic link) is refused with a warning, and lookups then walk for themselves.
"""

from __future__ import annotations

import logging
import os
import stat

import anyio

from indexer.daemon.logs import fields
from indexer.daemon.serving import read_request, serve
from indexer.daemon.shared import Sync
from indexer.sync import REQUEST, socket_path

TYPE_CHECKING = False
if TYPE_CHECKING:
    from anyio.abc import SocketStream, TaskStatus

    from indexer.daemon.shared import Shared

log = logging.getLogger("ocidx.daemon")

MAX_CLIENTS = 64
REQUEST_DEADLINE_S = 10.0


def socket_mode(db_path: str) -> int:
    """The socket's mode: read-write for each class of user that may read the database."""
    try:
        mode = os.stat(db_path).st_mode
    except OSError:
        return 0o600
    return 0o600 | (0o060 if mode & stat.S_IRGRP else 0) | (0o006 if mode & stat.S_IROTH else 0)


class Barrier:
    """The barrier duty (see the module)."""

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.path = socket_path(shared.db_path)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen and answer barriers until cancelled (a socket that cannot be made is said, not fatal)."""
        problem = _clear_stale(self.path)
        listener = None
        if problem is None:
            try:
                listener = await anyio.create_unix_listener(self.path, mode=socket_mode(self.shared.db_path))
            except OSError as exc:
                problem = f"cannot listen on {self.path}: {exc.strerror or exc}"
        if listener is None:
            log.warning(
                "no barrier for lookups (%s): they walk the roots themselves, as without a daemon",
                problem,
                extra=fields(event="barrier_unavailable", socket=self.path, reason=problem),
            )
            task_status.started()
            return
        try:
            await serve(
                listener,
                self._answer,
                name="barrier",
                max_clients=MAX_CLIENTS,
                deadline_s=REQUEST_DEADLINE_S,
                task_status=task_status,
            )
        finally:
            _remove_own(self.path)

    async def _answer(self, client: SocketStream) -> None:
        request = await read_request(client, b"\n")
        if request != REQUEST:
            await client.send(b"error: the only request is 'sync'\n")
            return
        sync = Sync()
        self.shared.sync(sync)
        await sync.done.wait()
        why = self.shared.inexact()
        await client.send(b"ok\n" if why is None else f"inexact {why}\n".encode("utf-8", "replace"))


def _clear_stale(path: str) -> str | None:
    """Remove a socket an earlier daemon of this user left at *path*; why *path* cannot be used, or None."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot examine {path}: {exc.strerror}"
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
        return f"{path} exists and is not a socket of this user; remove it"
    try:
        os.unlink(path)
    except OSError as exc:
        return f"cannot replace the stale socket {path}: {exc.strerror}"
    return None


def _remove_own(path: str) -> None:
    """Remove our socket at shutdown (only a socket of this user: unlinking never follows a link)."""
    try:
        st = os.lstat(path)
        if stat.S_ISSOCK(st.st_mode) and st.st_uid == os.geteuid():
            os.unlink(path)
    except OSError:
        pass
