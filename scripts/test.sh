#!/usr/bin/env bash
# The test suite, as the README and CI run it. Tests import the installed fastattn (run from tests/
# so the source tree's fastattn/ without its compiled _C is not picked up instead).
set -euo pipefail
cd "$(dirname "$0")/../tests"
exec python -m pytest -q -p no:cacheprovider -c ../pyproject.toml --rootdir .. "$@"
