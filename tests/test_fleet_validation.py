"""Readers validate every row of the fleet: one host's malformed rows never hide another host's answers.

Host ``mallory`` holds rows a publisher never writes: JSON columns that are not what the writer
encodes (a list for annotations, a number for a platform's os, text cut in half, nesting deeper than
any parser goes, a 5,000-digit number), a digest that tries to leave ``blobs/``, a negative size,
paths that are relative, hold a NUL or a ``..``, names and tags outside the grammar, a way of reading
a name ocidx does not know, negative counts. They get there two ways: sent by the host through the
fleet's publishing functions (which keep a host to its own rows but do not judge what it says about
them), and planted by the tables' owner (a restore, a hand edit). Either way ``find --fleet`` and
``hosts`` answer for every other host exactly as before, drop mallory's malformed rows with a warning
naming mallory, and never end in a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from cli_run import ANSWER_KEYS, ocidx
from fleet_hosts import alpine, local_answers, start_host, wait_converged
from harness import REPO, Daemon
from layouts import Layout
from needs import module
from pg_cluster import FleetDb, admin_connect, pg_rows, sqlite_rows

psycopg = module("psycopg", "pip install 'ocidx[fleet]'")

pytestmark = [pytest.mark.fleet, pytest.mark.integration]

INDEX = "application/vnd.oci.image.index.v1+json"
GOOD_ANNOTATIONS = '{"org.opencontainers.image.ref.name": "3.16"}'
CHILD = "sha256:" + "c" * 64
SHARED = "shared"  # stands for the digest host h1's alpine:3.16 index has: mallory's rows claim it too

# Each entry in a layout of its own, named :3.16 (a tag-only name), its digest h1's unless said otherwise.
BAD_ENTRIES: dict[str, dict[str, object]] = {
    "annotations_list": {"annotations": "[1, 2]"},
    "annotation_number": {"annotations": '{"a": 1}'},
    "annotations_cut": {"annotations": '{"a": '},
    "annotations_deep": {"annotations": "[" * 100_000},
    "annotations_huge_number": {"annotations": '{"a": 1' + "0" * 5000 + "}"},
    "platform_string": {"platform": '"linux"'},
    "platform_os_number": {"platform": '{"architecture": "amd64", "os": 7, "variant": null}'},
    "invalid_names_object": {"invalid_names": '{"x": 1}'},
    "warnings_numbers": {"warnings": "[1]"},
    "size_negative": {"size": -5},
    "digest_traversal": {"digest": "sha256:../../etc/passwd"},
}
# Layouts whose entry and name are good, but not their path.
BAD_PATHS = {"relative": b"srv/x", "nul": b"/srv/a\x00b", "dotdot": b"/srv/../etc", "double_slash": b"//srv/x"}
# Layouts whose entry is good, but not its name: the entry is answered without it, with a warning.
BAD_NAMES = {"name_invalid": ("Not A Name!", "3.16", "tag-only"), "how_unknown": ("", "3.16", "bogus")}
DROPPED_BY_TAG = len(BAD_ENTRIES) + len(BAD_PATHS) + len(BAD_NAMES)


def own_digest(n: int) -> str:
    return f"sha256:{n:064x}"


def mallory_rows(shared: str) -> dict[str, list[list[object]]]:
    """Mallory's rows, by table, columns in the order of ocidx.put_layouts and ocidx.put_rows (paths as bytes)."""
    rows: dict[str, list[list[object]]] = {"layouts": [], "entries": [], "names": [], "children": []}

    def layout(path: bytes, entry: dict[str, object], name: tuple[str, str, str] = ("", "3.16", "tag-only")) -> int:
        lid = len(rows["layouts"]) + 1
        rows["layouts"].append([lid, path, 1, "ok", None, None, None, 1])
        e = {
            "digest": own_digest(lid),
            "media_type": INDEX,
            "size": 100,
            "platform": None,
            "annotations": GOOD_ANNOTATIONS,
            "invalid_names": None,
            "warnings": None,
            **entry,
        }
        if e["digest"] == SHARED:
            e["digest"] = shared
        rows["entries"].append(
            [
                lid,
                0,
                e["digest"],
                e["media_type"],
                e["size"],
                e["platform"],
                e["annotations"],
                e["invalid_names"],
                e["warnings"],
            ]
        )
        rows["names"].append([lid, 0, 0, *name])
        return lid

    good = layout(b"/srv/mallory/good", {})
    rows["children"].append([good, 0, 0, own_digest(good), 1, CHILD, INDEX, 10, "[]", "{}"])  # a platform list
    for label, entry in BAD_ENTRIES.items():
        layout(f"/srv/mallory/{label}".encode(), {"digest": SHARED, **entry})
    for path in BAD_PATHS.values():
        layout(path, {})
    for label, name in BAD_NAMES.items():
        layout(f"/srv/mallory/{label}".encode(), {}, name)
    rows["layouts"][-1][7] = -1000  # its entry count: mallory's entries add up to less than none
    return rows


