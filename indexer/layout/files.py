"""Reading a layout's files safely: ``index.json`` (torn reads, symlinks kept inside the layout),
blobs (containment, size bounds, hash), and which directories are layouts.

The reads are small and synchronous, so the daemon runs them in a worker thread and the lookup CLI
calls them directly when it has to read a changed layout through.

Choices where the OCI image-layout specification is silent (docs/semantics.md restates them for users):

* **Torn reads.** ``index.json`` is opened with ``O_NONBLOCK`` (a FIFO never
  blocks; anything but a regular file is refused) and ``fstat``-ed before
  and after the read; a change, or a read whose length is not the size, is
  retried (``Limits.torn_retries`` times, backoff 1, 2, 4 … ms). A read that
  fails to parse is read again: if the bytes or the identity differ it was
  torn and is retried too, and only a file that reads the same twice is
  reported as broken. Retries exhausted: :class:`~indexer.errors.TornRead`.
  A rename-replaced file read through the old descriptor is a consistent
  old version, not a torn one.
* **index.json through a symlink.** ``index.json`` may be a symlink only to a file inside the
  layout (its real path below the layout's real path, checked again on the opened descriptor);
  one leading anywhere else is refused as :class:`~indexer.errors.LayoutUnreadable` (the layout is
  in state ``error``), so nothing of a file outside the layout (its content, annotations, hash)
  reaches the index. ``oci-layout`` is never read, only its presence marks a layout.
* **Blobs.** A digest is validated before it becomes a path. The blob's real
  path (symlinks resolved) must stay inside the layout's real path; symlinks
  inside the layout are followed, the final open uses ``O_NOFOLLOW``. Only a
  regular file of the descriptor's size, at most ``Limits.max_blob_bytes``,
  whose hash matches, is returned. A missing blob is
  :class:`BlobMissing` (normal in partial exports), any other problem
  :class:`~indexer.errors.BlobError`.
"""

from __future__ import annotations

import errno
import os
import stat

from indexer import reference
from indexer.errors import BlobError, IndexParseError, InvalidReference, LayoutUnreadable, TornRead, layout_failure
from indexer.layout.records import DEFAULT_LIMITS, INDEX_FILE, LAYOUT_FILE, FileIdentity, Limits
from indexer.names import quote_value

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import TypeVar

    _P = TypeVar("_P")

_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_LOWER_HEX = "0123456789abcdef"


class BlobMissing(BlobError):
    """The blob is not in ``blobs/``: normal for partial exports, so callers tell it apart."""

    category = "blob_missing"


# -- reading index.json ------------------------------------------------------------------------


def read_index_bytes(layout: str, limits: Limits = DEFAULT_LIMITS) -> tuple[bytes, FileIdentity]:
    """Read ``LAYOUT/index.json`` whole, retrying a read that a writer tore; return bytes and identity."""
    data, identity, _ = _read_index(os.path.join(layout, INDEX_FILE), limits, None)
    return data, identity


def _read_index(
    path: str,
    limits: Limits,
    parse: Callable[[bytes], _P] | None,
    read_once: Callable[[str, Limits], tuple[bytes, FileIdentity] | None] | None = None,
) -> tuple[bytes, FileIdentity, _P | None]:
    """The retry loop around one read (and parse) of ``index.json``; *read_once* is for tests."""
    read = read_once or _read_index_once
    attempts = limits.torn_retries + 1
    attempt = 0
    while attempt < attempts:
        if attempt:
            _backoff(attempt)
        attempt += 1
        got = read(path, limits)
        if got is None:
            continue
        data, identity = got
        if parse is None:
            return data, identity, None
        try:
            return data, identity, parse(data)
        except IndexParseError:
            # Broken, or torn in a way stat could not see (a rewrite within the
            # timestamp granularity): a file that reads the same again is broken.
            _backoff(1)
            if read(path, limits) == got:
                raise
            attempt += 1
    raise TornRead(f"{path} kept changing while it was read ({attempts} attempts); a writer is rewriting it")


def _read_index_once(path: str, limits: Limits) -> tuple[bytes, FileIdentity] | None:
    """One read of *path*; ``None`` when it changed while being read."""
    try:
        target = _index_target(path)
        # Refuse a device, FIFO or socket before opening it: opening some devices has effects
        # (a root daemon must never open a tape or a terminal a user's index.json points at).
        # The fstat after the open below still catches a swap between the two calls.
        kind = os.lstat(target).st_mode
        if not stat.S_ISREG(kind):
            raise LayoutUnreadable(f"{path} is {file_kind(kind)}, not a regular file")
        fd = os.open(target, _OPEN_FLAGS | _NOFOLLOW)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise LayoutUnreadable(f"{path} became a symlink while it was opened; refused") from None
        raise layout_failure(LayoutUnreadable, _open_error(path, exc), exc) from None
    try:
        _check_opened_inside(fd, path)
        try:
            before = os.fstat(fd)
        except OSError as exc:
            raise layout_failure(LayoutUnreadable, f"{path} cannot be read: {exc.strerror}", exc) from None
        if not stat.S_ISREG(before.st_mode):
            raise LayoutUnreadable(f"{path} is {file_kind(before.st_mode)}, not a regular file")
        if before.st_size > limits.max_index_bytes:
            raise IndexParseError(f"{path} is {before.st_size} bytes, over the limit of {limits.max_index_bytes} bytes")
        try:
            data = _read_all(fd, limits.max_index_bytes, before.st_size)
            after = os.fstat(fd)
        except OSError as exc:
            raise layout_failure(LayoutUnreadable, f"{path} cannot be read: {exc.strerror}", exc) from None
    finally:
        os.close(fd)
    identity = FileIdentity.of(before)
    if FileIdentity.of(after) != identity or len(data) != before.st_size:
        return None
    return data, identity


