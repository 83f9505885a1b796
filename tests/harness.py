"""The test harness every test file shares: running ocidx as a user would, and reading what it wrote.

Fixtures built on it live in conftest.py.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading

from indexer.config import Config
from indexer.scan.scanner import Scanner
from indexer.store.writer import Store
from indexer.sync import socket_path

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator


@contextlib.contextmanager
def scanner_on(db: str, config: Config | None = None) -> Iterator[Scanner]:
    """A scanner writing the database at *db* through a store of its own (both closed at the end)."""
    store = Store(db)
    scanner = Scanner(store, config or Config())
    try:
        yield scanner
    finally:
        try:
            scanner.close()
        finally:
            store.close()


@contextlib.contextmanager
def barrier_answering(db: str, answer: str | None) -> Iterator[None]:
    """A stand-in daemon's barrier socket beside *db* that answers every request with *answer*
    (None: no socket at all), served by a thread until the block ends."""
    if answer is None:
        yield
        return
    path = socket_path(db)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(8)
    server.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                client, _ = server.accept()
            except TimeoutError:
                continue
            with client:
                client.recv(64)
                client.sendall(answer.encode() + b"\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        server.close()
        os.unlink(path)
