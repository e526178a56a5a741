#!/usr/bin/env bash
# Set up what the tests need (scripts/setup.sh), then run the linters and every test:
# unit tests on fakes, integration tests against a real redis-server, real bwrap and Docker
# sandboxes, and end-to-end tests of the whole stack. Extra arguments go to pytest.
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
bash scripts/setup.sh || exit 1

.venv/bin/ruff check . || exit 1
.venv/bin/mypy || exit 1
.venv/bin/lint-imports || exit 1  # the layer contract in pyproject.toml

.venv/bin/python -m pytest -ra "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: that is a failure here" >&2
    exit 1
fi
exit "$rc"
