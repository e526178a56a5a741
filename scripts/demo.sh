#!/usr/bin/env bash
# The main job: set up what is missing (scripts/setup.sh), then run the example batch
# (examples/batch.jsonl: tools defined in setup_code, expected answers) through the whole
# local stack — a private redis-server, the API, a worker, bwrap sandboxes — and print a
# summary table and a results file. The model is the server named by OPENAI_BASE_URL /
# OPENAI_API_KEY / ACTFLEET_MODEL when set, otherwise the scripted `actfleet fake-llm`.
# Extra arguments go to `actfleet demo` (e.g. another batch file).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
if [ "${ACTFLEET_SANDBOX:-bwrap}" = "docker" ]; then
    bash scripts/setup.sh
else
    ACTFLEET_SETUP_DOCKER=0 bash scripts/setup.sh
fi
exec .venv/bin/actfleet demo "$@"
