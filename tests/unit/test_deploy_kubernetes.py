"""The Kubernetes manifests, validated offline against the API's JSON schemas.

Schemas come from the kubernetes-validate package (strict mode: unknown fields
are errors, so a misspelt field cannot slip through as it would with
``kubectl apply``).  The kustomization is rendered with ``kubectl kustomize``,
so generated ConfigMaps and the names that refer to them are checked as the
cluster would receive them.
"""

from __future__ import annotations

import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from sidecar.attest.entries import load_entries_text
from sidecar.collector.config import load_config as load_collector_config
from sidecar.daemon import config as daemon_config
from sidecar.policy.load import load_policy_text

REPO = Path(__file__).resolve().parents[2]
KUBE = REPO / "deploy" / "kubernetes"
# 1.30 is the oldest release with securityContext.appArmorProfile.
VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]

Obj = dict[str, Any]


def kustomization() -> Obj:
    data: Obj = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    return data


def documents(path: Path) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@cache
def rendered_text() -> str:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is missing: run scripts/install-ops-deps.sh"
    result = subprocess.run(
        [kubectl, "kustomize", str(KUBE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def rendered() -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(rendered_text()) if doc is not None]


def find(kind: str, name: str) -> Obj:
    matches = [d for d in rendered() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} objects"
    return matches[0]


def generated(name: str) -> Obj:
    """A ConfigMap from the generator, whether or not its name carries a hash."""
    matches = [
        d
        for d in rendered()
        if d["kind"] == "ConfigMap"
        and (d["metadata"]["name"] == name or d["metadata"]["name"].startswith(name + "-"))
    ]
    assert len(matches) == 1, f"ConfigMap {name}: {len(matches)} objects"
    return matches[0]


def pod_spec(kind: str, name: str) -> Obj:
    spec: Obj = find(kind, name)["spec"]["template"]["spec"]
    return spec


def container(kind: str, name: str) -> Obj:
    (only,) = pod_spec(kind, name)["containers"]
    assert isinstance(only, dict)
    return only


def validate(obj: Obj, version: str) -> None:
    kubernetes_validate.validate(obj, version, strict=True)


def test_kustomization_lists_every_manifest_file() -> None:
    on_disk = {p.name for p in KUBE.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization()["resources"]) == on_disk


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", sorted(kustomization()["resources"]))
def test_manifest_file_is_valid_against_the_kubernetes_schema(name: str, version: str) -> None:
    docs = documents(KUBE / name)
    assert docs
    for doc in docs:
        validate(doc, version)


@pytest.mark.parametrize("version", VERSIONS)
def test_rendered_kustomization_is_valid_against_the_kubernetes_schema(version: str) -> None:
    docs = rendered()
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        ["Namespace"] * 2
        + ["ServiceAccount"] * 2
        + ["ConfigMap"] * 3
        + ["DaemonSet", "Deployment", "Service", "PersistentVolumeClaim"]
    )
    for doc in docs:
        validate(doc, version)


def test_strict_schema_rejects_a_misspelt_field() -> None:
    """Guards the tests above: a typo in a pod spec is an error, not ignored."""
    (daemonset,) = documents(KUBE / "daemon-daemonset.yaml")
    daemonset["spec"]["template"]["spec"]["hostPid"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(daemonset, VERSIONS[-1])


def test_daemon_runs_in_host_pid_namespace_without_privileged_mode() -> None:
    spec = pod_spec("DaemonSet", "sidecar-daemon")
    daemon = container("DaemonSet", "sidecar-daemon")
    assert spec["hostPID"] is True
    assert daemon["command"][:2] == ["sidecar", "run"]
    security = daemon["securityContext"]
    assert security["privileged"] is False
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert set(security["capabilities"]["add"]) == {
        "BPF",
        "PERFMON",
        "NET_ADMIN",
        "SYS_PTRACE",
        "DAC_READ_SEARCH",
        "KILL",
    }


def test_daemon_mounts_the_host_paths_it_needs_and_only_writes_its_own() -> None:
    spec = pod_spec("DaemonSet", "sidecar-daemon")
    host_paths = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    mounts = {
        host_paths[m["name"]]: (m["mountPath"], m.get("readOnly", False))
        for m in container("DaemonSet", "sidecar-daemon")["volumeMounts"]
        if m["name"] in host_paths
    }
    assert mounts == {
        "/sys/fs/bpf": ("/sys/fs/bpf", False),
        "/sys/kernel/tracing": ("/sys/kernel/tracing", True),
        "/sys/fs/cgroup": ("/sys/fs/cgroup", True),
        "/lib/modules": ("/lib/modules", True),
        "/usr/src": ("/usr/src", True),
        "/run/sidecar": ("/run/sidecar", False),
        "/var/lib/sidecar": ("/var/lib/sidecar", False),
    }


def mounted_configmap(mount_path: str) -> tuple[Obj, Obj]:
    """(volumeMount, ConfigMap) of the daemon's volume mounted at ``mount_path``."""
    (mount,) = [
        m
        for m in container("DaemonSet", "sidecar-daemon")["volumeMounts"]
        if m["mountPath"] == mount_path
    ]
    (volume,) = [
        v for v in pod_spec("DaemonSet", "sidecar-daemon")["volumes"] if v["name"] == mount["name"]
    ]
    return mount, find("ConfigMap", volume["configMap"]["name"])


def test_policy_and_entries_reach_the_daemon_in_a_way_that_hot_reloads() -> None:
    mount, policy = mounted_configmap("/etc/sidecar")
    # subPath mounts are never updated by the kubelet: the change would not arrive.
    assert "subPath" not in mount
    assert mount["readOnly"] is True
    # Fixed name: edits update the same object, so the mounted files change in place.
    assert policy["metadata"]["name"] == "sidecar-policy"
    assert set(policy["data"]) == {"policy.yaml", "entries.yaml"}


def test_daemon_settings_come_from_a_hashed_configmap_that_rolls_the_pods() -> None:
    mount, settings = mounted_configmap("/etc/sidecar-config")
    assert settings["metadata"]["name"].startswith("sidecar-config-")
    assert set(settings["data"]) == {"config.yaml"}
    command = container("DaemonSet", "sidecar-daemon")["command"]
    assert command[command.index("--config") + 1] == f"{mount['mountPath']}/config.yaml"


def test_collector_keeps_its_store_on_the_claim_and_service_selects_its_pods() -> None:
    spec = pod_spec("Deployment", "sidecar-collector")
    deployment = find("Deployment", "sidecar-collector")
    claim = find("PersistentVolumeClaim", "sidecar-collector-store")
    service = find("Service", "sidecar-collector")
    (store,) = [v for v in spec["volumes"] if "persistentVolumeClaim" in v]
    assert store["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    (store_mount,) = [
        m
        for m in container("Deployment", "sidecar-collector")["volumeMounts"]
        if m["name"] == store["name"]
    ]
    assert store_mount["mountPath"] == "/var/lib/sidecar-collector"
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    ports = {
        p["name"]: p["containerPort"] for p in container("Deployment", "sidecar-collector")["ports"]
    }
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports.keys()


def test_collector_pod_meets_restricted_pod_security() -> None:
    spec = pod_spec("Deployment", "sidecar-collector")
    security = container("Deployment", "sidecar-collector")["securityContext"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert not spec.get("hostPID") and not spec.get("hostNetwork")
    assert not any("hostPath" in v for v in spec["volumes"])
    namespace = find("Namespace", find("Deployment", "sidecar-collector")["metadata"]["namespace"])
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_workloads_use_their_own_service_accounts_without_api_tokens() -> None:
    for kind, name, namespace in [
        ("DaemonSet", "sidecar-daemon", "sidecar-system"),
        ("Deployment", "sidecar-collector", "sidecar-collector"),
    ]:
        spec = pod_spec(kind, name)
        account = find("ServiceAccount", spec["serviceAccountName"])
        assert account["metadata"]["namespace"] == namespace
        assert find(kind, name)["metadata"]["namespace"] == namespace
        assert spec["automountServiceAccountToken"] is False
        assert account["automountServiceAccountToken"] is False


def test_configmap_files_load_with_the_products_own_loaders(tmp_path: Path) -> None:
    policy = generated("sidecar-policy")["data"]
    compiled = load_policy_text(policy["policy.yaml"], "policy.yaml")
    assert "spiffe://example.org/agent/triage" in compiled.identities
    entries = load_entries_text(policy["entries.yaml"], "entries.yaml")
    assert entries.spiffe_ids == {"spiffe://example.org/agent/triage"}
    settings = tmp_path / "config.yaml"
    settings.write_text(generated("sidecar-config")["data"]["config.yaml"])
    assert daemon_config.load(settings).pin_dir == Path("/sys/fs/bpf/sidecar")
    collector = tmp_path / "collector.yaml"
    collector.write_text(generated("sidecar-collector-config")["data"]["collector.yaml"])
    loaded = load_collector_config(collector)
    assert loaded.data_dir == Path("/var/lib/sidecar-collector")
    service = find("Service", "sidecar-collector")
    dns = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc"
    assert dns in loaded.server_names


def metrics_address(config_name: str) -> tuple[str, int]:
    text = generated(config_name)["data"]
    (doc,) = text.values()
    host, _, port = yaml.safe_load(doc)["metrics"].rpartition(":")
    return host, int(port)


def test_daemon_metrics_stay_on_the_nodes_loopback_unless_the_operator_opts_in(
    tmp_path: Path,
) -> None:
    settings = tmp_path / "config.yaml"
    settings.write_text(generated("sidecar-config")["data"]["config.yaml"])
    assert daemon_config.load(settings).metrics == "127.0.0.1:9464"
    # hostNetwork: the pod's 127.0.0.1 is the node's.
    assert pod_spec("DaemonSet", "sidecar-daemon")["hostNetwork"] is True


def test_daemon_probes_dial_the_health_endpoint_where_it_listens() -> None:
    host, port = metrics_address("sidecar-config")
    daemon = container("DaemonSet", "sidecar-daemon")
    paths = {}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = daemon[probe]["httpGet"]
        assert (get["host"], get["port"]) == (host, port), probe
        paths[probe] = get["path"]
    assert paths == {
        "startupProbe": "/healthz",
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
    }
    startup = daemon["startupProbe"]
    # BCC compiles at start: the start-up budget covers minutes, not seconds.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120


def test_collector_probes_dial_its_health_endpoint_on_the_pods_address() -> None:
    host, port = metrics_address("sidecar-collector-config")
    collector = container("Deployment", "sidecar-collector")
    ports = {p["name"]: p["containerPort"] for p in collector["ports"]}
    assert host == "0.0.0.0" and ports["metrics"] == port  # its own netns, not the node's
    assert collector["livenessProbe"]["httpGet"] == {"port": "metrics", "path": "/healthz"}
    assert collector["readinessProbe"]["httpGet"] == {"port": "metrics", "path": "/readyz"}
    assert collector["startupProbe"]["httpGet"] == {"port": "metrics", "path": "/healthz"}


def bpffs_init() -> Obj:
    spec = pod_spec("DaemonSet", "sidecar-daemon")
    (init,) = [c for c in spec["initContainers"] if c["name"] == "mount-bpffs"]
    assert isinstance(init, dict)
    return init


def test_an_init_container_mounts_bpffs_on_the_node_before_the_daemon_starts() -> None:
    spec = pod_spec("DaemonSet", "sidecar-daemon")
    init = bpffs_init()
    (mount,) = init["volumeMounts"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert volume["hostPath"]["path"] == "/sys/fs/bpf"
    assert mount["mountPath"] == "/sys/fs/bpf"
    # The mount must reach the node (and so the daemon container and later pods).
    assert mount["mountPropagation"] == "Bidirectional"
    assert init["securityContext"]["privileged"] is True  # Bidirectional requires it
    (daemon_mount,) = [
        m
        for m in container("DaemonSet", "sidecar-daemon")["volumeMounts"]
        if m["name"] == mount["name"]
    ]
    assert daemon_mount["mountPropagation"] == "HostToContainer"


@pytest.mark.parametrize(
    ("mounts", "mounted"),
    [
        ("sysfs /sys sysfs rw 0 0\n", True),
        ("sysfs /sys sysfs rw 0 0\nbpf /sys/fs/bpf bpf rw,relatime 0 0\n", False),
        ("sysfs /sys sysfs rw 0 0\nnone /sys/fs/bpf bpf rw 0 0\n", False),
    ],
)
def test_the_bpffs_init_step_mounts_only_when_no_bpffs_is_there(
    tmp_path: Path, mounts: str, mounted: bool
) -> None:
    """Runs the init container's own command, with ``mount`` standing in as a logger."""
    log = tmp_path / "mount.log"
    fake = tmp_path / "bin" / "mount"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    fake.chmod(0o755)
    table = tmp_path / "mounts"
    table.write_text(mounts)
    command = bpffs_init()["command"]
    env = {"PATH": f"{fake.parent}:/usr/bin:/bin", "MOUNTS": str(table)}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, result.stderr
    if mounted:
        assert log.read_text() == "-t bpf bpf /sys/fs/bpf\n"
    else:
        assert not log.exists()


# ---- enrollment: each node gets its credentials from the bootstrap Secret ----------


def init_container(name: str) -> Obj:
    (init,) = [
        c for c in pod_spec("DaemonSet", "sidecar-daemon")["initContainers"] if c["name"] == name
    ]
    assert isinstance(init, dict)
    return init


def volume_of(mounts: list[Obj], path: str) -> tuple[Obj, Obj]:
    """(volumeMount, volume) of the DaemonSet volume mounted at the folder holding ``path``."""
    (mount,) = [
        m for m in mounts if path == m["mountPath"] or path.startswith(m["mountPath"] + "/")
    ]
    (volume,) = [
        v for v in pod_spec("DaemonSet", "sidecar-daemon")["volumes"] if v["name"] == mount["name"]
    ]
    return mount, volume


def expanded(command: list[str], env: list[Obj]) -> list[str]:
    """``$(VAR)`` replaced as the kubelet does, by a placeholder naming the variable's source."""
    sources = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in env if "valueFrom" in e}
    return [sources.get(a[2:-1], a) if a.startswith("$(") else a for a in command]


def collector_service_address(port_name: str) -> str:
    service = find("Service", "sidecar-collector")
    (port,) = [p["port"] for p in service["spec"]["ports"] if p["name"] == port_name]
    return f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc:{port}"


def test_each_node_enrolls_in_an_init_step_with_the_bootstrap_secret_and_its_node_name() -> None:
    from sidecar.cli import build_parser

    spec = pod_spec("DaemonSet", "sidecar-daemon")
    names = [c["name"] for c in spec["initContainers"]]
    assert names.index("enroll") > names.index("mount-bpffs")
    init = init_container("enroll")
    # The command is one the product's own parser accepts, with these meanings.
    command = expanded(init["command"], init["env"])
    assert command[0] == "sidecar"
    args = build_parser().parse_args(command[1:])
    assert args.handler.__name__ == "_cmd_enroll"
    assert args.node_name == "spec.nodeName"  # $(NODE_NAME), from the downward API
    assert args.token is None and not args.renew
    assert args.collector == collector_service_address("enroll")
    mounts = init["volumeMounts"]
    # The token: the Secret sidecar-bootstrap's key `token`, read-only.
    mount, volume = volume_of(mounts, str(args.bootstrap_token_file))
    assert mount["readOnly"] is True
    assert volume["secret"]["secretName"] == "sidecar-bootstrap"
    items = {i["key"]: i["path"] for i in volume["secret"]["items"]}
    assert f"{mount['mountPath']}/{items['token']}" == str(args.bootstrap_token_file)
    # The CA bundle: published by the operator in a ConfigMap, never fetched unchecked.
    mount, volume = volume_of(mounts, str(args.bundle))
    assert mount["readOnly"] is True
    assert volume["configMap"]["name"] == "sidecar-collector-bundle"
    assert volume["configMap"].get("optional") is not True
    # The credentials: on the node, where the daemon finds and renews them.
    mount, volume = volume_of(mounts, str(args.out))
    assert volume["hostPath"]["path"] == "/var/lib/sidecar/host"
    assert mount.get("readOnly", False) is False
    # Nothing more than writing a root-owned folder of the node.
    security = init["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert not security.get("privileged")


def test_the_bootstrap_token_reaches_the_enroll_step_only() -> None:
    spec = pod_spec("DaemonSet", "sidecar-daemon")
    (secret,) = [v for v in spec["volumes"] if "secret" in v]
    users = [
        c["name"]
        for c in spec["initContainers"] + spec["containers"]
        if any(m["name"] == secret["name"] for m in c.get("volumeMounts", []))
    ]
    assert users == ["enroll"]
    daemon = container("DaemonSet", "sidecar-daemon")
    assert not any("secretKeyRef" in e.get("valueFrom", {}) for e in daemon.get("env", []))


def test_the_daemon_streams_to_the_collector_service_as_its_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = tmp_path / "config.yaml"
    settings.write_text(generated("sidecar-config")["data"]["config.yaml"])
    daemon = container("DaemonSet", "sidecar-daemon")
    env = {e["name"]: e for e in daemon["env"]}
    # Events name the node: the host name of the credentials it enrolled with.
    assert env["SIDECAR_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    monkeypatch.setenv("SIDECAR_HOST", "node-7.example.internal")
    cfg = daemon_config.load(settings)
    assert cfg.host == "node-7.example.internal"  # the file does not override it
    assert cfg.collector == (collector_service_address("grpc"),)
    # The collector's certificate names what the daemon dials.
    collector = tmp_path / "collector.yaml"
    collector.write_text(generated("sidecar-collector-config")["data"]["collector.yaml"])
    server_names = load_collector_config(collector).server_names
    assert cfg.collector[0].rpartition(":")[0] in server_names
    # The daemon reads the credentials where the enroll step wrote them: the same
    # node folder, through the daemon's own mount.
    mount, volume = volume_of(daemon["volumeMounts"], str(cfg.collector_credentials))
    node_path = (
        volume["hostPath"]["path"] + str(cfg.collector_credentials)[len(mount["mountPath"]) :]
    )
    init = init_container("enroll")
    out = init["command"][init["command"].index("--out") + 1]
    _, init_volume = volume_of(init["volumeMounts"], out)
    assert node_path == init_volume["hostPath"]["path"]
    assert mount.get("readOnly", False) is False  # renewal rewrites them
