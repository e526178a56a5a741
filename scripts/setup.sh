#!/usr/bin/env bash
# Everything a fresh machine lacks, installed idempotently:
#   Debian packages (redis-server, redis-tools' redis-cli for the cluster test, bubblewrap,
#   chromium for the HTML report's browser test,
#   and for the Docker backend docker.io and debootstrap), a virtualenv at .venv with actfleet and its dev tools, and, unless
#   ACTFLEET_SETUP_DOCKER=0, a running Docker engine with the sandbox image built.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
say() { printf '[setup] %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

need=()
# Playwright drives Debian's chromium (never `playwright install`: it downloads a browser).
for pair in redis-server:redis-server redis-cli:redis-tools bwrap:bubblewrap chromium:chromium; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair##*:}")
done
if [ "${#need[@]}" -gt 0 ]; then
    say "installing ${need[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

# iproute2 (`ip netns`, veth pairs): tests/e2e/test_multihost.py makes its hosts with it.
if ! command -v ip >/dev/null 2>&1; then
    say "installing iproute2"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 >/dev/null
fi

python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    say "creating .venv"
    "$python" -m venv .venv
fi
if ! .venv/bin/python -c "import actfleet, pytest, ruff" >/dev/null 2>&1 \
    || [ pyproject.toml -nt .venv/.installed ]; then
    say "installing actfleet into .venv (log: .venv/install.log)"
    if ! { .venv/bin/python -m pip install --upgrade pip \
        && .venv/bin/python -m pip install -e '.[dev]'; } >.venv/install.log 2>&1; then
        tail -n 30 .venv/install.log >&2
        exit 1
    fi
    touch .venv/.installed
fi

if [ "${ACTFLEET_SETUP_DOCKER:-1}" != "0" ]; then
    bash .ci/docker.sh
fi
say "ready"