def send_through_functions(dsn: str, rows: dict[str, list[list[object]]]) -> None:
    """Mallory, a registered host, sends its rows the only way it can: through the publishing functions."""
    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
        layouts = rows["layouts"]
        conn.execute(
            "SELECT ocidx.put_layouts(%s::bigint[], %s::bytea[], %s::bigint[], %s::text[], %s::text[], %s::text[], "
            "%s::text[], %s::integer[])",
            [[row[i] for row in layouts] for i in range(8)],
        )
        conn.execute(
            "SELECT ocidx.put_rows(%s, %s, %s, '[]')",
            (json.dumps(rows["entries"]), json.dumps(rows["names"]), json.dumps(rows["children"])),
        )
        conn.execute("SELECT ocidx.beat(-3, 1, 1, 'mallory-index')")


def plant_as_owner(admin_dsn: str, rows: dict[str, list[list[object]]]) -> None:
    """The same rows written by the tables' owner (a restore, a hand edit), which nothing checks."""
    with admin_connect(admin_dsn) as conn:
        conn.execute(
            "INSERT INTO layouts (host, id, path, version, state, error_category, error, content_hash, entry_count) "
            "SELECT 'mallory', * FROM unnest(%s::bigint[], %s::bytea[], %s::bigint[], %s::text[], %s::text[], "
            "%s::text[], %s::text[], %s::integer[])",
            [[row[i] for row in rows["layouts"]] for i in range(8)],
        )
        conn.cursor().executemany(
            "INSERT INTO entries (host, layout_id, position, digest, media_type, size, platform, annotations, "
            "invalid_names, warnings) VALUES ('mallory', %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            rows["entries"],
        )
        conn.cursor().executemany(
            "INSERT INTO names (host, layout_id, entry_position, ordinal, name, tag, how) "
            "VALUES ('mallory', %s, %s, %s, %s, %s, %s)",
            rows["names"],
        )
        conn.cursor().executemany(
            "INSERT INTO children (host, layout_id, entry_position, position, parent, depth, digest, media_type, "
            "size, platform, annotations) VALUES ('mallory', %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            rows["children"],
        )
        conn.execute("INSERT INTO heartbeats (host, backlog) VALUES ('mallory', -3)")
        conn.commit()


