#!/usr/bin/env bash
# Create .venv and install billing-bot with its test extras, once per change of pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true  # optional: an old pip works too
  .venv/bin/python -m pip install --quiet -e '.[test]' >.venv/pip-install.log 2>&1 || { cat .venv/pip-install.log; exit 1; }
  rm -f .venv/.installed-* && touch "$stamp"
fi
