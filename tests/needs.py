"""The one rule for tests that need an outside program: skipped when it is missing, failed under CI."""

from __future__ import annotations

import os

import pytest

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import ModuleType


def require(missing: list[str], hint: str) -> None:
    """Skip the test when *missing* names programs (fail instead when ``$CI`` is set); *hint* says how to get them."""
    if not missing:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but {', '.join(missing)} is not installed: these tests must run")
    pytest.skip(f"{', '.join(missing)} not installed ({hint}, or set CI to make this a failure)")


def module(name: str, hint: str) -> ModuleType:
    """Import *name* for a test module, or skip the module (fail under ``$CI``) when it is not installed."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but the Python module {name} is not installed: {hint}", pytrace=False)
        pytest.skip(f"the Python module {name} is not installed ({hint})", allow_module_level=True)