def _index_target(path: str) -> str:
    """What to open for *path* (``LAYOUT/index.json``): itself, or, when it is a symlink, its real path,
    which must be inside the layout's real path.

    ``index.json`` is read as root into a database other users can read: a symlink to a file
    outside the layout (``/root/.docker/config.json``, another user's layout) would copy what it
    holds, or its hash, into the index. Like blobs, it may point only inside its own layout.
    """
    if not stat.S_ISLNK(os.lstat(path).st_mode):
        return path
    layout = os.path.realpath(os.path.dirname(path))
    inside = layout if layout.endswith(os.sep) else layout + os.sep
    real = os.path.realpath(path)
    if not real.startswith(inside):
        raise LayoutUnreadable(f"{path} is a symlink leading outside the layout (to {real}); refused")
    if os.path.islink(real):
        raise LayoutUnreadable(f"{path} is a symlink that never resolves (a loop)")
    return real


def _check_opened_inside(fd: int, path: str) -> None:
    """Raise unless the file open at *fd* is inside the layout directory as named, by the kernel's
    account of where *fd* is (``/proc/self/fd``).

    Layouts are read at their real paths (discovery resolves them; lookups resolve what they are
    given). A layout directory replaced by a symlink after it was indexed (``mv app old; ln -s
    /root/x app``), or a directory on the way swapped between the resolution and the open, would
    otherwise make a root daemon read a file outside the layout under the layout's name.
    """
    try:
        opened = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return  # no /proc: the checks before the open are all there is
    opened = opened.removesuffix(" (deleted)")  # replaced by a rename since: still the file we opened
    layout = os.path.dirname(os.path.abspath(path))
    inside = layout if layout.endswith(os.sep) else layout + os.sep
    if not opened.startswith(inside):
        raise LayoutUnreadable(f"{path} led outside the layout directory when opened (to {opened}); refused")


def _read_all(fd: int, limit: int, expected: int) -> bytes:
    """Read *fd* to its end, but never more than ``limit + 1`` bytes."""
    chunks: list[bytes] = []
    total = 0
    want = min(expected, limit) + 1
    while total <= limit:
        request = min(want, limit + 1 - total)
        chunk = os.read(fd, request)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        if len(chunk) < request:
            break  # a regular file reads short only at its end; the fstat after the read checks the rest
        want = 1 << 20
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _backoff(attempt: int) -> None:
    import time

    time.sleep(0.001 * (1 << min(attempt - 1, 6)))


