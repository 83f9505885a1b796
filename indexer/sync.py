"""Read your own writes: a lookup's barrier with the daemon (the lookups' side; the daemon's is
:mod:`indexer.daemon.barrier`).

A lookup that trusts the daemon's index for the roots it watches first asks it, over the Unix socket
beside the database, to take every change made before the question and to answer once that is
written. ``ok`` means the index holds every change completed before the lookup started; anything
else (``inexact why``, no answer within :data:`TIMEOUT_S`, no socket) means the daemon cannot vouch
for that now, and the lookup walks the roots itself, as it does without a daemon.

Standard library only, and not even the ``socket`` module (the lookup path's import budget): the
``_socket`` extension underneath it does all this needs.
"""

from __future__ import annotations

import _socket
import time

SUFFIX = ".sock"
REQUEST = b"sync\n"
# A live daemon answers within milliseconds unless it is writing a burst; past this, a lookup treats
# it as not live and walks for itself (which is exact too, only slower).
TIMEOUT_S = 2.0
_MAX_ANSWER = 4096


def socket_path(db_path: str) -> str:
    """Where the daemon of the database at *db_path* listens for barriers."""
    return db_path + SUFFIX


def barrier(db_path: str, timeout_s: float = TIMEOUT_S) -> str | None:
    """The daemon's answer to a barrier (``ok``, or ``inexact ...``), or None when none came in time."""
    deadline = time.monotonic() + timeout_s
    try:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    except OSError:
        return None
    try:
        sock.settimeout(timeout_s)
        sock.connect(socket_path(db_path))
        sock.sendall(REQUEST)
        data = b""
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or len(data) > _MAX_ANSWER:
                return None
            sock.settimeout(left)
            chunk = sock.recv(_MAX_ANSWER)
            if not chunk:
                return None
            data += chunk
        return data.decode("utf-8", "replace").strip()
    except OSError:  # no daemon listening, a refused connection, a timeout
        return None
    finally:
        sock.close()
