"""Shared test set-up: kernel tests skip without root/BPF, or fail under CI.

Every test under tests/kernel/ is marked ``kernel``.  Where the machine
cannot run BPF programs they skip, unless ``SIDECAR_REQUIRE_KERNEL=1`` (set
by .ci/run), which turns each such skip into a failure: a green CI run
proves the kernel path ran.

PostgreSQL tests never skip: ``pg_dsn`` gives each test a fresh database in a
throwaway cluster of the session (sidecar.testing.postgres), and fails with
what to run (``make setup``) where PostgreSQL is not installed.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from sidecar.testing.postgres import Cluster

REQUIRE_KERNEL = os.environ.get("SIDECAR_REQUIRE_KERNEL") == "1"


def kernel_unavailable() -> str | None:
    """Why kernel tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "kernel tests need root"
    try:
        from sidecar.kernel.checks import preflight

        preflight()
    except Exception as exc:  # any reason at all is a reason to skip (or fail in CI)
        return f"kernel not usable: {exc}"
    return None


_KERNEL_REASON: list[str | None] = []


def _interrupted(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_sessionstart(session: pytest.Session) -> None:
    """SIGTERM (a CI timeout, an operator's kill) ends the run as Ctrl-C does, so the
    fixtures' teardowns still detach programs, unpin maps and remove scratch cgroups."""
    signal.signal(signal.SIGTERM, _interrupted)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    kernel_dir = Path(__file__).parent / "kernel"
    for item in items:
        if kernel_dir in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.kernel)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("kernel") is None:
        return
    if not _KERNEL_REASON:
        _KERNEL_REASON.append(kernel_unavailable())
    reason = _KERNEL_REASON[0]
    if reason is None:
        return
    if REQUIRE_KERNEL:
        pytest.fail(f"SIDECAR_REQUIRE_KERNEL=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Under SIDECAR_REQUIRE_KERNEL=1 (CI), any skip is a failure, however it was made.

    A ``skipif`` marker is evaluated before the setup hook above could turn it
    into a failure; this catches it, and every ``pytest.skip()`` too, so a
    green CI run means every test ran.
    """
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_KERNEL and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under SIDECAR_REQUIRE_KERNEL=1, which allows no skip: {reason}"


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    """A PostgreSQL cluster on a unix socket in a temporary folder, removed at the end."""
    try:
        import psycopg  # noqa: F401

        from sidecar.testing.postgres import PostgresUnavailable, cluster
    except ImportError as exc:
        pytest.fail(f"PostgreSQL tests need psycopg ({exc}): run `make setup`", pytrace=False)
    try:
        with cluster() as c:
            yield c
    except PostgresUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture
def pg_dsn(pg_cluster: Cluster) -> Iterator[str]:
    """The DSN of a new, empty database of its own; dropped after the test."""
    import psycopg

    from sidecar.testing.postgres import create_database

    name = f"t_{uuid.uuid4().hex[:12]}"
    yield create_database(pg_cluster, name)
    with psycopg.connect(pg_cluster.dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pidfds_opened(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The pids ``os.pidfd_open`` is called for from now on in this process (an
    in-process daemon's attestations included), in order."""
    opened: list[int] = []
    real_pidfd_open = os.pidfd_open

    def counting_pidfd_open(pid: int, flags: int = 0) -> int:
        opened.append(pid)
        return real_pidfd_open(pid, flags)

    monkeypatch.setattr(os, "pidfd_open", counting_pidfd_open)
    return opened
