"""Parsing systemd units, pod UIDs and container IDs out of cgroup v2 paths."""

from __future__ import annotations

import pytest

from sidecar.attest import cgroup

CID = "4e7ad5e7d0a1fa3ac2e7b2c3c6b9e1c0d9f2a8b7c6d5e4f3a2b1c0d9e8f7a6b5"
CID2 = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
UID = "3d0a0f6e-7c2b-4d3e-9f1a-2b3c4d5e6f70"
UID_ = UID.replace("-", "_")
STATIC = "6f1c5c1e9d2b8a7f4e3d2c1b0a9f8e7d"

# (cgroup path, systemd unit, pod uid, container id)
CASES = [
    # kubelet, systemd driver, containerd
    (
        f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/"
        f"cri-containerd-{CID}.scope",
        f"cri-containerd-{CID}.scope",
        UID,
        CID,
    ),
    # Guaranteed QoS has no QoS slice
    (
        f"/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope",
        f"cri-containerd-{CID}.scope",
        UID,
        CID,
    ),
    # CRI-O, systemd driver
    (
        f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/"
        f"crio-{CID}.scope",
        f"crio-{CID}.scope",
        UID,
        CID,
    ),
    # CRI-O's conmon monitor is in the pod but is not the container
    (
        f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/"
        f"crio-conmon-{CID}.scope",
        f"crio-conmon-{CID}.scope",
        UID,
        None,
    ),
    # kind: kubelet in a node container, kubelet.slice prefix
    (
        "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
        f"kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope",
        f"cri-containerd-{CID}.scope",
        UID,
        CID,
    ),
    # kubelet, cgroupfs driver
    (f"/kubepods/burstable/pod{UID}/{CID}", None, UID, CID),
    (f"/kubepods/pod{UID}/{CID}", None, UID, CID),
    # static pod: the UID is a hash, not a UUID
    (f"/kubepods/besteffort/pod{STATIC}/{CID}", None, STATIC, CID),
    # the pod's own cgroup (pause-less sandbox processes): pod known, no container
    (
        f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice",
        None,
        UID,
        None,
    ),
    # docker, systemd and cgroupfs drivers
    (f"/system.slice/docker-{CID}.scope", f"docker-{CID}.scope", None, CID),
    (f"/docker/{CID}", None, None, CID),
    # podman rootless, with the container's own sub-cgroup
    (
        f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CID}.scope/container",
        f"libpod-{CID}.scope",
        None,
        CID,
    ),
    # kind node (docker) running a pod: the innermost container wins
    (
        f"/system.slice/docker-{CID2}.scope/kubelet.slice/kubelet-kubepods.slice/"
        f"kubelet-kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope",
        f"cri-containerd-{CID}.scope",
        UID,
        CID,
    ),
    # plain systemd services and scopes
    ("/system.slice/agent-runner.service", "agent-runner.service", None, None),
    ("/system.slice/agent-runner.service/worker", "agent-runner.service", None, None),
    (
        "/user.slice/user-1000.slice/user@1000.service/app.slice/research-bot.service",
        "research-bot.service",
        None,
        None,
    ),
    ("/user.slice/user-1000.slice/session-3.scope", "session-3.scope", None, None),
    ("/system.slice/system-getty.slice/getty@tty1.service", "getty@tty1.service", None, None),
    # nothing to find
    ("/", None, None, None),
    ("/agents/research", None, None, None),
    # a 'pod' cgroup outside kubepods is not a Kubernetes pod
    (f"/custom/pod{UID}", None, None, None),
    # a container-like name that is too short is not a container ID
    ("/docker/4e7ad5e7d0a1", None, None, None),
]


@pytest.mark.parametrize(("path", "unit", "pod", "container"), CASES)
def test_cgroup_path_yields_unit_pod_and_container(
    path: str, unit: str | None, pod: str | None, container: str | None
) -> None:
    assert cgroup.systemd_unit(path) == unit
    assert cgroup.pod_uid(path) == pod
    assert cgroup.container_id(path) == container


@pytest.mark.parametrize(
    ("path", "prefix", "expected"),
    [
        ("/agents/bot", "/agents", True),
        ("/agents/bot", "/agents/", True),
        ("/agents", "/agents", True),
        ("/agents-old/bot", "/agents", False),
        ("/agentsx", "/agents", False),
        ("/other/agents", "/agents", False),
        ("/anything", "/", True),
        ("/", "/agents", False),
    ],
)
def test_cgroup_prefix_compares_whole_segments(path: str, prefix: str, expected: bool) -> None:
    assert cgroup.is_under(path, prefix) is expected
