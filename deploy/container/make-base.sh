#!/usr/bin/env bash
# Build the base image localhost/mertools-base:bookworm from Debian's own packages (debootstrap), for hosts
# that cannot pull python:3.11-slim-bookworm from Docker Hub. Debian 12's python3 is 3.11, as in that image.
#
#   sudo deploy/container/make-base.sh            # builds it unless it exists
#   sudo deploy/container/make-base.sh --force    # rebuilds it
#
# Environment: MERTOOLS_BASE_IMAGE (the tag, default localhost/mertools-base:bookworm), DEBIAN_MIRROR
# (default http://deb.debian.org/debian), DEBIAN_SECURITY_MIRROR (default http://deb.debian.org/debian-security).
# Needs root (debootstrap, chroot); installs debootstrap and podman with apt-get when they are missing.
set -euo pipefail

IMAGE=${MERTOOLS_BASE_IMAGE:-localhost/mertools-base:bookworm}
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
# python3-venv and python3-pip: the Dockerfile's `python3 -m venv`; libgomp1: numba's OpenMP threading layer
# (without it numba falls back to its workqueue layer, which aborts on concurrent parallel calls)
PACKAGES=python3,python3-venv,python3-pip,ca-certificates,libgomp1
FORCE=0

for arg in "$@"; do
    case $arg in
        --force) FORCE=1 ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "make-base.sh: unknown argument: $arg" >&2; exit 2 ;;
    esac
done

[[ $(id -u) -eq 0 ]] || { echo "make-base.sh: needs root (debootstrap, chroot)" >&2; exit 1; }

need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v podman >/dev/null || need+=(podman)
if ((${#need[@]})); then
    echo "make-base.sh: installing ${need[*]} with apt-get" >&2
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}"
fi

# podman settings for this kind of host, in a temporary containers.conf (see common.sh)
# shellcheck source=deploy/container/common.sh
. "$(dirname "$0")/common.sh"

if ((!FORCE)) && podman image exists "$IMAGE"; then
    echo "make-base.sh: $IMAGE exists (--force rebuilds it)"
    rm -rf "$MERTOOLS_PODMAN_CONF_DIR"
    exit 0
fi

rootfs=$(mktemp -d /var/tmp/mertools-base.XXXXXX)
cleanup() {
    if mountpoint -q "$rootfs/proc"; then umount "$rootfs/proc"; fi
    rm -rf --one-file-system "$rootfs" "$MERTOOLS_PODMAN_CONF_DIR" "${log:-}"
}
trap cleanup EXIT

log=$(mktemp /var/tmp/mertools-base-log.XXXXXX)
fail() { tail -n 30 "$log" >&2; echo "make-base.sh: FAILED: $*" >&2; exit 1; }

echo "make-base.sh: debootstrap $SUITE (minbase + $PACKAGES) from $MIRROR" >&2
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$MIRROR" >"$log" 2>&1 || fail debootstrap

cat >"$rootfs/etc/apt/sources.list" <<SOURCES
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY_MIRROR $SUITE-security main
SOURCES
# as Docker's debian images: no documentation, no recommends, no package cache left behind
cat >"$rootfs/etc/dpkg/dpkg.cfg.d/excludes" <<'DPKG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
DPKG
cat >"$rootfs/etc/apt/apt.conf.d/90container" <<'APT'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Languages "none";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT

# the point release's packages plus bookworm-updates and the security archive
echo "make-base.sh: apt-get upgrade from $SUITE-updates and $SUITE-security" >&2
cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
mount -t proc proc "$rootfs/proc"
chroot "$rootfs" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
    sh -c 'apt-get update -q && apt-get -y -q upgrade && apt-get clean' >"$log" 2>&1 || fail "apt-get upgrade"
grep -E '^[0-9]+ upgraded' "$log" | sed 's/^/make-base.sh: /' >&2 || true
umount "$rootfs/proc"

# what the runtime provides, or only the build needed
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/var/cache/debconf/*-old \
    "$rootfs"/var/log/* "$rootfs"/tmp/* "$rootfs"/var/tmp/* \
    "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/*
find "$rootfs/usr/share/doc" -mindepth 2 ! -name copyright ! -type d -delete 2>/dev/null || true
: >"$rootfs/etc/resolv.conf"
: >"$rootfs/etc/hostname"

echo "make-base.sh: importing as $IMAGE" >&2
tar --numeric-owner --xattrs -C "$rootfs" -cf - . | podman import --quiet \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --message "debootstrap --variant=minbase --include=$PACKAGES $SUITE" \
    - "$IMAGE" >/dev/null

podman run --rm --network none "$IMAGE" python3 -c \
    'import ssl, sys, venv; print("make-base.sh: %s: Python %s, %s" % (sys.argv[1], sys.version.split()[0], ssl.OPENSSL_VERSION))' "$IMAGE"
echo "make-base.sh: $IMAGE: $(podman image inspect "$IMAGE" --format '{{.Size}}' | awk '{ printf "%.0f MB", $1 / 1e6 }')"
