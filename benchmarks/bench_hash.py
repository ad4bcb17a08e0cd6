"""Cost of hashing executables for attestation, cold and through the cache.

Prints figures, asserts nothing.  Each figure is given as a ratio against a
baseline measured in the same run (reading the same file without hashing),
so numbers from different machines can be compared.

    python benchmarks/bench_hash.py [--size-mb 50] [--repeat 5]

The file is in the page cache for every run (it was just written), so "cold"
means "not in the hash cache", not "not in memory": disk speed is left out on
purpose, it is not the attestor's to improve.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sidecar.attest.facts import gather
from sidecar.attest.hashcache import HashCache

_CHUNK = 1 << 20


def timed(fn: Callable[[], object], repeat: int) -> float:
    """Median wall time of ``fn`` in seconds."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def read_only(fd: int) -> None:
    offset = 0
    while chunk := os.pread(fd, _CHUNK, offset):
        offset += len(chunk)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--lookups", type=int, default=20000)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.bin"
        with path.open("wb") as fh:
            for _ in range(args.size_mb):
                fh.write(os.urandom(_CHUNK))
        fd = os.open(path, os.O_RDONLY)
        try:
            read_s = timed(lambda: read_only(fd), args.repeat)
            cold_s = timed(lambda: HashCache().digest_fd(fd), args.repeat)
            cache = HashCache()
            cache.digest_fd(fd)

            def warm_batch() -> None:
                for _ in range(args.lookups):
                    cache.digest_fd(fd)

            warm_s = timed(warm_batch, args.repeat) / args.lookups
        finally:
            os.close(fd)

        # Whole attestation facts of a live process, with the hash cache warm.
        proc = subprocess.Popen(["sleep", "60"])
        try:
            hashes = HashCache()
            gather(proc.pid, None, hashes)
            n = 2000

            def gather_batch(want: bool) -> None:
                for _ in range(n):
                    gather(proc.pid, None, hashes, want_sha256=want, want_user=want)

            gather_batch(False)  # warm up /proc, dentries and the allocator
            gather_batch(True)
            gather_plain_s = timed(lambda: gather_batch(False), args.repeat) / n
            gather_warm_s = timed(lambda: gather_batch(True), args.repeat) / n
        finally:
            proc.kill()
            proc.wait()

    mb = args.size_mb
    print(f"file: {mb} MB, median of {args.repeat} runs")
    print(f"baseline read (no hash):   {read_s * 1e3:9.2f} ms  ({mb / read_s:8.0f} MB/s)")
    print(
        f"cold sha256 via HashCache: {cold_s * 1e3:9.2f} ms  ({mb / cold_s:8.0f} MB/s)"
        f"  = {cold_s / read_s:6.2f} x baseline read"
    )
    print(
        f"warm cache lookup:         {warm_s * 1e6:9.2f} us"
        f"  = {cold_s / warm_s:8.0f} x faster than cold"
    )
    print(f"gather() facts, no hash:   {gather_plain_s * 1e6:9.2f} us")
    print(
        f"gather() facts, warm hash: {gather_warm_s * 1e6:9.2f} us"
        f"  = {gather_warm_s / gather_plain_s:6.2f} x gather without hash"
    )


if __name__ == "__main__":
    main()
