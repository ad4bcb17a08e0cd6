"""Attesting real processes: copies of real binaries started in tmp_path.

No root needed: the test only inspects its own children.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from sidecar.attest import (
    Attestor,
    Entries,
    HashCache,
    boot_id,
    gather,
    load_entries_text,
    read_start_time,
)
from sidecar.attest import facts as facts_mod
from sidecar.attest.facts import ExecSeen
from sidecar.kernel import abi
from sidecar.proc.read import kernel_dev
from sidecar.util.errors import AttestationError

UID = os.getuid()
HEADER = """\
apiVersion: sidecar/v1
kind: RegistrationEntries
trustDomain: example.org
entries:
"""


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def entries(*items: tuple[str, list[str]]) -> Entries:
    body = "".join(f"  - spiffeId: {sid}\n    selectors: {sels}\n" for sid, sels in items)
    body = body or "  []\n"
    return load_entries_text(HEADER + body.replace("'", ""), "test.yaml")


class Procs:
    """Starts long-running children and always kills and reaps them."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str | Path]) -> subprocess.Popen[bytes]:
        # Popen returns once the exec has succeeded, so /proc shows the new image.
        p = subprocess.Popen([str(a) for a in argv], stdin=subprocess.PIPE)
        self.started.append(p)
        return p

    def close(self) -> None:
        for p in self.started:
            if p.poll() is None:
                p.kill()
            p.wait()
            if p.stdin:
                p.stdin.close()


@pytest.fixture
def procs() -> Iterator[Procs]:
    ps = Procs()
    try:
        yield ps
    finally:
        ps.close()


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    d = tmp_path / "bin"
    d.mkdir()
    return d


def copy_binary(name: str, dest: Path) -> Path:
    src = shutil.which(name)
    assert src is not None, f"{name} not installed"
    shutil.copy2(src, dest)
    return dest.resolve()


def test_process_matching_uid_and_sha256_gets_the_identity(bin_dir: Path, procs: Procs) -> None:
    sleep = copy_binary("sleep", bin_dir / "sleep")
    attestor = Attestor(
        entries(
            (
                "spiffe://example.org/agent/bot",
                [f"unix:uid:{UID}", f"unix:sha256:{sha256_file(sleep)}"],
            )
        )
    )
    p = procs.start([sleep, "60"])
    result = attestor.attest(p.pid)
    assert result.spiffe_id == "spiffe://example.org/agent/bot"
    assert result.match is not None
    assert [str(s) for s in result.match.selectors] == [
        f"unix:uid:{UID}",
        f"unix:sha256:{sha256_file(sleep)}",
    ]
    assert result.facts.pid == p.pid
    assert result.facts.exe_path == str(sleep)
    assert result.entries_digest == attestor.entries.digest


def test_other_binary_under_the_same_uid_gets_no_identity(bin_dir: Path, procs: Procs) -> None:
    sleep = copy_binary("sleep", bin_dir / "sleep")
    cat = copy_binary("cat", bin_dir / "cat")
    attestor = Attestor(
        entries(
            (
                "spiffe://example.org/agent/bot",
                [f"unix:uid:{UID}", f"unix:sha256:{sha256_file(sleep)}"],
            )
        )
    )
    p = procs.start([cat])  # waits on its stdin pipe
    result = attestor.attest(p.pid)
    assert result.match is None
    assert result.facts.uid == UID
    assert result.facts.sha256 == sha256_file(cat)


def test_copy_with_one_byte_changed_gets_no_identity(bin_dir: Path, procs: Procs) -> None:
    good = copy_binary("sleep", bin_dir / "sleep")
    bad = copy_binary("sleep", bin_dir / "sleep-patched")
    data = bytearray(bad.read_bytes())
    assert data[:4] == b"\x7fELF"
    data[10] ^= 0x01  # e_ident padding: ignored by the loader, so the copy still runs
    bad.write_bytes(bytes(data))
    attestor = Attestor(
        entries(
            (
                "spiffe://example.org/agent/bot",
                [f"unix:uid:{UID}", f"unix:sha256:{sha256_file(good)}"],
            )
        )
    )
    p = procs.start([bad, "60"])
    result = attestor.attest(p.pid)
    assert p.poll() is None
    assert result.match is None
    assert result.facts.sha256 == sha256_file(bad) != sha256_file(good)


