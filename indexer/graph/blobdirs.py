"""What a layout's ``blobs/`` holds: its ``blobs/ALG`` directories opened safely and listed once."""

from __future__ import annotations

import errno
import os
import stat

from indexer.errors import BlobError
from indexer.graph.keys import graph_key, hex_keys
from indexer.graph.manifests import _HEX
from indexer.layout.files import file_kind

_HEX_LENGTHS = {"sha256": 64, "sha384": 96, "sha512": 128}  # the algorithms a digest may name (go-digest)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK


class BlobDirs:
    """A layout's ``blobs/ALG`` directories, opened, and the blobs they hold (one listing each).

    Each directory is opened with ``O_NOFOLLOW | O_DIRECTORY`` below a descriptor of the layout, so
    what is listed (and what :mod:`indexer.gc` unlinks, relative to these descriptors) is inside
    the layout whatever is renamed meanwhile. With *follow*, a ``blobs`` or ``blobs/ALG`` that is a
    symlink is followed when it resolves inside the layout, the rule :func:`indexer.layout.read_blob`
    applies; without it (``ocidx gc``), such a directory is refused and not listed.

    ``files`` are the digests of the regular files named like a blob (``sha256:HEX``), ``keys`` the
    same by :func:`graph_key`; ``odd``
    the other entries named like one (a symlink, a FIFO, a directory, a device) with what they
    are; names that are not a blob's (a writer's temporary file) are ignored. With *follow*, a
    symlink that resolves to a regular file inside the layout counts as a file. ``identities``
    holds each directory listed, as ``(name, dev, ino, mtime_ns, ctime_ns)`` (``blobs`` itself
    first, then each ``blobs/ALG``), taken before its listing began at ``listed_ns``.
    """

    def __init__(self, layout: str, *, follow: bool = True) -> None:
        import time

        self.layout = layout
        self.follow = follow
        self.files: set[str] = set()
        self.keys: dict[int, str] = {}
        self.odd: dict[str, str] = {}
        self.problems: list[str] = []
        self.identities: list[tuple[str, int, int, int, int]] = []
        self.fds: dict[str, int] = {}
        self.listed_ns = time.time_ns()
        self.exists = False
        self._layout_fd = -1
        try:
            self._list()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> BlobDirs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the directories (a listing's results stay)."""
        for fd in [*self.fds.values(), self._layout_fd]:
            if fd >= 0:
                os.close(fd)
        self.fds = {}
        self._layout_fd = -1

    def _open(self, name: str, parent: int, shown: str) -> int | None:
        """A descriptor of directory *name* below *parent*, or None (absent, or refused with a problem)."""
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            return None
        except PermissionError as exc:
            # The layout's own permissions: its blobs are not counted, and the graph says so. Any
            # other failure (EMFILE, EIO, ENOMEM) is the environment's and is raised: never a proof.
            self.problems.append(f"{shown} cannot be listed: {exc.strerror}; its blobs are not counted")
            return None
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
        if not self.follow or not stat.S_ISLNK(os.lstat(name, dir_fd=parent).st_mode):
            self.problems.append(f"{shown} is not a directory; its blobs are not counted")
            return None
        real = os.path.realpath(os.path.join(self.layout, shown))
        inside = os.path.realpath(self.layout).rstrip(os.sep) + os.sep
        if not real.startswith(inside) or not os.path.isdir(real):
            self.problems.append(f"{shown} is a symlink leading outside the layout (to {real}); refused")
            return None
        return os.open(real, _DIR_FLAGS)

    def _list(self) -> None:
        # The layout path is resolved by the caller. Without *follow* it must not have become a
        # symlink since, nor lead elsewhere through a directory swapped on the way (/proc/self/fd).
        self._layout_fd = os.open(self.layout, _DIR_FLAGS if not self.follow else _DIR_FLAGS & ~os.O_NOFOLLOW)
        if not self.follow:
            try:
                opened = os.readlink(f"/proc/self/fd/{self._layout_fd}")
            except OSError:
                opened = self.layout
            if opened != self.layout:
                raise BlobError(f"{self.layout} led elsewhere when opened (to {opened}); refused")
        blobs = self._open("blobs", self._layout_fd, "blobs")
        if blobs is None:
            return
        self.exists = True
        self.fds[""] = blobs
        st = os.fstat(blobs)
        self.identities.append(("blobs", st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns))
        for algorithm in sorted(os.listdir(blobs)):
            length = _HEX_LENGTHS.get(algorithm)
            if length is None:
                continue  # not a digest algorithm: nothing in it can be named by a descriptor
            fd = self._open(algorithm, blobs, f"blobs/{algorithm}")
            if fd is None:
                continue
            self.fds[algorithm] = fd
            st = os.fstat(fd)
            self.identities.append((f"blobs/{algorithm}", st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns))
            prefix = algorithm + ":"
            with os.scandir(fd) as listing:
                entries = list(listing)
            # Names of other lengths are not blobs' (a writer's temporary files); the rest is checked
            # in a few C calls: every name hex (per name only when one is not), every entry a file.
            regular = [e.name for e in entries if e.is_file(follow_symlinks=False) and len(e.name) == length]
            if "".join(regular).strip(_HEX):
                regular = [name for name in regular if not name.strip(_HEX)]
            digests = [prefix + name for name in regular]
            self.files.update(digests)
            self.keys.update(zip(hex_keys(regular), digests, strict=True))
            if len(regular) != len(entries):
                for entry in entries:
                    name = entry.name
                    if len(name) != length or name.strip(_HEX) or entry.is_file(follow_symlinks=False):
                        continue
                    if entry.is_symlink():
                        self._symlink(prefix + name, algorithm, name)
                    else:
                        self.odd[prefix + name] = _entry_kind(entry)

    def _symlink(self, digest: str, algorithm: str, name: str) -> None:
        if self.follow:
            real = os.path.realpath(os.path.join(self.layout, "blobs", algorithm, name))
            inside = os.path.realpath(self.layout).rstrip(os.sep) + os.sep
            if real.startswith(inside) and os.path.isfile(real):
                self.files.add(digest)
                self.keys[graph_key(digest)] = digest
                return
            self.problems.append(f"blob {digest} is a symlink leading outside the layout or to no file; refused")
        self.odd[digest] = "a symlink"

    def stat(self, digest: str) -> os.stat_result | None:
        """``lstat`` of a listed blob, relative to its directory (None when it is gone since)."""
        algorithm, _, name = digest.partition(":")
        try:
            return os.stat(name, dir_fd=self.fds[algorithm], follow_symlinks=self.follow)
        except (OSError, KeyError):
            return None


def _entry_kind(entry: os.DirEntry[str]) -> str:
    try:
        mode = entry.stat(follow_symlinks=False).st_mode
    except OSError:
        return "gone"
    return file_kind(mode)
