#!/usr/bin/env bash
# The whole GPU round in one command: build the extension with all cores, compare the
# hardware's ldmatrix/mma fragments with the CPU emulation's (layout), then side by side the test
# suite on the GPU (cuda and triton backends, every gradient), compute-sanitizer on a small sweep and
# `fastattn check`; `fastattn bench` last, alone on the GPU. Uses the machine's own Python and packages
# (no registry access); pytest-xdist and pytest-timeout are used where installed.
# Usage on the lent machine (repo root):  bash scripts/gpu_check.sh [--quick]   (--quick: the bench's
#   headline configs, every mode)
#   FASTATTN_ROUND_BUDGET=S   finish inside S seconds: every step gets a share of what is left and is
#                             stopped (SIGINT, so pytest still prints its summary) when that runs out
#   BENCH_RESERVE=S           of that budget, S seconds kept for the bench (default 170)
#   TORCH_CUDA_ARCH_LIST      default: this GPU's architecture only (a shorter build)
#   FASTATTN_COMMIT           the commit the bench JSON records (the copied tree's .git may be stale)
#   SWEEP_ARGS                extra `fastattn bench` arguments for the length sweep (see below)
#   BENCH_ARGS, CHECK_ARGS    extra arguments of the bench (e.g. "--op attention"), of `fastattn check`
#                             (default --quick); FASTATTN_GPU_TESTS: the test files (a short confirming round)
#   ROUND_SKIP                steps not to run, e.g. "layout sanitize check" (a confirming round)
# $OUT gets env.txt, summary.txt, the bench JSON and PNG, and logs.tgz (every step's log): few files,
# as the device tool brings back at most 8.
# Without a GPU it rehearses the round: every step runs, the GPU-only ones (layout, sanitize) report
# "skip" and the rest run on the CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
logs="$OUT/logs"
mkdir -p "$logs"
quick=""
[ "${1:-}" = "--quick" ] && quick="--quick"
export PYTHON="${PYTHON:-python3}"
case "$PYTHON" in */*) PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")" ;; esac
py="$PYTHON"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}" PYTHONUNBUFFERED=1
budget="${FASTATTN_ROUND_BUDGET:-0}"
t_start=$(date +%s)
left() { echo $(( budget - ($(date +%s) - t_start) )); }

step() {  # step NAME CAP COMMAND...: run under min(CAP, time left) seconds, log to $logs/NAME.log
  local name=$1 cap=$2; shift 2
  local lim=$cap t0 rc
  if [ "$budget" -gt 0 ]; then
    lim=$(( $(left) - 15 ))   # 15 s kept for the summary and the archive
    [ "$lim" -gt "$cap" ] && lim=$cap
  fi
  if [ "$lim" -lt 10 ]; then echo "timeout 0" >"$logs/$name.rc"; echo "== $name: no time left"; return; fi
  t0=$(date +%s)
  echo "== $name (≤${lim}s): $*" | tee "$logs/$name.log"
  # SIGINT back to its default first: a background job of a script starts with it ignored
  "$py" -c 'import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execvp(sys.argv[1], sys.argv[1:])' \
      timeout -s INT -k 20 "$lim" "$@" >>"$logs/$name.log" 2>&1
  rc=$?
  echo "$rc $(( $(date +%s) - t0 ))" >"$logs/$name.rc"
  echo "== $name: rc $rc in $(( $(date +%s) - t0 ))s"
  tail -n 8 "$logs/$name.log"
}
skip() { echo "skip 0" >"$logs/$1.rc"; echo "== $1: skip (${2:-no GPU})"; }
skipped() { [[ " ${ROUND_SKIP:-} " == *" $1 "* ]] && skip "$1" "ROUND_SKIP"; }

have_gpu=$("$py" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
"$py" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__,
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU: rehearsal')" | tee "$OUT/env.txt"
if [ "$have_gpu" = 1 ]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv >>"$OUT/env.txt" 2>&1
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$("$py" -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'{a}.{b}' + ('a' if a == 9 else ''))")}"
fi

step build 300 "$py" -m pip install --no-build-isolation --no-deps --no-index -v -e .
if [ "$(cut -d' ' -f1 "$logs/build.rc")" != 0 ]; then  # no PEP 660 editable support: build in place
  step build 300 "$py" setup.py build_ext --inplace
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ "$(cut -d' ' -f1 "$logs/build.rc")" != 0 ]; then  # the CUDA sources broke the build: keep the rest
  echo "!! build with CUDA failed (see build.log); rebuilding without csrc/cuda (FASTATTN_CUDA=0)"
  mv "$logs/build.log" "$logs/build-cuda-failed.log"
  FASTATTN_CUDA=0 step build 300 "$py" setup.py build_ext --inplace
  echo "1 0" >"$logs/build.rc"   # still reported as a failure in the summary
fi
# correctness, side by side (on an H200 the GPU test files took 275 s over 12 workers beside the
# sanitizer, 278 s, and the quick `check`, 238 s; the build 43 s, the quick bench 73 s): the layout
# probe (the hardware's fragments against the emulation's: a mismatch voids the emulated results), the
# suite with one Triton config per kernel (autotuning is for the bench), compute-sanitizer, and the
# quick `fastattn check` (the suite already holds the full sweep). With a budget, BENCH_RESERVE seconds
# of it are kept for the bench.
cap=420
[ "$budget" -gt 0 ] && cap=$(( $(left) - 15 - ${BENCH_RESERVE:-170} ))
par=()
"$py" -c "import xdist" 2>/dev/null && par+=(-n "$(( $(nproc) > 12 ? 12 : 2 ))")
"$py" -c "import pytest_timeout" 2>/dev/null && par+=(--timeout 240)
if [ "$have_gpu" = 1 ]; then
  skipped layout || step layout 120 bash scripts/test.sh -p no:warnings -p no:xdist test_cuda.py -k layout_probe &
  skipped sanitize || OUT="$logs" step sanitize "$cap" bash scripts/cuda_sanitize.sh &
else
  skip layout
  skip sanitize
fi
# on a GPU the tests that run there, the long (slow) sweeps of the GPU backends' fuzz included; the CPU
# ones are CI's (they took ~150 s of the round, the CPU fuzz 600 s of its workers). On an H100 the files other
# than the Triton long fuzz needed more than the 233 s a 470 s round leaves them (704 of 728 done). The Triton
# long fuzz, compile-bound (its 400-case chunks 30-250 s each over 14 workers), wants a call of its own after
# the build: FASTATTN_TRITON_AUTOTUNE=0 bash scripts/test.sh -n 14 -m "slow or not slow" test_fuzz.py::test_fuzz_triton_long
tests=()
gpu_fuzz="test_fuzz.py::test_fuzz_triton test_fuzz.py::test_fuzz_triton_long test_fuzz.py::test_fuzz_triton_forward_only \
  test_fuzz.py::test_fuzz_cuda test_fuzz.py::test_fuzz_cuda_long test_fuzz.py::test_fuzz_cuda_forward_only"
[ "$have_gpu" = 1 ] && read -ra tests <<<"${FASTATTN_GPU_TESTS:-test_cuda.py test_triton.py $gpu_fuzz test_cli.py test_errors.py test_package.py}"
[ "$have_gpu" = 1 ] && tests+=(-m "slow or not slow")
FASTATTN_TRITON_AUTOTUNE=0 step tests "$cap" bash scripts/test.sh -p no:warnings -v -rfE --durations=30 "${par[@]}" "${tests[@]}" &
read -ra check_args <<<"${CHECK_ARGS:---quick}"
skipped check || step check "$cap" "$py" -m fastattn check "${check_args[@]}" &
wait

gpu=cpu-rehearsal
[ "$have_gpu" = 1 ] && gpu=$("$py" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
json="$OUT/bench-$(date +%Y-%m-%d)-$gpu.json"
modes=()
[ -n "$quick" ] && [ "$have_gpu" = 1 ] && modes=(--mode fwd --mode bwd --mode fwd_bwd)
read -ra bench_args <<<"${BENCH_ARGS:-}"
step bench 600 "$py" -m fastattn bench $quick "${modes[@]}" "${bench_args[@]}" --out "$json"
plot() { [ -f "$1" ] && "$py" -c "import json, sys; from fastattn import bench
rows = json.load(open(sys.argv[1]))
bench.plot(rows['results'], sys.argv[2], rows)" "$1" "$2" >>"$logs/bench.log" 2>&1; }
plot "$json" "$OUT/bench-$gpu.png"
# what time is left goes to the attention sweep over lengths (fwd and fwd+bwd, D 64 and 128, bf16 and
# fp16; SWEEP_ARGS, e.g. "--dtype fp16 --head-dim 64", narrows it to what an earlier round did not reach);
# its JSON is written after every config, so a run stopped by the budget keeps what it measured
if [ -n "$quick" ] && [ "$have_gpu" = 1 ] && [ "$budget" -gt 0 ] && [ "$(left)" -gt 60 ]; then
  sweep="$OUT/bench-$(date +%Y-%m-%d)-$gpu-sweep.json"
  read -ra sweep_args <<<"${SWEEP_ARGS:-}"
  step sweep 600 "$py" -m fastattn bench --op attention --mode fwd --mode fwd_bwd "${sweep_args[@]}" --out "$sweep"
  plot "$sweep" "$OUT/bench-$gpu-sweep.png"
fi

{
  echo "== summary ($OUT)"
  for s in build layout tests sanitize check bench sweep; do
    if [ "$s" = sweep ] && [ ! -f "$logs/sweep.rc" ]; then st=skip secs=0
    else read -r st secs <"$logs/$s.rc" 2>/dev/null || { st=1; secs="?"; }; fi
    case "$s:$st" in  # the sweep takes what time is left: stopped by the budget is its normal end
      *:0) word=ok ;; *:skip) word=skip ;; sweep:124|sweep:130|sweep:137|sweep:timeout) word=cut ;;
      *:124|*:130|*:137|*:timeout) word=TIMEOUT ;; *) word=FAIL ;; esac
    printf '%-8s %-7s %5ss\n' "$s" "$word" "$secs"
  done
  grep -hE "[0-9]+ (passed|failed)" "$logs/tests.log" | tail -2
  grep -hE "^FAILED|^ERROR" "$logs/tests.log" | head -40
  grep -hE "cases on" "$logs/check.log" | tail -1
  grep -HE "ERROR SUMMARY|RACECHECK SUMMARY" "$logs"/sanitize-*.log 2>/dev/null
  grep -h "same-instruction" "$logs/sanitize.log" 2>/dev/null
} | tee "$OUT/summary.txt"
tar -czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$logs"
! grep -qE "^[a-z]+ +(FAIL|TIMEOUT)" "$OUT/summary.txt"