def test_path_selector_sees_the_executable_not_the_symlink_used_to_start_it(
    tmp_path: Path, bin_dir: Path, procs: Procs
) -> None:
    sleep = copy_binary("sleep", bin_dir / "sleep")
    link = tmp_path / "agent"
    link.symlink_to(sleep)
    by_target = Attestor(entries(("spiffe://example.org/a", [f"unix:path:{sleep}"])))
    by_link = Attestor(entries(("spiffe://example.org/a", [f"unix:path:{link}"])))
    p = procs.start([link, "60"])
    assert by_target.attest(p.pid).spiffe_id == "spiffe://example.org/a"
    assert by_link.attest(p.pid).match is None


def test_binary_replaced_at_its_path_is_hashed_as_it_runs_and_loses_the_path(
    bin_dir: Path, procs: Procs
) -> None:
    sleep = copy_binary("sleep", bin_dir / "agent")
    original = sha256_file(sleep)
    p = procs.start([sleep, "60"])
    impostor = copy_binary("cat", bin_dir / "impostor")
    os.replace(impostor, sleep)  # the running image keeps its inode, now nameless
    by_hash = Attestor(entries(("spiffe://example.org/a", [f"unix:sha256:{original}"])))
    by_path = Attestor(entries(("spiffe://example.org/a", [f"unix:path:{sleep}"])))
    result = by_hash.attest(p.pid)
    assert result.spiffe_id == "spiffe://example.org/a"
    assert result.facts.exe_deleted
    assert result.facts.exe_path == str(sleep)
    assert by_path.attest(p.pid).match is None


def test_exited_and_reaped_process_raises_attestation_error(procs: Procs) -> None:
    p = procs.start(["sleep", "60"])
    p.kill()
    p.wait()
    with pytest.raises(AttestationError, match=f"pid {p.pid}: process is gone"):
        Attestor(entries()).attest(p.pid)


def test_zombie_process_raises_attestation_error(procs: Procs) -> None:
    p = procs.start(["sleep", "60"])
    p.kill()
    os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)  # dead but not reaped
    with pytest.raises(AttestationError, match="process is gone"):
        gather(p.pid, None, HashCache())


def test_invalid_pid_raises_attestation_error() -> None:
    with pytest.raises(AttestationError):
        gather(0, None, HashCache())
    with pytest.raises(AttestationError, match="process is gone"):
        gather(2**22 + 1, None, HashCache())  # above the largest pid_max


