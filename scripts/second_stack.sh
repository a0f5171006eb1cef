#!/usr/bin/env bash
# shellcheck disable=SC2016,SC2329
# (the functions run through step; the single-quoted bash -c scripts expand in the child shell)
# The project on the lent GPU machine's software stack, checked on a CPU: torch 2.11 (its CUDA 13.0
# build: PyPI has no CPU build of it; it imports and runs on a CPU) and triton 3.6, where CI runs
# torch 2.13 and triton 3.9. In a virtual environment of its own it installs that stack, builds
# fastattn (FASTATTN_CUDA=0) and runs:
#   trace   the triton_op registration on fake CUDA tensors: every op forward and backward under
#           FakeTensorMode, torch.compile(fullgraph=True) of the public functions (the ops opaque to
#           dynamo, static and dynamic shapes), and AOTAutograd decomposing each op into its kernels
#           (torch's wrap_triton path, which the interpreter never takes)
#   cpu     the test suite without TRITON_INTERPRET (C++ kernels, reference, modules, opcheck,
#           torch.compile, export), as scripts/test.sh's first pass
#   interp  the Triton backend's tests in Triton's interpreter (TRITON_INTERPRET=1), as its second
#   aot     python scripts/check_triton_aot.py $FASTATTN_STACK2_AOT_ARGS (the kept configs compiled for
#           sm_80/sm_90 by triton 3.6, the compiler the GPU machine runs), if the script is there
# then prints a summary; exits 1 if any step failed.
#
# Usage (repo root or anywhere):  bash scripts/second_stack.sh [pytest args for cpu and interp]
# Environment:
#   FASTATTN_STACK2_VENV    the venv (default .venv-stack2 in the repo root); reused while it holds the
#                           requested torch and triton, rebuilt when FASTATTN_STACK2_FRESH=1
#   FASTATTN_STACK2_TORCH / _TRITON / _NUMPY   pip requirement specs (default torch==2.11.*,
#                           triton==3.6.*, numpy: no pin is needed, triton_kernels/_compat.py covers
#                           triton 3.6's interpreter on numpy >= 2.4)
#   FASTATTN_STACK2_STEPS   the steps to run, comma-separated (default trace,cpu,interp,aot)
#   FASTATTN_STACK2_AOT_ARGS  arguments for check_triton_aot.py (e.g. --quick; default none)
#   PYTHON                  the interpreter the venv is made from (default python3; the GPU machine
#                           has 3.12, CI 3.11)
#   OUT                     where the logs go (default <venv>/logs)
# A fresh venv downloads about 1.7 GB (torch 2.11 and the nvidia wheels it pins; 2.7 GB of wheels in
# all) and takes 5 GB; on a 2-core machine install ~2 min, build ~4 min, trace, cpu and interp 8-12 min,
# aot much longer (fp32 and D = 256 compiles take minutes each).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
root=$PWD
venv="${FASTATTN_STACK2_VENV:-.venv-stack2}"
case "$venv" in /*) ;; *) venv="$root/$venv" ;; esac
torch_spec="${FASTATTN_STACK2_TORCH:-torch==2.11.*}"
triton_spec="${FASTATTN_STACK2_TRITON:-triton==3.6.*}"
numpy_spec="${FASTATTN_STACK2_NUMPY:-numpy}"
steps=",${FASTATTN_STACK2_STEPS:-trace,cpu,interp,aot},"
export MAX_JOBS="${MAX_JOBS:-2}" PYTHONUNBUFFERED=1
stamp() { date +%s; }
t_start=$(stamp)
declare -A took status
order=()

step() {  # step NAME COMMAND...: run with its output to the terminal and $OUT/NAME.log
  local name=$1; shift
  order+=("$name")
  local t0; t0=$(stamp)
  echo "== $name: $*"
  "$@" 2>&1 | tee "$OUT/$name.log"
  status[$name]=${PIPESTATUS[0]}
  took[$name]=$(( $(stamp) - t0 ))
}
want() { [[ "$steps" == *",$1,"* ]]; }

# ---------------------------------------------------------------------------------------- environment
have_stack() {  # the venv exists and holds the requested torch and triton
  "$venv/bin/python" - "$torch_spec" "$triton_spec" <<'EOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
from pip._vendor.packaging.requirements import Requirement
for spec in sys.argv[1:]:
    req = Requirement(spec)
    if not req.specifier.contains(version(req.name).split("+")[0], prereleases=True):
        sys.exit(1)
EOF
}

install_stack() {
  local py="${PYTHON:-python3}"
  if [ ! -x "$venv/bin/python" ]; then
    echo "creating $venv ($py: $("$py" --version 2>&1))"
    "$py" -m venv "$venv" || return 1
    "$venv/bin/python" -m pip install -q --upgrade pip setuptools wheel || return 1
  else
    echo "reusing $venv"
  fi
  # torch 2.11 pins triton 3.6.0 and its CUDA 13 wheels; the rest is .ci/run's list for the tests
  "$venv/bin/python" -m pip install -q --progress-bar off "$torch_spec" "$triton_spec" "$numpy_spec" \
    pytest ninja pybind11 transformers matplotlib || return 1
  "$venv/bin/python" -c "import sys, torch, triton, numpy; print('python', sys.version.split()[0], '| torch', \
torch.__version__, '(cuda', torch.version.cuda, ') | triton', triton.__version__, '| numpy', numpy.__version__)"
}

build() {
  # setuptools' build folder in this venv, not the repo's build/ (objects compiled against another torch)
  local cfg="$venv/build.cfg"
  printf '[build]\nbuild_base = %s\n' "$venv/build" > "$cfg"
  DIST_EXTRA_CONFIG="$cfg" FASTATTN_CUDA=0 "$venv/bin/python" -m pip install -q --no-build-isolation --no-deps . &&
    (cd "$venv" && "$venv/bin/python" -c "import fastattn, json; print(json.dumps(fastattn.backends(), indent=1))")
}

if [ "${FASTATTN_STACK2_FRESH:-0}" = 1 ] || { [ -e "$venv" ] && ! have_stack; }; then
  rm -rf "$venv"
fi
OUT="${OUT:-$venv/logs}"
mkdir -p "$OUT"
step install install_stack
[ "${status[install]}" = 0 ] || { echo "!! installing the second stack failed (see $OUT/install.log)"; exit 1; }
step build build
[ "${status[build]}" = 0 ] || { echo "!! building fastattn failed (see $OUT/build.log)"; exit 1; }
# shellcheck disable=SC1091
. "$venv/bin/activate"

# ------------------------------------------------------------------------------------- triton_op trace
trace_check() {
  (cd "$venv" && python - <<'EOF'
"""The Triton ops as a GPU registers them (torch.library.triton_op), traced on fake CUDA tensors."""
import logging
import sys

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastattn
from fastattn.triton_kernels import ops

backends = sys.modules["fastattn.backends"]
assert ops.USE_TRITON_OP, "the triton ops should register as torch.library.triton_op without TRITON_INTERPRET"
# the backend refuses to run without a CUDA device; the tensors here are fake CUDA tensors
backends._BACKENDS["triton"].unavailable = lambda: None
backends._AVAILABILITY.clear()
# no GPU, so no triton driver: torch cannot analyse which arguments a kernel mutates and logs a traceback
# for every kernel (it then treats every tensor argument as mutated, which is safe). A filter, since
# torch.compile resets its loggers' levels. (torch 2.11 logs it on torch._dynamo, 2.13 on the module's.)
for name in ("torch._dynamo", "torch._higher_order_ops.triton_kernel_wrap"):
    logging.getLogger(name).addFilter(lambda r: "assuming every input is mutated" not in r.getMessage())
T = torch.ops.fastattn
dev, dt = torch.device("cuda"), torch.float16
fails = []


def check(name, fn):
    try:
        fn()
        print(f"ok    {name}")
    except Exception as e:  # noqa: BLE001  (every check is reported)
        fails.append(name)
        print(f"FAIL  {name}: {type(e).__name__}: {str(e).strip()[:2000]}")


def inputs():
    r = lambda *s, dtype=dt: torch.randn(*s, device=dev, dtype=dtype)
    q, k, v = r(2, 4, 40, 64), r(2, 2, 72, 64), r(2, 2, 72, 32)
    return dict(q=q, k=k, v=v, bias=r(2, 1, 40, 72), keep=torch.ones(2, 1, 1, 72, device=dev, dtype=torch.bool),
                gate=r(2, 4, 40, 1), x=r(3, 50, 64), scores=r(3, 50, 4), w=r(4, 64),
                xmask=torch.ones(3, 50, device=dev, dtype=torch.bool))


def ops_fake():
    """Every op forward and backward: the launcher runs on fake tensors through wrap_triton."""
    with FakeTensorMode():
        a = inputs()
        q, k, v, g = a["q"], a["k"], a["v"], a["gate"].expand(2, 4, 40, 32)
        for mask, causal in ((None, 0), (a["bias"], 1), (a["keep"], 2)):
            out, lse, acc = T.triton_attention_fwd(q, k, v, mask, g, 0.125, causal)
            assert out.shape == (2, 4, 40, 32) and out.device.type == "cuda" and lse.shape == (2, 4, 40)
            grads = T.triton_attention_bwd(out, q, k, v, out, lse, mask, g, lse, 0.125, causal,
                                           mask is not None and mask.dtype != torch.bool)
            assert grads[0].shape == q.shape and grads[1].shape == k.shape and grads[2].shape == v.shape
        for pool in (False, True):
            y, alpha = T.triton_softmax_gate_fwd(a["scores"], a["x"], a["xmask"], pool)
            T.triton_softmax_gate_bwd(y, a["x"], alpha, alpha, pool)
            y, alpha = T.triton_score_softmax_gate_fwd(a["x"], a["w"], a["xmask"], 0.5, pool)
            T.triton_score_softmax_gate_bwd(y, a["x"], a["w"], alpha, None, 0.5, pool)


def public(a):
    out = fastattn.attention(a["q"], a["k"], a["v"], attn_mask=a["bias"], causal=True, gate=a["gate"],
                             backend="triton", return_lse=True)
    y = fastattn.softmax_gate(a["scores"], a["x"], mask=a["xmask"], backend="triton")
    z = fastattn.score_softmax_gate(a["x"], a["w"], mask=a["xmask"], pool=True, backend="triton")
    kept = fastattn.attention(a["q"], a["k"], a["v"], attn_mask=a["keep"], backend="triton")
    return (*out, y, z, kept)


def public_attention(a):
    return fastattn.attention(a["q"], a["k"], a["v"], attn_mask=a["bias"], causal=True, gate=a["gate"],
                              backend="triton", return_lse=True)


def compiled(dynamic, backend="eager", fn=public):
    def run():
        torch._dynamo.reset()
        fn_c = torch.compile(fn, fullgraph=True, dynamic=dynamic, backend=backend)
        with FakeTensorMode(allow_non_fake_inputs=True):
            outs = fn_c(inputs())
        assert outs[0].shape == (2, 4, 40, 32) and all(o.device.type == "cuda" for o in outs)
    return run


def decomposed():
    """AOTAutograd (inference) turns each triton_op into its kernels: wrap_triton's traced path (needs a
    CUDA build of torch, as the second stack's is)."""
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    from torch._dynamo.backends.common import aot_autograd
    compiled(False, aot_autograd(fw_compiler=keep))()
    code = "\n".join(g.code for g in graphs)
    n = code.count("triton_kernel_wrapper_functional(")
    assert "torch.ops.fastattn" not in code, "a triton op was left undecomposed"
    # torch 2.11's Inductor cannot lower a dtype view of a bool tensor (torch.iinfo(torch.bool)): the
    # launchers hand bool masks to the kernels as they are
    assert "aten.view.dtype" not in code, "a launcher views a tensor as another dtype"
    assert n >= 3, f"expected the ops' kernels in the graph, found {n} kernel calls"
    print(f"      ({n} Triton kernel launches in the traced graph)")


check("registration: ops are triton_ops, every op fwd+bwd on fake CUDA tensors", ops_fake)
check("torch.compile(fullgraph=True, backend='eager'), static shapes", compiled(False))
# dynamic: attention only (score_softmax_gate's default scale, 1/sqrt(D), is a SymFloat that its
# math.isfinite check cannot take under dynamo, on either stack)
check("torch.compile(fullgraph=True, backend='eager'), dynamic shapes (attention)",
      compiled(True, fn=public_attention))
if torch.version.cuda is not None:
    check("AOTAutograd inference: triton_ops decomposed into wrap_triton kernel calls", decomposed)
else:
    print("skip  AOTAutograd decomposition: this torch is a CPU build (no CUDA device type to trace)")
print(f"{len(fails)} failed" if fails else "all trace checks passed")
sys.exit(1 if fails else 0)
EOF
  )
}

pytest_cmd=(python -m pytest -q -p no:cacheprovider -c ../pyproject.toml --rootdir ..)
want trace && step trace trace_check
want cpu && step cpu bash -c 'cd tests && exec "$@"' _ "${pytest_cmd[@]}" "$@"
if want interp; then
  step interp bash -c 'cd tests && TRITON_INTERPRET=1 "$@"; rc=$?; [ $rc -eq 5 ] && rc=0; exit $rc' _ \
    "${pytest_cmd[@]}" -m "triton and not slow" "$@"
fi
if want aot; then
  if [ -f scripts/check_triton_aot.py ]; then
    # the arguments are meant to split
    # shellcheck disable=SC2086
    step aot python scripts/check_triton_aot.py ${FASTATTN_STACK2_AOT_ARGS:-}
  else
    echo "== aot: skipped (scripts/check_triton_aot.py is not in this tree)"
  fi
fi

echo
echo "== summary: $(python -c "import sys, torch, triton, numpy; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)") (logs: $OUT)"
fails=0
for s in "${order[@]}"; do
  printf '%-8s %-4s %5ss\n' "$s" "$([ "${status[$s]}" = 0 ] && echo ok || echo FAIL)" "${took[$s]}"
  [ "${status[$s]}" = 0 ] || fails=1
done
for s in cpu interp; do
  [[ " ${order[*]} " == *" $s "* ]] && echo "$s: $(grep -E '(passed|failed|error)' "$OUT/$s.log" | tail -1)"
done
echo "total $(( $(stamp) - t_start ))s"
exit $fails
