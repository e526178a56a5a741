#!/usr/bin/env bash
# Build the actfleet service image (api, worker, fake-llm) without a container registry and
# without PyPI access from inside containers. Idempotent: a second run with unchanged inputs
# takes a few seconds and leaves the image alone.
#
#   deploy/build-service-image.sh                       # local Debian base, offline build
#   ACTFLEET_BASE_IMAGE=python:3.11-slim deploy/build-service-image.sh   # with a registry
#
# Steps:
#   1. base image: unless ACTFLEET_BASE_IMAGE is set, the locally bootstrapped Debian base
#      actfleet/debian-python:bookworm (made by sandbox_images/build.sh, which this script
#      runs when the base is missing; that also builds the sandbox image the docker backend
#      needs);
#   2. a clean build context in $ACTFLEET_BUILD_CACHE/service-context: the repository's
#      files (git ls-files: tracked and untracked, minus .gitignore'd ones such as .venv),
#      plus deploy/wheels/ (every wheel, downloaded on the host with `pip download`, for the
#      base image's Python version and architecture, plus pip, setuptools and wheel) and
#      deploy/debs/ (bubblewrap and its libraries, `apt-get download` on a Debian host);
#   3. `docker build -f deploy/Dockerfile --build-arg BASE_IMAGE=...`, tagged
#      $ACTFLEET_SERVICE_IMAGE and labelled with a hash of its inputs; an image with the same
#      hash is not rebuilt.
#
# The host's pip must reach the package index (directly or through the host's proxy and CA
# bundle); containers never do: the Dockerfile installs with `--no-index --find-links`.
#
# Environment: ACTFLEET_SERVICE_IMAGE (default actfleet:latest), ACTFLEET_BASE_IMAGE
# (default actfleet/debian-python:bookworm), ACTFLEET_BUILD_CACHE (default
# /var/cache/actfleet-build), PYTHON (host python for `pip download`), FORCE=1 to rebuild
# everything (wheelhouse included).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
image="${ACTFLEET_SERVICE_IMAGE:-actfleet:latest}"
local_base="actfleet/debian-python:bookworm"
base="${ACTFLEET_BASE_IMAGE:-$local_base}"
cache="${ACTFLEET_BUILD_CACHE:-/var/cache/actfleet-build}"
force="${FORCE:-0}"
export DOCKER_BUILDKIT="${DOCKER_BUILDKIT:-0}"  # the classic builder needs no buildx plugin

say() { printf '[build-service-image] %s\n' "$*" >&2; }

host_python() {
    if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
    if [ -x "$repo/.venv/bin/python" ]; then echo "$repo/.venv/bin/python"; else echo python3; fi
}

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

command -v docker >/dev/null || { say "docker CLI is missing"; exit 1; }
docker info >/dev/null 2>&1 || { say "no Docker engine answers (start dockerd, or run .ci/docker.sh)"; exit 1; }
mkdir -p "$cache"

# 1. The base image.
if ! image_exists "$base"; then
    if [ "$base" = "$local_base" ]; then
        say "bootstrapping $local_base (and the sandbox image) with sandbox_images/build.sh"
        ACTFLEET_BUILD_CACHE="$cache" "$repo/sandbox_images/build.sh"
    else
        say "base image $base is missing: docker pull it, or unset ACTFLEET_BASE_IMAGE"
        exit 1
    fi
fi

# The base's Python and architecture decide which wheels to download.
read -r py_ver py_arch < <(docker run --rm --entrypoint python3 "$base" -c \
    'import platform, sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}", platform.machine())')
py_tag="cp${py_ver/./}"
say "base $base: Python $py_ver on $py_arch"

# Wheels for the base's Python and architecture into $wheels; arguments: what to download.
download_wheels() {
    "$(host_python)" -m pip download --disable-pip-version-check --quiet \
        --only-binary=:all: --implementation cp --python-version "$py_ver" --abi "$py_tag" \
        --abi abi3 --abi none \
        --platform "manylinux_2_28_$py_arch" --platform "manylinux_2_17_$py_arch" \
        --platform "manylinux2014_$py_arch" --platform any \
        -d "$wheels" "$@"
}

# 2. The build context.
ctx="$cache/service-context"
wheels="$cache/service-wheels"  # kept across runs; copied into the context
debs="$cache/service-debs"
rm -rf "$ctx"
mkdir -p "$ctx/deploy" "$wheels" "$debs"
if git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$repo" && git ls-files -z --cached --others --exclude-standard \
        | xargs -0 -r sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' sh \
        | tar --null -T - -cf -) | tar -C "$ctx" -xf -
