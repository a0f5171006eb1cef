"""Seeded property fuzzing (fastattn.fuzz) of every available backend against the float64 reference,
forward and backward, over the whole input space: a fast slice in CI, thousands of cases with
``-m slow``, any number with ``fastattn check --fuzz N``. A failure names the case's seed and what it
drew; ``fastattn.fuzz.attention_case(seed, dtypes)`` / ``gate_case`` rebuild it."""
import os

import pytest
import torch

import backend_checks as bc
import fastattn
from fastattn import fuzz
from fastattn.backends import CUDA_DTYPES, Problem, cuda_kernels_unsupported

ALL_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
CHUNK = 100


def _run(family, backend, seeds, device, inference=False):
    bc.fuzz_passes(family, backend, seeds, device, inference=inference)


@pytest.mark.parametrize("family", ["attention", "gates", "pool"])
@pytest.mark.parametrize("chunk", range(6))
def test_fuzz_cpu(family, chunk):
    if not fastattn.backends()["cpu"]["available"]:
        pytest.skip(fastattn.backends()["cpu"]["reason"])
    _run(family, "cpu", range(chunk * CHUNK, (chunk + 1) * CHUNK), "cpu")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["attention", "gates"])
@pytest.mark.parametrize("chunk", range(6, 60))
def test_fuzz_cpu_long(family, chunk):
    _run(family, "cpu", range(chunk * CHUNK, (chunk + 1) * CHUNK), "cpu")


def _triton_device():
    if torch.cuda.is_available() and not INTERPRET:
        return "cuda"
    if INTERPRET:
        return "cpu"
    pytest.skip("the Triton backend needs a CUDA device or TRITON_INTERPRET=1")


# In the interpreter (CPU, ~1000x slower than a GPU) fewer and smaller cases.
_TRITON_N = 40 if INTERPRET else 400


@pytest.mark.triton
@pytest.mark.parametrize("family", ["attention", "gates", "pool"])
def test_fuzz_triton(family):
    _run(family, "triton", range(_TRITON_N), _triton_device())


@pytest.mark.triton
def test_fuzz_triton_forward_only():
    """Inference: the forward without out_acc or the two-part P V kept for a backward."""
    _run("attention", "triton", range(_TRITON_N), _triton_device(), inference=True)


# The long GPU sweeps come in chunks of the quick one's size, which pytest-xdist spreads over its workers.
@pytest.mark.slow
@pytest.mark.triton
@pytest.mark.parametrize("family", ["attention", "gates", "pool"])
@pytest.mark.parametrize("chunk", range(1, 10))
def test_fuzz_triton_long(family, chunk):
    with bc.triton_unspecialized():
        _run(family, "triton", range(chunk * _TRITON_N, (chunk + 1) * _TRITON_N), _triton_device())


@pytest.mark.triton
def test_triton_unspecialized_launches_bind_no_divisibility_or_alignment():
    """The long GPU sweep's launches: every fastattn kernel binds integers and pointers without Triton's
    divisibility/alignment attributes (one compile per constexpr set), and gets its specializing binder
    back afterwards."""
    if INTERPRET:
        pytest.skip("the interpreter specializes nothing")
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    from fastattn.triton_kernels.attention import _attn_fwd
    backend = make_backend(GPUTarget("cuda", 90, 32))
    fn = next(f for f in bc.triton_kernels_jitted() if f.fn.__name__ == "_attn_fwd")
    assert fn is _attn_fwd.fn and len(bc.triton_kernels_jitted()) >= 10
    names = [p.name for p in fn.params if not p.is_constexpr]
    n_ptr = names.index("stride_qb")  # the pointers come first
    args = [torch.empty(64)] * n_ptr + [32] * (len(names) - n_ptr)
    consts = {p.name: 1 for p in fn.params if p.is_constexpr}

    def attrs():
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        return [a for kind, a in binder(*args, **consts)[1] if kind != "constexpr"]

    before = fn.device_caches
    assert "D" in attrs()
    with bc.triton_unspecialized():
        assert attrs() == [None] * len(args)
        assert all(f.device_caches is not before for f in bc.triton_kernels_jitted())
    assert "D" in attrs() and fn.device_caches is before


