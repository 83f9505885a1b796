"""``python -m indexer`` is the ``ocidx`` command."""

from __future__ import annotations

import sys

try:
    from indexer.cli import main
except OSError as exc:
    # Out of descriptors before the command could even be loaded (every import opens a file): say so
    # as the command would (exit 6), without a traceback, whose printing would fail the same way.
    import errno

    if exc.errno not in (errno.EMFILE, errno.ENFILE):
        raise
    sys.stderr.write(f"ocidx: too many open files while starting ({exc.strerror}): raise the limit (ulimit -n)\n")
    sys.exit(6)

sys.exit(main())
