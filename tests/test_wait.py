"""``ocidx wait``: a real process blocks until the layout lands, written by a real tool, and answers
as ``resolve`` does; no daemon and no database (docs/semantics.md, Waiting)."""

from __future__ import annotations

import json
import os
import selectors
import shutil
import subprocess
import sys
import time

import pytest
from harness import must, skopeo_copy, skopeo_digest
from layouts import LINUX_AMD64, LINUX_ARM64, Layout, named
from needs import require

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEADLINE_S = 30.0  # generous: two cores shared with other test runs


class Waiter:
    """``ocidx wait ARGS`` in its own process, with the test's private (empty) data directories."""

    def __init__(self, tmp_path: str, *args: str) -> None:
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("OCIDX_")},
            "PYTHONPATH": CHECKOUT,
            "XDG_CONFIG_HOME": os.path.join(tmp_path, "xdg-config"),
            "XDG_DATA_HOME": os.path.join(tmp_path, "xdg-data"),
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "indexer", "wait", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env,
            cwd=tmp_path,
        )
        self.err = ""

    def waiting(self) -> str:
        """Block until the process says it is waiting (its first check found nothing); that line."""
        assert self.proc.stderr is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self.proc.stderr, selectors.EVENT_READ)
            assert selector.select(timeout=DEADLINE_S), "ocidx wait never said it was waiting"
        line = self.proc.stderr.readline()
        self.err += line
        assert "waiting for" in line, line
        return line

    def result(self) -> tuple[int, str, str]:
        """Exit code, stdout and stderr once it exits (it must, within the deadline)."""
        out, err = self.proc.communicate(timeout=DEADLINE_S)
        return self.proc.returncode, out, self.err + err

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


@pytest.fixture
def waiters() -> Iterator[list[Waiter]]:
    started: list[Waiter] = []
    yield started
    for waiter in started:
        waiter.close()


def start(waiters: list[Waiter], tmp_path: str, *args: str) -> Waiter:
    waiter = Waiter(tmp_path, *args)
    waiters.append(waiter)
    return waiter


@pytest.fixture
def source(tmp_path: str) -> str:
    """A local image made with umoci (no network): ``SRC:v1`` and ``SRC:v2``."""
    require([t for t in ("skopeo", "umoci") if shutil.which(t) is None], "install them")
    src = os.path.join(tmp_path, "src")
    must("umoci", "init", "--layout", src)
    must("umoci", "new", "--image", f"{src}:v1")
    must("umoci", "config", "--image", f"{src}:v1", "--tag", "v2", "--config.label", "build=2")
    return src


@pytest.mark.interop
def test_wait_returns_when_skopeo_writes_the_layout_into_a_new_directory_tree(
    tmp_path: str, waiters: list[Waiter], source: str
) -> None:
    out_dir = os.path.join(tmp_path, "exports", "team", "app")  # nothing of it exists yet
    waiter = start(waiters, tmp_path, "--timeout", "120", "--json", f"oci-layout://{out_dir}:v1")
    assert "does not exist" in waiter.waiting()
    os.makedirs(os.path.dirname(out_dir))  # the tree appears a level at a time, then the copy lands
    skopeo_copy(f"{source}:v1", f"{out_dir}:v1")
    landed = time.monotonic()
    code, out, err = waiter.result()
    assert code == 0, err
    answer = json.loads(out)
    assert (answer["layout"], answer["digest"]) == (out_dir, skopeo_digest(out_dir, "v1"))
    assert answer["freshness"] == "read-through"  # no database: the layout itself
    assert time.monotonic() - landed < DEADLINE_S
    assert not os.path.exists(os.path.join(tmp_path, "xdg-data", "ocidx"))  # it created no database


@pytest.mark.interop
def test_wait_sees_a_tag_added_to_a_layout_that_exists(tmp_path: str, waiters: list[Waiter], source: str) -> None:
    lay = os.path.join(tmp_path, "lay")
    skopeo_copy(f"{source}:v1", f"{lay}:v1")
    waiter = start(waiters, tmp_path, f"oci-layout://{lay}:v2", "--format", "context")
    assert "v2 not found in" in waiter.waiting()
    skopeo_copy(f"{source}:v2", f"{lay}:v2")  # skopeo rewrites index.json in place
    code, out, err = waiter.result()
    assert code == 0, err
    assert out == f"oci-layout://{lay}@{skopeo_digest(lay, 'v2')}\n"


@pytest.mark.interop
def test_wait_by_name_below_a_layout_that_umoci_creates(tmp_path: str, waiters: list[Waiter], source: str) -> None:
    """oci-layout://PATH/NAME:TAG: the layout is a prefix of the path, made by umoci (rename into place)."""
    lay = os.path.join(tmp_path, "lay")
    waiter = start(waiters, tmp_path, f"oci-layout://{lay}/alpine:3.16")
    waiter.waiting()
    must("umoci", "init", "--layout", lay)
    must("umoci", "new", "--image", f"{lay}:docker.io/library/alpine:3.16")
    code, out, err = waiter.result()
    assert code == 0, err
    assert out.strip() == skopeo_digest(lay, "docker.io/library/alpine:3.16")


