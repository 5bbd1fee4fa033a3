#!/usr/bin/env bash
# `make image-test`: build images/cpu.Dockerfile with podman, then run stages in it as KFP and Airflow would
# (tests/image/test_image.py) and report the image's size. Root only: podman runs rootful here, with runc and
# cgroupfs; podman, runc and debootstrap are installed from Debian's packages when missing.
#
# Base images cannot be pulled on these machines, so the Dockerfile's FROM is built from Debian's packages
# (bookworm, whose Python is 3.11 like the real base) under the same name, and the build runs with --pull=never.
# Where the name already exists (a pulled image, or an earlier run) it is used as it is.
#
# Environment: IMAGE (tag to build, default localhost/onereward:cpu-test); PIP_FIND_LINKS (a wheel folder: torch's
# CPU wheel comes from there when set, for machines that cannot reach its index); DEBIAN_MIRROR.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
IMAGE=${IMAGE:-localhost/onereward:cpu-test}
DOCKERFILE=images/cpu.Dockerfile
PODMAN=(podman --runtime runc --cgroup-manager cgroupfs)  # crun refuses this kernel's hybrid cgroup mode

if [ "$(id -u)" != 0 ]; then
  echo "image-test: needs root (rootful podman with runc, debootstrap)" >&2
  exit 1
fi
if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v debootstrap >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q podman runc debootstrap >/dev/null \
    || { apt-get update -q >/dev/null && apt-get install -y -q podman runc debootstrap >/dev/null; }
fi

# --- the base: the Dockerfile's FROM, as Docker would resolve a short name -------------------------------------
base=$(awk 'toupper($1) == "FROM" { print $2; exit }' "$DOCKERFILE")
case $base in
  */*/*) base_ref=$base ;;
  */*) base_ref=docker.io/$base ;;
  *) base_ref=docker.io/library/$base ;;
esac
if "${PODMAN[@]}" image exists "$base_ref"; then
  echo "image-test: base $base_ref present"
else
  mirror=${DEBIAN_MIRROR:-$(awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^https?:\/\/.*\/debian\/?$/) { print $i; exit } }' \
    /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null || true)}
  mirror=${mirror:-http://deb.debian.org/debian}
  rootfs=$(mktemp -d /var/tmp/onereward-base.XXXXXX)
  trap 'rm -rf "$rootfs"' EXIT
  echo "image-test: building $base_ref from Debian bookworm ($mirror)"
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || { tail -20 "$rootfs.log" >&2; exit 1; }
  rm -f "$rootfs.log"
  # The official image keeps `python` and `pip` in /usr/local/bin, outside Debian's externally managed Python: a
  # virtualenv over Debian's Python 3.11 at /usr/local gives the same. Like the official Debian images, apt
  # keeps no package caches in layers (debuerreotype's docker-clean).
  chroot "$rootfs" python3 -m venv /usr/local
  printf 'Dir::Cache::pkgcache "";\nDir::Cache::srcpkgcache "";\n' >"$rootfs/etc/apt/apt.conf.d/docker-clean"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | "${PODMAN[@]}" import --quiet \
    --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$base_ref" >/dev/null
  rm -rf "$rootfs"
  trap - EXIT
fi

# --- the image ---------------------------------------------------------------------------------------------------
# The host's CA bundle: the build's pip trusts what this machine trusts (a proxy's CA, where there is one).
build=(--pull=never --format docker --network host -v /etc/ssl/certs:/etc/ssl/certs:ro
       --build-arg "ONEREWARD_GIT_COMMIT=$(git rev-parse HEAD 2>/dev/null || true)")
if [ -n "${PIP_FIND_LINKS:-}" ] && [ -d "$PIP_FIND_LINKS" ]; then
  # torch's CPU wheel from the local folder; its dependencies and the rest from the package registry
  build+=(-v "$PIP_FIND_LINKS:/wheels:ro" --build-arg PIP_FIND_LINKS=/wheels
          --build-arg "TORCH_INDEX_URL=${PIP_INDEX_URL:-https://pypi.org/simple}")
fi
echo "image-test: building $IMAGE"
build_start=$SECONDS
"${PODMAN[@]}" build "${build[@]}" -f "$DOCKERFILE" -t "$IMAGE" . >/tmp/onereward-image-build.log 2>&1 \
  || { tail -40 /tmp/onereward-image-build.log >&2; exit 1; }
echo "image-test: built in $((SECONDS - build_start))s (log: /tmp/onereward-image-build.log)"

# --- stages in the image, as the orchestrators start them ----------------------------------------------------------
ONEREWARD_IMAGE_UNDER_TEST=$IMAGE ONEREWARD_PODMAN="${PODMAN[*]}" .venv/bin/pytest tests/image -p no:cacheprovider -q

# --- size ----------------------------------------------------------------------------------------------------------
"${PODMAN[@]}" history --no-trunc --format json "$IMAGE" | .venv/bin/python -c '
import json, sys
layers = sorted(json.load(sys.stdin), key=lambda layer: -layer["size"])
total = sum(layer["size"] for layer in layers) / 1e9
print("image-test: %s is %.2f GB; its largest layers:" % (sys.argv[1], total))
for layer in layers[:3]:
    print("  %7.1f MB  %s" % (layer["size"] / 1e6, layer["CreatedBy"][:110]))
' "$IMAGE"
echo "image-test: passed in $((SECONDS - start))s"
