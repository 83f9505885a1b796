"""The mount table: which file systems are mounted where, and a thread told when that changes.

inotify does not cross mount points: a file system mounted below a root after its directories were
watched is invisible to those watches, and one unmounted takes its watches with it. The kernel
signals ``POLLPRI | POLLERR`` on ``/proc/self/mountinfo`` for every mount or unmount in our
namespace; :class:`MountWatch` waits for that in a thread of its own and tells the daemon, which
diffs :func:`mount_points` and watches and rediscovers what changed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import select
import threading

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger("ocidx.watch")

MOUNTINFO = "/proc/self/mountinfo"
_OCTAL = re.compile(rb"\\([0-7]{3})")


def mount_points(path: str = MOUNTINFO) -> dict[int, str]:
    """Every mount of our namespace: mount id to mount point (``/proc/self/mountinfo``), {} without /proc."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError:
        return {}
    found: dict[int, str] = {}
    for line in data.splitlines():
        fields = line.split(b" ")
        if len(fields) < 5 or not fields[0].isdigit():
            continue
        # The kernel writes space, tab, newline and backslash in a mount point as \ooo.
        point = _OCTAL.sub(lambda m: bytes([int(m.group(1), 8)]), fields[4])
        found[int(fields[0])] = os.fsdecode(point)
    return found


class MountWatch:
    """A thread waiting for the kernel to say the mount table changed; calls *on_change* (never raises)."""

    def __init__(self, on_change: Callable[[], None], path: str = MOUNTINFO) -> None:
        self.on_change = on_change
        self.path = path
        self._thread: threading.Thread | None = None
        self._stop_w: int | None = None

    def start(self) -> None:
        """Start watching; OSError when the mount table cannot be watched (no /proc)."""
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        stop_r, stop_w = os.pipe2(os.O_CLOEXEC)
        poller = select.poll()
        poller.register(fd, select.POLLPRI | select.POLLERR)
        poller.register(stop_r, select.POLLIN)
        poller.poll(0)  # the first poll reports the table as changed: consume that
        self._stop_w = stop_w
        self._thread = threading.Thread(target=self._run, args=(poller, fd, stop_r), name="ocidx-mounts", daemon=True)
        self._thread.start()

    def _run(self, poller: select.poll, fd: int, stop_r: int) -> None:
        try:
            while True:
                events = poller.poll()
                if any(which == stop_r for which, _ in events):
                    return
                if any(which == fd and mask & (select.POLLPRI | select.POLLERR) for which, mask in events):
                    with contextlib.suppress(Exception):
                        self.on_change()
        except Exception as exc:  # the periodic reconcile still covers what is missed
            with contextlib.suppress(Exception):
                log.error("watching the mount table failed: %s", exc)
        finally:
            os.close(fd)
            os.close(stop_r)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread and wait for it (blocking: call it from a worker thread)."""
        stop_w, self._stop_w = self._stop_w, None
        thread, self._thread = self._thread, None
        if stop_w is None:
            return
        with contextlib.suppress(OSError):
            os.write(stop_w, b"x")
        if thread is not None:
            thread.join(timeout)
        os.close(stop_w)
