#!/usr/bin/env bash
# The main job on a fresh machine: install, then print the demo cases. With no DATABASE_URL the
# bot starts an embedded PostgreSQL (pgserver) seeded with the demo month.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/billing-bot demo "$@"
