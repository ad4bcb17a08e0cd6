"""A throwaway PostgreSQL cluster for tests and benchmarks: initdb into a folder, serve
on a unix socket in that folder only (no TCP at all), remove everything at the end.

PostgreSQL refuses to run as root, so when the caller is root the cluster's files are
owned by the ``postgres`` account (made by the distribution's package) and its
programs run through ``runuser``; everyone else runs them as themselves.  The socket
folder is world-reachable, and authentication is ``trust`` on the local socket only:
the socket's folder lives inside the caller's temporary folder, and the cluster
exists for the length of one test session.

The binaries come from the distribution (``make setup`` installs ``postgresql``);
:func:`find_bin_dir` says what is missing when they are not there.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sidecar.util.errors import SidecarError

#: Where Debian and Ubuntu put each major version's server programs.
DEBIAN_ROOT = Path("/usr/lib/postgresql")
SERVICE_USER = "postgres"
START_TIMEOUT_S = 30.0


class PostgresUnavailable(SidecarError):
    """The PostgreSQL server programs are not installed here."""


def find_bin_dir() -> Path:
    """The newest installed ``.../bin`` with initdb and pg_ctl, or a clear error."""
    override = os.environ.get("SIDECAR_PG_BIN")
    candidates = [Path(override)] if override else []
    if DEBIAN_ROOT.is_dir():
        versions = sorted(
            (p for p in DEBIAN_ROOT.iterdir() if p.name.isdigit()),
            key=lambda p: int(p.name),
            reverse=True,
        )
        candidates += [v / "bin" for v in versions]
    for c in candidates:
        if (c / "initdb").is_file() and (c / "pg_ctl").is_file():
            return c
    raise PostgresUnavailable(
        "PostgreSQL server programs (initdb, pg_ctl) not found under"
        f" {DEBIAN_ROOT}/<version>/bin (or $SIDECAR_PG_BIN): run `make setup`,"
        " which installs the distribution's postgresql package"
    )


@dataclass(frozen=True)
class Cluster:
    """A running cluster: connect with :attr:`dsn` (or :meth:`dsn_for` another database)."""

    root: Path
    socket_dir: Path
    port: int
    user: str

    def dsn_for(self, dbname: str) -> str:
        return f"host={self.socket_dir} port={self.port} user={self.user} dbname={dbname}"

    @property
    def dsn(self) -> str:
        return self.dsn_for("postgres")


def _runner(root: Path) -> tuple[list[str], str]:
    """Command prefix and owner name for the cluster's programs."""
    if os.geteuid() != 0:
        return [], pwd.getpwuid(os.geteuid()).pw_name
    try:
        pw = pwd.getpwnam(SERVICE_USER)
    except KeyError as exc:
        raise PostgresUnavailable(
            f"running as root needs the '{SERVICE_USER}' account to own the cluster:"
            " run `make setup` (the postgresql package creates it)"
        ) from exc
    runuser = shutil.which("runuser") or "/usr/sbin/runuser"
    os.chown(root, pw.pw_uid, pw.pw_gid)
    return [runuser, "-u", SERVICE_USER, "--"], SERVICE_USER


def _run(cmd: list[str], what: str) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    if res.returncode != 0:
        raise SidecarError(f"{what} failed ({res.returncode}): {res.stderr.strip()[-2000:]}")


@contextlib.contextmanager
def cluster(
    parent: Path | None = None, port: int = 5432, *, durable: bool = False
) -> Iterator[Cluster]:
    """initdb into a new folder under ``parent`` (default: the system's temporary
    folder, which keeps the socket path short), serve on its ``socket`` folder only,
    then stop the server and remove the folder, also when the caller failed.

    The port number only names the socket file: no TCP port is opened.  A
    throwaway cluster runs with ``fsync=off``; ``durable`` keeps PostgreSQL's
    defaults (``fsync`` and ``synchronous_commit`` on: a commit is on disk
    before it is acknowledged), for benchmarks that compare stores as
    operators run them.
    """
    bindir = find_bin_dir()
    root = Path(tempfile.mkdtemp(prefix="sidecar-pg-", dir=parent))
    data, sock = root / "data", root / "socket"
    prefix: list[str] = []
    started = False
    try:
        root.chmod(0o755)
        prefix, user = _runner(root)
        _run(
            [
                *prefix,
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                user,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",  # a throwaway cluster: nothing to keep after a crash
            ],
            "initdb",
        )
        _run([*prefix, "mkdir", "-m", "0755", str(sock)], "mkdir socket folder")
        options = " ".join(
            [
                "-c listen_addresses=''",  # unix socket only
                f"-c unix_socket_directories='{sock}'",
                f"-p {port}",
                *([] if durable else ["-c fsync=off"]),  # throwaway: speed over crash safety
                "-c max_connections=200",
            ]
        )
        started = True
        _run(
            [
                *prefix,
                str(bindir / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(root / "server.log"),
                "-o",
                options,
                "-w",
                "-t",
                str(int(START_TIMEOUT_S)),
                "start",
            ],
            "pg_ctl start",
        )
        yield Cluster(root=root, socket_dir=sock, port=port, user=user)
    finally:
        if started:
            subprocess.run(
                [*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                capture_output=True,
                timeout=60,
                check=False,
            )
        shutil.rmtree(root, ignore_errors=True)


def create_database(c: Cluster, name: str) -> str:
    """A fresh database in ``c``; its DSN."""
    import psycopg

    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            with psycopg.connect(c.dsn, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{name}"')  # name is the test's own
            return c.dsn_for(name)
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
