"""Daemon configuration: defaults < environment < file < command-line flags.

The file is YAML (``apiVersion: sidecar/v1``, ``kind: DaemonConfig``), read
strictly: an unknown or mistyped field is an error naming file, line and
field.  Everything is validated once, here, into a frozen dataclass.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from sidecar.kernel import limits
from sidecar.util.errors import ConfigError
from sidecar.util.inputs import source_name
from sidecar.util.yamlsrc import Document, Fields, Path_, check_header, load_file

API_VERSION = "sidecar/v1"
KIND = "DaemonConfig"

# Environment variables that override defaults (and are overridden by file and flags).
ENV_CGROUP = "SIDECAR_CGROUP"
ENV_OUTPUT = "SIDECAR_OUTPUT"
ENV_PIN_DIR = "SIDECAR_PIN_DIR"
ENV_HOST = "SIDECAR_HOST"  # a DaemonSet sets it to the node's name


@dataclass(frozen=True)
class DaemonConfig:
    host: str
    scope_cgroup: Path | None  # None: the cgroup2 root
    pin_dir: Path
    procs_max: int
    ringbuf_pages: int
    detach_on_exit: bool  # False: programs keep enforcing after the daemon stops
    output: str  # "-" for stdout, or a file path
    entries: Path | None = None  # registration entries; None: no attestation
    state_dir: Path = Path("/var/lib/sidecar")  # the signing CA lives here
    svid_ttl: int = 600  # seconds
    workload_socket: Path | None = Path("/run/sidecar/workload.sock")
    # An upstream-signed intermediate to sign workload SVIDs with, instead of
    # a CA generated in state_dir: certificate, key and the chain above it.
    ca_cert: Path | None = None
    ca_key: Path | None = None
    ca_chain: Path | None = None
    policy: Path | None = None  # None: observe only
    reload_interval: float = 1.0  # seconds between checks of the policy and entries files
    admin_socket: Path | None = Path("/run/sidecar/admin.sock")
    metrics: str = "127.0.0.1:9464"  # "" turns the endpoint off
    # host:port of each collector replica's mTLS port, tried in turn (the exporter
    # moves to the next on failure); empty keeps events local.
    collector: tuple[str, ...] = ()
    collector_credentials: Path = Path("/var/lib/sidecar/host")  # from 'sidecar enroll'
    collector_server_name: str | None = None
    spool_dir: Path = Path("/var/lib/sidecar/spool")
    spool_max_bytes: int = 256 * 1024 * 1024
    # Secrets in argv are masked before events leave the daemon (sidecar.util.redact):
    # None uses the built-in rules; an empty tuple turns redaction off.
    redact_patterns: tuple[str, ...] | None = None
    source: str = "<defaults>"


def defaults() -> DaemonConfig:
    return DaemonConfig(
        host=socket.gethostname(),
        scope_cgroup=None,
        pin_dir=Path("/sys/fs/bpf/sidecar"),
        procs_max=limits.PROCS_MAX_DEFAULT,
        ringbuf_pages=limits.RINGBUF_PAGES_DEFAULT,
        detach_on_exit=False,
        output="-",
    )


def _from_env(cfg: DaemonConfig) -> DaemonConfig:
    env = os.environ
    if env.get(ENV_CGROUP):
        cfg = replace(cfg, scope_cgroup=Path(env[ENV_CGROUP]))
    if env.get(ENV_OUTPUT):
        cfg = replace(cfg, output=env[ENV_OUTPUT])
    if env.get(ENV_PIN_DIR):
        cfg = replace(cfg, pin_dir=Path(env[ENV_PIN_DIR]))
    if env.get(ENV_HOST):
        cfg = replace(cfg, host=env[ENV_HOST])
    return cfg


def _abs_path(value: object) -> Path:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError(f"must be an absolute path, not {value!r}")
    return Path(value)


def _bounded(lo: int, hi: int) -> Callable[[object], int]:
    def check(value: object) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise ValueError(f"must be an integer from {lo} to {hi}, not {value!r}")
        return value

    return check


def _address(value: object) -> str:
    if value == "" or value is False:
        return ""
    if not isinstance(value, str) or ":" not in value:
        raise ValueError(f"must be HOST:PORT or '' (off), not {value!r}")
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"must be HOST:PORT with a port from 1 to 65535, not {value!r}")
    return value


def _addresses(doc: Document, where: Path_, value: object) -> tuple[str, ...]:
    """``collector.address``: one HOST:PORT, a comma-separated string, or a YAML list.

    An error names the entry (``collector.address[1]``) and its line.
    """
    if value is None or value == "" or value is False:
        return ()
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
        items: list[tuple[Path_, object]] = [(where, p) for p in parts]
    elif isinstance(value, list):
        if not value:
            raise doc.error(where, "must list at least one HOST:PORT, or be '' (off)")
        items = [((*where, k), v) for k, v in enumerate(value)]
    else:
        raise doc.error(where, f"must be HOST:PORT, a list of them, or '' (off), not {value!r}")
    out: list[str] = []
    for at, item in items:
        try:
            address = _address(item)
        except ValueError as exc:
            raise doc.error(at, str(exc)) from exc
        if not address:
            raise doc.error(at, "an empty address in the list")
        if address in out:
            raise doc.error(at, f"{address} is listed twice")
        out.append(address)
    return tuple(out)


def _power_of_two(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1 or value & (value - 1):
        raise ValueError(f"must be a power of two, not {value!r}")
    if value > limits.RINGBUF_PAGES_MAX:
        raise ValueError(f"must be at most {limits.RINGBUF_PAGES_MAX} pages, not {value}")
    return value


def _from_file(cfg: DaemonConfig, path: Path) -> DaemonConfig:
    doc = load_file(path, ConfigError)
    top = check_header(doc, API_VERSION, KIND)
    host = top.optional("host", str, cfg.host) or cfg.host
    output = top.optional("output", str, cfg.output)
    scope_cgroup = cfg.scope_cgroup
    if "scope" in doc.data:
        scope = Fields(doc, ("scope",), top.optional("scope", dict, {}))
        scope_cgroup = scope.parse("cgroup", _abs_path, scope_cgroup)
        scope.done()
    pin_dir, procs_max, pages, detach = (
        cfg.pin_dir,
        cfg.procs_max,
        cfg.ringbuf_pages,
        cfg.detach_on_exit,
    )
    if "bpf" in doc.data:
        bpf = Fields(doc, ("bpf",), top.optional("bpf", dict, {}))
        pin_dir = bpf.parse("pinDir", _abs_path, pin_dir) or pin_dir
        procs_max = bpf.parse("procsMax", _bounded(*limits.PROCS_MAX_RANGE), procs_max) or procs_max
        pages = bpf.parse("ringbufPages", _power_of_two, pages) or pages
        detach = bpf.optional("detachOnExit", bool, detach)
        bpf.done()
    entries, state_dir, ttl, workload = (
        cfg.entries,
        cfg.state_dir,
        cfg.svid_ttl,
        cfg.workload_socket,
    )
    if "identity" in doc.data:
        ident = Fields(doc, ("identity",), top.optional("identity", dict, {}))
        entries = ident.parse("entries", _abs_path, entries)
        state_dir = ident.parse("stateDir", _abs_path, state_dir) or state_dir
        ttl = ident.parse("svidTtlSeconds", _bounded(10, 86400), ttl) or ttl
        workload = ident.parse("workloadSocket", _abs_path, workload)
        ca_cert = ident.parse("caCert", _abs_path, cfg.ca_cert)
        ca_key = ident.parse("caKey", _abs_path, cfg.ca_key)
        ca_chain = ident.parse("caChain", _abs_path, cfg.ca_chain)
        if (ca_cert is None) != (ca_key is None):
            raise doc.error(("identity",), "caCert and caKey go together")
        ident.done()
    else:
        ca_cert, ca_key, ca_chain = cfg.ca_cert, cfg.ca_key, cfg.ca_chain
    policy, interval = cfg.policy, cfg.reload_interval
    if "policy" in doc.data:
        pol = Fields(doc, ("policy",), top.optional("policy", dict, {}))
        policy = pol.parse("file", _abs_path, policy)
        interval = float(
            pol.parse("reloadIntervalSeconds", _bounded(1, 3600), int(interval)) or interval
        )
        pol.done()
    collector = (
        cfg.collector,
        cfg.collector_credentials,
        cfg.collector_server_name,
        cfg.spool_dir,
        cfg.spool_max_bytes,
    )
    if "collector" in doc.data:
        col = Fields(doc, ("collector",), top.optional("collector", dict, {}))
        collector = (
            _addresses(doc, ("collector", "address"), col.optional("address", object, None)),
            col.parse("credentials", _abs_path, collector[1]) or collector[1],
            col.optional("serverName", str, collector[2] or "") or None,
            col.parse("spoolDir", _abs_path, collector[3]) or collector[3],
            col.parse("spoolMaxBytes", _bounded(1 << 20, 1 << 40), collector[4]) or collector[4],
        )
        col.done()
    redact = cfg.redact_patterns
    if "redaction" in doc.data:
        red = Fields(doc, ("redaction",), top.optional("redaction", dict, {}))
        enabled = red.optional("enabled", bool, True)
        raw = red.optional("patterns", list, None)
        red.done()
        if raw is not None:
            for k, item in enumerate(raw):
                where = ("redaction", "patterns", k)
                if not isinstance(item, str):
                    raise doc.error(where, "must be a regular expression (a string)")
                try:
                    re.compile(item)
                except re.error as exc:
                    raise doc.error(where, f"not a valid regular expression: {exc}") from exc
            redact = tuple(raw)
        if not enabled:
            redact = ()
    admin = top.parse("adminSocket", _abs_path, cfg.admin_socket)
    metrics = top.parse("metrics", _address, cfg.metrics)
    top.done()
    return replace(
        cfg,
        entries=entries,
        state_dir=state_dir,
        svid_ttl=ttl,
        workload_socket=workload,
        ca_cert=ca_cert,
        ca_key=ca_key,
        ca_chain=ca_chain,
        policy=policy,
        reload_interval=interval,
        admin_socket=admin,
        metrics=metrics if metrics is not None else cfg.metrics,
        collector=collector[0],
        collector_credentials=collector[1],
        collector_server_name=collector[2],
        spool_dir=collector[3],
        spool_max_bytes=collector[4],
        redact_patterns=redact,
        host=host,
        output=output,
        scope_cgroup=scope_cgroup,
        pin_dir=pin_dir,
        procs_max=procs_max,
        ringbuf_pages=pages,
        detach_on_exit=detach,
        source=source_name(path),
    )


def check_file(path: str | Path) -> tuple[DaemonConfig, list[str]]:
    """Validate one config file (``-``: standard input) on its own: defaults < file,
    no environment, no flags.  Also returns warnings about what this host lacks."""
    cfg = _from_file(defaults(), Path(path))
    warnings: list[str] = []
    if cfg.scope_cgroup is not None and not cfg.scope_cgroup.is_dir():
        warnings.append(
            f"scope.cgroup {cfg.scope_cgroup} does not exist on this host: "
            "'sidecar run' would refuse it here"
        )
    return cfg, warnings


def load(
    path: Path | None = None,
    *,
    cgroup: Path | None = None,
    output: str | None = None,
    policy: Path | None = None,
    entries: Path | None = None,
) -> DaemonConfig:
    """Build the effective config; flags (``cgroup``, ``output``, ...) win over everything."""
    cfg = _from_env(defaults())
    if path is not None:
        cfg = _from_file(cfg, path)
    if cgroup is not None:
        cfg = replace(cfg, scope_cgroup=cgroup)
    if output is not None:
        cfg = replace(cfg, output=output)
    if policy is not None:
        cfg = replace(cfg, policy=policy)
    if entries is not None:
        cfg = replace(cfg, entries=entries)
    if cfg.scope_cgroup is not None and not cfg.scope_cgroup.is_dir():
        raise ConfigError(
            f"scope cgroup {cfg.scope_cgroup} does not exist: create it "
            f"(mkdir {cfg.scope_cgroup}) or point scope.cgroup / --cgroup at an existing cgroup"
        )
    return cfg
