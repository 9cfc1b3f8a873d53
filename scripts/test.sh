#!/usr/bin/env bash
# The whole test suite on a fresh machine: install, then pytest (real PostgreSQL via pgserver,
# our Kubernetes/Polar/Slack/SMTP servers on 127.0.0.1).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-$(mktemp -d)}
exec .venv/bin/python -m pytest "$@"
