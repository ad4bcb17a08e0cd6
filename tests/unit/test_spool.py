"""The disk spool: sequences, chain, durability, acks and the size cap, on a real folder."""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from sidecar.api.v1 import event_pb2 as ev
from sidecar.export.chain import CHAIN_SEED, chain_over
from sidecar.export.exporter import Exporter, ExporterConfig, HostIdentity
from sidecar.export.spool import Spool
from sidecar.util.errors import TransportError


def _exit(i: int) -> ev.Event:
    return ev.Event(host="h", time_ns=i, exit=ev.Exit(pid=i))


def test_sequences_and_chain_continue_after_reopening(tmp_path: Path) -> None:
    sp = Spool(tmp_path, 1 << 20)
    for i in range(5):
        assert sp.append(_exit(i)) == i + 1
    sp.close()
    sp = Spool(tmp_path, 1 << 20)
    assert sp.append(_exit(5)) == 6
    sp.sync()
    prev, recs = sp.read(0, 100, 1 << 20)
    assert prev == CHAIN_SEED
    assert [r.sequence for r in recs] == [1, 2, 3, 4, 5, 6]
    assert [r.chain for r in recs] == chain_over(CHAIN_SEED, 1, [r.payload for r in recs])


def test_only_fsynced_records_are_handed_to_the_sender(tmp_path: Path) -> None:
    sp = Spool(tmp_path, 1 << 20)
    sp.append(_exit(1))
    assert sp.read(0, 10, 1 << 20)[1] == []
    sp.sync()
    assert [r.sequence for r in sp.read(0, 10, 1 << 20)[1]] == [1]


def test_torn_tail_is_cut_off_and_numbering_resumes_after_the_last_whole_record(
    tmp_path: Path,
) -> None:
    sp = Spool(tmp_path, 1 << 20)
    for i in range(3):
        sp.append(_exit(i))
    sp.close()
    seg = next(tmp_path.glob("seg-*.spool"))
    data = seg.read_bytes()
    seg.write_bytes(data[:-3])  # a crash in the middle of writing record 3
    sp = Spool(tmp_path, 1 << 20)
    assert sp.last_sequence == 2
    assert sp.append(_exit(9)) == 3
    sp.sync()
    assert [r.sequence for r in sp.read(0, 10, 1 << 20)[1]] == [1, 2, 3]


def test_ack_cursor_persists_and_frees_whole_segments(tmp_path: Path) -> None:
    sp = Spool(tmp_path, 1 << 20, segment_bytes=1024)
    for i in range(100):
        sp.append(_exit(i))
    sp.sync()
    segments = len(list(tmp_path.glob("seg-*.spool")))
    assert segments > 3
    sp.ack(90)
    assert len(list(tmp_path.glob("seg-*.spool"))) < segments
    sp.close()
    sp = Spool(tmp_path, 1 << 20, segment_bytes=1024)
    assert sp.acked == 90
    assert [r.sequence for r in sp.read(sp.acked, 100, 1 << 20)[1]] == list(range(91, 101))
    # Everything acknowledged: numbering still continues after a restart.
    sp.ack(100)
    sp.close()
    assert Spool(tmp_path, 1 << 20, segment_bytes=1024).append(_exit(0)) == 101


def test_acks_between_cursor_writes_are_resent_after_a_kill_never_lost(tmp_path: Path) -> None:
    """The cursor reaches the disk at most once a second: a host killed in between
    resends what was acknowledged since (the collector keeps each once), and no
    segment the written cursor does not cover is removed."""
    sp = Spool(tmp_path, 1 << 20, segment_bytes=1024)
    for i in range(100):
        sp.append(_exit(i))
    sp.sync()
    sp.ack(10)  # the first ack is written at once
    segments = len(list(tmp_path.glob("seg-*.spool")))
    sp.ack(90)  # within the second: in memory only
    assert sp.acked == 90
    assert len(list(tmp_path.glob("seg-*.spool"))) == segments  # nothing freed yet
    # Killed here (no close): the next run starts from the cursor on disk.
    again = Spool(tmp_path, 1 << 20, segment_bytes=1024)
    assert again.acked == 10
    assert [r.sequence for r in again.read(again.acked, 200, 1 << 20)[1]] == list(range(11, 101))
    # Told to write it (the sender idles, or closes): the cursor and the freeing catch up.
    sp.save_state()
    assert Spool(tmp_path, 1 << 20, segment_bytes=1024).acked == 90
    assert len(list(tmp_path.glob("seg-*.spool"))) < segments


def test_full_spool_drops_oldest_and_counts_them_by_kind(tmp_path: Path) -> None:
    sp = Spool(tmp_path, 8192, segment_bytes=1024)
    for i in range(400):
        e = _exit(i) if i % 2 else ev.Event(host="h", exec=ev.Exec(pid=i, exe="/bin/true"))
        sp.append(e)
    sp.sync()
    dropped = sp.take_dropped()
    assert dropped is not None
    assert sp.size_bytes() <= 8192
    prev, recs = sp.read(0, 1000, 1 << 20)
    first_kept = recs[0].sequence
    assert dropped.first_sequence == 1 and dropped.last_sequence == first_kept - 1
    assert dropped.count == first_kept - 1
    execs = dropped.kinds[("exec", "spool_full")]
    assert execs == len(range(0, first_kept - 1, 2))
    assert execs + dropped.kinds[("exit", "spool_full")] == first_kept - 1
    assert [r.sequence for r in recs] == list(range(first_kept, 401))
    assert chain_over(prev, first_kept, [r.payload for r in recs]) == [r.chain for r in recs]
    assert sp.take_dropped() is None


