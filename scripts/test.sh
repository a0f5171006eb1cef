#!/usr/bin/env bash
# The test suite, as the README and CI run it. Tests import the installed fastattn (run from tests/
# so the source tree's fastattn/ without its compiled _C is not picked up instead).
#
# Without a CUDA device the Triton backend's tests (marked "triton") run a second time in Triton's
# interpreter (TRITON_INTERPRET=1, CPU tensors), in a process of their own: the variable changes what
# every triton.jit makes and which backends are available, so the rest of the suite runs without it
# (test_triton.py skips itself there). Arguments go to both runs.
#
# Both runs spread over the cores with pytest-xdist where it is installed, unless the arguments choose (-n N,
# -p no:xdist). CI installs it: on its 2 cores the interpreter's run (single-threaded numpy) went from 304 s to
# 183 s; the first run stayed at ~295 s, its torch already using both cores in one process.
set -euo pipefail
cd "$(dirname "$0")/../tests"
py="${PYTHON:-python}"
pytest_cmd=("$py" -m pytest -q -p no:cacheprovider -c ../pyproject.toml --rootdir ..)
if [[ " $* " != *" -n "* && " $* " != *xdist* ]] && "$py" -c "import xdist" 2>/dev/null; then
  cores=$(nproc 2>/dev/null || echo 2)
  pytest_cmd+=(-n "$(( cores > 8 ? 8 : cores ))")
fi
if [ -n "${TRITON_INTERPRET:-}" ] || "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  exec "${pytest_cmd[@]}" "$@"
fi
rc=0
"${pytest_cmd[@]}" "$@" || rc=$?
echo "--- Triton backend in the interpreter (TRITON_INTERPRET=1, CPU tensors)"
irc=0
TRITON_INTERPRET=1 "${pytest_cmd[@]}" -m "triton and not slow" "$@" || irc=$?
[ "$irc" -eq 5 ] && irc=0   # 5: the selection held no Triton test
[ "$rc" -ne 0 ] && exit "$rc"
exit "$irc"
