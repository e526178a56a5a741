#!/usr/bin/env bash
# Every image docker-compose.yml needs, built on this host with no container registry and
# no package index reachable from containers (docker-compose.offline.yml points compose at
# them). Idempotent: each step keeps an image whose inputs did not change, so a second run
# takes seconds.
#
#   deploy/build-offline-images.sh
#   docker-compose -p actfleet -f docker-compose.yml -f docker-compose.offline.yml --profile demo up -d
#
# Builds, in order (each script's header says how):
#   actfleet/debian-python:bookworm + actfleet-sandbox:latest   sandbox_images/build.sh
#   actfleet:latest (api, worker, fake-llm)                     deploy/build-service-image.sh
#   actfleet/redis:bookworm                                     deploy/offline/build-debian-image.sh redis
#   actfleet/prometheus:bookworm                                deploy/offline/build-debian-image.sh prometheus
# Grafana has no offline build: the stack runs without it (profile `grafana`).
#
# Needs: a Docker engine, debootstrap, and the host's apt mirror and package index (for
# debootstrap, `apt-get download` and `pip download`, all on the host). Environment: each
# script's own (ACTFLEET_SANDBOX_IMAGE, ACTFLEET_SERVICE_IMAGE, ACTFLEET_REDIS_IMAGE,
# ACTFLEET_PROMETHEUS_IMAGE, ACTFLEET_BUILD_CACHE, DEBIAN_MIRROR, FORCE=1).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
say() { printf '[build-offline-images] %s\n' "$*" >&2; }

docker info >/dev/null 2>&1 || { say "no Docker engine answers (start dockerd, or run .ci/docker.sh)"; exit 1; }
"$repo/sandbox_images/build.sh"  # first: the service image is built on its base
# The other three at once (debootstrap mostly waits on downloads and dpkg, one core each);
# each one's output goes to its own log, shown if it fails.
logs="$(mktemp -d)"
trap 'rm -rf "$logs"' EXIT
"$repo/deploy/build-service-image.sh" >"$logs/service" 2>&1 &
service=$!
"$repo/deploy/offline/build-debian-image.sh" redis >"$logs/redis" 2>&1 &
redis=$!
"$repo/deploy/offline/build-debian-image.sh" prometheus >"$logs/prometheus" 2>&1 &
prometheus=$!
failed=0
for step in service redis prometheus; do
    if ! wait "${!step}"; then
        say "building the $step image failed:"
        tail -n 30 "$logs/$step" >&2
        failed=1
    else
        tail -n 1 "$logs/$step" >&2
    fi
done
[ "$failed" = 0 ] || exit 1
say "images ready; now: export DOCKER_GID=\$(stat -c %g /var/run/docker.sock) and"
say "  docker-compose -p actfleet -f docker-compose.yml -f docker-compose.offline.yml --profile demo up -d"
