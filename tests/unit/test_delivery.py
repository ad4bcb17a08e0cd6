"""The local output across a daemon killed while it writes a batch.

A batch's events are flushed to the file, then its ring position is pinned.
A daemon killed between the two leaves records its successor re-reads; the
pinned intent (the position, and the size the file has once flushed) tells
the successor whether the file already holds them.  The kill is an
exception raised from the pin, at each step in turn; the file is real.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from sidecar.daemon.outputs import Delivery, JsonLinesSink, Outputs
from sidecar.events import model as m
from sidecar.kernel.maps import DELIVERED


@dataclass
class Ring:
    producer: int = 1000
    consumer: int = 0

    def commit(self, position: int) -> None:
        self.consumer = max(self.consumer, position)


class Killed(Exception):
    pass


def exit_event(pid: int) -> m.Exit:
    return m.Exit(
        time_ns=1, host="h", pid=pid, ppid=1, uid=0, gid=0, comm="x", exe="", argv=(), cgroup=""
    )


def daemon(path: Path, pins: dict[str, int], kill_at: str | None = None) -> Delivery:
    def pin(name: str, position: int) -> None:
        if name == kill_at:
            raise Killed(name)
        pins[name] = position

    outputs = Outputs(JsonLinesSink(str(path)), exporting=False)
    delivery = Delivery(outputs, Ring(), pin, exporting=False)
    delivery.adopt(pins | {})
    return delivery


def lines(path: Path) -> int:
    return len(path.read_bytes().splitlines())


@pytest.mark.parametrize(
    ("kill_at", "in_file", "rewritten"),
    [
        ("sink_intent_end", 10, True),  # before anything of the batch: written again
        ("sink_intent", 10, True),  # the end pinned, not the intent: written again
        ("sink", 15, False),  # flushed, not pinned: the successor knows the file has it
    ],
)
def test_a_daemon_killed_while_it_delivers_a_batch_writes_it_once(
    tmp_path: Path, kill_at: str, in_file: int, rewritten: bool
) -> None:
    path = tmp_path / "events.jsonl"
    pins = dict.fromkeys(DELIVERED, 0)
    first = daemon(path, pins)
    for pid in range(10):
        first.outputs.emit(exit_event(pid))
    first.delivered(100)  # the first batch, delivered whole
    assert pins["sink"] == 100 and lines(path) == 10
    dying = daemon(path, pins, kill_at)
    for pid in range(10, 15):
        dying.outputs.emit(exit_event(pid))
    with pytest.raises(Killed):
        dying.delivered(200)
    # What a kill leaves: the buffer of a dead process is gone, the file stays.
    assert lines(path) == in_file
    successor = daemon(path, pins)
    assert successor.outputs_for(200) == (rewritten, True)
    assert successor.outputs_for(100) == (False, True)  # the first batch never again


def test_a_file_cut_short_since_the_intent_gets_the_batch_again(tmp_path: Path) -> None:
    """Rotated, or the flush did not reach the disk whole: written again (at least once)."""
    path = tmp_path / "events.jsonl"
    pins = dict.fromkeys(DELIVERED, 0)
    dying = daemon(path, pins, "sink")
    for pid in range(5):
        dying.outputs.emit(exit_event(pid))
    with pytest.raises(Killed):
        dying.delivered(200)
    path.write_bytes(path.read_bytes()[:-10])
    assert daemon(path, pins).outputs_for(200) == (True, True)


def test_a_ring_made_anew_is_not_mistaken_for_an_old_file_size(tmp_path: Path) -> None:
    """The intent's end is a file size, often larger than any ring position."""
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"x\n" * 5000)
    pins = dict.fromkeys(DELIVERED, 0) | {"sink": 300, "sink_intent_end": 10_000}
    assert daemon(path, pins).replay_sink == 300  # the ring's producer is at 1000
