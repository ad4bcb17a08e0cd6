"""Facts hidden in a process's cgroup v2 path.

Container runtimes and systemd encode who a process belongs to in the names of
the cgroups they create.  Reading the path (``0::`` line of
``/proc/PID/cgroup``, as seen from the host) is enough to learn the systemd
unit, the Kubernetes pod and the container, without asking any runtime: the
daemon must not depend on a socket to containerd or docker being reachable.

Layouts handled (examples in ``docs/entries-reference.md`` and the tests):

- systemd cgroup driver (kubelet, containerd, CRI-O, docker, podman)::

    /kubepods.slice/kubepods-burstable.slice/
        kubepods-burstable-pod<uid with _ for ->.slice/cri-containerd-<64 hex>.scope
    /system.slice/docker-<64 hex>.scope

- cgroupfs driver::

    /kubepods/burstable/pod<uid>/<64 hex>
    /docker/<64 hex>

In every case the innermost match wins: a container nested in another one
(kind, docker-in-docker) is named by its own, deepest cgroup.
"""

from __future__ import annotations

import re

CONTAINER_ID_RE = re.compile(r"^[0-9a-f]{64}$")
# A pod UID is a UUID; static pods use a 32-hex-digit hash instead.
POD_UID_RE = re.compile(
    r"^(?:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{32})$"
)
SYSTEMD_UNIT_RE = re.compile(r"^[A-Za-z0-9:_.\\@-]{1,249}\.(?:service|scope)$")

# Scopes that container runtimes create with the systemd driver.
_SCOPE_RE = re.compile(r"^(?:docker|cri-containerd|crio|libpod|containerd)-([0-9a-f]{64})\.scope$")
# kubepods-pod<uid>.slice, kubepods-besteffort-pod<uid>.slice, kubelet-kubepods-...-pod<uid>.slice
_POD_SLICE_RE = re.compile(r"^(?:[a-z0-9]+-)*pod([0-9a-f_]{32,36})\.slice$")
_POD_DIR_RE = re.compile(r"^pod([0-9a-f-]{32,36})$")


def segments(path: str) -> list[str]:
    """``/a/b/`` -> ``["a", "b"]``; the root cgroup has no segments."""
    return [s for s in path.split("/") if s]


def is_under(path: str, prefix: str) -> bool:
    """Whether cgroup ``path`` is ``prefix`` or below it, compared segment by segment.

    ``/agents`` covers ``/agents/bot`` but not ``/agents-old``: a plain string
    prefix would let a sibling cgroup borrow an identity.
    """
    want = segments(prefix)
    return segments(path)[: len(want)] == want


def container_id(path: str) -> str | None:
    """The innermost container ID named in ``path``, or None."""
    for seg in reversed(segments(path)):
        m = _SCOPE_RE.match(seg)
        if m:
            return m.group(1)
        if CONTAINER_ID_RE.match(seg):
            return seg
    return None


def pod_uid(path: str) -> str | None:
    """The UID of the innermost Kubernetes pod named in ``path``, or None.

    A pod segment counts only below a segment naming ``kubepods``, so that an
    unrelated cgroup that happens to be called ``pod<hex>`` is not taken for a
    pod.  The systemd driver writes the UID with ``_`` for ``-`` (``-``
    separates slice levels); it is given back with ``-``.
    """
    segs = segments(path)
    for i in range(len(segs) - 1, -1, -1):
        seg = segs[i]
        m = _POD_SLICE_RE.match(seg)
        uid = m.group(1).replace("_", "-") if m else None
        if uid is None:
            d = _POD_DIR_RE.match(seg)
            uid = d.group(1) if d else None
        if uid is None or not POD_UID_RE.match(uid):
            continue
        if any("kubepods" in s for s in segs[: i + 1]):
            return uid
    return None


def systemd_unit(path: str) -> str | None:
    """The innermost systemd service or scope in ``path``, or None.

    This is the unit ``systemctl status PID`` names: for a user service it is
    the user unit (``app.service``), not the ``user@1000.service`` around it;
    a cgroup a service delegates below itself still belongs to that service.
    """
    for seg in reversed(segments(path)):
        if SYSTEMD_UNIT_RE.match(seg):
            return seg
    return None
