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
"$repo/sandbox_images/build.sh"
"$repo/deploy/build-service-image.sh"
"$repo/deploy/offline/build-debian-image.sh" redis
"$repo/deploy/offline/build-debian-image.sh" prometheus
say "images ready; now: export DOCKER_GID=\$(stat -c %g /var/run/docker.sock) and"
say "  docker-compose -p actfleet -f docker-compose.yml -f docker-compose.offline.yml --profile demo up -d"
