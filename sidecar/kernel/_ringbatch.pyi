# Types of the C module built from _ringbatch.c.

CALLBACK: int
BATCH_MAX_BYTES: int

class RecordBatch:
    ctx: int
    deferred: int
    def take(self) -> list[bytes]: ...
