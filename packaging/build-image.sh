#!/usr/bin/env bash
# Build the daemon and collector OCI images from Debian packages only (`make image`).
#
#   packaging/build-image.sh dist/sidecar_<version>_<arch>.deb
#
# mmdebstrap makes a bookworm root (its default sources for Debian: the suite,
# its -updates and -security) of the Essential packages plus the
# package's Depends (python3, python3-bpfcc, libbpf1, ...), without
# Recommends, without apt; dpkg then installs the .deb itself, so the
# images hold the same files as a host that installed it.  Documentation,
# manual pages and translations are left out (copyright files kept), and the
# logs and caches the installation wrote are removed.  `podman import` makes
# one image for each role from the same root (one layer, stored once):
#
#   localhost/sidecar:<version>            sidecar run --config /etc/sidecar/config.yaml
#   localhost/sidecar-collector:<version>  sidecar collector --config /etc/sidecar/collector.yaml
#                                          (as uid 65532)
#
# No base image is pulled from a registry.  The list of installed packages
# (name, architecture, version) is written next to the .deb as
# sidecar-image-packages.txt and is in the image at
# /usr/share/sidecar/image-packages.txt; tests/packaging compares it with
# packaging/image-packages.txt.
#
# Environment: SUITE (bookworm), MIRROR (the host's apt sources when unset),
# CACHE (downloaded .debs, default build/pkg-cache/archives), PODMAN_ARGS
# (extra podman arguments, e.g. a --root for tests), NO_IMPORT=1 (stop at the
# root tarball, build/image/rootfs.tar).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
deb=$(realpath "${1:?usage: build-image.sh SIDECAR_DEB}")
suite=${SUITE:-bookworm}
cache=${CACHE:-$repo/build/pkg-cache/archives}
work=$repo/build/image
read -r -a podman_args <<<"${PODMAN_ARGS:-}"

version=$(dpkg-deb -f "$deb" Version)
# Depends without version constraints: mmdebstrap installs those names from
# the suite, then dpkg checks the constraints when it installs the .deb.
deps=$(dpkg-deb -f "$deb" Depends | tr ',|' '\n\n' | sed 's/(.*)//; s/[[:space:]]//g' \
    | grep -v '^$' | LC_ALL=C sort -u | paste -sd, -)
name=$(basename "$deb")

rm -rf "$work"
mkdir -p "$work" "$cache"
mirror=()
[ -n "${MIRROR:-}" ] && mirror=("$MIRROR")

# The merged-usr hook makes /usr merged the way debootstrap does and installs
# usr-is-merged, so init-system-helpers' "usrmerge | usr-is-merged" does not
# bring the usrmerge converter (and Perl with it) into the image.
mmdebstrap --quiet --variant=essential --include="$deps" \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --aptopt='APT::Install-Recommends "false"' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --skip=download/empty \
    --setup-hook='mkdir -p "$1"/var/cache/apt/archives' \
    --setup-hook="sync-in '$cache' /var/cache/apt/archives" \
    --customize-hook="sync-out /var/cache/apt/archives '$cache'" \
    --customize-hook="copy-in '$deb' /tmp" \
    --customize-hook="chroot \"\$1\" dpkg -i '/tmp/$name' >/dev/null" \
    --customize-hook='rm -rf "$1"/tmp/* "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/* "$1"/var/log/* "$1"/var/cache/debconf/*-old "$1"/var/lib/dpkg/*-old' \
    --customize-hook='chroot "$1" dpkg-query -W -f "\${Package} \${Architecture} \${Version}\n" | LC_ALL=C sort > "$1"/usr/share/sidecar/image-packages.txt' \
    --customize-hook="cp \"\$1\"/usr/share/sidecar/image-packages.txt '$work/packages.txt'" \
    "$suite" "$work/rootfs.tar" "${mirror[@]}"

out=$(dirname "$deb")
cp "$work/packages.txt" "$out/sidecar-image-packages.txt"
[ "${NO_IMPORT:-0}" = 1 ] && { echo "$work/rootfs.tar"; exit 0; }

list_sha=$(sha256sum "$work/packages.txt" | cut -d' ' -f1)
common=(
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
    --change 'ENTRYPOINT ["/usr/bin/sidecar"]'
    --change "LABEL org.opencontainers.image.version=$version"
    --change 'LABEL org.opencontainers.image.licenses=Apache-2.0'
    --change "LABEL org.opencontainers.image.base.name=debian:$suite"
    --change "LABEL io.sidecar.packages.sha256=$list_sha"
)
podman "${podman_args[@]}" import -q "${common[@]}" \
    --change 'CMD ["run", "--config", "/etc/sidecar/config.yaml"]' \
    --change 'LABEL org.opencontainers.image.title=sidecar-daemon' \
    "$work/rootfs.tar" "localhost/sidecar:$version" >/dev/null
podman "${podman_args[@]}" import -q "${common[@]}" \
    --change 'USER 65532:65532' \
    --change 'CMD ["collector", "--config", "/etc/sidecar/collector.yaml"]' \
    --change 'LABEL org.opencontainers.image.title=sidecar-collector' \
    "$work/rootfs.tar" "localhost/sidecar-collector:$version" >/dev/null
rm -f "$work/rootfs.tar"
echo "localhost/sidecar:$version localhost/sidecar-collector:$version"
