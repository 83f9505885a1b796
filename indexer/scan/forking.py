"""Work shared among forked processes, each sending back its result on a pipe (the no-change proof's
``stat`` calls, :mod:`indexer.scan.proof`)."""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import NoReturn, TypeVar

    T = TypeVar("T")
    R = TypeVar("R")


def forked(fn: Callable[[T], R], shares: list[T]) -> list[R]:
    """``[fn(share) for share in shares]``, the first share in this process and each other in a
    process forked for it, which sends back its ``marshal``-able result on a pipe.

    Forking is safe only with no other thread (a lock another thread held stays held in the child),
    so a process that has threads (as far as ``threading`` knows them) runs every share itself, as
    it does a share no process could be forked for (a process limit, no memory) and a share whose
    process died or sent nothing whole. Signals are blocked from just before each fork until the
    parent has recorded its child, and stay blocked in the child: no signal handler ever runs there
    (it would raise into the parent's code), and a Ctrl-C leaves no child unreaped. A child only
    computes, writes and exits with ``os._exit`` (no ``atexit`` hook, no buffer the parent would
    flush again, the parent's database connection never touched); it lives as long as its share.
    """
    import marshal
    import signal
    import threading

    if len(shares) < 2 or threading.active_count() > 1 or not hasattr(os, "fork"):
        return [fn(share) for share in shares]
    children: list[tuple[int, int, int]] = []  # (pid, the pipe's read end, the index of its share)
    alone: list[int] = []  # the shares no process could be forked for
    try:
        for index in range(1, len(shares)):
            if alone:
                alone.append(index)
                continue
            try:
                read_end, write_end = os.pipe()
            except OSError:
                alone.append(index)
                continue
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
            try:
                pid = os.fork()
            except OSError:
                pid = -1
            if pid == 0:
                _child(fn, shares[index], read_end, write_end)
            try:
                os.close(write_end)
                if pid < 0:
                    os.close(read_end)
                    alone.append(index)
                else:
                    children.append((pid, read_end, index))
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        results: dict[int, R] = {0: fn(shares[0])}
        for index in alone:
            results[index] = fn(shares[index])
        while children:
            pid, read_end, index = children.pop(0)
            try:
                with open(read_end, "rb", closefd=True) as pipe:
                    data = pipe.read()
            finally:
                _, status = os.waitpid(pid, 0)
            try:
                if status != 0:
                    raise ValueError(status)
                results[index] = marshal.loads(data)
            except (ValueError, EOFError, TypeError):
                results[index] = fn(shares[index])  # the child died or sent nothing whole: done here
        return [results[index] for index in range(len(shares))]
    finally:
        for pid, read_end, _index in children:  # left by an exception: reap them, leave no zombie
            os.close(read_end)
            os.waitpid(pid, 0)


def _child(fn: Callable[[T], R], share: T, read_end: int, write_end: int) -> NoReturn:
    """A forked process's whole life: ``fn(share)``, its result on the pipe, ``os._exit``."""
    import marshal

    status = 1
    try:
        os.close(read_end)
        data = marshal.dumps(fn(share))  # type: ignore[arg-type]  # R: what marshal takes
        with open(write_end, "wb", closefd=True) as out:
            out.write(data)
        status = 0
    finally:
        os._exit(status)