def test_wait_sees_a_whole_layout_renamed_into_place_after_a_torn_index(tmp_path: str, waiters: list[Waiter]) -> None:
    target = os.path.join(tmp_path, "out", "app")
    os.makedirs(target)
    with open(os.path.join(target, "index.json"), "w") as f:
        f.write('{"schemaVersion": 2, "manif')  # a writer half-way through: waited out, not an answer
    waiter = start(waiters, tmp_path, "--json", "oci-layout://out/app:v1")  # relative to its directory
    assert "index.json" in waiter.waiting()
    staged = Layout(os.path.join(tmp_path, "staging"))
    image = staged.manifest(label="landed")
    staged.write_index([named(image, ref="v1")])
    shutil.rmtree(target)
    os.rename(staged.path, target)
    code, out, err = waiter.result()
    assert code == 0, err
    assert json.loads(out)["digest"] == image["digest"]


def test_wait_gives_up_after_its_timeout_saying_why(tmp_path: str, waiters: list[Waiter]) -> None:
    lay = Layout(os.path.join(tmp_path, "lay"))
    lay.write_index([named(lay.manifest(), ref="v1")])
    waiter = start(waiters, tmp_path, "--timeout", "0.5", "--json", f"oci-layout://{lay.path}:v2")
    code, out, err = waiter.result()
    assert code == 1
    error = json.loads(out)
    assert error["error"] == "timeout"
    assert "did not resolve within 0.5 s" in error["message"] and "v2 not found" in error["message"]
    assert "waiting for" in err


@pytest.mark.parametrize(
    ("target", "code", "category"),
    [("oci-layout://{lay}:Bad^Tag", 2, "tag_invalid_format"), ("oci-layout://{lay}:3.16", 3, "ambiguous")],
)
def test_what_waiting_cannot_change_ends_the_wait_at_once(
    tmp_path: str, waiters: list[Waiter], target: str, code: int, category: str
) -> None:
    lay = Layout(os.path.join(tmp_path, "lay"))
    lay.write_index([named(lay.manifest(label="a"), ref="a:3.16"), named(lay.manifest(label="b"), ref="b:3.16")])
    waiter = start(waiters, tmp_path, "--json", target.format(lay=lay.path))  # no timeout: it must not wait
    got, out, _err = waiter.result()
    assert (got, json.loads(out)["error"]) == (code, category)


def test_a_bad_platform_or_timeout_is_a_usage_error(tmp_path: str, waiters: list[Waiter]) -> None:
    for args in (["--platform", "linux"], ["--timeout", "-1"], ["--timeout", "nan"]):
        got, _out, err = start(waiters, tmp_path, *args, "oci-layout://x:v1").result()
        assert got == 2, (args, err)


def test_wait_for_a_digest_sees_its_blob_arrive(tmp_path: str, waiters: list[Waiter]) -> None:
    """A digest target is answered by a bare blob of the layout too: its arrival under blobs/ wakes the wait."""
    lay = Layout(os.path.join(tmp_path, "lay"))
    lay.write_index([named(lay.manifest(label="other"), ref="v1")])
    elsewhere = Layout(os.path.join(tmp_path, "elsewhere"))
    image = elsewhere.manifest(label="awaited")
    digest = str(image["digest"])
    waiter = start(waiters, tmp_path, "--json", f"oci-layout://{lay.path}@{digest}")
    assert "not found" in waiter.waiting()
    shutil.copy(elsewhere.blob_path(digest), lay.blob_path(digest) + ".tmp")
    os.rename(lay.blob_path(digest) + ".tmp", lay.blob_path(digest))  # as writers land a blob
    code, out, err = waiter.result()
    assert code == 0, err
    answer = json.loads(out)
    assert (answer["digest"], answer["source"]) == (digest, "blob")


def test_wait_for_a_platform_sees_its_manifest_complete_a_partial_export(tmp_path: str, waiters: list[Waiter]) -> None:
    lay = Layout(os.path.join(tmp_path, "lay"))
    amd64, arm64 = lay.manifest(platform=LINUX_AMD64), lay.manifest(platform=LINUX_ARM64)
    lay.write_index([named(lay.index([amd64, arm64]), ref="v1")])
    with open(lay.blob_path(str(arm64["digest"])), "rb") as f:
        kept = f.read()
    lay.remove_blob(arm64)  # a partial export: index.json names arm64, its blob is not there
    waiter = start(waiters, tmp_path, "--platform", "linux/arm64", f"oci-layout://{lay.path}:v1")
    assert "absent from the layout" in waiter.waiting()
    with open(lay.blob_path(str(arm64["digest"])), "wb") as f:
        f.write(kept)
    code, out, err = waiter.result()
    assert code == 0, err
    assert out.strip() == arm64["digest"]
