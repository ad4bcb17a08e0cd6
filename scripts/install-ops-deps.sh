#!/usr/bin/env bash
# Install what the deployment tests need (tests/unit/test_deploy_*.py and
# test_metrics.py) on a Debian 12 / Ubuntu 22.04+ host. Idempotent: installs
# only what is missing, so `make venv` can run it every time.
#
#   systemd-analyze        verify and score the units in systemd/
#   vagrant + libvirt      `vagrant validate` of vagrant/Vagrantfile: the libvirt
#                          provider is usable without a hypervisor running, so
#                          provider blocks are validated without booting a VM
#   kubectl                `kubectl kustomize` renders deploy/kubernetes
#   Python packages        kubernetes-validate (offline Kubernetes schemas),
#                          prometheus-client; installed with $PYTHON's pip when
#                          the venv lacks them (they belong in pyproject's extras)
#
# Usage (as root): PYTHON=.venv/bin/python scripts/install-ops-deps.sh
set -euo pipefail

PYTHON=${PYTHON:-}
PIP_PACKAGES=("kubernetes-validate>=1.30" "prometheus-client>=0.20")
PIP_MODULES=(kubernetes_validate prometheus_client)

log() { echo "install-ops-deps: $*" >&2; }

missing_apt=()
need_apt() {  # need_apt COMMAND PACKAGE: queue PACKAGE when COMMAND is absent
  command -v "$1" >/dev/null 2>&1 || missing_apt+=("$2")
}
need_apt systemd-analyze systemd
need_apt vagrant vagrant
# kubectl from any source will do (a cloud SDK's or Kubernetes' own repository);
# the distribution's kubernetes-client is the fallback.
need_apt kubectl kubernetes-client
if ! dpkg-query -W -f='${Status}' vagrant-libvirt 2>/dev/null | grep -q "install ok installed" \
  && ! { command -v vagrant >/dev/null 2>&1 && VAGRANT_CHECKPOINT_DISABLE=1 vagrant plugin list 2>/dev/null | grep -q '^vagrant-libvirt '; }; then
  missing_apt+=(vagrant-libvirt)
fi

missing_pip=()
if [ -n "$PYTHON" ]; then
  for i in "${!PIP_MODULES[@]}"; do
    "$PYTHON" -c "import ${PIP_MODULES[$i]}" 2>/dev/null || missing_pip+=("${PIP_PACKAGES[$i]}")
  done
fi

if [ ${#missing_apt[@]} -eq 0 ] && [ ${#missing_pip[@]} -eq 0 ]; then
  exit 0
fi

if [ ${#missing_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    # Not fatal, so that `make venv` works for an unprivileged developer; the
    # deployment tests name this script when they find a tool missing.
    log "as root, this would install: ${missing_apt[*]} (the deployment tests need them)"
  else
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    available=()
    for p in "${missing_apt[@]}"; do
      if apt-cache show "$p" >/dev/null 2>&1; then
        available+=("$p")
      else
        # Not fatal: the rest of the suite still runs, and the test that needs
        # it fails naming the tool, which can then come from elsewhere.
        log "package $p is not in this host's apt sources: install it another way"
      fi
    done
    if [ ${#available[@]} -gt 0 ]; then
      log "installing ${available[*]}"
      apt-get install -y -q --no-install-recommends "${available[@]}" >/dev/null
    fi
  fi
fi

if [ ${#missing_pip[@]} -gt 0 ]; then
  log "installing ${missing_pip[*]} into $PYTHON's environment"
  "$PYTHON" -m pip install -q "${missing_pip[@]}"
fi
