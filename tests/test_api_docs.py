"""docs/api.md runs as written: its set-up with the real umoci and skopeo, then every Python example,
in order, each in a fresh interpreter (the examples assert what they show)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
from needs import require

pytestmark = pytest.mark.interop

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API_MD = os.path.join(CHECKOUT, "docs", "api.md")


def _blocks(language: str) -> list[str]:
    with open(API_MD, encoding="utf-8") as f:
        return re.findall(rf"^```{language}\n(.*?)^```$", f.read(), re.S | re.M)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A directory prepared by the page's own set-up commands, ``ocidx`` on PATH as installed."""
    require([t for t in ("skopeo", "umoci") if shutil.which(t) is None], "install them")
    (setup,) = _blocks("sh")
    here = str(tmp_path_factory.mktemp("api"))
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", setup], cwd=here, env=_env(here), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return here


def _env(here: str) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("OCIDX_")},
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
        "PYTHONPATH": CHECKOUT,
        "XDG_CONFIG_HOME": os.path.join(here, "xdg-config"),
        "XDG_DATA_HOME": os.path.join(here, "xdg-data"),
    }


EXAMPLES = _blocks("python")


def test_the_page_has_an_example_of_every_call() -> None:
    text = "\n".join(EXAMPLES)
    for call in (
        ".resolve(",
        ".resolve_in(",
        ".find(",
        ".resolve_many(",
        ".find_many(",
        ".wait(",
        ".layouts(",
        ".layout_detail(",
        ".status(",
        ".referrers(",
        ".du(",
        "AsyncIndex(",
        "except NotFound",
        "except LayoutNotFound",
        "except Ambiguous",
        "except InvalidReference",
        "except DatabaseError",
        "except WaitTimeout",
    ):
        assert call in text, call


@pytest.mark.parametrize("number", range(len(EXAMPLES)))
def test_each_example_runs_as_written(workdir: str, number: int) -> None:
    done = subprocess.run(
        [sys.executable, "-c", EXAMPLES[number]],
        cwd=workdir,
        env=_env(workdir),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"example {number + 1} of docs/api.md:\n{EXAMPLES[number]}\n{done.stderr}"


def test_the_async_example_runs_under_trio_too(workdir: str) -> None:
    pytest.importorskip("trio")
    (example,) = [e for e in EXAMPLES if "AsyncIndex(" in e]
    under_trio = example.replace("anyio.run(main)", 'anyio.run(main, backend="trio")')
    assert under_trio != example
    done = subprocess.run(
        [sys.executable, "-c", under_trio], cwd=workdir, env=_env(workdir), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
