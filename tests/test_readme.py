"""The README's commands do what the README says, run as a user runs them: the daemon of its first
command on ``config.example.toml``, then every line of "First lookup" and "Using it" in a shell,
and the fleet section. No network here: ``docker://docker.io/library/alpine:3.16`` is replaced by a
local two-platform stand-in (tests/readme_image.py); everything else runs as written."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import readme_image
from harness import wait_for
from needs import require

pytestmark = [pytest.mark.interop, pytest.mark.integration]

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator

    from pg_cluster import FleetDb

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(CHECKOUT, "README.md")
HUB = "docker://docker.io/library/alpine:3.16"


def _blocks() -> list[str]:
    with open(README, encoding="utf-8") as f:
        return re.findall(r"^```sh\n(.*?)^```$", f.read(), re.S | re.M)


def _section(title: str) -> str:
    """The sh block under the heading *title*."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    after = text.split(f"## {title}\n", 1)[1]
    found = re.search(r"^```sh\n(.*?)^```$", after, re.S | re.M)
    assert found is not None, title
    return found.group(1)


class Shell:
    """Runs README lines in one directory, as a user whose PATH has the installed ``ocidx``."""

    def __init__(self, cwd: str, source: str, env: dict[str, str] | None = None) -> None:
        self.cwd = cwd
        self.source = source
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("OCIDX_")},
            "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
            "XDG_CONFIG_HOME": os.path.join(cwd, ".xdg-config"),
            "XDG_DATA_HOME": os.path.join(cwd, ".xdg-data"),
            **(env or {}),
        }
        self.background: list[subprocess.Popen[bytes]] = []

    def line(self, text: str) -> str:
        """The line as it runs here: the network source replaced, the venv already active."""
        return text.replace(HUB, self.source).replace(". .venv/bin/activate && ", "")

    def run(self, text: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", self.line(text)], cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=120
        )

    def start(self, text: str, log: str) -> subprocess.Popen[bytes]:
        """A line ending in ``&``: started in the background, its output to *log*."""
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                ["bash", "-c", self.line(text).rstrip("& ")],  # bash execs a lone command: the pid is the daemon's
                cwd=self.cwd,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.background.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.background:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _succeeds(shell: Shell, command: str) -> bool:
    return shell.run(command).returncode == 0


def _commands(block: str) -> list[str]:
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


@pytest.fixture
def image(tmp_path: str) -> readme_image.Image:
    require([t for t in ("skopeo", "umoci") if shutil.which(t) is None], "install them")
    return readme_image.build(os.path.join(tmp_path, "hub", "alpine"))


@pytest.fixture
def shell(tmp_path: str, image: readme_image.Image) -> Iterator[Shell]:
    """A checkout as the README expects one: this directory holds config.example.toml."""
    checkout = os.path.join(tmp_path, "checkout")
    os.mkdir(checkout)
    shutil.copy(os.path.join(CHECKOUT, "config.example.toml"), checkout)
    here = Shell(checkout, image.source)
    yield here
    here.stop()


