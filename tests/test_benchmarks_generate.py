"""The benchmark generator: deterministic from its seed, and its layouts are ones ocidx reads."""

from __future__ import annotations

import json
import os

from benchmarks import generate as gen
from indexer.layout import read_layout

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path


def _files(root: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _dirs, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = fh.read()
    return out


def test_same_seed_writes_the_same_bytes_and_another_seed_does_not(tmp_path: Path) -> None:
    a = gen.generate_tree(str(tmp_path / "a"), 30, "7")
    b = gen.generate_tree(str(tmp_path / "b"), 30, "7")
    c = gen.generate_tree(str(tmp_path / "c"), 30, "8")
    files_a, files_b = _files(a.root), _files(b.root)
    assert files_a == files_b
    assert (a.entries, a.names, a.files) == (b.entries, b.names, b.files)
    assert len(files_a) == a.files
    index = os.path.join("g000", "l00000", "index.json")
    assert _files(c.root)[index] != files_a[index]


def test_every_layout_parses_with_the_names_and_children_it_was_built_with(tmp_path: Path) -> None:
    info = gen.generate_tree(str(tmp_path / "tree"), 60, "1")
    images = gen.ImageCache()
    hows: set[str] = set()
    nested = children = partial = 0
    for number, path in enumerate(info.layouts):
        model = gen.build_layout("1", number, images)
        snapshot = read_layout(path)
        assert len(snapshot.entries) == model.entries
        assert sum(len(e.names) for e in snapshot.entries) == model.expected_names
        assert not any(e.invalid_names for e in snapshot.entries)
        hows.update(n.how for e in snapshot.entries for n in e.names)
        nested += len(model.nested)
        children += len(snapshot.children)
        missing = [w for w in snapshot.warnings if "partial export" in w]
        partial += len(missing)
        # Only missing blobs of partial exports are reported; nothing else is wrong with the layout.
        assert len(missing) == len(snapshot.warnings)
    assert hows == {"containerd", "tag-only", "full", "familiar"}
    assert nested > 0
    assert children >= 2 * nested - 2 * partial
    assert partial > 0
    assert info.names / len(info.layouts) > 5


def test_huge_layout_has_one_entry_with_the_target_tag_at_its_end(tmp_path: Path) -> None:
    path = str(tmp_path / "huge")
    names = gen.generate_huge(path, 500, "1", target_tag="bench-target")
    snapshot = read_layout(path)
    assert len(snapshot.entries) == 500
    assert sum(len(e.names) for e in snapshot.entries) == names
    with open(os.path.join(path, "index.json"), "rb") as fh:
        manifests = json.load(fh)["manifests"]
    tagged = [m for m in manifests if m.get("annotations", {}).get(gen.REF_NAME) == "bench-target"]
    assert tagged == [manifests[-1]]
    digest = str(tagged[0]["digest"])
    assert os.path.exists(os.path.join(path, "blobs", "sha256", digest.partition(":")[2]))
