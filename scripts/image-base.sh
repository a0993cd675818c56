#!/usr/bin/env bash
# A local substitute for the Dockerfile's pinned base (python:3.12-slim-bookworm), for machines
# that can reach Debian's archive and PyPI but no container registry (ours and CI's).
#
#   bash scripts/image-base.sh [NAME]     # default NAME: localhost/pipeline-base:3.12-bookworm
#
# It is what the real base is made of, from the same sources: a Debian bookworm minbase
# (debootstrap), the shared libraries CPython links against, and a CPython 3.12 under /usr/local
# (pyenv's build on this machine) with a pip 25 as its bundled pip (the real 3.12 slim image
# bundles pip 25; 3.12.1's own 23.2 rejects the hashed lock, see docs/image.md). Idempotent:
# an existing NAME is kept. Needs root, buildah and debootstrap (`make image` installs both).
set -euo pipefail
name=${1:-localhost/pipeline-base:3.12-bookworm}
python_src=${PIPELINE_BASE_PYTHON:-$HOME/.pyenv/versions/3.12.1}
# The Debian archive this machine's apt sources name (it is the one reachable here).
mirror=${DEBIAN_MIRROR:-$(cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
  | sed -n 's/^URIs: *//p; s/^deb \(http[^ ]*\) bookworm .*/\1/p' | head -n1 || true)}
mirror=${mirror:-http://deb.debian.org/debian}
pip_version=25.0.1

if buildah inspect --type image "$name" >/dev/null 2>&1; then
  echo "base $name: already built"
  exit 0
fi
[ -x "$python_src/bin/python3.12" ] || { echo "no CPython 3.12 at $python_src (set PIPELINE_BASE_PYTHON)" >&2; exit 2; }

work=$(mktemp -d /var/tmp/pipeline-base.XXXXXX)
ctr=""
cleanup() {
  [ -n "$ctr" ] && buildah rm "$ctr" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

echo "base $name: debootstrap bookworm from $mirror"
# The libraries python:3.12-slim-bookworm carries for its CPython (ssl, sqlite, ffi, compression,
# readline, uuid) plus certificates, netbase and tzdata, as that image's Dockerfile installs them.
debootstrap --variant=minbase \
  --include=ca-certificates,netbase,tzdata,libssl3,libsqlite3-0,libffi8,libbz2-1.0,liblzma5,libreadline8,zlib1g,libncursesw6,libuuid1 \
  bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"*

echo "base $name: CPython $("$python_src/bin/python3.12" -c 'import platform; print(platform.python_version())') into /usr/local"
mkdir -p "$work/rootfs/usr/local"
# The interpreter and stdlib only: no site-packages (this machine's has a sandbox-only .pth),
# no test suite (the slim image drops it too).
tar -C "$python_src" --exclude='lib/python3.12/site-packages/*' --exclude='lib/python3.12/test' \
    --exclude='__pycache__' -cf - bin include lib share 2>/dev/null | tar -C "$work/rootfs/usr/local" -xf -
rm -f "$work/rootfs/usr/local/bin/pip"*
bundled="$work/rootfs/usr/local/lib/python3.12/ensurepip/_bundled"
rm -f "$bundled"/pip-*.whl
"$python_src/bin/python3.12" -m pip download --quiet --disable-pip-version-check --no-deps \
  --dest "$bundled" "pip==$pip_version"
sed -i "s/^_PIP_VERSION = .*/_PIP_VERSION = \"$pip_version\"/" "$work/rootfs/usr/local/lib/python3.12/ensurepip/__init__.py"
chroot "$work/rootfs" /sbin/ldconfig
chroot "$work/rootfs" /usr/local/bin/python3.12 -m ensurepip --default-pip >/dev/null 2>&1
chroot "$work/rootfs" /usr/local/bin/python3.12 -c 'import ssl, sqlite3, ctypes, lzma, bz2, zlib, uuid, readline; import pip; print("stdlib ok, pip", pip.__version__)'

ctr=$(buildah from scratch)
mnt=$(buildah mount "$ctr")
cp -a "$work/rootfs/." "$mnt/"
buildah umount "$ctr" >/dev/null
buildah config --env PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
  --env PYTHON_VERSION=3.12 --cmd python3 --label org.opencontainers.image.description="local substitute for python:3.12-slim-bookworm (scripts/image-base.sh)" "$ctr"
buildah commit --quiet "$ctr" "$name" >/dev/null
echo "base $name: built"
