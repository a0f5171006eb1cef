#!/usr/bin/env bash
# compute-sanitizer over a small slice of tests/test_cuda.py (GPU machine, after the CUDA build):
# memcheck (out-of-bounds / misaligned accesses), racecheck (shared-memory hazards: a missing
# __syncthreads around the K/V, Q/dO double buffers or the P/dS tiles), synccheck, initcheck (reads of
# memory nothing wrote). Small shapes only: the tools slow kernels down 10-100x.
# Usage (repo root): bash scripts/cuda_sanitize.sh [pytest -k expression]
set -uo pipefail
cd "$(dirname "$0")/../tests"
py="${PYTHON:-python3}"
sel="${1:-L17 or L37 or L113-203 or L300 or GQA or B2-H8-2 or softmax_gate-B3-N17}"
OUT="${OUT:-$PWD/../gpu_out}"
mkdir -p "$OUT"
rc=0
for tool in memcheck racecheck synccheck initcheck; do
  echo "== compute-sanitizer --tool $tool"
  compute-sanitizer --tool "$tool" --error-exitcode 99 --target-processes all \
      "$py" -m pytest -x -q -p no:cacheprovider -c ../pyproject.toml --rootdir .. test_cuda.py -k "$sel" \
      >"$OUT/sanitize-$tool.log" 2>&1
  r=$?
  tail -n 5 "$OUT/sanitize-$tool.log"
  [ "$r" -ne 0 ] && rc=1 && echo "   $tool: FAILED (rc $r), see $OUT/sanitize-$tool.log"
done
exit $rc