def test_a_spool_cap_below_the_minimum_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TransportError, match="below the minimum"):
        Spool(tmp_path, 100)


def _identity() -> HostIdentity:
    from sidecar.identity.x509 import new_key

    return HostIdentity("h", b"", new_key(), b"")


def test_submit_never_blocks_and_counts_drops_by_kind_and_reason(tmp_path: Path) -> None:
    cfg = ExporterConfig(target="127.0.0.1:1", spool_dir=tmp_path, queue_size=3)
    exp = Exporter(cfg, _identity)
    results = [exp.submit(_exit(i)) for i in range(5)]
    results.append(exp.submit(ev.Event(exec=ev.Exec(pid=1))))
    assert results == [True, True, True, False, False, False]
    assert exp.dropped == {("exit", "queue_full"): 2, ("exec", "queue_full"): 1}


def test_queue_and_spool_losses_become_one_in_band_report(tmp_path: Path) -> None:
    cfg = ExporterConfig(
        target="127.0.0.1:1", spool_dir=tmp_path, queue_size=2, spool_max_bytes=8192
    )
    exp = Exporter(cfg, _identity, boot_id="b")
    exp.spool.segment_bytes = 1024
    exp.submit(_exit(0))
    exp.submit(_exit(1))
    assert not exp.submit(_exit(2))
    # Drain the queue as the writer thread does, then overflow the spool.
    while True:
        try:
            item = exp._queue.get_nowait()
        except queue.Empty:
            break
        assert isinstance(item, ev.Event)
        exp._append(item)
    for i in range(400):
        exp._append(_exit(i))
    exp._report_losses()
    exp.spool.sync()
    recs = exp.spool.read(0, 1000, 1 << 20)[1]
    lost = [ev.Event.FromString(r.payload) for r in recs if b"spool_full" in r.payload]
    assert len(lost) == 1
    report = lost[0].lost
    counts = {(c.kind, c.reason): c.count for c in report.counts}
    assert counts[("exit", "queue_full")] == 1
    assert counts[("exit", "spool_full")] == report.last_sequence - report.first_sequence + 1
    assert report.first_sequence == 1
    assert recs[0].sequence == report.last_sequence + 1
    assert lost[0].host == "h" and lost[0].boot_id == "b"
    exp.spool.close()


def _fill(sp: Spool, n: int) -> None:
    for i in range(n):
        sp.append(ev.Event(host="h", exec=ev.Exec(pid=i, exe="/bin/true")))
    sp.sync()


def test_records_sent_and_then_removed_are_not_lost_if_the_collector_stored_them(
    tmp_path: Path,
) -> None:
    """A frozen collector: sent, unacknowledged, removed by the cap, yet stored in the end."""
    sp = Spool(tmp_path, 8192, segment_bytes=1024)
    _fill(sp, 100)
    sp.mark_sent(100)  # all on the wire, the collector frozen before acking
    _fill(sp, 300)  # the cap removes the oldest, sent ones among them
    _, recs = sp.read(0, 1000, 1 << 20)
    first_kept = recs[0].sequence
    assert first_kept > 100  # every sent record was removed
    dropped = sp.take_dropped()
    # Only never-sent records are lost now; the sent ones wait for the collector's word.
    assert dropped is not None and dropped.first_sequence == 101
    assert dropped.count == first_kept - 101
    sp.settle(100)  # the collector thaws: it had stored 1..100
    assert sp.take_dropped() is None  # nothing more lost


def test_records_sent_and_removed_and_never_stored_are_counted_lost_exactly(
    tmp_path: Path,
) -> None:
    """A killed collector: of 100 sent records it stored 40; the other 60 were removed."""
    sp = Spool(tmp_path, 8192, segment_bytes=1024)
    _fill(sp, 100)
    sp.mark_sent(100)
    _fill(sp, 300)
    _, recs = sp.read(0, 1000, 1 << 20)
    first_kept = recs[0].sequence
    never_sent = sp.take_dropped()
    assert never_sent is not None
    sp.settle(40)  # the restarted collector says it holds 1..40
    lost_after_send = sp.take_dropped()
    assert lost_after_send is not None
    assert lost_after_send.kinds == Counter({("exec", "spool_full"): 60})
    assert (lost_after_send.first_sequence, lost_after_send.last_sequence) == (41, 100)
    # Everything missing is reported once: removed = lost before send + lost after it.
    assert never_sent.count + lost_after_send.count == (first_kept - 1) - 40