def test_start_time_change_during_attestation_is_refused(
    procs: Procs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What /proc shows if the PID is recycled while it is read: another start time."""
    p = procs.start(["sleep", "60"])
    real = facts_mod.read_start_time
    calls = iter([0, 1])
    monkeypatch.setattr(facts_mod, "read_start_time", lambda pid: real(pid) + next(calls))
    with pytest.raises(AttestationError, match="replaced by another process"):
        gather(p.pid, None, HashCache())


def test_facts_carry_process_instance_keys_and_cgroup(procs: Procs) -> None:
    p = procs.start(["sleep", "60"])
    f = gather(p.pid, "spiffe://example.org/parent", HashCache())
    assert f.start_time == read_start_time(p.pid) > 0
    assert f.start_time >= read_start_time(os.getpid())
    assert f.uid == UID and f.gid == os.getgid()
    assert f.user == pwd.getpwuid(UID).pw_name
    st = Path(f"/proc/{p.pid}/exe").stat()
    assert (f.exe_dev, f.exe_ino, f.exe_size, f.exe_mtime_ns) == (
        st.st_dev,
        st.st_ino,
        st.st_size,
        st.st_mtime_ns,
    )
    own = Path(f"/proc/{p.pid}/cgroup").read_text().splitlines()
    assert f.cgroup_path == next(line[3:] for line in own if line.startswith("0::"))
    assert f.parent_identity == "spiffe://example.org/parent"
    status = Path(f"/proc/{p.pid}/status").read_text().splitlines()
    capeff = next(x for x in status if x.startswith("CapEff:"))
    assert f.cap_eff == int(capeff.split()[1], 16)
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", boot_id())
    assert boot_id() == boot_id()


def test_sha256_and_user_are_read_only_when_an_entry_needs_them(procs: Procs) -> None:
    hashes = HashCache()
    attestor = Attestor(entries(("spiffe://example.org/a", [f"unix:uid:{UID}"])), hashes)
    p = procs.start(["sleep", "60"])
    result = attestor.attest(p.pid)
    assert result.spiffe_id == "spiffe://example.org/a"
    assert result.facts.sha256 is None and result.facts.user is None
    assert hashes.stats().misses == 0


def test_second_attestation_of_one_binary_hits_the_hash_cache(bin_dir: Path, procs: Procs) -> None:
    sleep = copy_binary("sleep", bin_dir / "sleep")
    hashes = HashCache()
    attestor = Attestor(
        entries(("spiffe://example.org/a", [f"unix:sha256:{sha256_file(sleep)}"])), hashes
    )
    first = procs.start([sleep, "60"])
    second = procs.start([sleep, "60"])
    assert attestor.attest(first.pid).spiffe_id == "spiffe://example.org/a"
    assert attestor.attest(second.pid).spiffe_id == "spiffe://example.org/a"
    stats = hashes.stats()
    assert (stats.hits, stats.misses) == (1, 1)


def test_parent_identity_given_by_the_caller_selects_the_child_entry(procs: Procs) -> None:
    attestor = Attestor(
        entries(
            ("spiffe://example.org/planner", ["unix:uid:4000000000"]),
            (
                "spiffe://example.org/tool",
                ["parent:id:spiffe://example.org/planner", f"unix:uid:{UID}"],
            ),
        )
    )
    p = procs.start(["sleep", "60"])
    assert attestor.attest(p.pid, "spiffe://example.org/planner").spiffe_id == (
        "spiffe://example.org/tool"
    )
    assert attestor.attest(p.pid, "spiffe://example.org/other").match is None


def test_failed_reload_keeps_the_old_entries(tmp_path: Path, procs: Procs) -> None:
    path = tmp_path / "entries.yaml"
    path.write_text(
        HEADER + f"  - spiffeId: spiffe://example.org/old\n    selectors: [unix:uid:{UID}]\n"
    )
    attestor = Attestor(entries())
    attestor.reload(path)
    p = procs.start(["sleep", "60"])
    assert attestor.attest(p.pid).spiffe_id == "spiffe://example.org/old"
    path.write_text(
        HEADER + "  - spiffeId: spiffe://example.org/new\n    selectors: [unix:bogus:1]\n"
    )
    with pytest.raises(AttestationError, match=r"entries\.yaml:6: entries\[0\]\.selectors\[0\]"):
        attestor.reload(path)
    assert attestor.attest(p.pid).spiffe_id == "spiffe://example.org/old"
    old = attestor.replace_entries(entries(("spiffe://example.org/new", [f"unix:uid:{UID}"])))
    assert old.spiffe_ids == {"spiffe://example.org/old"}
    assert attestor.attest(p.pid).spiffe_id == "spiffe://example.org/new"


def test_exec_while_being_attested_is_refused(
    procs: Procs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process execs another program between the open of its exe and the end."""
    p = procs.start(["sh", "-c", "read line; exec sleep 60"])
    first_exe = os.readlink(f"/proc/{p.pid}/exe")
    real_readlink = os.readlink

    def readlink_then_exec(path: str) -> str:
        result = real_readlink(path)
        assert p.stdin is not None
        p.stdin.write(b"go\n")
        p.stdin.flush()
        deadline = time.monotonic() + 30  # a guard against hanging, not a timing check
        while real_readlink(f"/proc/{p.pid}/exe") == first_exe:  # wait for the exec
            if time.monotonic() > deadline:
                pytest.fail("the child never exec'd sleep")
            os.sched_yield()
        return result

    monkeypatch.setattr(os, "readlink", readlink_then_exec)
    with pytest.raises(AttestationError, match="exec'd another program"):
        gather(p.pid, None, HashCache())


@pytest.mark.parametrize(
    "selector",
    ["cgroup:path:/", "systemd:unit:nothing.service", "k8s:pod-uid:{u}", "container:id:{c}"],
)
def test_the_cgroup_is_read_when_a_selector_needs_it_and_only_then(
    procs: Procs, selector: str
) -> None:
    p = procs.start(["sleep", "60"])
    own = Path(f"/proc/{p.pid}/cgroup").read_text().splitlines()
    path = next(line[3:] for line in own if line.startswith("0::"))
    sel = selector.format(u="0" * 8 + "-0000-0000-0000-" + "0" * 12, c="0" * 64)
    with_cgroup = Attestor(
        entries(
            ("spiffe://example.org/a", f"[unix:uid:{UID}, {sel}]"),
            ("spiffe://example.org/b", f"[unix:uid:{UID}]"),
        )
    )
    assert with_cgroup.entries.needs_cgroup
    result = with_cgroup.attest(p.pid)
    assert result.facts.cgroup_path == path
    # Every process is under "/"; none is in that unit, pod or container.
    want = "a" if selector.startswith("cgroup:path") else "b"
    assert result.spiffe_id == f"spiffe://example.org/{want}"
    without = Attestor(entries(("spiffe://example.org/b", f"[unix:uid:{UID}]")))
    assert not without.entries.needs_cgroup
    result = without.attest(p.pid)
    assert result.facts.cgroup_path is None
    assert result.spiffe_id == "spiffe://example.org/b"


# ------------------------------------------------- facts the exec record gave


def seen_from_proc(pid: int, **over: int) -> ExecSeen:
    """What the kernel's exec record says of ``pid`` (tests/kernel checks the kernel says so)."""
    st = os.stat(f"/proc/{pid}/exe")
    fields = {
        "start_ns": read_start_time(pid) * (10**9 // os.sysconf("SC_CLK_TCK")),
        "uid": os.getuid(),
        "gid": os.getgid(),
        "cap_host": 0,
        "exe_dev": kernel_dev(st.st_dev),
        "exe_ino": st.st_ino,
    }
    fields.update(over)
    return ExecSeen(**fields)


def test_facts_from_the_exec_record_agree_with_proc(procs: Procs) -> None:
    p = procs.start(["sleep", "60"])
    from_proc = gather(p.pid, None, HashCache())
    from_record = gather(p.pid, None, HashCache(), seen=seen_from_proc(p.pid, cap_host=1 << 21))
    assert replace(from_record, cap_eff=0, cap_host=None) == replace(from_proc, cap_eff=0)
    # What the record says of the exec wins over what /proc shows now.
    assert (from_record.cap_eff, from_record.cap_host) == (1 << 21, 1 << 21)
    assert from_proc.cap_host is None


def test_the_exec_record_s_ids_are_those_of_the_exec(procs: Procs) -> None:
    """A process that changes its ids after exec is attested with those it exec'd under."""
    p = procs.start(["sleep", "60"])
    f = gather(p.pid, None, HashCache(), seen=seen_from_proc(p.pid, uid=4242, gid=4343))
    assert (f.uid, f.gid) == (4242, 4343)
    assert f.user == _name_of(4242)  # the name of the recorded uid, not of ours


def _name_of(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def test_a_pid_that_is_no_longer_the_recorded_process_is_refused(procs: Procs) -> None:
    """The record's start time differs from the pid's: the pid was reused since the exec."""
    p = procs.start(["sleep", "60"])
    tick = 10**9 // os.sysconf("SC_CLK_TCK")
    for start in (read_start_time(p.pid) - 1, read_start_time(p.pid) + 1):
        with pytest.raises(AttestationError, match="replaced by another process since its exec"):
            gather(p.pid, None, HashCache(), seen=seen_from_proc(p.pid, start_ns=start * tick))
    # Positive control: any nanosecond of the recorded tick is the same process.
    last_ns = (read_start_time(p.pid) + 1) * tick - 1
    assert (
        gather(p.pid, None, HashCache(), seen=seen_from_proc(p.pid, start_ns=last_ns)).pid == p.pid
    )


def test_a_process_gone_since_its_exec_is_refused_with_the_record_too(procs: Procs) -> None:
    p = procs.start(["sleep", "60"])
    seen = seen_from_proc(p.pid)
    p.kill()
    os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)  # a zombie keeps its pid and stat
    with pytest.raises(AttestationError, match="process is gone"):
        gather(p.pid, None, HashCache(), seen=seen)
    p.wait()
    with pytest.raises(AttestationError, match="process is gone"):
        gather(p.pid, None, HashCache(), seen=seen)


def test_a_file_other_than_the_recorded_one_is_read_from_proc(bin_dir: Path, procs: Procs) -> None:
    """It exec'd again since the record (or the file system shows another device):
    the facts are then all read from /proc, those of the image that runs."""
    p = procs.start(["sh", "-c", "read line; exec sleep 60"])
    seen = seen_from_proc(p.pid, uid=4242)  # the record of the shell's exec
    assert p.stdin is not None
    p.stdin.write(b"go\n")
    p.stdin.flush()
    shell = os.readlink(f"/proc/{p.pid}/exe")
    deadline = time.monotonic() + 30  # a guard against hanging, not a timing check
    while os.readlink(f"/proc/{p.pid}/exe") == shell:
        if time.monotonic() > deadline:
            pytest.fail("the child never exec'd sleep")
        time.sleep(0.01)
    f = gather(p.pid, None, HashCache(), seen=seen)
    assert f.exe_path == os.path.realpath(shutil.which("sleep") or "")
    assert f.uid == UID  # read from /proc, not taken from the shell's record
    assert f.cap_host is None
    # The same with a device number that does not match (the stat/kernel mismatch case).
    q = procs.start(["sleep", "60"])
    g = gather(q.pid, None, HashCache(), seen=seen_from_proc(q.pid, exe_dev=1, uid=4242))
    assert (g.uid, g.cap_host) == (UID, None)


def test_an_exec_record_without_a_file_or_start_time_falls_back_to_proc(procs: Procs) -> None:
    p = procs.start(["sleep", "60"])
    for over in ({"exe_ino": 0}, {"start_ns": 0}):
        f = gather(p.pid, None, HashCache(), seen=seen_from_proc(p.pid, uid=4242, **over))
        assert (f.uid, f.cap_host) == (UID, None)


def test_when_the_kernel_confirms_the_process_no_pidfd_is_opened_and_it_is_asked_last(
    procs: Procs, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = procs.start(["sleep", "60"])
    seen = seen_from_proc(p.pid)
    calls: list[str] = []
    real_open, real_pidfd_open = os.open, os.pidfd_open

    def logging_open(path: str, *args: int) -> int:
        calls.append(f"open {path}")
        return real_open(path, *args)

    def logging_pidfd_open(pid: int, flags: int = 0) -> int:
        calls.append("pidfd")
        return real_pidfd_open(pid, flags)

    def still_running() -> bool:
        calls.append("asked")
        return True

    monkeypatch.setattr(os, "open", logging_open)
    monkeypatch.setattr(os, "pidfd_open", logging_pidfd_open)
    f = gather(p.pid, None, HashCache(), seen=seen, still_running=still_running)
    assert "pidfd" not in calls
    assert calls[-1] == "asked"  # after the last /proc read
    assert f"open /proc/{p.pid}/exe" in calls and f"open /proc/{p.pid}/cgroup" in calls
    monkeypatch.undo()
    assert replace(f, cap_eff=0, cap_host=None) == replace(
        gather(p.pid, None, HashCache()), cap_eff=0
    )


def test_when_the_kernel_does_not_confirm_the_process_a_pidfd_decides(
    procs: Procs, pidfds_opened: list[int]
) -> None:
    """False is no answer (the kernel's entry may show no start time): read again
    through a pidfd, which still refuses a pid that is no longer the recorded process."""
    p = procs.start(["sleep", "60"])
    opened = pidfds_opened
    f = gather(p.pid, None, HashCache(), seen=seen_from_proc(p.pid), still_running=lambda: False)
    assert opened == [p.pid] and f.pid == p.pid and f.cap_host == 0
    tick = 10**9 // os.sysconf("SC_CLK_TCK")
    reused = seen_from_proc(p.pid, start_ns=(read_start_time(p.pid) - 1) * tick)
    with pytest.raises(AttestationError, match="replaced by another process since its exec"):
        gather(p.pid, None, HashCache(), seen=reused, still_running=lambda: False)


def test_live_instances_are_counted_as_they_come_and_go_and_the_gauge_follows(
    procs: Procs,
) -> None:
    """The live-instance gauge is kept per identity as instances start and end,
    not counted again from every live instance at each exec."""
    from sidecar.daemon.describe import Describer
    from sidecar.daemon.table import Process
    from sidecar.enforce.enforcer import IdentityNumbers
    from sidecar.identity.instances import InstanceRegistry
    from sidecar.proc.cgroups import CgroupNames

    agent, tool = "spiffe://example.org/agent", "spiffe://example.org/tool"
    attestor = Attestor(entries((agent, [f"unix:uid:{UID}"])))
    other = Attestor(entries((tool, [f"unix:uid:{UID}"])))
    gauges: list[tuple[str, int]] = []

    class Metrics:
        def set_live_instances(self, identity: str, n: int) -> None:
            gauges.append((identity, n))

        def __getattr__(self, name: str) -> object:
            return lambda *a, **k: None

    numbers = IdentityNumbers()
    for sid in (agent, tool):
        numbers.number(sid)  # both known, as after loading a policy naming them
    d = Describer("h", numbers, lambda: None, CgroupNames(Path("/"), Path("/")), metrics=Metrics())  # type: ignore[arg-type]
    registry = InstanceRegistry(None)
    d.instances = registry
    a, b, c = (procs.start(["sleep", "60"]) for _ in range(3))

    def row(pid: int) -> Process:
        return d.table.add(Process(pid, 0, os.getpid(), UID, os.getgid(), "", (), ""))

    d.finish_attestation(row(a.pid), attestor.attest(a.pid), numbers.number(agent))
    # The first change sets every known identity's gauge, 0 for those with none.
    assert set(gauges) == {(agent, 1), (tool, 0)}
    d.finish_attestation(row(b.pid), attestor.attest(b.pid), numbers.number(agent))
    d.finish_attestation(row(c.pid), other.attest(c.pid), numbers.number(tool))
    assert gauges[-2:] == [(agent, 2), (tool, 1)]
    # The same instance attested again is still one instance.
    registry.add(attestor.attest(a.pid), 0)
    assert (registry.live(agent), registry.live(tool)) == (2, 1)
    d.on_exit(abi.Exit(0, abi.Task(a.pid, a.pid, 0, UID, 0, 0, 0, "sleep")), None)
    assert gauges[-1] == (agent, 1)
    assert registry.end(a.pid) is None and registry.live(agent) == 1  # ended once
    assert registry.live_counts() == {agent: 1, tool: 1}
