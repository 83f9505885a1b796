"""One daemon per database: an exclusive ``flock`` on ``<db>.lock`` holding the pid of its owner."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os

from indexer.errors import DaemonError
from indexer.store import open_beside_database


class DatabaseLock:
    """An exclusive ``flock`` on ``<db>.lock`` holding the pid of its owner."""

    def __init__(self, db_path: str) -> None:
        self.path = db_path + ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise DaemonError naming the pid that holds it."""
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        try:
            # A symlink or another user's file planted at the lock's name is refused (UnsafeFile):
            # the pid is written into the file, which must be this user's own.
            fd, _created = open_beside_database(self.path)
        except OSError as exc:
            raise DaemonError(f"cannot open the daemon lock {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                who = f"pid {holder}" if holder is not None else "another process"
                raise DaemonError(
                    f"another ocidx daemon ({who}) is already running on this database: it holds {self.path}"
                ) from None
            raise DaemonError(f"cannot lock {self.path}: {exc.strerror}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def still_held(self) -> bool:
        """Whether the lock file at the path is still the one this lock holds (not deleted or replaced)."""
        fd = self._fd
        if fd is None:
            return False
        try:
            held, named = os.fstat(fd), os.lstat(self.path)
        except OSError:
            return False
        return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)

    def renew(self) -> None:
        """Lock the file at the path again when the one held was deleted or replaced (a cleanup of the
        database's directory): the path must keep refusing a second daemon. DaemonError when another
        process took it meanwhile."""
        if self.still_held():
            return
        old, self._fd = self._fd, None
        try:
            self.acquire()
        finally:
            if old is not None:
                os.close(old)

    def release(self) -> None:
        """Empty the pid and drop the lock."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None
