"""The executable hash cache: keyed by file identity, bounded, safe across threads."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from sidecar.attest.hashcache import FileKey, HashCache


def digest(cache: HashCache, path: Path) -> str:
    fd = os.open(path, os.O_RDONLY)
    try:
        return cache.digest_fd(fd, str(path))[1]
    finally:
        os.close(fd)


def test_digest_is_the_sha256_of_the_content(tmp_path: Path) -> None:
    p = tmp_path / "f"
    content = os.urandom(3 * 1024 * 1024 + 7)  # more than one read chunk
    p.write_bytes(content)
    assert digest(HashCache(), p) == hashlib.sha256(content).hexdigest()


def test_second_lookup_of_unchanged_file_is_a_hit(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"binary")
    cache = HashCache()
    first = digest(cache, p)
    assert cache.stats().hits == 0
    assert digest(cache, p) == first
    stats = cache.stats()
    assert (stats.hits, stats.misses) == (1, 1)


def test_size_change_is_a_miss_with_the_new_digest(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"binary")
    cache = HashCache()
    digest(cache, p)
    with p.open("ab") as fh:
        fh.write(b"!")
    assert digest(cache, p) == hashlib.sha256(b"binary!").hexdigest()
    assert cache.stats().misses == 2


def test_same_size_rewrite_with_restored_mtime_is_still_a_miss(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"aaaa")
    st = p.stat()
    cache = HashCache()
    digest(cache, p)
    p.write_bytes(b"bbbb")
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # hide the write from mtime
    while p.stat().st_ctime_ns == st.st_ctime_ns:  # coarse clocks: wait for a new tick
        time.sleep(0.005)
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (p.stat().st_mtime_ns, p.stat().st_size) == (st.st_mtime_ns, st.st_size)
    assert digest(cache, p) == hashlib.sha256(b"bbbb").hexdigest()
    assert cache.stats().misses == 2


def test_mtime_change_alone_is_a_miss(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"aaaa")
    cache = HashCache()
    digest(cache, p)
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    digest(cache, p)
    assert (cache.stats().hits, cache.stats().misses) == (0, 2)


def test_cache_keeps_only_the_most_recently_used_entries(tmp_path: Path) -> None:
    cache = HashCache(max_entries=2)
    files = []
    for i in range(3):
        p = tmp_path / f"f{i}"
        p.write_bytes(bytes([i]))
        files.append(p)
    digest(cache, files[0])
    digest(cache, files[1])
    digest(cache, files[0])  # f0 is now the most recent
    digest(cache, files[2])  # evicts f1
    assert cache.stats().size == 2
    keys = [FileKey.of(f.stat()) for f in files]
    assert cache.lookup(keys[0]) is not None
    assert cache.lookup(keys[1]) is None
    assert cache.lookup(keys[2]) is not None


def test_concurrent_lookups_agree_and_every_call_is_counted(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(os.urandom(256 * 1024))
    expected = hashlib.sha256(p.read_bytes()).hexdigest()
    cache = HashCache()
    results: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(50):
            d = digest(cache, p)
            with lock:
                results.append(d)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(results) == {expected}
    stats = cache.stats()
    assert stats.hits + stats.misses == 400
    assert stats.size == 1


def test_cache_must_hold_at_least_one_entry() -> None:
    with pytest.raises(ValueError):
        HashCache(max_entries=0)
