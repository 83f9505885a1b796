"""What a pass keeps of the manifests it read: graph keys, packed pairs, shapes, and what was sent.

* **Read once per pass.** In a scan, each worker process reads a manifest or config from the first
  layout of the pass that holds it, sends its rows once (the index stores them once per host), and
  keeps only its :class:`Shape` (what a layout needs of it: the keys and sizes it references) for
  every later layout (:class:`Known`). Only a read whose hash matched is kept, so a forged or
  truncated copy in one layout never reaches another layout's rows; a later layout's copy of a
  digest already read is trusted by its name, as its layers are (they are never read).
* **Keys.** A layout's references, the blobs it holds and what it misses are counted by
  :func:`graph_key` (the first 63 bits of a digest): two digests sharing a key would count as one
  (a chance of 2**-63 per pair, and a forged name can only confuse its own layout's figures);
  ``ocidx gc`` then keeps a blob it could have removed, never the reverse.
"""

from __future__ import annotations

import collections
import sys
from array import array

from indexer._record import Record
from indexer.graph.manifests import IMAGE_CONFIG_TYPES

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NamedTuple

    from indexer.graph.manifests import Manifest

if TYPE_CHECKING:

    class Shape(NamedTuple):
        """What a layout needs of a manifest or index whose rows are sent (:class:`Known`)."""

        pairs: bytes
        config: str | None
        image_config: bool
        external: tuple[int, ...]
        algorithms: tuple[str, ...]
        complete: bool
        warnings: tuple[str, ...]

else:
    # ``pairs``: the graph key and size of its config (first) and each layer, packed (:func:`pack_pairs`);
    # ``config``: the digest of its image config while that config's rows are not sent (then None);
    # ``image_config``: whether its config is an image config (OCI or Docker); ``external``: the keys
    # of its layers with ``urls``; ``algorithms``: those of the digests it references. A hundred
    # thousand of these per worker in a pass: a few hundred bytes each, where a parse took 2.8 KB.
    Shape = collections.namedtuple(
        "Shape", ("pairs", "config", "image_config", "external", "algorithms", "complete", "warnings")
    )


def graph_key(digest: str) -> int:
    """The key of *digest* in the graph's tables and a layout's figures: its first 63 bits (the rows
    keep the digest, which every lookup compares, so two digests sharing a key can cost an answer its
    graph, never mix)."""
    if digest.startswith("sha256:"):
        return int(digest[7:23], 16) >> 1
    return int(digest[digest.index(":") + 1 :][:16], 16) >> 1


def hex_keys(hexes: list[str]) -> list[int]:
    """:func:`graph_key` of each digest's hex part (a listing's names), in a few C calls."""
    packed = array("Q", bytes.fromhex("".join([text[:16] for text in hexes])))
    if sys.byteorder == "little":
        packed.byteswap()  # the hex is big-endian: its first 16 digits read as one number
    return [key >> 1 for key in packed]


def pack_pairs(pairs: list[int]) -> bytes:
    """Integers (keys, sizes) as native int64s; :func:`unpack_pairs` reads them back."""
    return array("q", pairs).tobytes()


def unpack_pairs(data: bytes | None) -> list[int]:
    """The integers :func:`pack_pairs` packed (none for None)."""
    found = array("q")
    if data:
        found.frombytes(data)
    return found.tolist()


class Known(Record):
    """What one process has read and sent in one pass, by :func:`graph_key`: the :class:`Shape` of each
    manifest and index whose row it sent, and the warnings of each config whose row it sent.

    Filled only where the rows are made (``store.rows.graph_rows``), so a key here is a row sent:
    a later layout holding that digest claims the row instead of reading the blob again.
    """

    __slots__ = ("configs", "manifests")

    manifests: dict[int, Shape]
    configs: dict[int, tuple[str, ...]]

    def __init__(self) -> None:
        self.manifests = {}
        self.configs = {}


_SHA256 = ("sha256",)


def manifest_shape(manifest: Manifest) -> Shape:
    """The :class:`Shape` of a parsed manifest or index."""
    config = manifest.config
    refs = (config, *manifest.layers) if config is not None else manifest.layers
    pairs: list[int] = []
    external: list[int] = []
    algorithms: tuple[str, ...] = _SHA256
    for ref in refs:
        key = graph_key(ref.digest)
        pairs += (key, ref.size)
        if ref.external:
            external.append(key)
        if not ref.digest.startswith("sha256:"):
            algorithms = tuple(sorted({*algorithms, ref.digest.partition(":")[0]}))
    image_config = config is not None and config.media_type in IMAGE_CONFIG_TYPES
    return Shape(
        pack_pairs(pairs),
        config.digest if image_config and config is not None else None,
        image_config,
        tuple(external),
        algorithms if refs else (),
        manifest.complete,
        manifest.warnings,
    )
