#!/usr/bin/env bash
# Compile-checks the CUDA kernels without a GPU (and without CUDA torch): nvcc -c of every
# csrc/cuda/*.cu for sm_80 and sm_90a with -Xptxas -v, then one table of registers, shared memory
# and spills per kernel. Fails on any compile error, any spill or stack frame (local memory), or a
# kernel whose static + dynamic shared memory exceeds sm_80's 163 KB per block.
# binding.cpp is not compiled here: it needs torch's CUDA headers (it builds with the extension).
# Usage: bash scripts/check_cuda_build.sh [-j JOBS]     (runs in CI when nvcc is present)
set -uo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc 2>/dev/null || echo 2)
[ "${1:-}" = "-j" ] && jobs=$2
NVCC="${NVCC:-nvcc}"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# the defines torch.utils.cpp_extension adds to every nvcc command, so this build matches the real one
flags=(-c -O3 -std=c++17 --use_fast_math --expt-relaxed-constexpr -Xptxas -v -Icsrc
       -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
       -D__CUDA_NO_HALF2_OPERATORS__)
archs=("compute_80,code=sm_80" "compute_90a,code=sm_90a")

t0=$(date +%s)
for f in csrc/cuda/*.cu; do
  for a in "${archs[@]}"; do
    tag="$(basename "$f" .cu).${a##*=}"
    echo "$f|$a|$tag"
  done
done | xargs -P "$jobs" -I{} bash -c '
  IFS="|" read -r f a tag <<<"{}"
  if "$0" "${@}" -gencode "arch=${a%%,*},${a#*,}" "$f" -o "'"$out"'/$tag.o" >"'"$out"'/$tag.log" 2>&1; then
    echo ok >"'"$out"'/$tag.rc"
  else
    echo fail >"'"$out"'/$tag.rc"
  fi' "$NVCC" "${flags[@]}"
t1=$(date +%s)

# The dynamic shared memory of each attention and decode kernel, as kernel_traits.h computes it (a host program
# reads the traits: the one definition), for the head dims the kernels cover.
cat >"$out/traits.cpp" <<'CPP'
#include <cstdio>
#include "cuda/kernel_traits.h"
using namespace fastattn::cuda;
int main() {
  std::printf("fwd 64 %d\nfwd 128 %d\n", FwdTraits<64>::kSmemBytes, FwdTraits<128>::kSmemBytes);
  std::printf("bwd 64 %d\nbwd 128 %d\n", BwdTraits<64>::kSmemBytes, BwdTraits<128>::kSmemBytes);
  std::printf("decode 64 %d\ndecode 128 %d\n", DecodeTraits<64>::kSmemBytes, DecodeTraits<128>::kSmemBytes);
}
CPP
"${CXX:-c++}" -std=c++17 -Icsrc "$out/traits.cpp" -o "$out/traits" && "$out/traits" >"$out/traits.txt" || exit 1

python3 - "$out" <<'PY'
import glob, os, re, subprocess, sys

out = sys.argv[1]
SMEM_LIMIT = 163 * 1024  # sm_80 opt-in maximum per block (sm_90: 227 KB)
DYN_SMEM = {(k, int(d)): int(n) for k, d, n in (l.split() for l in open(os.path.join(out, "traits.txt")))}

def dyn_smem(name):
    m = re.search(r"attention_(?:varlen_)?(fwd|bwd|decode)_kernel<[^,]+, (\d+)[,>]", name)
    return DYN_SMEM[m.group(1), int(m.group(2))] if m else 0

def demangle(names):
    try:
        r = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
        return r.stdout.splitlines()
    except Exception:
        return names

def short(name):
    name = name.replace("fastattn::cuda::", "").replace("(anonymous namespace)::", "")
    name = re.sub(r"\((const )?fastattn::cuda::\w+Params\)|\(.*\)$", "", name)
    return name.replace("__nv_bfloat16", "bf16").replace("__half", "fp16")

rows, failed = [], []
for rc in sorted(glob.glob(os.path.join(out, "*.rc"))):
    tag = os.path.basename(rc)[:-3]
    log = open(rc[:-3] + ".log").read()
    if open(rc).read().strip() != "ok":
        failed.append(tag)
        print(f"--- {tag}: compile FAILED\n{log}")
        continue
    if re.search(r"\bwarning\b", log):
        print(f"--- {tag}: warnings\n" + "\n".join(l for l in log.splitlines() if "warning" in l))
    cur = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)' for '(sm_\w+)'", line)
        if m:
            cur = {"mangled": m.group(1), "arch": m.group(2), "file": tag.rsplit(".", 1)[0]}
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur["stack"], cur["spill_st"], cur["spill_ld"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["regs"] = int(m.group(1))
            sm = re.search(r"(\d+) bytes smem", line)
            cur["smem"] = int(sm.group(1)) if sm else 0

for r, d in zip(rows, demangle([r["mangled"] for r in rows])):
    r["name"] = short(d)
    r["dyn"] = dyn_smem(d)

bad = []
print(f"{'kernel':<62} {'arch':<7} {'regs':>4} {'smem':>6} {'dyn smem':>8} {'stack':>5} {'spill':>5}")
for r in sorted(rows, key=lambda r: (r["file"], r["name"], r["arch"])):
    spill = r.get("spill_st", 0) + r.get("spill_ld", 0)
    flag = ""
    if spill or r.get("stack", 0):
        flag = "  <- SPILL/STACK"
        bad.append(r)
    if r["smem"] + r["dyn"] > SMEM_LIMIT:
        flag += "  <- SMEM > 163 KB"
        bad.append(r)
    print(f"{r['name'][:62]:<62} {r['arch']:<7} {r.get('regs', '?'):>4} {r['smem']:>6} {r['dyn']:>8} "
          f"{r.get('stack', '?'):>5} {spill:>5}{flag}")
print(f"{len(rows)} kernels, {len(failed)} failed compiles, {len(bad)} with spills/stack/too much smem")
sys.exit(1 if failed or bad or not rows else 0)
PY
rc=$?
echo "check_cuda_build: compile wall time $((t1 - t0)) s with $jobs jobs; $([ $rc = 0 ] && echo PASS || echo FAIL)"
exit $rc
