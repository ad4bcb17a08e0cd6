#!/usr/bin/env bash
# Build dist/sidecar_<version>_<arch>.deb (`make deb`).
#
# Layout of the package:
#   /usr/bin/sidecar                 launcher: the system python3 on the private tree
#   /usr/lib/sidecar/python/         the sidecar wheel and its Python libraries
#                                    (Debian 12's grpcio and protobuf are too old)
#   /usr/share/sidecar/bpf/          BPF C sources (BCC compiles them at start) and
#                                    unix.bpf.o, the unix-socket hooks built here
#                                    with clang, so that hosts need no clang
#   /lib/systemd/system/             sidecar.service, sidecar-collector.service
#   /etc/sidecar/                    example config.yaml, policy.yaml, entries.yaml,
#                                    collector.yaml (conffiles)
#   /var/lib/sidecar/                the daemon's state (0700), for runs outside
#                                    systemd; the units' StateDirectory= makes it too
#
# The Python libraries are the versions the build's virtualenv has (the ones
# `make test` ran against), pinned through a constraints file.
#
# Environment: PYTHON (a virtualenv of SYSTEM_PYTHON with pip, setuptools and
# the package's dependencies; default .venv/bin/python), SYSTEM_PYTHON
# (default /usr/bin/python3), OUT (default dist/).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
PY=${PYTHON:-$repo/.venv/bin/python}
SYSTEM_PYTHON=${SYSTEM_PYTHON:-/usr/bin/python3}
out=${OUT:-$repo/dist}
work=$repo/build/deb
root=$work/root
lib=/usr/lib/sidecar/python

die() { echo "build-deb: $*" >&2; exit 1; }

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n 1)
[ -n "$version" ] || die "no version in pyproject.toml"
arch=$(dpkg --print-architecture)
pyver=$("$SYSTEM_PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
venv_pyver=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
# The C extension and the binary wheels must fit the interpreter that runs them.
[ "$pyver" = "$venv_pyver" ] || die "$PY is Python $venv_pyver, $SYSTEM_PYTHON is $pyver"
next_minor="${pyver%.*}.$((${pyver#*.} + 1))"
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}

rm -rf "$work"
mkdir -p "$work/wheel" "$root$lib" "$root/DEBIAN"

# 1. The wheel (it builds the ring buffer's C extension for this Python), and
#    the libraries it needs, at the versions of the build's virtualenv.
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$work/wheel" "$repo" >/dev/null
"$PY" -m pip freeze --exclude-editable | grep -E '^[A-Za-z0-9_.-]+==' >"$work/constraints.txt"
"$PY" -m pip install -q --no-compile --no-warn-script-location --disable-pip-version-check \
    --target "$root$lib" -c "$work/constraints.txt" "$work"/wheel/sidecar-*.whl
rm -rf "$root$lib/bin"   # pip's console scripts: /usr/bin/sidecar replaces them
for ext in kernel/_ringbatch kernel/_records events/_jsonline; do
    ls "$root$lib"/sidecar/$ext.cpython-*.so >/dev/null || die "C extension $ext missing"
done
# Byte-compiled once here (the units' read-only /usr forbids it at run time),
# with tracebacks naming the installed paths and hash-checked, not mtime-checked.
"$SYSTEM_PYTHON" -m compileall -q -j 0 -s "$root" -p / --invalidation-mode checked-hash \
    "$root$lib" >/dev/null

# 2. The launcher, the BPF sources and the prebuilt unix-socket object.
install -D -m 0755 packaging/sidecar.launcher "$root/usr/bin/sidecar"
mkdir -p "$root/usr/share/sidecar/bpf"
cp -r bpf/. "$root/usr/share/sidecar/bpf/"
PYTHONPATH=$repo "$PY" -c '
import sys
from pathlib import Path
from sidecar.kernel.unix import compile_object
bpf = Path(sys.argv[1])
compile_object(bpf / "unix.bpf.c", bpf / "include", Path(sys.argv[2]))
' "$repo/bpf" "$root/usr/share/sidecar/bpf/unix.bpf.o"

# 3. Units, example configuration, state directory, documentation.
install -D -m 0644 -t "$root/lib/systemd/system" systemd/sidecar.service \
    systemd/sidecar-collector.service
install -D -m 0644 examples/daemon.yaml "$root/etc/sidecar/config.yaml"
install -m 0644 -t "$root/etc/sidecar" examples/policy.yaml examples/entries.yaml \
    examples/collector.yaml
install -d -m 0700 "$root/var/lib/sidecar"
install -D -m 0644 /dev/stdin "$root/usr/share/doc/sidecar/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: sidecar

Files: *
License: Apache-2.0
 On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.
 The Python libraries under /usr/lib/sidecar/python carry their own licences
 in their *.dist-info folders.
EOF

# 4. Control files.  The binary wheels need at least the newest glibc symbol
#    version any of their ELF files asks for.
glibc=$(find "$root" -name '*.so*' -type f -exec objdump -T {} + 2>/dev/null \
    | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -n 1)
[ -n "$glibc" ] || die "no glibc version found in the ELF files"
find "$root" -path "$root/DEBIAN" -prune -o -type f -printf '%P\n' | LC_ALL=C sort \
    | (cd "$root" && xargs -d '\n' md5sum) >"$root/DEBIAN/md5sums"
find "$root/etc" -type f -printf '/etc/%P\n' | LC_ALL=C sort >"$root/DEBIAN/conffiles"
install -m 0755 -t "$root/DEBIAN" packaging/deb/postinst packaging/deb/prerm packaging/deb/postrm
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat >"$root/DEBIAN/control" <<EOF
Package: sidecar
Version: $version
Architecture: $arch
Maintainer: Sidecar maintainers <maintainers@sidecar.invalid>
Installed-Size: $size
Depends: python3 (>= $pyver), python3 (<< $next_minor), python3-bpfcc, libbpf1, libc6 (>= $glibc), mount, procps
Recommends: systemd, linux-headers-$arch
Section: admin
Priority: optional
Description: runtime identity and least agency for AI agents, enforced with eBPF
 A host daemon that attests AI agent processes, gives each a SPIFFE identity
 and short-lived X.509 credentials, holds them to an allowlist enforced in the
 kernel, and streams events over mTLS gRPC to a collector (also included).
 .
 BCC compiles the programs against the running kernel's headers
 (linux-headers-$arch, or the package matching the running kernel).
EOF

find "$root" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
mkdir -p "$out"
deb="$out/sidecar_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "$deb"
