"""inotify(7), as the kernel gives it: one descriptor, watches on directories, events read in order.

Standard library only (``ctypes`` for the three system calls Python's ``os`` lacks), so that both
the daemon and ``ocidx wait`` use it without an event-loop library. The descriptor is opened
non-blocking: :meth:`Inotify.read` returns what is queued now and never waits, which is what makes
"read until empty" an exact barrier (every event the kernel queued before the call is returned by
it or by an earlier call). Waiting for the descriptor is the caller's business (``select.poll``, or
``anyio.wait_readable`` in the daemon).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
import termios

from indexer._record import Record

IN_ACCESS = 0x00000001
IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_CLOSE_NOWRITE = 0x00000010
IN_OPEN = 0x00000020
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_UNMOUNT = 0x00002000
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_EXCL_UNLINK = 0x04000000
IN_MASK_ADD = 0x20000000
IN_ISDIR = 0x40000000

IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len (struct inotify_event)
# Room for many events per read; the kernel never splits one event across reads.
_READ_BYTES = 64 * 1024


class Event(Record):
    """One ``struct inotify_event``: the watch, what happened, the rename cookie, the name in the directory."""

    __slots__ = ("cookie", "mask", "name", "wd")

    def __init__(self, wd: int, mask: int, cookie: int, name: bytes) -> None:
        self.wd = wd
        self.mask = mask
        self.cookie = cookie
        self.name = name


_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.inotify_init1.argtypes = [ctypes.c_int]
        lib.inotify_init1.restype = ctypes.c_int
        lib.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        lib.inotify_add_watch.restype = ctypes.c_int
        lib.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.inotify_rm_watch.restype = ctypes.c_int
        _libc = lib
    return _libc


def _raise(what: str) -> None:
    code = ctypes.get_errno()
    raise OSError(code, os.strerror(code), what)


def parse(data: bytes) -> list[Event]:
    """The events in *data*, as :meth:`Inotify.read` returned them from one ``read``."""
    events = []
    offset, end, header, size = 0, len(data), _HEADER.unpack_from, _HEADER.size
    while offset + size <= end:
        wd, mask, cookie, length = header(data, offset)
        offset += size
        name = data[offset : offset + length].rstrip(b"\0")
        offset += length
        events.append(Event(wd, mask, cookie, name))
    return events


class Inotify:
    """One inotify instance, non-blocking and close-on-exec."""

    def __init__(self) -> None:
        fd = int(_lib().inotify_init1(IN_NONBLOCK | IN_CLOEXEC))
        if fd < 0:
            _raise("inotify_init1")
        self._fd = fd

    def fileno(self) -> int:
        """The descriptor, to wait on for readability."""
        return self._fd

    def add_watch(self, path: str | bytes, mask: int) -> int:
        """Watch *path* for the events in *mask*; the watch descriptor (the same one again for a
        directory already watched). OSError as the kernel says: ``ENOSPC`` when the watch limit is
        reached, ``ENOENT``/``ENOTDIR`` when it is gone, ``EACCES`` when it cannot be read."""
        wd = _lib().inotify_add_watch(self._fd, os.fsencode(path), mask)
        if wd < 0:
            _raise(os.fsdecode(path))
        return int(wd)

    def rm_watch(self, wd: int) -> None:
        """Remove a watch; one the kernel already dropped (its directory was deleted) is no error."""
        if _lib().inotify_rm_watch(self._fd, wd) < 0 and ctypes.get_errno() != errno.EINVAL:
            _raise(f"watch {wd}")

    def pending(self) -> int:
        """How many bytes of events the kernel holds for the next read (``FIONREAD``)."""
        buf = bytearray(4)
        fcntl.ioctl(self._fd, termios.FIONREAD, buf)
        return int.from_bytes(buf, "little", signed=True)

    def read(self) -> list[Event]:
        """Every event queued now, in the kernel's order (none: an empty list); never waits."""
        out: list[Event] = []
        while True:
            try:
                data = os.read(self._fd, _READ_BYTES)
            except BlockingIOError:
                return out
            except InterruptedError:
                continue
            if not data:
                return out
            out.extend(parse(data))
            if len(data) < _READ_BYTES // 2:
                return out  # a short read took all there was: no second system call to learn it

    def close(self) -> None:
        """Close the descriptor (every watch goes with it)."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> Inotify:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
