"""Serving clients the daemon does not control, within bounds (the metrics endpoint, the barrier).

Any local user can connect to a socket the daemon listens on, and keep the connection idle for as
long as they like. A thread per connection and no deadline (what ``prometheus_client``'s server
does) let about a thousand idle connections use up the daemon's descriptors, after which its own
work failed with ``EMFILE``. Here every endpoint serves at most ``max_clients`` connections at once,
each for at most ``deadline_s`` seconds from its accept to its close; past that many, a client waits
in the kernel's listen backlog, which costs the daemon no descriptor, until one is closed. A client
that sends nothing, or too much, or too slowly, is dropped at its deadline.
"""

from __future__ import annotations

import errno
import logging

import anyio
from anyio.abc import Listener, SocketStream

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from anyio.abc import TaskStatus

log = logging.getLogger("ocidx.daemon")

# Out of descriptors (or kernel memory) at accept: the listener backs off rather than spin.
_ACCEPT_RETRY = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
ACCEPT_BACKOFF_S = 0.1
MAX_REQUEST_BYTES = 8192


async def serve(
    listener: Listener[SocketStream],
    handle: Callable[[SocketStream], Awaitable[None]],
    *,
    name: str,
    max_clients: int,
    deadline_s: float,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Accept clients of *listener* and run ``handle(stream)`` for each, within the bounds above."""
    slots = anyio.Semaphore(max_clients)
    said = False
    async with listener, anyio.create_task_group() as tg:
        task_status.started()
        while True:
            await slots.acquire()
            try:
                client = await listener.accept()  # type: ignore[attr-defined]
            except OSError as exc:
                slots.release()
                if exc.errno in _ACCEPT_RETRY:
                    if not said:
                        said = True
                        log.warning("%s: cannot accept a client now (%s); retrying", name, exc.strerror or exc)
                    await anyio.sleep(ACCEPT_BACKOFF_S)
                continue
            said = False
            tg.start_soon(_serve_one, client, handle, slots, deadline_s)


async def _serve_one(
    client: SocketStream,
    handle: Callable[[SocketStream], Awaitable[None]],
    slots: anyio.Semaphore,
    deadline_s: float,
) -> None:
    try:
        with anyio.move_on_after(deadline_s):
            await handle(client)
    except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream):
        pass  # the client went away: nothing to tell it
    finally:
        with anyio.CancelScope(shield=True):
            await client.aclose()
        slots.release()


async def read_request(client: SocketStream, end: bytes) -> bytes | None:
    """Bytes from *client* up to and including *end*, or None when it closes first or sends more
    than :data:`MAX_REQUEST_BYTES` (the caller's deadline bounds the time)."""
    data = b""
    while end not in data:
        if len(data) > MAX_REQUEST_BYTES:
            return None
        try:
            data += await client.receive(4096)
        except anyio.EndOfStream:
            return None
    return data
