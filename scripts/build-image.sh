#!/usr/bin/env bash
# Builds the Dockerfile with buildah (no daemon needed): `make image IMAGE=ref` calls this.
#
#   bash scripts/build-image.sh REF          # e.g. localhost/pipeline:dev
#   bash scripts/build-image.sh --tools      # only install buildah and debootstrap (apt), then exit
#
# Base image: BASE_IMAGE when set; else the Dockerfile's pinned digest when a registry answers;
# else (no registry, as on our CI machines) the local substitute from scripts/image-base.sh,
# said so on stderr. Layers are cached (`--layers`) and so are pip's downloads (a cache mount):
# a code-only change rebuilds only the last few small layers. Needs root (chroot isolation).
set -euo pipefail
ref=${1:?usage: build-image.sh IMAGE_REF | --tools}
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

need=()
command -v buildah >/dev/null || need+=(buildah)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || { echo "build-image: needs ${need[*]} (apt-get install -y ${need[*]})" >&2; exit 2; }
  echo "build-image: installing ${need[*]} from Debian"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
[ "$ref" = "--tools" ] && exit 0

pinned=$(sed -n 's/^ARG BASE_IMAGE=//p' Dockerfile)
base=${BASE_IMAGE:-}
if [ -z "$base" ]; then
  if timeout 10 buildah pull --quiet "docker.io/library/$pinned" >/dev/null 2>&1; then
    base=""  # the Dockerfile's own default
  else
    base=localhost/pipeline-base:3.12-bookworm
    echo "build-image: no registry reachable for $pinned; using the local substitute $base (scripts/image-base.sh)" >&2
    bash scripts/image-base.sh "$base"
  fi
fi

args=(--isolation chroot --layers --format docker -f Dockerfile -t "$ref"
      --label "org.opencontainers.image.revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)")
[ -n "$base" ] && args+=(--build-arg "BASE_IMAGE=$base")
# Behind a TLS-intercepting egress proxy the proxy's CA is in the host's bundle only: lend that bundle
# to pip for the build (a read-only mount; it never lands in a layer).
host_ca=/etc/ssl/certs/ca-certificates.crt
if [ -f "$host_ca" ]; then
  args+=(--volume "$host_ca:/run/host-ca.crt:ro" --build-arg PIP_CERT=/run/host-ca.crt)
fi
start=$(date +%s)
buildah bud "${args[@]}" .
echo "build-image: $ref built in $(( $(date +%s) - start )) s; $(buildah images --format '{{.Size}}' "$ref" | head -n1)"
