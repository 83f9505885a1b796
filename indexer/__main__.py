"""``python -m indexer`` is the ``ocidx`` command."""

from __future__ import annotations

import sys

from indexer.cli import main

sys.exit(main())