def _open_error(path: str, exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return f"{path} does not exist"
    if exc.errno == errno.ENOTDIR:
        return f"{path} does not exist: a parent is not a directory"
    if exc.errno == errno.ENXIO:
        return f"{path} is a socket or device, not a regular file"
    return f"{path} cannot be opened: {exc.strerror}"


def file_kind(mode: int) -> str:
    """What a file that is not a regular file is, for a message ("a FIFO", "a directory", ...)."""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


# -- blobs -------------------------------------------------------------------------------------


def blob_path(layout: str, digest: str) -> str:
    """``LAYOUT/blobs/ALG/HEX`` for a digest validated first; :class:`BlobError` when invalid."""
    try:
        reference.validate_digest(digest)
    except InvalidReference as exc:
        raise BlobError(f"invalid digest {quote_value(digest)} ({exc.category})") from None
    algorithm, _, encoded = digest.partition(":")
    return os.path.join(layout, "blobs", algorithm, encoded)


def read_blob(
    layout: str,
    digest: str,
    size: int | None,
    limits: Limits = DEFAULT_LIMITS,
    *,
    resolved: dict[str, str] | None = None,
) -> bytes:
    """The verified content of one blob; :class:`BlobMissing` when absent, :class:`BlobError` when bad.

    *resolved* caches the resolved layout and ``blobs/ALG`` directories across the calls for one
    layout: resolving every blob's whole path cost 0.1 ms a blob, most of a nested-index walk.
    """
    import hashlib

    if len(digest) == 71 and digest.startswith("sha256:") and not digest[7:].strip(_LOWER_HEX):
        # The common digest, checked as go-digest would in a few C calls (the set of digests
        # validate_digest keeps is far smaller than the blobs of a host).
        path = os.path.join(layout, "blobs", "sha256", digest[7:])
    else:
        path = blob_path(layout, digest)
    cache = resolved if resolved is not None else {}
    algorithm, _, encoded = digest.partition(":")
    directory = cache.get(algorithm)
    if directory is None:
        directory = cache[algorithm] = _blob_directory(layout, os.path.dirname(path), cache)
    if not directory:
        real = os.path.realpath(path)
        raise BlobError(f"blob {digest} at {path} leads outside the layout (to {real}); refused")
    real = directory + os.sep + encoded
    try:
        try:
            # The directory is resolved and inside the layout; O_NOFOLLOW refuses a symlinked blob,
            # which is then resolved in full and allowed only when it stays inside the layout.
            fd = os.open(real, _OPEN_FLAGS | _NOFOLLOW)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            real = os.path.realpath(path)
            if not real.startswith(_inside(layout, cache)):
                raise BlobError(f"blob {digest} at {path} leads outside the layout (to {real}); refused") from None
            fd = os.open(real, _OPEN_FLAGS | _NOFOLLOW)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            raise BlobMissing(f"blob {digest} is not in {os.path.join(layout, 'blobs')}") from None
        if exc.errno == errno.ELOOP:
            raise BlobError(f"blob {digest} at {path} became a symlink while opened; refused") from None
        raise layout_failure(BlobError, f"blob {digest} at {path} cannot be opened: {exc.strerror}", exc) from None
    limit = limits.max_blob_bytes
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BlobError(f"blob {digest} at {path} is {file_kind(st.st_mode)}, not a regular file")
        for claimed in (size, st.st_size):
            if claimed is not None and claimed > limit:
                raise BlobError(f"blob {digest} is {claimed} bytes, over the limit of {limit} bytes")
        if size is not None and st.st_size != size:
            raise BlobError(f"blob {digest} is {st.st_size} bytes, but its descriptor says {size}")
        try:
            data = _read_all(fd, limit, st.st_size)
        except OSError as exc:
            raise layout_failure(BlobError, f"blob {digest} at {path} cannot be read: {exc.strerror}", exc) from None
    finally:
        os.close(fd)
    if len(data) > limit or (size is not None and len(data) != size):
        raise BlobError(f"blob {digest} changed size while it was read", transient=True, retry_soon=True)
    if getattr(hashlib, algorithm)(data).hexdigest() != encoded:  # a validated digest: sha256, sha384 or sha512
        raise BlobError(f"blob {digest} does not match its digest (content changed or corrupt)")
    return data


def _inside(layout: str, cache: dict[str, str]) -> str:
    """The layout's real path with a trailing separator: what every blob's real path starts with."""
    inside = cache.get("")
    if inside is None:
        root = os.path.realpath(layout)
        inside = cache[""] = root if root.endswith(os.sep) else root + os.sep
    return inside


def _blob_directory(layout: str, directory: str, cache: dict[str, str]) -> str:
    """``LAYOUT/blobs/ALG`` as a path to open blobs below, ``""`` when it leads outside the layout.

    Neither ``blobs`` nor ``ALG`` a symlink: the directory is inside the layout whatever the
    layout's own path is, and two ``lstat`` calls showed it (resolving the layout and the directory
    instead costs one ``lstat`` per component of each path: a tenth of a nested-index walk). Else
    it is resolved, and must stay inside the layout's real path.
    """
    try:
        blobs_mode, algorithm_mode = os.lstat(os.path.dirname(directory)).st_mode, os.lstat(directory).st_mode
    except OSError:
        pass  # missing (a partial export): resolved below, and the open says so
    else:
        if not (stat.S_ISLNK(blobs_mode) or stat.S_ISLNK(algorithm_mode)):
            return directory
    real = os.path.realpath(directory)
    return real if real.startswith(_inside(layout, cache)) else ""


# -- discovery ---------------------------------------------------------------------------------


def is_layout_dir(path: str) -> bool:
    """Whether *path* is a directory holding ``oci-layout`` or ``index.json``."""
    return os.path.isdir(path) and (
        os.path.lexists(os.path.join(path, LAYOUT_FILE)) or os.path.lexists(os.path.join(path, INDEX_FILE))
    )


def layout_dir_state(path: str) -> bool | None:
    """:func:`is_layout_dir`, or None when it cannot be told: a ``stat`` failed for a reason other than
    absence (a permission, an I/O error), which proves neither that the layout is there nor gone."""
    try:
        if not stat.S_ISDIR(os.stat(path).st_mode):
            return False
    except OSError as exc:
        return False if exc.errno in (errno.ENOENT, errno.ENOTDIR) else None
    for marker in (LAYOUT_FILE, INDEX_FILE):
        try:
            os.lstat(os.path.join(path, marker))
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                return None
        else:
            return True
    return False
