"""Which mount a file is on: the kernel's unique mount id (``statx`` with ``STATX_MNT_ID_UNIQUE``).

Two file systems with identical metadata (a copied image, a reproducible build of one) mounted one
after the other at the same place show the same device number (a loop device, an anonymous device
number reused), inode numbers, sizes and timestamps: ``stat`` cannot tell them apart, and the mount
ids of ``/proc/self/mountinfo`` are reused as soon as a mount goes. Linux 6.8 gives every mount an
id that is never reused (``STATX_MNT_ID_UNIQUE``); a stored identity carries it, and a proof that
finds another one says the file may not be the one read (docs/reliability.md).

Python 3.11 has no ``os.statx``. ``ctypes`` costs 1.6 ms to import, 6% of a whole ``ocidx resolve``
(the lookup path's budget is 1.5x a bare interpreter), so this calls libc's ``statx`` through
``_ctypes``, the C module under ``ctypes`` (0.3 ms), with the few definitions ``ctypes`` would
make. Anything missing (another libc, no ``statx``, a kernel before 6.8, which leaves the bit out of
the answer) gives None: no mount id is stored, and none is compared. Standard library only.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_STATX_MNT_ID_UNIQUE = 0x4000
# struct statx (linux/stat.h): stx_mask at 0, stx_dev_major and stx_dev_minor at 0x88 and 0x8c,
# stx_mnt_id at 0x90; 256 bytes in all.
_SIZE = 256

_statx: Callable[..., int] | None = None
_buffer_type: Callable[..., object] | None = None
_loaded = False


def _load() -> bool:
    global _statx, _buffer_type, _loaded
    try:
        import _ctypes

        # ctypes.c_int and ctypes.c_char (the base is generic to type checkers, not at run time)
        class _Int(_ctypes._SimpleCData):  # type: ignore[type-arg]
            _type_ = "i"

        class _Char(_ctypes._SimpleCData):  # type: ignore[type-arg]
            _type_ = "c"

        class _Function(_ctypes.CFuncPtr):  # ctypes.CDLL's functions, errno kept
            _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
            _restype_ = _Int

        class _Process:  # what CFuncPtr looks a symbol up in: dlopen(NULL), this process's libraries
            _handle = _ctypes.dlopen(None, os.RTLD_NOW)  # type: ignore[arg-type]  # NULL: dlopen(3) says so

        _statx = _Function(("statx", _Process()))  # type: ignore[arg-type]  # what CDLL is duck-typed as
        _buffer_type = (_Char * _SIZE).from_buffer
    except (ModuleNotFoundError, AttributeError, TypeError):  # no _ctypes, no statx in this libc: for good
        _loaded, _statx = True, None
        return False
    except (ImportError, OSError):  # the module file could not be opened now (EMFILE): another time
        return False
    _loaded = True
    return True


def mount_of(path: str | None = None, fd: int | None = None) -> tuple[int, int] | None:
    """``(st_dev, unique mount id)`` of the file at *path* (symlinks followed) or open at *fd*, or None
    when the system cannot say (see the module docstring) or the call fails."""
    if not _loaded and not _load():
        return None
    statx, buffer_type = _statx, _buffer_type
    if statx is None or buffer_type is None:
        return None
    buffer = bytearray(_SIZE)
    if fd is not None:
        done = statx(fd, b"", _AT_EMPTY_PATH, _STATX_MNT_ID_UNIQUE, buffer_type(buffer))
    elif path is not None:
        done = statx(_AT_FDCWD, os.fsencode(path), 0, _STATX_MNT_ID_UNIQUE, buffer_type(buffer))
    else:
        return None
    order = sys.byteorder
    if done != 0 or not int.from_bytes(buffer[0:4], order) & _STATX_MNT_ID_UNIQUE:
        return None
    device = os.makedev(int.from_bytes(buffer[0x88:0x8C], order), int.from_bytes(buffer[0x8C:0x90], order))
    return device, int.from_bytes(buffer[0x90:0x98], order)