def test_a_loss_report_removed_by_the_cap_passes_its_counts_on(tmp_path: Path) -> None:
    sp = Spool(tmp_path, 8192, segment_bytes=1024)
    report = ev.LostEvents()
    report.counts.add(kind="exec", reason="queue_full", count=500)
    report.counts.add(kind="connect", reason="queue_full", count=7)
    sp.append(ev.Event(host="h", lost=report))
    _fill(sp, 400)
    dropped = sp.take_dropped()
    assert dropped is not None
    assert dropped.kinds[("exec", "queue_full")] == 500
    assert dropped.kinds[("connect", "queue_full")] == 7
    assert ("lost", "spool_full") not in dropped.kinds  # not one event of kind "lost"


def test_a_mark_is_reported_only_once_everything_before_it_is_in_the_spool_file(
    tmp_path: Path,
) -> None:
    """Marks tell the daemon which ring records the kernel may reuse, and when a
    loss report is in the spool (so that it can be pinned as reported)."""
    cfg = ExporterConfig(target="127.0.0.1:1", spool_dir=tmp_path, queue_size=3)
    exp = Exporter(cfg, _identity)
    seen: list[tuple[int, int]] = []

    def written(position: int) -> None:
        # Every record written so far is in the file, not a buffer of this process.
        on_disk = sum(p.stat().st_size for p in tmp_path.glob("seg-*.spool"))
        assert on_disk == sum(seg.size for seg in exp.spool._segments)
        seen.append((position, exp.spool.last_sequence))

    exp.submit(_exit(0))
    exp.submit(_exit(1))
    exp.submit_mark(lambda: written(10))
    # The queue is full now: the next mark waits aside, and is never lost.
    assert not exp.submit(_exit(2))
    exp.submit_mark(lambda: written(20))
    exp._writer = writer = threading.Thread(target=exp._write_loop)
    writer.start()
    try:
        deadline = time.monotonic() + 10
        while len(seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert seen == [(10, 2), (20, 2)]
        exp.submit(_exit(3))
        exp.submit_mark(lambda: written(30))
        deadline = time.monotonic() + 10
        while len(seen) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert seen[2] == (30, 4)  # the queue-full loss report, then exit 3
    finally:
        exp._stop_writer()


def test_an_ack_at_a_sent_batch_end_takes_its_chain_without_reading_the_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sp = Spool(tmp_path, 1 << 20)
    _fill(sp, 50)
    _, recs = sp.read(0, 20, 1 << 20)
    sp.mark_sent(recs[-1].sequence, recs[-1].chain)

    def no_reads(sequence: int) -> bytes:
        raise AssertionError(f"segment read for the chain at {sequence}")

    monkeypatch.setattr(sp, "_chain_at", no_reads)
    sp.ack(recs[-1].sequence)
    assert sp.acked_chain == recs[-1].chain
    monkeypatch.undo()
    # An ack that is not a batch end this spool sent (an earlier run's) reads it.
    sp.ack(30)
    assert sp.acked_chain == sp.read(29, 1, 1 << 20)[1][0].chain
    sp.close()


def test_records_read_for_sending_are_in_doubt_at_once_not_dropped(tmp_path: Path) -> None:
    """The cap may run between the sender's read and its write to the stream.

    Records read for sending count as sent in the same step: if the cap
    removes them before the batch is on the wire, they wait for the
    collector's word like any sent record (before, they were counted lost,
    and the collector then stored them too: loss over-reported).
    """
    sp = Spool(tmp_path, 8192, segment_bytes=1024)
    _fill(sp, 100)
    _, batch = sp.read(0, 100, 1 << 20, sending=True)
    assert [r.sequence for r in batch] == list(range(1, 101))
    _fill(sp, 300)  # the writer thread's cap, before the batch reaches the stream
    dropped = sp.take_dropped()
    assert dropped is not None and dropped.first_sequence == 101  # 1..100 are in doubt
    sp.settle(100)  # the collector stored the batch after all
    assert sp.take_dropped() is None
    # Control: a plain read marks nothing.
    sp2 = Spool(tmp_path / "b", 8192, segment_bytes=1024)
    _fill(sp2, 100)
    sp2.read(0, 100, 1 << 20)
    _fill(sp2, 300)
    control = sp2.take_dropped()
    assert control is not None and control.first_sequence == 1


def test_skipping_ahead_of_a_collector_reports_what_was_never_acknowledged(
    tmp_path: Path,
) -> None:
    """This host's spool was lost: the collector holds later sequences than ours."""
    sp = Spool(tmp_path, 1 << 20, segment_bytes=1024)
    for i in range(40):
        sp.append(_exit(i))
    sp.sync()
    sp.ack(15)
    sp.skip_to(1000)
    dropped = sp.take_dropped()
    assert dropped is not None
    assert dropped.kinds == Counter({("exit", "collector_ahead"): 25})
    assert (dropped.first_sequence, dropped.last_sequence) == (16, 40)
    assert sp.pending() == 0 and sp.acked == 1000
    assert sp.append(_exit(99)) == 1001
    sp.sync()
    assert [r.sequence for r in sp.read(0, 10, 1 << 20)[1]] == [1001]
    # Nothing left to report, and nothing when the collector is not ahead.
    assert sp.take_dropped() is None
    sp.skip_to(500)
    assert sp.take_dropped() is None
