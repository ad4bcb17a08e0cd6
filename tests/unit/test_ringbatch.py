"""The C sample callback that gathers ring-buffer records, called as libbpf calls it."""

from __future__ import annotations

import ctypes

from sidecar.kernel import _ringbatch

# int (*ring_buffer_sample_fn)(void *ctx, void *data, size_t size)
SAMPLE_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
collect = SAMPLE_FN(_ringbatch.CALLBACK)


def offer(batch: _ringbatch.RecordBatch, record: bytes) -> int:
    buf = ctypes.create_string_buffer(record, len(record))
    return int(collect(batch.ctx, ctypes.addressof(buf), len(record)))


def test_records_come_back_whole_and_in_order_then_the_batch_is_empty() -> None:
    batch = _ringbatch.RecordBatch()
    records = [b"", b"\x00" * 7, bytes(range(256)) * 5, b"exec\x00argv\x00"]
    for r in records:
        assert offer(batch, r) == 0
    assert batch.take() == records
    assert batch.take() == []
    assert offer(batch, b"next") == 0
    assert batch.take() == [b"next"]


def test_a_batch_grows_past_its_first_buffer() -> None:
    batch = _ringbatch.RecordBatch()
    records = [i.to_bytes(4, "little") * 300 for i in range(2000)]  # 2.4 MB
    for r in records:
        assert offer(batch, r) == 0
    assert batch.take() == records
    assert batch.deferred == 0


def test_a_full_batch_leaves_the_record_in_the_ring_and_counts_it() -> None:
    # libbpf stops at a negative return and leaves that record unconsumed: the
    # next poll delivers it, after the reader has taken the batch.
    batch = _ringbatch.RecordBatch()
    chunk = b"x" * (1 << 20)
    taken = 0
    while offer(batch, chunk) == 0:
        taken += 1
    assert taken * len(chunk) <= _ringbatch.BATCH_MAX_BYTES
    assert taken >= _ringbatch.BATCH_MAX_BYTES // len(chunk) - 1
    assert batch.deferred == 1
    assert len(batch.take()) == taken
    assert offer(batch, b"after") == 0
    assert batch.take() == [b"after"]