@pytest.mark.parametrize("writer", ["host_through_functions", "owner"])
def test_a_hosts_malformed_rows_are_dropped_with_a_warning_and_hide_no_other_host(
    writer: str,
    fleet_db: FleetDb,
    daemons: list[Daemon],
    base: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h1 = start_host(daemons, fleet_db, base, "h1")
    lay = Layout(os.path.join(h1.roots[0], "a"))
    index = alpine(lay, "one")
    lay.write_index([index])
    wait_converged(fleet_db, "h1", h1)
    h1_rows = pg_rows(fleet_db.admin_dsn, "h1")
    mallory = fleet_db.add_host("mallory")
    rows = mallory_rows(str(index["digest"]))
    if writer == "owner":
        plant_as_owner(fleet_db.admin_dsn, rows)
    else:
        send_through_functions(mallory, rows)
    assert pg_rows(fleet_db.admin_dsn, "h1") == h1_rows  # whatever mallory sent, h1's rows are h1's
    monkeypatch.setenv("OCIDX_FLEET_DSN", fleet_db.add_reader("dash"))

    def mine(answers: list[dict[str, object]], host: str) -> list[dict[str, object]]:
        return [{k: v for k, v in a.items() if k in ANSWER_KEYS} for a in answers if a["host"] == host]

    # By tag: h1's answer as h1 answers it; mallory's good rows answered, its malformed ones dropped.
    code, out, err = ocidx(capsys, "find", "--fleet", "--json", ":3.16")
    assert code == 0, err
    answers = json.loads(out)
    assert mine(answers, "h1") == local_answers(h1, ":3.16")
    assert {a["layout"]: a["warnings"] for a in answers if a["host"] == "mallory"} == {
        "/srv/mallory/good": [],
        "/srv/mallory/name_invalid": ["host mallory published 1 malformed row for this layout: dropped"],
        "/srv/mallory/how_unknown": ["host mallory published 1 malformed row for this layout: dropped"],
    }
    assert [a["names"] for a in answers if a["layout"] == "/srv/mallory/name_invalid"] == [[]]
    assert f"ocidx: warning: host mallory: {DROPPED_BY_TAG} malformed rows dropped (the first: " in err
    assert "h1" not in err

    # By digest: the entries that claim h1's digest are all malformed; h1's answer stands alone.
    code, out, err = ocidx(capsys, "find", "--fleet", "--json", f"@{index['digest']}")
    assert code == 0, err
    assert mine(json.loads(out), "h1") == local_answers(h1, f"@{index['digest']}")
    assert [a["host"] for a in json.loads(out)] == ["h1"]
    assert f"host mallory: {len(BAD_ENTRIES) - 1} malformed rows dropped" in err

    # A child manifest with a malformed platform: not answered, and said so.
    code, _out, err = ocidx(capsys, "find", "--fleet", f"@{CHILD}")
    assert code == 1
    assert "host mallory: 1 malformed row dropped (the first: children: platform" in err

    # hosts: mallory's counts that cannot be are unknown, and said so; h1's are as they are.
    code, out, err = ocidx(capsys, "hosts", "--json")
    assert code == 0, err
    by_host = {h["host"]: h for h in json.loads(out)}
    assert (by_host["h1"]["layouts"], by_host["h1"]["entries"], by_host["h1"]["backlog"]) == (1, 1, 0)
    assert (by_host["mallory"]["entries"], by_host["mallory"]["backlog"]) == (None, None)
    assert "host mallory: 2 malformed rows dropped" in err

    # The same from a process of its own: exit codes, and no traceback anywhere.
    env = {**os.environ}
    for argv, want in ((["find", "--fleet", ":3.16"], 0), (["find", "--fleet", f"@{CHILD}"], 1), (["hosts"], 0)):
        done = subprocess.run(
            [sys.executable, "-m", "indexer", *argv], capture_output=True, text=True, env=env, cwd=REPO, timeout=60
        )
        assert done.returncode == want, done.stderr
        assert "Traceback" not in done.stderr and "host mallory" in done.stderr
    assert sqlite_rows(h1.db)["layouts"]  # h1 was never touched


def test_a_host_cannot_send_rows_for_another_hosts_layout(fleet_db: FleetDb) -> None:
    """The functions take no host: every row a host sends is its own, and must hang on a layout of its own."""
    fleet_db.add_host("h1")
    with psycopg.connect(fleet_db.dsn("h1"), autocommit=True) as conn:
        conn.execute(
            "SELECT ocidx.put_layouts(ARRAY[1]::bigint[], ARRAY['/srv/h1'::bytea], ARRAY[1]::bigint[], ARRAY['ok'], "
            "ARRAY[NULL]::text[], ARRAY[NULL]::text[], ARRAY[NULL]::text[], ARRAY[0])"
        )
    before = pg_rows(fleet_db.admin_dsn, "h1")
    mallory = fleet_db.add_host("mallory")
    entry = json.dumps([[1, 0, own_digest(1), INDEX, 1, None, "{}", None, None]])  # h1's layout id
    with psycopg.connect(mallory, autocommit=True) as conn, pytest.raises(psycopg.errors.ForeignKeyViolation):
        conn.execute("SELECT ocidx.put_rows(%s, '[]', '[]', '[]')", (entry,))
    assert pg_rows(fleet_db.admin_dsn, "h1") == before
    assert pg_rows(fleet_db.admin_dsn, "mallory")["entries"] == []
