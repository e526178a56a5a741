#!/usr/bin/env bash
# Build the actfleet Python sandbox image, with or without a container registry.
#
#   sandbox_images/build.sh                 # no registry: bootstrap a Debian base locally
#   ACTFLEET_BASE_IMAGE=python:3.11-slim sandbox_images/build.sh   # with a registry
#
# Steps (each skipped when its result already exists, so a second run takes seconds):
#   1. base image: `debootstrap --variant=minbase --include=python3 bookworm` from the
#      machine's own apt mirror, then `docker import` (skipped with ACTFLEET_BASE_IMAGE);
#   2. wheels: `pip download` of requirements.txt (+ pip) on the host into the build context;
#   3. `docker build --build-arg BASE_IMAGE=...`, tagged $ACTFLEET_SANDBOX_IMAGE and labelled
#      with a hash of its inputs; an image with the same hash is not rebuilt.
#
# Environment: ACTFLEET_SANDBOX_IMAGE (default actfleet-sandbox:latest),
# ACTFLEET_BASE_IMAGE (default: the local bootstrap, actfleet/debian-python:bookworm),
# ACTFLEET_BUILD_CACHE (default /var/cache/actfleet-build), DEBIAN_MIRROR (default: read
# from the apt sources), PYTHON (the host python used for `pip download`), FORCE=1 to rebuild.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
src="$here/python"
image="${ACTFLEET_SANDBOX_IMAGE:-actfleet-sandbox:latest}"
local_base="actfleet/debian-python:bookworm"
base="${ACTFLEET_BASE_IMAGE:-$local_base}"
cache="${ACTFLEET_BUILD_CACHE:-/var/cache/actfleet-build}"
force="${FORCE:-0}"
export DOCKER_BUILDKIT="${DOCKER_BUILDKIT:-0}"  # the classic builder needs no buildx plugin

say() { printf '[build.sh] %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

host_python() {
    if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
    local venv="$here/../.venv/bin/python"
    if [ -x "$venv" ]; then echo "$venv"; else echo python3; fi
}

# The Debian mirror this machine's apt already uses (deb822 or one-line format).
debian_mirror() {
    if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
    local f uri
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        uri="$(awk '
            /^[[:space:]]*$/ { if (uri != "" && suite ~ /(^| )bookworm( |$)/) { print uri; exit } uri=""; suite="" ; next }
            /^URIs:/ { uri=$2 }
            /^Suites:/ { $1=""; suite=$0 " " }
            END { if (uri != "" && suite ~ /(^| )bookworm( |$)/) print uri }
        ' "$f" | head -n 1)"
        if [ -n "$uri" ]; then echo "$uri"; return; fi
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        uri="$(awk '$1 == "deb" && $0 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' "$f")"
        if [ -n "$uri" ]; then echo "$uri"; return; fi
    done
    say "no Debian mirror found in the apt sources; set DEBIAN_MIRROR"; exit 1
}

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

mkdir -p "$cache"

# 1. The base image.
if [ "$base" = "$local_base" ] && { [ "$force" = 1 ] || ! image_exists "$local_base"; }; then
    command -v debootstrap >/dev/null || { say "debootstrap is missing (apt-get install debootstrap)"; exit 1; }
    rootfs="$cache/bookworm-rootfs"
    if [ ! -x "$rootfs/usr/bin/python3" ] || [ "$force" = 1 ]; then
        mirror="$(debian_mirror)"
        say "debootstrap bookworm (minbase + python3) from the apt mirror into $rootfs"
        as_root rm -rf "$rootfs"
        as_root debootstrap --variant=minbase --include=python3 bookworm "$rootfs" "$mirror"
        # Trim what a sandbox never needs: apt lists and caches, docs, man pages.
        as_root rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
            "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/*
    fi
    say "docker import $local_base"
    as_root tar -C "$rootfs" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["python3"]' \
        - "$local_base" >/dev/null
fi
image_exists "$base" || { say "base image $base is missing (docker pull it, or unset ACTFLEET_BASE_IMAGE)"; exit 1; }

# 2. The build context: Dockerfile, runner, requirements and their wheels.
[ -f "$src/runner.py" ] || { say "missing $src/runner.py"; exit 1; }
ctx="$cache/context"
mkdir -p "$ctx/wheels"
req_hash="$(sha256sum "$src/requirements.txt" | cut -c1-16)"
if [ "$force" = 1 ] || [ "$(cat "$ctx/wheels/.requirements-hash" 2>/dev/null)" != "$req_hash" ]; then
    say "pip download the wheels of requirements.txt"
    rm -rf "$ctx/wheels" && mkdir -p "$ctx/wheels"
    "$(host_python)" -m pip download --disable-pip-version-check --quiet \
        --only-binary=:all: --implementation cp --python-version 3.11 --abi cp311 \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 \
        -d "$ctx/wheels" -r "$src/requirements.txt" pip
    echo "$req_hash" >"$ctx/wheels/.requirements-hash"
fi
cp "$src/Dockerfile" "$src/runner.py" "$src/requirements.txt" "$ctx/"

# 3. The image, unless one built from the same inputs exists.
base_id="$(docker image inspect --format '{{.Id}}' "$base")"
build_hash="$( { cat "$ctx/Dockerfile" "$ctx/runner.py" "$ctx/requirements.txt"; echo "$base_id"; } | sha256sum | cut -c1-32)"
if [ "$force" != 1 ] && image_exists "$image" &&
    [ "$(docker image inspect --format '{{index .Config.Labels "actfleet.build-hash"}}' "$image")" = "$build_hash" ]; then
    say "$image is up to date ($build_hash)"
    exit 0
fi
say "docker build $image from $base"
docker build --build-arg "BASE_IMAGE=$base" --label "actfleet.build-hash=$build_hash" \
    -t "$image" "$ctx"
say "built $image"
