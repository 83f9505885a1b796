"""A local stand-in for ``docker://docker.io/library/alpine:3.16``: no network here, so the README's
commands copy from this ``oci:`` layout instead, with the same ``skopeo copy`` commands.

Like Docker Hub's alpine, ``SRC:3.16`` is an OCI image index of two platforms (linux/amd64 and
linux/arm64/v8), each a real image made with umoci; skopeo without ``--all`` copies the one for this
machine's platform, with ``--all`` the index and both.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess

OCI_INDEX = "application/vnd.oci.image.index.v1+json"


class Image:
    """The source layout and the digests the README's lookups must print."""

    def __init__(self, src: str, index: str, platforms: dict[str, str]) -> None:
        self.src = src
        self.source = f"oci:{src}:3.16"  # what replaces docker://docker.io/library/alpine:3.16
        self.index = index  # the digest of the multi-platform index
        self.platforms = platforms  # "linux/amd64": digest of its manifest, ...


def _run(*args: str) -> None:
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"{' '.join(args)}: {done.stderr}"


def build(src: str) -> Image:
    """Write the source layout at *src*."""
    _run("umoci", "init", "--layout", src)
    _run("umoci", "new", "--image", f"{src}:amd64")
    _run("umoci", "config", "--image", f"{src}:amd64", "--os", "linux", "--architecture", "amd64")
    _run("umoci", "new", "--image", f"{src}:arm64")
    _run("umoci", "config", "--image", f"{src}:arm64", "--os", "linux", "--architecture", "arm64")
    index_path = os.path.join(src, "index.json")
    with open(index_path, encoding="utf-8") as f:
        top = json.load(f)
    by_tag = {m["annotations"]["org.opencontainers.image.ref.name"]: m for m in top["manifests"]}
    children = []
    platforms = {}
    for tag, platform in (
        ("amd64", {"architecture": "amd64", "os": "linux"}),
        ("arm64", {"architecture": "arm64", "os": "linux", "variant": "v8"}),
    ):
        descriptor = {k: v for k, v in by_tag[tag].items() if k != "annotations"}
        children.append({**descriptor, "platform": platform})
        platforms["linux/" + tag] = str(descriptor["digest"])
    blob = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": children}).encode()
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    with open(os.path.join(src, "blobs", "sha256", digest.split(":")[1]), "wb") as f:
        f.write(blob)
    top["manifests"].append(
        {
            "mediaType": OCI_INDEX,
            "digest": digest,
            "size": len(blob),
            "annotations": {"org.opencontainers.image.ref.name": "3.16"},
        }
    )
    with open(index_path, "w", encoding="utf-8") as f:
        json.dump(top, f)
    return Image(src, digest, platforms)
