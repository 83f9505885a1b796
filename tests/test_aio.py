"""``AsyncIndex``: the lookups from an event loop, under asyncio and trio (anyio's pytest plugin runs
each test on both), without blocking the loop."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import anyio
import anyio.lowlevel
import pytest
from layouts import LINUX_AMD64, LINUX_ARM64, Layout, named

from indexer import AsyncIndex, Index, LayoutNotFound, NotFound, UsageError, WaitTimeout
from indexer.config import Config

pytestmark = pytest.mark.anyio
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    if request.param == "trio":
        pytest.importorskip("trio")
    return str(request.param)


@pytest.fixture
def indexed(tmp_path: str) -> tuple[str, Layout, dict[str, object]]:
    """A scanned root with one layout (``v1``: an index for two platforms), and the database."""
    root = os.path.join(tmp_path, "root")
    lay = Layout(os.path.join(root, "lay"))
    index = lay.index([lay.manifest(platform=LINUX_AMD64), lay.manifest(platform=LINUX_ARM64)])
    lay.write_index([named(index, ref="v1"), named(lay.manifest(label="two"), ref="v2")])
    db = os.path.join(tmp_path, "index.db")
    done = subprocess.run(
        [sys.executable, "-m", "indexer", "scan", "--db", db, "--no-progress", root],
        env={**os.environ, "PYTHONPATH": CHECKOUT},
        capture_output=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return db, lay, index


async def test_the_lookups_answer_as_index_does(indexed: tuple[str, Layout, dict[str, object]]) -> None:
    db, lay, index_descriptor = indexed
    target = f"oci-layout://{lay.path}:v1"
    with Index(db, config=Config()) as sync:
        expected = sync.resolve(target, platform="linux/arm64")
        found = sync.find(":v1")
        detail = sync.layout_detail(lay.path)
    async with AsyncIndex(db, config=Config()) as index:
        assert await index.resolve(target, platform="linux/arm64") == expected
        assert (await index.resolve_in(lay.path, ":v1")).digest == index_descriptor["digest"]
        assert await index.find(":v1") == found
        assert await index.layout_detail(lay.path) == detail
        assert [row["layout"] for row in await index.layouts()] == [lay.path]
        assert (await index.status())["layouts"] == 1
        (_t, first), (_u, second) = await index.resolve_many([target, f"oci-layout://{lay.path}:v9"])
        assert first == sync_answer(db, target) and isinstance(second, NotFound)
        ((_r, matches),) = await index.find_many([":v2"])
        assert not isinstance(matches, Exception) and len(matches) == 1
        with pytest.raises(LayoutNotFound):
            await index.resolve(f"oci-layout://{lay.path}-gone:v1")


def sync_answer(db: str, target: str) -> object:
    with Index(db, config=Config()) as sync:
        return sync.resolve(target)


async def test_many_tasks_at_once_share_the_pool_across_threads(indexed: tuple[str, Layout, dict[str, object]]) -> None:
    """100 lookups from 100 tasks: each connection passes from one worker thread to another, never
    used by two at once; every answer is right and no more connections are opened than the limit."""
    db, lay, descriptor = indexed
    threads: set[int] = set()
    answers: list[str] = []
    async with AsyncIndex(db, config=Config(), concurrency=3) as index:

        async def one(number: int) -> None:
            answer = await index.resolve(f"oci-layout://{lay.path}:v1" if number % 2 else f"oci-layout://{lay.path}")
            threads.add(threading.get_ident())
            answers.append(answer.digest)

        async def lookup(number: int) -> None:
            try:
                await one(number)
            except NotFound:  # oci-layout://PATH means :latest, which this layout does not hold
                answers.append("not found")

        async with anyio.create_task_group() as tasks:
            for number in range(100):
                tasks.start_soon(lookup, number)
        assert len(index._idle) <= 3
    assert sorted(set(answers)) == sorted({str(descriptor["digest"]), "not found"})
    assert answers.count("not found") == 50


async def test_wait_runs_on_the_loop_while_another_task_writes_the_layout(tmp_path: str) -> None:
    """The wait awaits the inotify descriptor: the writer task on the same loop runs meanwhile (a wait
    that blocked the loop would never see the layout, and the deadline would fail the test)."""
    target_dir = os.path.join(tmp_path, "exports", "app")
    written: list[str] = []

    async def writer() -> None:
        while not index._idle:  # the wait's first check ran (its Index is back in the pool): nothing yet
            await anyio.lowlevel.checkpoint()
        os.makedirs(os.path.dirname(target_dir))
        lay = Layout(target_dir)
        image = lay.manifest(label="landed")
        lay.write_index([named(image, ref="v1")])
        written.append(str(image["digest"]))

    async with AsyncIndex(os.path.join(tmp_path, "none.db"), config=Config()) as index:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(writer)
                answer = await index.wait(f"oci-layout://{target_dir}:v1")
        assert [answer.digest] == written
        assert answer.freshness == "read-through"
        with pytest.raises(WaitTimeout, match=r"did not resolve within 0\.05 s: .* not found"):
            await index.wait(f"oci-layout://{target_dir}:v2", timeout=0.05)
        with anyio.move_on_after(0.05) as scope:  # cancelled like any task; its watches are closed
            await index.wait(f"oci-layout://{target_dir}:v3")
        assert scope.cancelled_caught


async def test_bad_arguments_and_a_closed_index_are_usage_errors(tmp_path: str) -> None:
    index = AsyncIndex(os.path.join(tmp_path, "none.db"), config=Config())
    with pytest.raises(UsageError, match="timeout must be"):
        await index.wait("oci-layout://x:v1", timeout=-1)
    with pytest.raises(UsageError, match=r"resolve_in\(layout, ref\) or find\(ref\)"):  # arguments, not flags
        await index.resolve("alpine:3.16")
    await index.aclose()
    with pytest.raises(UsageError, match="closed"):
        await index.resolve("oci-layout://x:v1")
    with pytest.raises(UsageError, match="concurrency"):
        AsyncIndex(config=Config(), concurrency=0)
