"""Selector syntax, normalisation and matching against hand-made process facts."""

from __future__ import annotations

import dataclasses

import pytest

from sidecar.attest.facts import ProcessFacts
from sidecar.attest.selectors import Selector, compatible, parse_selector

TD = "example.org"
SHA = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
CID = "4e7ad5e7d0a1fa3ac2e7b2c3c6b9e1c0d9f2a8b7c6d5e4f3a2b1c0d9e8f7a6b5"
UID = "3d0a0f6e-7c2b-4d3e-9f1a-2b3c4d5e6f70"

BASE = ProcessFacts(
    pid=4242,
    start_time=1000,
    uid=1000,
    gid=100,
    user="bot",
    exe_path="/usr/bin/python3.11",
    exe_deleted=False,
    exe_dev=1,
    exe_ino=2,
    exe_size=3,
    exe_mtime_ns=4,
    sha256=SHA,
    cgroup_path=(
        "/kubepods.slice/kubepods-burstable.slice/"
        f"kubepods-burstable-pod{UID.replace('-', '_')}.slice/cri-containerd-{CID}.scope"
    ),
    parent_identity="spiffe://example.org/agent/planner",
)


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("unix:uid:1000", "unix:uid:1000"),
        ("unix:uid:007", "unix:uid:7"),
        ("unix:gid:0", "unix:gid:0"),
        ("unix:user:svc-bot_1", "unix:user:svc-bot_1"),
        ("unix:path:/usr/bin/python3.11", "unix:path:/usr/bin/python3.11"),
        (f"unix:sha256:{SHA}", f"unix:sha256:{SHA}"),
        ("cgroup:path:/agents/", "cgroup:path:/agents"),
        ("cgroup:path:/", "cgroup:path:/"),
        ("systemd:unit:agent-runner.service", "systemd:unit:agent-runner.service"),
        ("systemd:unit:getty@tty1.service", "systemd:unit:getty@tty1.service"),
        (f"k8s:pod-uid:{UID}", f"k8s:pod-uid:{UID}"),
        (f"container:id:{CID}", f"container:id:{CID}"),
        (
            "parent:id:spiffe://example.org/agent/planner",
            "parent:id:spiffe://example.org/agent/planner",
        ),
    ],
)
def test_valid_selectors_parse_to_their_normal_form(text: str, normalised: str) -> None:
    assert str(parse_selector(text, TD)) == normalised


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("unix:pid:12", "unknown selector type"),
        ("uid:1000", "unknown selector type"),
        ("unix", "unknown selector type"),
        ("unix:uid:-1", "decimal number"),
        ("unix:uid:abc", "decimal number"),
        ("unix:uid:", "decimal number"),
        ("unix:uid:4294967295", "at most"),
        ("unix:uid:١٢", "decimal number"),  # non-ASCII digits
        ("unix:user:bad name", "user name"),
        ("unix:path:bin/sh", "absolute"),
        ("unix:path:/usr/bin/../bin/sh", "normalised"),
        ("unix:path:/usr/bin/", "normalised"),
        (f"unix:sha256:{SHA.upper()}", "lower-case hex"),
        (f"unix:sha256:{SHA[:-1]}", "lower-case hex"),
        ("cgroup:path:agents", "start with '/'"),
        ("cgroup:path:/a//b", "segments"),
        ("cgroup:path:/a/../b", "segments"),
        ("systemd:unit:agent-runner", "systemd unit"),
        ("systemd:unit:agent.timer", "systemd unit"),
        ("k8s:pod-uid:not-a-uid", "pod UID"),
        (f"k8s:pod-uid:{UID.upper()}", "pod UID"),
        ("container:id:4e7ad5e7d0a1", "64 lower-case hex"),
        ("parent:id:spiffe://other.org/agent", "not in trust domain"),
        ("parent:id:https://example.org/agent", "must start with 'spiffe://'"),
    ],
)
def test_malformed_selectors_are_refused_with_the_reason(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_selector(text, TD)


def _matches(text: str, **changes: object) -> bool:
    facts = dataclasses.replace(BASE, **changes)  # type: ignore[arg-type]
    return parse_selector(text, TD).matches(facts)


@pytest.mark.parametrize(
    "text",
    [
        "unix:uid:1000",
        "unix:gid:100",
        "unix:user:bot",
        "unix:path:/usr/bin/python3.11",
        f"unix:sha256:{SHA}",
        "cgroup:path:/kubepods.slice",
        f"systemd:unit:cri-containerd-{CID}.scope",
        f"k8s:pod-uid:{UID}",
        f"container:id:{CID}",
        "parent:id:spiffe://example.org/agent/planner",
    ],
)
def test_each_selector_type_matches_the_fact_it_names(text: str) -> None:
    assert _matches(text)


@pytest.mark.parametrize(
    ("text", "changes"),
    [
        ("unix:uid:1000", {"uid": 1001}),
        ("unix:gid:100", {"gid": 0}),
        ("unix:user:bot", {"user": None}),
        ("unix:path:/usr/bin/python3.11", {"exe_path": "/usr/bin/python3.12"}),
        ("unix:path:/usr/bin/python3.11", {"exe_deleted": True}),
        (f"unix:sha256:{SHA}", {"sha256": "0" * 64}),
        (f"unix:sha256:{SHA}", {"sha256": None}),
        ("cgroup:path:/kubepods", {}),  # segment prefix, not string prefix
        ("cgroup:path:/kubepods.slice", {"cgroup_path": None}),
        (f"k8s:pod-uid:{UID}", {"cgroup_path": "/system.slice/x.service"}),
        (f"container:id:{CID}", {"cgroup_path": "/"}),
        ("systemd:unit:x.service", {}),
        ("parent:id:spiffe://example.org/agent/planner", {"parent_identity": None}),
    ],
)
def test_selector_does_not_match_when_its_fact_differs(
    text: str, changes: dict[str, object]
) -> None:
    assert not _matches(text, **changes)


def test_cgroup_prefixes_are_compatible_only_when_nested() -> None:
    a = Selector("cgroup:path", "/agents")
    assert compatible(a, Selector("cgroup:path", "/agents/bot"))
    assert not compatible(a, Selector("cgroup:path", "/other"))
    assert not compatible(Selector("unix:uid", "1"), Selector("unix:uid", "2"))
