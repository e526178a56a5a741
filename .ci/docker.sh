#!/usr/bin/env bash
# Make a Docker engine available and build the sandbox image. Idempotent: every step is
# skipped when its result already exists. CI runs this before the docker tests.
#
#   .ci/docker.sh            # install docker.io if missing, start dockerd, build the image
#
# Logs: $ACTFLEET_CI_LOG_DIR (default /tmp/actfleet-ci)/dockerd.log and build.log.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
log_dir="${ACTFLEET_CI_LOG_DIR:-/tmp/actfleet-ci}"
mkdir -p "$log_dir"

say() { printf '[docker.sh] %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# 1. The engine's packages (Debian's docker.io brings dockerd, containerd, runc, tini).
if ! command -v dockerd >/dev/null 2>&1 || ! command -v docker >/dev/null 2>&1; then
    say "installing docker.io"
    as_root apt-get update -qq >>"$log_dir/apt.log" 2>&1
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >>"$log_dir/apt.log" 2>&1
fi
if ! command -v debootstrap >/dev/null 2>&1; then
    say "installing debootstrap"
    as_root apt-get update -qq >>"$log_dir/apt.log" 2>&1
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >>"$log_dir/apt.log" 2>&1
fi

# A compose implementation for docker-compose.yml (tests/e2e/test_compose.py): Debian's
# docker-compose 1.29, unless `docker compose` (v2) already works.
if ! command -v docker-compose >/dev/null 2>&1 && ! docker compose version >/dev/null 2>&1; then
    say "installing docker-compose"
    as_root apt-get update -qq >>"$log_dir/apt.log" 2>&1
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >>"$log_dir/apt.log" 2>&1
fi

# 2. The daemon: start it in the background unless one already answers.
if ! docker info >/dev/null 2>&1; then
    if ! pgrep -x dockerd >/dev/null 2>&1; then
        say "starting dockerd (log: $log_dir/dockerd.log)"
        as_root nohup dockerd >>"$log_dir/dockerd.log" 2>&1 </dev/null &
    fi
    for _ in $(seq 1 60); do
        docker info >/dev/null 2>&1 && break
        sleep 1
    done
    if ! docker info >/dev/null 2>&1; then
        say "dockerd did not come up in 60 s; last log lines:"
        tail -n 30 "$log_dir/dockerd.log" >&2 || true
        exit 1
    fi
fi
say "docker engine is up: $(docker version --format '{{.Server.Version}}')"

# 3. The sandbox image (bootstraps a local base image when no registry is reachable).
say "building the sandbox image (log: $log_dir/build.log)"
if ! "$repo/sandbox_images/build.sh" >>"$log_dir/build.log" 2>&1; then
    say "image build failed; last log lines:"
    tail -n 40 "$log_dir/build.log" >&2 || true
    exit 1
fi
say "sandbox image ready"

# 4. The compose stack's images (service, Redis, Prometheus; no registry needed), so that
# tests/e2e/test_compose.py finds them built: a test never downloads anything.
if [ "${ACTFLEET_SETUP_COMPOSE_IMAGES:-1}" != "0" ]; then
    say "building the compose stack's images (log: $log_dir/compose-images.log)"
    if ! "$repo/deploy/build-offline-images.sh" >>"$log_dir/compose-images.log" 2>&1; then
        say "compose image build failed; last log lines:"
        tail -n 40 "$log_dir/compose-images.log" >&2 || true
        exit 1
    fi
    say "compose images ready"
fi
