#!/usr/bin/env bash
# A Debian bookworm base image made locally, for machines that reach a Debian mirror but no
# container registry:  docker/base.sh [IMAGE]   (default tide-ds-base:local)
# Kept when it already exists (delete the image to rebuild it). The rootfs comes from debootstrap
# with the mirror apt uses on this machine.
set -euo pipefail
image=${1:-tide-ds-base:local}
if docker image inspect "$image" >/dev/null 2>&1; then
  echo "base image $image exists"
  exit 0
fi
command -v debootstrap >/dev/null || { echo "docker/base.sh: needs debootstrap (apt-get install debootstrap)" >&2; exit 1; }
mirror=${DEBIAN_MIRROR:-$(grep -rhoE '^(URIs:|deb) *https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d 2>/dev/null \
  | grep -oE 'https?://[^ ]+' | head -n1 || true)}
mirror=${mirror:-http://deb.debian.org/debian}
rootfs=$(mktemp -d /tmp/tide-ds-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
echo "debootstrap bookworm from $mirror"
debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >/dev/null
tar -C "$rootfs" -c . | docker import - "$image" >/dev/null
echo "base image $image made"
