"""SHA-256 of executables, cached by file identity.

Hashing a 50 MB interpreter on every exec would cost tens of milliseconds per
agent start; agents exec the same few binaries over and over.  The cache is
keyed by what changes when the file's content can have changed: device,
inode, size, mtime and ctime.  ctime is in the key (beyond the brief's
dev/inode/size/mtime) because ``touch -d`` can set mtime back after a write,
while ctime is set by the kernel on every change and cannot be set by a user.

The digest is always computed from an already open file descriptor (the
attestor opens ``/proc/PID/exe``), never from a path that could be swapped.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

from sidecar.util.errors import AttestationError

_logger = logging.getLogger(__name__)

_CHUNK = 1 << 20


@dataclass(frozen=True)
class FileKey:
    """Identity of one version of a file's content."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileKey:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    size: int


class HashCache:
    """Bounded, thread-safe LRU of SHA-256 digests keyed by :class:`FileKey`.

    Hashing happens outside the lock, so one slow file never blocks lookups
    of others; two threads hashing the same new file at once both compute it,
    which is harmless.
    """

    def __init__(self, max_entries: int = 1024) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._max = max_entries
        self._lock = threading.Lock()
        self._items: OrderedDict[FileKey, str] = OrderedDict()
        self._hits = 0
        self._misses = 0

    def lookup(self, key: FileKey) -> str | None:
        """The cached digest for ``key``, counting a hit or a miss."""
        with self._lock:
            digest = self._items.get(key)
            if digest is None:
                self._misses += 1
                return None
            self._items.move_to_end(key)
            self._hits += 1
            return digest

    def store(self, key: FileKey, digest: str) -> None:
        with self._lock:
            self._items[key] = digest
            self._items.move_to_end(key)
            while len(self._items) > self._max:
                self._items.popitem(last=False)

    def digest_fd(
        self, fd: int, what: str = "file", st: os.stat_result | None = None
    ) -> tuple[FileKey, str]:
        """Key and hex SHA-256 of the regular file open at ``fd``.

        The file is stat'ed before and after hashing; if it changed in
        between, the digest describes no single version of it and
        :class:`AttestationError` is raised instead of caching it.  ``st`` is
        the caller's fstat of ``fd`` when it just made one.
        """
        try:
            before = st if st is not None else os.fstat(fd)
        except OSError as exc:
            raise AttestationError(f"{what}: cannot stat: {exc.strerror or exc}") from exc
        key = FileKey.of(before)
        cached = self.lookup(key)
        if cached is not None:
            return key, cached
        digest = _sha256_fd(fd, what)
        try:
            after = FileKey.of(os.fstat(fd))
        except OSError as exc:
            raise AttestationError(f"{what}: cannot stat: {exc.strerror or exc}") from exc
        if after != key:
            raise AttestationError(f"{what}: changed while it was being hashed")
        self.store(key, digest)
        _logger.debug("hashed %s (%d bytes): %s", what, key.size, digest)
        return key, digest

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self._hits, self._misses, len(self._items))

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


def _sha256_fd(fd: int, what: str) -> str:
    h = hashlib.sha256()
    offset = 0
    try:
        while True:
            chunk = os.pread(fd, _CHUNK, offset)
            if not chunk:
                break
            h.update(chunk)
            offset += len(chunk)
    except OSError as exc:
        raise AttestationError(f"{what}: cannot read: {exc.strerror or exc}") from exc
    return h.hexdigest()
