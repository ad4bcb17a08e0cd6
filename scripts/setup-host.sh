#!/usr/bin/env bash
# Prepare a Debian 12 / Ubuntu 22.04+ host to build, run and test the sidecar.
# Idempotent: installs only what is missing. Needs root.
#
#   - BCC from the distribution (python3-bpfcc), libbpf, bpftool, python3-venv
#   - kernel headers for BCC at /lib/modules/$(uname -r)/build. When the
#     running kernel has no headers package (custom or cloud kernels), the
#     fallback links the distribution's newest header tree there: the BPF
#     programs use only UAPI structs, tracepoint formats and helpers, so any
#     recent tree compiles them correctly.
#   - tracefs at /sys/kernel/tracing and bpffs at /sys/fs/bpf
#   - PostgreSQL server programs (initdb, pg_ctl): the collector tests start a
#     throwaway cluster of their own on a unix socket. The distribution's
#     service that the package starts is not used; it is left as the package sets it.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
  echo "setup-host: must run as root (it installs packages and mounts tracefs/bpffs)" >&2
  exit 2
fi

export DEBIAN_FRONTEND=noninteractive
release=$(uname -r)
apt_updated=0
apt_install() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ $apt_updated -eq 0 ]; then apt-get update -q >/dev/null; apt_updated=1; fi
  echo "setup-host: installing ${missing[*]}"
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
}

apt_install python3-bpfcc libbpf1 bpftool python3-venv python3-dev gcc make systemd
# clang and libbpf-dev build the unix-socket hooks (bpf/unix.bpf.c), which BCC cannot.
apt_install clang libbpf-dev linux-libc-dev
# `make deb` / `make image` and their tests (tests/packaging,
# tests/kernel/test_images_in_podman.py):
# mmdebstrap makes the clean Debian roots, podman runs the images. The tests
# run podman as root with runc (crun cannot run on hosts with a hybrid cgroup
# layout), chosen per command line: the host's container config is left alone.
apt_install mmdebstrap podman runc
# The collector's PostgreSQL store is tested against a real server (tests/conftest.py).
apt_install postgresql
# promtool checks the shipped alert rules and a metrics scrape
# (tests/unit/test_observability.py). Debian ships it only inside the
# Prometheus server package (about 19 MB, JavaScript libraries for its web UI
# as the only other dependencies); the server itself is not wanted on a build
# host, so the install neither starts it nor enables it at boot.
if ! dpkg-query -W -f='${Status}' prometheus 2>/dev/null | grep -q "install ok installed"; then
  if [ -d /run/systemd/system ]; then
    systemctl mask prometheus.service >/dev/null
  fi
  made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    # Debian's standard switch for "do not start services while installing".
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    made_policy=1
  fi
  rc=0
  apt_install prometheus || rc=$?
  if [ $made_policy -eq 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
  [ $rc -eq 0 ] || exit $rc
fi

# Kernel headers for BCC.
build=/lib/modules/$release/build
if [ ! -e "$build/include" ] && [ ! -e "$build/Makefile" ]; then
  if [ $apt_updated -eq 0 ]; then apt-get update -q >/dev/null; apt_updated=1; fi
  if apt-cache show "linux-headers-$release" >/dev/null 2>&1; then
    apt_install "linux-headers-$release"
  else
    . /etc/os-release
    case "${ID:-}" in
      ubuntu) meta=linux-headers-generic ;;
      *) if [ "$(dpkg --print-architecture)" = amd64 ]; then meta=linux-headers-cloud-amd64; else meta=linux-headers-$(dpkg --print-architecture); fi ;;
    esac
    echo "setup-host: no headers package for kernel $release; falling back to $meta"
    apt_install "$meta"
    tree=$(ls -d /usr/src/linux-headers-*/ 2>/dev/null | grep -v -- '-common/$' | sort -V | tail -n 1)
    tree=${tree%/}
    if [ -z "$tree" ]; then
      echo "setup-host: no header tree found under /usr/src after installing $meta" >&2
      exit 2
    fi
    mkdir -p "/lib/modules/$release"
    ln -sfn "$tree" "/lib/modules/$release/build"
    common=${tree%-*-amd64}-common
    case "$tree" in *-cloud-amd64) common=${tree%-cloud-amd64}-common ;; esac
    if [ -d "$common" ]; then
      ln -sfn "$common" "/lib/modules/$release/source"
    else
      ln -sfn "$tree" "/lib/modules/$release/source"
    fi
    echo "setup-host: linked $tree as the header tree of $release"
  fi
fi

# File systems the daemon needs.
grep -q ' tracefs ' /proc/mounts || mount -t tracefs tracefs /sys/kernel/tracing
grep -q ' /sys/fs/bpf bpf ' /proc/mounts || mount -t bpf bpf /sys/fs/bpf
if ! grep -q ' cgroup2 ' /proc/mounts; then
  mkdir -p /sys/fs/cgroup/unified
  mount -t cgroup2 none /sys/fs/cgroup/unified
fi
