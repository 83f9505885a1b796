"""Platforms: a descriptor's platform, and containerd's rules for comparing two.

Choices where the OCI image specification is silent (docs/semantics.md restates them for users):

* **Platforms** keep the descriptor's strings as written; comparison
  normalizes both sides as containerd's ``platforms.Normalize`` does
  (``arm64/v8`` ≡ ``arm64``: ``v8`` becomes ``""``; ``arm`` → ``v7``;
  ``x86_64`` → ``amd64``) except that an empty OS stays empty (containerd
  would substitute the host's). Matching compares the normalized
  (os, architecture, variant) exactly, as containerd's ``NewMatcher`` does
  (not the more lenient ``Only``, which also accepts older variants):
  ``linux/amd64`` does not match ``linux/amd64/v3``, nor ``linux/arm/v7``
  ``linux/arm/v6``. ``os.version`` and ``os.features`` are kept, not compared.
"""

from __future__ import annotations

from indexer._record import Record
from indexer.errors import UsageError
from indexer.names import quote_value

_PLATFORM_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-"


class Platform(Record):
    """A descriptor's platform, strings as written (``""`` when absent)."""

    __slots__ = ("architecture", "os", "os_features", "os_version", "variant")

    os: str
    architecture: str
    variant: str
    os_version: str
    os_features: tuple[str, ...]

    def __init__(
        self,
        os: str,
        architecture: str,
        variant: str = "",
        os_version: str = "",
        os_features: tuple[str, ...] = (),
    ) -> None:
        self.os = os
        self.architecture = architecture
        self.variant = variant
        self.os_version = os_version
        self.os_features = os_features

    def normalized(self) -> Platform:
        """This platform as containerd normalizes it (see :func:`normalize_platform`)."""
        os_, arch, variant = normalize_platform(self.os, self.architecture, self.variant)
        return Platform(os_, arch, variant, self.os_version, self.os_features)

    def to_json(self) -> dict[str, str | None]:
        """The ``{"os", "architecture", "variant"}`` object of ``--json`` output."""
        return {"os": self.os, "architecture": self.architecture, "variant": self.variant or None}

    def __str__(self) -> str:
        text = f"{self.os}/{self.architecture}"
        return f"{text}/{self.variant}" if self.variant else text


def normalize_platform(os: str, arch: str, variant: str) -> tuple[str, str, str]:
    """(os, architecture, variant) as containerd's ``platforms.Normalize`` makes them."""
    os, arch, variant = os.lower(), arch.lower(), variant.lower()
    if os == "macos":
        os = "darwin"
    if arch == "i386":
        arch, variant = "386", ""
    elif arch in ("x86_64", "x86-64", "amd64"):
        arch = "amd64"
        if variant == "v1":
            variant = ""
    elif arch in ("aarch64", "arm64"):
        arch = "arm64"
        if variant in ("8", "v8", "v8.0"):
            variant = ""
        elif variant in ("9", "9.0", "v9.0"):
            variant = "v9"
    elif arch == "armhf":
        arch, variant = "arm", "v7"
    elif arch == "armel":
        arch, variant = "arm", "v6"
    elif arch == "arm":
        if variant in ("", "7"):
            variant = "v7"
        elif variant in ("5", "6", "8"):
            variant = "v" + variant
    return os, arch, variant


def parse_platform_spec(spec: str) -> Platform:
    """Parse ``OS/ARCH[/VARIANT]`` as given to ``--platform``; :class:`UsageError` when malformed."""
    parts = spec.split("/")
    if not 2 <= len(parts) <= 3 or not all(part and not part.strip(_PLATFORM_CHARS) for part in parts):
        raise UsageError(f"invalid platform {quote_value(spec)}: expected OS/ARCH[/VARIANT], such as linux/arm64/v8")
    return Platform(parts[0], parts[1], parts[2] if len(parts) == 3 else "")


def platform_matches(want: Platform, have: Platform) -> bool:
    """Whether *have* is the platform *want* asks for, both normalized as containerd does."""
    return normalize_platform(want.os, want.architecture, want.variant) == normalize_platform(
        have.os, have.architecture, have.variant
    )
