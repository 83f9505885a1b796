"""The operator's recipe: the shipped unit files pass ``systemd-analyze verify``, the example config
loads with absolute roots, docs/operations.md shows exactly the shipped files, and the README's two
opening commands stay first."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

from indexer import config as config_mod

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "docs", "examples")
SYSTEM_UNIT = os.path.join(EXAMPLES, "ocidx.service")
USER_UNIT = os.path.join(EXAMPLES, "ocidx-user.service")
CONFIG = os.path.join(EXAMPLES, "config.toml")


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _blocks(path: str, language: str) -> list[str]:
    """The fenced code blocks of *language* in the Markdown file at *path*, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```$", _read(path), re.S | re.M)


def _systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing in CI")
        pytest.skip("systemd-analyze is not installed")
    return found


def _ocidx_command() -> str:
    """The ``ocidx`` script of the environment running the tests (what pip install . makes)."""
    script = os.path.join(os.path.dirname(sys.executable), "ocidx")
    assert os.access(script, os.X_OK), script
    return script


def _verify(
    tmp_path: str, unit: str, installed_as: str, *, user: bool, ocidx: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``systemd-analyze verify`` on *unit* with its ocidx path replaced by this environment's (or *ocidx*).

    Only the path of the executable changes: verify checks that ExecStart's program exists, and
    /opt/ocidx (or ~/.local/bin) is not installed on a test machine.
    """
    text = _read(unit)
    assert installed_as in text
    copy = os.path.join(tmp_path, "ocidx.service")
    with open(copy, "w", encoding="utf-8") as f:
        f.write(text.replace(installed_as, ocidx or _ocidx_command()))
    env = dict(os.environ)
    if user:  # a user manager needs a runtime directory; a test process may have none
        runtime = os.path.join(tmp_path, "runtime")
        os.mkdir(runtime, 0o700)
        env["XDG_RUNTIME_DIR"] = runtime
    command = [_systemd_analyze(), *(["--user"] if user else []), "verify", copy]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=60, check=False)


def test_the_system_unit_verifies_clean(tmp_path: str) -> None:
    done = _verify(tmp_path, SYSTEM_UNIT, "/opt/ocidx/bin/ocidx", user=False)
    assert (done.returncode, done.stderr, done.stdout) == (0, "", "")


def test_the_user_unit_verifies_clean(tmp_path: str) -> None:
    done = _verify(tmp_path, USER_UNIT, "%h/.local/bin/ocidx", user=True)
    assert (done.returncode, done.stderr, done.stdout) == (0, "", "")


def test_a_broken_unit_is_caught_by_the_same_check(tmp_path: str) -> None:
    broken = os.path.join(tmp_path, "broken.service")
    with open(broken, "w", encoding="utf-8") as f:
        f.write(_read(SYSTEM_UNIT).replace("Type=exec", "Type=exce"))
    os.mkdir(os.path.join(tmp_path, "check"))
    done = _verify(os.path.join(tmp_path, "check"), broken, "/opt/ocidx/bin/ocidx", user=False)
    assert "Failed to parse service type" in done.stderr  # a warning, exit 0: hence stderr must be empty


def test_the_units_do_not_restart_a_bad_config_in_a_loop() -> None:
    for unit in (SYSTEM_UNIT, USER_UNIT):
        text = _read(unit)
        assert "RestartPreventExitStatus=2" in text  # exit 2: bad config or command line
        assert "ExecReload=/bin/kill -HUP $MAINPID" in text  # systemctl reload: SIGHUP re-reads the config
        assert "ConditionPathExists=" in text


def test_the_example_config_loads_with_absolute_paths() -> None:
    config = config_mod.load(CONFIG)
    assert config.roots and all(os.path.isabs(root.path) for root in config.roots)
    assert config.database == "/var/lib/ocidx/index.db"
    unit = _read(SYSTEM_UNIT)
    assert "--config /etc/ocidx/config.toml" in unit and f"--db {config.database}" in unit
    assert not any(root.path.startswith(("/tmp/", "/var/tmp/")) for root in config.roots)  # PrivateTmp


def test_operations_md_shows_exactly_the_shipped_files() -> None:
    doc = os.path.join(REPO, "docs", "operations.md")
    ini = _blocks(doc, "ini")
    same = "docs/operations.md shows {} as it ships: edit both (the unit a user pastes is the one verified)"
    assert _read(SYSTEM_UNIT) in ini, same.format("docs/examples/ocidx.service")
    assert _read(USER_UNIT) in ini, same.format("docs/examples/ocidx-user.service")
    assert _read(CONFIG) in _blocks(doc, "toml"), same.format("docs/examples/config.toml")
    recipe = "\n".join(_blocks(doc, "sh"))
    for step in (
        "python3 -m venv /opt/ocidx",
        "/opt/ocidx/bin/pip install .",
        "useradd --system",
        "install -m 0644 docs/examples/config.toml /etc/ocidx/config.toml",
        "install -m 0644 docs/examples/ocidx.service /etc/systemd/system/ocidx.service",
        "systemd-analyze verify /etc/systemd/system/ocidx.service",
    ):
        assert step in recipe, step


def test_the_readme_opens_with_the_two_commands_and_shows_a_first_lookup() -> None:
    readme = os.path.join(REPO, "README.md")
    blocks = _blocks(readme, "sh")
    assert blocks[:2] == [
        "python3 -m venv .venv && . .venv/bin/activate && pip install . && ocidx daemon --config config.example.toml\n",
        "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[test]' && python -m pytest -q\n",
    ]
    assert "ocidx resolve oci-layout://layouts/alpine:3.16" in blocks[2]
    assert "oci:layouts/alpine:3.16" in blocks[2]
    example = config_mod.load(os.path.join(REPO, "config.example.toml"))
    assert [root.path for root in example.roots] == [os.path.join(REPO, "layouts")]


def _venv_with_ocidx(python: str, venv: str) -> str:
    """A venv made by *python* (no pip: nothing is installed from the network), with an ``ocidx``
    console script as pip writes one (its shebang is the venv's interpreter); the script's path."""
    subprocess.run([python, "-m", "venv", "--without-pip", venv], check=True, capture_output=True, timeout=120)
    script = os.path.join(venv, "bin", "ocidx")
    with open(script, "w", encoding="utf-8") as f:
        f.write(f"#!{venv}/bin/python3\nprint('ocidx 0.1.0')\n")
    os.chmod(script, 0o755)
    return script


def test_the_recipes_runuser_check_catches_a_venv_the_service_user_cannot_run(
    tmp_path: str, request: pytest.FixtureRequest
) -> None:
    """A venv made by an interpreter under a mode-700 home links to it: the service user cannot run
    ocidx, systemd-analyze verify does not see it, and the recipe's runuser check does."""
    runuser = shutil.which("runuser") or next(
        (p for p in ("/usr/sbin/runuser", "/sbin/runuser") if os.access(p, os.X_OK)), None
    )
    if os.geteuid() != 0 or runuser is None:
        pytest.skip("needs root and runuser (util-linux) to run a command as another user")
    recipe = "\n".join(_blocks(os.path.join(REPO, "docs", "operations.md"), "sh"))
    (check,) = [line.split("  #")[0].split() for line in recipe.splitlines() if line.startswith("runuser ")]
    assert check == ["runuser", "-u", "ocidx", "--", "/opt/ocidx/bin/ocidx", "--version"]
    assert "/usr/bin/python3 -m venv /opt/ocidx" in recipe
    # Outside pytest's own temporary directories, which only root may enter: the service user must
    # reach the venv's directory, as it reaches /opt.
    base = tempfile.mkdtemp(prefix="ocidx-venv-")
    request.addfinalizer(lambda: shutil.rmtree(base, ignore_errors=True))
    os.chmod(base, 0o755)
    home = os.path.join(base, "home")
    os.makedirs(os.path.join(home, "bin"))
    os.chmod(home, 0o700)
    private_python = os.path.join(home, "bin", "python3")  # a Python of root's own, as pyenv installs one
    shutil.copy(os.path.realpath("/usr/bin/python3"), private_python)
    bad = _venv_with_ocidx(private_python, os.path.join(base, "opt-bad"))
    good = _venv_with_ocidx("/usr/bin/python3", os.path.join(base, "opt-good"))

    def as_service_user(script: str) -> subprocess.CompletedProcess[str]:
        argv = [script if arg == "/opt/ocidx/bin/ocidx" else "nobody" if arg == "ocidx" else arg for arg in check]
        argv[0] = runuser  # root's PATH has /usr/sbin; a test's may not
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)

    assert as_service_user(good).stdout == "ocidx 0.1.0\n"
    failed = as_service_user(bad)
    assert failed.returncode != 0 and "Permission denied" in failed.stderr
    unit = os.path.join(tmp_path, "unit")
    os.mkdir(unit)
    verified = _verify(unit, SYSTEM_UNIT, "/opt/ocidx/bin/ocidx", user=False, ocidx=bad)
    assert (verified.returncode, verified.stderr) == (0, "")  # verify cannot tell
