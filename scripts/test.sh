#!/usr/bin/env bash
# Set up (once) and run the whole test suite: scripts/test.sh [pytest args]
# The golden reference data is read from $SA3_REFERENCE_DIR (default ../shared/reference).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
export SA3_REFERENCE_DIR="${SA3_REFERENCE_DIR:-$here/../shared/reference}"
if [ ! -d "$SA3_REFERENCE_DIR/golden" ]; then
  echo "scripts/test.sh: reference data not found at $SA3_REFERENCE_DIR (set SA3_REFERENCE_DIR)" >&2
  exit 2
fi
if [ ! -x .venv/bin/pytest ] || [ "pyproject.toml" -nt .venv/.sa3-install-stamp ]; then
  ./install.sh -y --test -q
fi
exec .venv/bin/python -m pytest "$@"