def test_the_readme_from_the_daemon_to_every_lookup(shell: Shell, image: readme_image.Image) -> None:
    first, tests = _blocks()[:2]
    assert first.rstrip().endswith("ocidx daemon --config config.example.toml")
    log = os.path.join(shell.cwd, "daemon.log")
    daemon = shell.start(first.rstrip().split(" && ")[-1], log)  # the venv and pip install are this one's
    wait_for(lambda: "ready:" in _read(log) or daemon.poll() is not None, "the daemon says ready")
    assert daemon.poll() is None, _read(log)
    assert "does not exist" in _read(log)  # "It logs that layouts does not exist yet"
    layouts = os.path.join(shell.cwd, "layouts")

    # First lookup
    copy, resolve, find = _commands(_section("First lookup"))
    assert shell.run(copy).returncode == 0
    done = shell.run(resolve)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [image.platforms["linux/amd64"]]  # this machine's platform, not the index
    assert done.stdout.split() != [image.index]
    wait_for(lambda: f"changed: {layouts}/alpine" in _read(log), "the daemon logs the new layout")
    done = shell.run(find)
    assert done.returncode == 0, done.stderr
    assert [line.split("\t")[:2] for line in done.stdout.splitlines()] == [
        [f"{layouts}/alpine", image.platforms["linux/amd64"]]
    ]
    done = shell.run("ocidx find alpine:3.16")  # what the README says of a name here
    assert done.returncode == 1 and "ocidx find :3.16" in done.stderr

    # Using it: each line as written, with what its comment says
    outputs = {}
    for command in _commands(_section("Using it")):
        done = shell.run(command)
        outputs[command.split("  #")[0].strip()] = done
        if command.startswith("ocidx lint"):
            assert done.returncode in (0, 1), (command, done.stderr)  # 1: findings, printed
            assert "layouts/app" in done.stdout
        else:
            assert done.returncode == 0, (command, done.stderr)
    amd64, arm64 = image.platforms["linux/amd64"], image.platforms["linux/arm64"]

    def out(prefix: str) -> str:
        """The output of the one command that is *prefix*, or starts with it and a space."""
        (found,) = [o.stdout for c, o in outputs.items() if c == prefix or c.startswith(prefix + " ")]
        return found

    assert out("ocidx resolve oci-layout://layouts/app:3.16").split() == [amd64]
    assert out("ocidx resolve oci-layout://layouts/app/alpine:3.16").split() == [amd64]
    assert out("ocidx resolve --layout layouts/app").strip() == f"oci-layout://{layouts}/app@{amd64}"
    multi = [
        (c, o.stdout.split()) for c, o in outputs.items() if c.startswith("ocidx resolve oci-layout://layouts/multi")
    ]
    assert multi == [
        ("ocidx resolve oci-layout://layouts/multi:3.16", [image.index]),  # the index, with --all
        ("ocidx resolve oci-layout://layouts/multi:3.16 --platform linux/arm64", [arm64]),
    ]
    assert [line.split("\t")[0] for line in out("ocidx find alpine:3.16").splitlines()] == [f"{layouts}/app"]
    assert "docker.io/library/alpine:3.16\t(familiar)" in out("ocidx ls layouts/app")
    assert json.loads(out("ocidx ref --json"))[0]["canonical"] == "docker.io/library/alpine:3.16"
    batch = [json.loads(line) for line in out("printf").splitlines()]
    assert [(b["target"], b["digest"]) for b in batch] == [
        ("oci-layout://layouts/alpine:3.16", amd64),
        ("oci-layout://layouts/app:3.16", amd64),
    ]
    assert out("ocidx wait").split() == [amd64]
    assert tests.rstrip().endswith("python -m pytest -q")


@pytest.mark.fleet
def test_the_readme_fleet_section(fleet_db: FleetDb, tmp_path: str, image: readme_image.Image) -> None:
    """The fleet block as written, less the lines that start PostgreSQL (the session's cluster stands
    for the one initdb and pg_ctl make) and with its DSNs pointed at that cluster."""
    block = _section("The fleet: one index across many hosts (optional)")
    here = os.path.join(tmp_path, "fleet")
    os.mkdir(here)
    shell = Shell(here, image.source)
    admin, fleet_tmp = fleet_db.admin_dsn, os.path.join(tmp_path, "fleet-tmp")
    os.mkdir(fleet_tmp)
    try:
        ran = []
        for command in _commands(block):
            if command.startswith(("pip install", "/usr/lib/postgresql/")):
                assert "initdb" in command or "pg_ctl" in command or "[fleet]" in command
                continue
            command = (
                command.replace("host=/tmp dbname=postgres user=admin", admin)
                .replace("host=/tmp dbname=postgres user=host-a", fleet_db.dsn("host-a"))
                .replace("host=/tmp dbname=postgres user=host-b", fleet_db.dsn("host-b"))
                .replace("/tmp/fleet-", fleet_tmp + "/fleet-")
            )
            if command.startswith("export "):
                name, _, value = command.removeprefix("export ").split("  #")[0].strip().partition("=")
                shell.env[name] = value.strip('"')
                continue
            if command.rstrip().endswith("&"):
                shell.start(command, os.path.join(here, f"daemon-{len(shell.background)}.log"))
                continue
            if command.startswith("ocidx find --fleet"):  # published within about a second
                wait_for(functools.partial(_succeeds, shell, command), "find --fleet finds it", 60)
            done = shell.run(command)
            assert done.returncode == 0, (command, done.stderr)
            ran.append((command, done.stdout))
        (found,) = [out for command, out in ran if command.startswith("ocidx find --fleet")]
        rows = [line.split("\t") for line in found.splitlines()]
        assert [(r[0], r[1], r[2]) for r in rows] == [
            ("host-a", f"{fleet_tmp}/fleet-a/app", image.platforms["linux/amd64"])
        ]
        (hosts,) = [out for command, out in ran if command.startswith("ocidx hosts")]
        assert [line.split("\t")[:2] for line in hosts.splitlines()] == [["host-a", "live"], ["host-b", "live"]]
    finally:
        shell.stop()