# The Triton kernels on a GPU's tiles (sm_90's lists, its problem sizes) in the interpreter, every lane they
# load or store checked against the bounds of the launch's tensors: out-of-bounds accesses without a GPU.
def _on_gpu_tiles(family, seeds):
    if not INTERPRET:
        pytest.skip("bounds checks run in Triton's interpreter (TRITON_INTERPRET=1); on a GPU, compute-sanitizer")
    import triton_bounds
    with triton_bounds.checked(cc=90):
        bc.fuzz_passes(family, "triton", seeds, "cpu", limits_device="cuda")


@pytest.mark.triton
@pytest.mark.parametrize("family", ["attention", "gates"])
def test_fuzz_triton_gpu_tiles_in_bounds(family):
    # seeds past test_fuzz_triton's: the two quick runs check different cases
    _on_gpu_tiles(family, range(_TRITON_N, _TRITON_N + (24 if family == "attention" else 64)))


@pytest.mark.slow
@pytest.mark.triton
@pytest.mark.parametrize("family", ["attention", "gates"])
@pytest.mark.parametrize("chunk", range(10))
def test_fuzz_triton_gpu_tiles_in_bounds_long(family, chunk):
    _on_gpu_tiles(family, range(chunk * 400, (chunk + 1) * 400))


@pytest.mark.triton
def test_bounds_checks_catch_a_lane_past_a_tensor():
    """The checker's own test: one lane read past the end of x is caught; the same launch in bounds is not."""
    if not INTERPRET:
        pytest.skip("bounds checks run in Triton's interpreter (TRITON_INTERPRET=1)")
    import triton.runtime.interpreter as interp
    import triton_bounds
    unchecked = interp.InterpreterBuilder.create_masked_load
    x, y = torch.randn(40)[:33].clone(), torch.zeros(33)
    with triton_bounds.checked():
        triton_bounds.copy_prefix[(1,)](x, y, 33, 33, BLOCK=64)
        assert torch.equal(y, x)
        with pytest.raises(Exception, match=r"copy_prefix: load of 1 lane\(s\) outside every tensor"):
            triton_bounds.copy_prefix[(1,)](x, y, 34, 33, BLOCK=64)
        with pytest.raises(Exception, match=r"copy_prefix: store of 2 lane\(s\) outside"):
            triton_bounds.copy_prefix[(1,)](x, y, 33, 35, BLOCK=64)
    assert interp.InterpreterBuilder.create_masked_load is unchecked


_CUDA = fastattn.backends()["cuda"]
needs_cuda = pytest.mark.skipif(not _CUDA["available"], reason=f"the cuda backend: {_CUDA['reason']}")


@needs_cuda
@pytest.mark.parametrize("family", ["attention", "gates", "pool"])
def test_fuzz_cuda(family):
    _run(family, "cuda", range(400), "cuda")


@needs_cuda
def test_fuzz_cuda_forward_only():
    """Inference: the forward without out_acc, P rounded for P V (test_cuda_emu.py has its emulated twin)."""
    _run("attention", "cuda", range(400), "cuda", inference=True)


@pytest.mark.slow
@needs_cuda
@pytest.mark.parametrize("family", ["attention", "gates", "pool"])
@pytest.mark.parametrize("chunk", range(1, 10))
def test_fuzz_cuda_long(family, chunk):
    _run(family, "cuda", range(chunk * 400, (chunk + 1) * 400), "cuda")


