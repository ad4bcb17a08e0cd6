"""The one /proc parser: status fields by lookup, and capabilities as the host counts them."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from sidecar.proc.read import (
    StatusFields,
    host_caps,
    parse_status,
    parse_status_ids,
    read_host_caps,
)


def by_lines(status: str) -> StatusFields | None:
    """The plain reading: split every line, take the first number of each field."""
    found: dict[str, str] = {}
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in ("PPid", "Uid", "Gid", "CapEff") and value.split():
            found.setdefault(key, value.split()[0])
    if len(found) < 4:
        return None
    return StatusFields(
        int(found["PPid"]), int(found["Uid"]), int(found["Gid"]), int(found["CapEff"], 16)
    )


def test_lookup_reads_what_every_line_says_for_every_process_here() -> None:
    checked = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "status").read_text()
        except OSError:
            continue  # gone meanwhile
        assert parse_status(text) == by_lines(text), entry
        checked += 1
    assert checked > 10


def test_a_name_cannot_pose_as_a_field() -> None:
    """The kernel shows a newline in a name as "\\n": the lookup must not see a field in it."""
    script = "import sys, time; print('ok', flush=True); time.sleep(30)"
    p = subprocess.Popen(
        ["python3", "-c", f"import ctypes; ctypes.CDLL(None).prctl(15, b'x\\nUid:\\t7'); {script}"],
        stdout=subprocess.PIPE,
    )
    try:
        assert p.stdout is not None and p.stdout.readline() == b"ok\n"
        text = Path(f"/proc/{p.pid}/status").read_text()
        assert text.startswith("Name:\tx\\nUid:")  # shown escaped, on the Name line
        fields = parse_status(text)
        assert fields is not None and fields.uid == os.getuid()
    finally:
        p.kill()
        p.wait()


def test_a_missing_or_malformed_field_gives_none() -> None:
    good = "Name:\tx\nPPid:\t1\nUid:\t5\t5\t5\t5\nGid:\t6\t6\t6\t6\nCapEff:\t00000000000000ff"
    assert parse_status(good) == StatusFields(1, 5, 6, 0xFF)  # last line without newline
    assert parse_status_ids(good) == (1, 5, 6)
    for field in ("PPid", "Uid", "Gid", "CapEff"):
        assert parse_status(good.replace(f"\n{field}:", "\nOther:")) is None, field
    assert parse_status(good.replace("Uid:\t5", "Uid:\tfive")) is None
    assert parse_status(good.replace("Uid:\t5\t5\t5\t5", "Uid:")) is None


def test_capabilities_count_on_the_host_only_in_our_user_namespace() -> None:
    me = os.getpid()
    own = parse_status(Path("/proc/self/status").read_text())
    assert own is not None
    assert read_host_caps(me) == own.cap_eff
    assert host_caps(me, 0) == 0
    assert host_caps(me, 0x10) == 0x10
    # A process in a new user namespace holds all capabilities there, none here.
    p = subprocess.Popen(["unshare", "--user", "--map-root-user", "sleep", "30"])
    try:
        for _ in range(100):
            if os.stat(f"/proc/{p.pid}/ns/user").st_ino != os.stat("/proc/self/ns/user").st_ino:
                break
            subprocess.run(["sleep", "0.02"], check=True)
        else:
            pytest.fail("unshare never entered a new user namespace")
        held = parse_status(Path(f"/proc/{p.pid}/status").read_text())
        assert held is not None and held.cap_eff != 0  # root of its own namespace
        assert read_host_caps(p.pid) == 0
        assert host_caps(p.pid, held.cap_eff) == 0
    finally:
        p.kill()
        p.wait()
    assert host_caps(p.pid, 0x10) is None  # gone
