#!/bin/sh
# Builds a stand-in for the python:3.11-slim-bookworm base image from Debian's own packages, for a
# host that can reach Debian's mirror but no container registry (`make images` falls back to it when
# the pull fails). Debian bookworm's python3 is 3.11, the same minor version as the public image.
#
#   sudo deploy/base/build-base.sh [IMAGE]        (default localhost/imagine-python:3.11-bookworm)
#
# Needs root, debootstrap and podman. DEBIAN_MIRROR picks the mirror.
set -eu
IMAGE=${1:-localhost/imagine-python:3.11-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if podman image exists "$IMAGE"; then
    echo "base image $IMAGE exists"
    exit 0
fi
if ! command -v debootstrap >/dev/null; then
    echo "debootstrap is not installed (Debian/Ubuntu: apt-get install -y debootstrap)" >&2
    exit 1
fi
rootfs=$(mktemp -d /var/tmp/imagine-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT INT TERM
echo "debootstrap bookworm into $rootfs (about a minute)"
# python3-venv brings ensurepip, so `python3 -m venv` gets pip without Debian's python3-pip (which
# would add 100 MB of build tools).
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$MIRROR" \
    >"$rootfs.log" 2>&1 || { tail -20 "$rootfs.log"; rm -f "$rootfs.log"; exit 1; }
rm -f "$rootfs.log"
chroot "$rootfs" apt-get clean
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/usr/share/doc/* \
    "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
# The public image's environment: UTF-8 text, and `python` as well as `python3`.
ln -sf python3 "$rootfs/usr/bin/python"
tar -C "$rootfs" -c . | podman import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' \
    - "$IMAGE" >/dev/null
echo "built $IMAGE ($(podman image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%d MB", $1/1e6}'))"