def test_fuzz_draws_only_what_the_cuda_kernels_cover():
    """The cuda fuzz runs kernels, not refusals: every attention case it draws is one they accept (a head
    dim of 0 is refused by name like any other, so zero sizes come from B and L there)."""
    ids = []
    for seed in range(4000):
        case = fuzz.attention_case(seed, list(CUDA_DTYPES), **fuzz.limits("cuda", "cuda"))
        q, v = (case.inputs[n].build(case.inputs[n].master) for n in ("q", "v"))
        p = Problem("attention", "cuda", case.dtype, D=q.shape[-1], Dv=v.shape[-1])
        assert cuda_kernels_unsupported(p) is None, case.id
        ids.append(case.id)
    assert any("-L0-" in i for i in ids) and any("B0-" in i for i in ids)


def test_the_floor_covers_per_position_roundings_summed_by_an_expand():
    """scores seen through expand: their gradient is torch's sum of 5 per-position gradients of about 0.6,
    each rounded to bfloat16 by the op, cancelling to ~0; the reference in bfloat16 happens to round to an
    exact 0 there. Each term's rounding counts, so the kernel (closer to the truth than that reference at
    every position) passes."""
    case = fuzz.gate_case(3694, list(CUDA_DTYPES))
    assert "scores:expand" in case.id and case.dtype == torch.bfloat16
    bad = [c for c in fuzz.check_gate(case, "cpu") if not c.ok]
    assert not bad, bad


def test_fuzz_covers_the_input_space():
    """The generator reaches every kind of input it promises, so a green run means something."""
    cases = [fuzz.attention_case(s, ALL_DTYPES) for s in range(600)]
    ids = " ".join(c.id for c in cases)
    for needle in ("nan-", "emptyrows", "causalTrue", "causalbottom_right", "mask-bool", "mask-float_grad",
                   "gate-elementwise", "gate-headwise", "scale20", "-L1-", "-L0-", "B0-",
                   *(f":{k}" for k in fuzz.VIEW_KINDS if k != "contiguous")):
        assert needle in ids, needle
    assert {c.dtype for c in cases} == set(ALL_DTYPES)
    assert any(c.inputs["q"].master.shape[1] != c.inputs["k"].master.shape[1] for c in cases)  # GQA
    gates = " ".join(fuzz.gate_case(s, ALL_DTYPES).id for s in range(300))
    for needle in ("softmax_gate", "score_softmax_gate", "pool", "mask-empty", "nan-", "scale10.0", "scale100.0", "-N0-",
                   "x:unfold"):
        assert needle in gates, needle


def test_fuzz_reports_a_broken_kernel(monkeypatch):
    """Plant a bug (dq off by 1% when the scale is not the default) and the fuzz finds it."""
    real = torch.ops.fastattn.attention_bwd

    def broken(dout, q, k, v, out, lse, mask, gate, dlse, scale, causal, need_dmask, *mods):
        dq, dk, dv, dmask, dgate = real(dout, q, k, v, out, lse, mask, gate, dlse, scale, causal, need_dmask, *mods)
        return (dq * 1.01 if abs(scale - q.shape[-1] ** -0.5) > 1e-6 else dq), dk, dv, dmask, dgate

    monkeypatch.setattr(torch.ops.fastattn, "attention_bwd", broken)
    with pytest.raises(AssertionError, match="dq err"):
        _run("attention", "cpu", range(100), "cpu")


def test_fuzz_names_the_seed_of_a_crash(monkeypatch):
    """A kernel that raises (on a GPU: an illegal memory access) fails the chunk naming the case's seed."""
    real = torch.ops.fastattn.attention_fwd

    def crashing(q, k, v, mask, gate, scale, causal, need_acc, *mods):
        if q.shape[-2] == 97:
            raise RuntimeError("illegal memory access")
        return real(q, k, v, mask, gate, scale, causal, need_acc, *mods)

    monkeypatch.setattr(torch.ops.fastattn, "attention_fwd", crashing)
    seed = next(s for s in range(100) if "-L97-" in fuzz.attention_case(s, ALL_DTYPES).id)
    with pytest.raises(AssertionError, match=f"attention fuzz case seed {seed} on cpu raised RuntimeError: illegal"):
        _run("attention", "cpu", range(seed - 1, seed + 2), "cpu")
