"""Watching the policy and registration entries files for a change worth taking.

A file is taken once the writer is done with it: the same stamp (inode,
mtime, size) at two checks a reload interval apart.  A half-written policy
can be valid YAML that allows nothing (or more).  SIGHUP takes a file at
once: the operator says it is ready.

Thread: the event loop.
"""

from __future__ import annotations

from pathlib import Path

Stamp = tuple[int, int, int]


def file_stamp(path: Path | None) -> Stamp | None:
    """(inode, mtime, size) of a file, None if there is none."""
    if path is None:
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class StillChanging(Exception):
    """The file changed while it was read: try again once it is quiet."""


class FileWatch:
    def __init__(self) -> None:
        #: what -> stamp of the file last loaded
        self.loaded: dict[str, Stamp | None] = {}
        # what -> stamp seen changed at the last check, not yet loaded
        self._unsettled: dict[str, Stamp | None] = {}

    def mark_loaded(self, what: str, stamp: Stamp | None) -> None:
        self.loaded[what] = stamp

    def forget_change(self, what: str) -> None:
        """Wait for a quiet interval again before taking ``what``."""
        self._unsettled.pop(what, None)

    def changed_and_settled(self, what: str, path: Path | None, force: bool) -> bool:
        """Has the file changed since it was loaded, and stayed unchanged for a whole check?"""
        if path is None:
            return False
        stamp = file_stamp(path)
        if force:
            return True
        if stamp == self.loaded.get(what):
            self._unsettled.pop(what, None)
            return False
        if self._unsettled.get(what) != stamp:
            self._unsettled[what] = stamp  # seen changing: look again next check
            return False
        del self._unsettled[what]
        return True