else
    (cd "$repo" && tar --exclude=.git --exclude=.venv --exclude='*_cache' --exclude='*.egg-info' \
        --exclude=__pycache__ -cf - .) | tar -C "$ctx" -xf -
fi
rm -rf "$ctx/deploy/wheels" "$ctx/deploy/debs"

# Wheels: the project's dependencies (from pyproject.toml) + pip, setuptools, wheel.
req="$ctx/.service-requirements.txt"
"$(host_python)" - "$repo/pyproject.toml" >"$req" <<'EOF'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)
build = project.get("build-system", {}).get("requires", ["setuptools", "wheel"])
for line in [*project["project"]["dependencies"], *build, "pip"]:
    print(line)
EOF
req_hash="$( { cat "$req"; echo "$py_ver $py_arch"; } | sha256sum | cut -c1-16)"
if [ "$force" = 1 ] || [ "$(cat "$wheels/.requirements-hash" 2>/dev/null)" != "$req_hash" ]; then
    say "pip download the wheels for Python $py_ver ($py_arch) into $wheels"
    rm -rf "$wheels" && mkdir -p "$wheels"
    download_wheels -r "$req"
    # pip evaluates environment markers against the host's interpreter, not the base's (e.g.
    # redis needs async-timeout only below Python 3.11.3): resolve inside the base image,
    # offline, and fetch whatever it still misses.
    for _ in 1 2 3 4 5; do
        missing="$(docker run -i --rm --network none -v "$wheels:/w:ro" --entrypoint sh "$base" -c \
            'python3 "$(ls /w/pip-*.whl | head -n 1)/pip" install --disable-pip-version-check \
                --dry-run --ignore-installed --target /tmp/t --no-index --find-links /w \
                -r /dev/stdin 2>&1 || true' <"$req" \
            | sed -n 's/.*No matching distribution found for \([^ ]*\).*/\1/p' | head -n 1)"
        [ -n "$missing" ] || break
        say "the base also needs $missing: downloading it"
        download_wheels "$missing"
    done
    echo "$req_hash" >"$wheels/.requirements-hash"
fi
rm -f "$req"
mkdir -p "$ctx/deploy/wheels"
cp "$wheels"/*.whl "$ctx/deploy/wheels/"

# Debs: bubblewrap and its libraries, from the host's apt (Debian/Ubuntu hosts only). Without
# them the Dockerfile falls back to apt-get inside the build.
if command -v apt-get >/dev/null 2>&1; then
    if [ "$force" = 1 ] || ! ls "$debs"/bubblewrap_*.deb >/dev/null 2>&1; then
        say "apt-get download bubblewrap libcap2 libselinux1 into $debs"
        rm -f "$debs"/*.deb
        if ! (cd "$debs" && apt-get download bubblewrap libcap2 libselinux1 >/dev/null 2>&1); then
            (cd "$debs" && apt-get download bubblewrap >/dev/null 2>&1) \
                || say "apt-get download failed: the build will apt-get install bubblewrap"
        fi
    fi
    if ls "$debs"/*.deb >/dev/null 2>&1; then
        mkdir -p "$ctx/deploy/debs"
        cp "$debs"/*.deb "$ctx/deploy/debs/"
    fi
fi

# 3. The image, unless one built from the same inputs exists.
base_id="$(docker image inspect --format '{{.Id}}' "$base")"
build_hash="$( { (cd "$ctx" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum); \
    echo "$base_id"; } | sha256sum | cut -c1-32)"
if [ "$force" != 1 ] && image_exists "$image" &&
    [ "$(docker image inspect --format '{{index .Config.Labels "actfleet.build-hash"}}' "$image")" = "$build_hash" ]; then
    say "$image is up to date ($build_hash)"
    exit 0
fi
say "docker build $image from $base"
docker build --force-rm -f "$ctx/deploy/Dockerfile" --build-arg "BASE_IMAGE=$base" \
    --label "actfleet.build-hash=$build_hash" -t "$image" "$ctx"
say "built $image"
if [ -S /var/run/docker.sock ]; then
    say "for docker-compose's worker (socket access): export DOCKER_GID=$(stat -c %g /var/run/docker.sock)"
fi
