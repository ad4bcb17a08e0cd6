"""The ring reader consumes a record only on commit, so a restarted reader re-reads it.

A tiny BPF program writes one numbered record per getppid() call of this
process (and of no other) into a 4-page ring buffer.  Records are read with
the daemon's reader (``sidecar.kernel.ring.Ring``), then read again through a
second reader on the same map, as a restarted daemon would.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from sidecar.kernel import libbpf
from sidecar.kernel.ring import Ring

PAGES = 4
PROGRAM = r"""
BPF_RINGBUF_OUTPUT(records, PAGES);
BPF_ARRAY(counter, u64, 2); /* 0: next number, 1: not reserved (ring full) */

TRACEPOINT_PROBE(syscalls, sys_enter_getppid)
{
	u32 zero = 0, one = 1;
	u64 *next, *full, *rec;

	if ((bpf_get_current_pid_tgid() >> 32) != TGID)
		return 0;
	next = counter.lookup(&zero);
	full = counter.lookup(&one);
	if (!next || !full)
		return 0;
	rec = records.ringbuf_reserve(sizeof(u64) * 16);
	if (!rec) {
		__sync_fetch_and_add(full, 1);
		return 0;
	}
	rec[0] = __sync_fetch_and_add(next, 1);
	records.ringbuf_submit(rec, 0);
	return 0;
}
"""


@pytest.fixture
def ring_map() -> Iterator[tuple[int, Any]]:
    from bcc import BPF

    bpf = BPF(text=PROGRAM.encode(), cflags=[f"-DTGID={os.getpid()}", f"-DPAGES={PAGES}"])
    try:
        fd = bpf[b"records"].map_fd
        yield fd, bpf
    finally:
        bpf.cleanup()


def numbers(records: list[bytes]) -> list[int]:
    return [int.from_bytes(r[:8], "little") for r in records]


def test_records_stay_until_committed_and_a_new_reader_reads_them_again(
    ring_map: tuple[int, Any],
) -> None:
    fd, _ = ring_map
    size = libbpf.map_max_entries(fd)
    first = Ring(fd, size)
    for _ in range(5):
        os.getppid()
    got = first.read(1000)
    assert numbers(got.records) == [0, 1, 2, 3, 4]
    ends = got.ends_list()
    assert ends == sorted(ends) and ends[-1] == got.cursor == first.producer
    assert first.consumer == 0  # read, not consumed
    assert first.read(0).records == []  # the cursor moved on

    # A reader that starts now (a restarted daemon) sees them all again.
    second = Ring(fd, size)
    assert numbers(second.read(1000).records) == [0, 1, 2, 3, 4]
    second.commit(ends[2])  # the first three are written out
    first.close()
    second.close()

    third = Ring(fd, size)
    assert third.consumer == ends[2]
    assert numbers(third.read(1000).records) == [3, 4]
    third.commit(0)  # never backwards
    assert third.consumer == ends[2]
    third.close()


def test_unconsumed_records_hold_the_space_and_the_kernel_counts_what_did_not_fit(
    ring_map: tuple[int, Any],
) -> None:
    fd, bpf = ring_map
    ring = Ring(fd, libbpf.map_max_entries(fd))
    for _ in range(500):  # 136 bytes each: about 120 fit in 16 KiB
        os.getppid()
    got = ring.read(1000)
    kept = len(got.records)
    full = bpf[b"counter"][bpf[b"counter"].Key(1)].value
    assert 100 < kept < 500
    assert kept + full == 500  # every call either recorded or counted
    assert numbers(got.records) == list(range(kept))
    ring.commit(got.cursor)
    os.getppid()  # space again once committed
    assert numbers(ring.read(1000).records) == [kept]
    ring.close()


def test_a_reader_whose_commits_lag_still_sees_new_records_promptly(
    ring_map: tuple[int, Any],
) -> None:
    # The kernel wakes a reader only for a record at the consumer position;
    # with commits behind, the reader must look again by itself.
    fd, _ = ring_map
    ring = Ring(fd, libbpf.map_max_entries(fd))
    os.getppid()
    assert numbers(ring.read(1000).records) == [0]  # read, not committed
    timer = threading.Timer(0.2, os.getppid)
    timer.start()
    started = time.monotonic()
    got = ring.read(5000)
    waited = time.monotonic() - started
    timer.join()
    assert numbers(got.records) == [1]
    assert waited < 2.0  # not the whole 5 s timeout
    ring.commit(got.cursor)
    # Caught up: an empty read waits for its timeout in epoll, then returns nothing.
    started = time.monotonic()
    assert ring.read(100).records == []
    assert time.monotonic() - started >= 0.09
    ring.close()


def test_a_closed_ring_refuses_reads_and_ignores_commits(ring_map: tuple[int, Any]) -> None:
    from sidecar.util.errors import KernelError

    fd, _ = ring_map
    ring = Ring(fd, libbpf.map_max_entries(fd))
    ring.close()
    ring.commit(8)
    with pytest.raises(KernelError, match="closed"):
        ring.read(0)
