"""Checks every fused backend must pass, written once and called by each backend's test file
(test_attention_cpu.py / test_ops.py for "cpu", test_triton.py, test_cuda.py): fully masked rows,
strided inputs reaching the kernel uncopied, torch.library.opcheck of the op family, and
torch.compile(fullgraph=True) through every op."""
import collections
import contextlib
import itertools
import math

import torch

import fastattn
from fastattn import contract, functional, fuzz, testing
from fastattn.backends import CUDA_DTYPES, CudaBackend, Problem, cuda_kernels_unsupported
from fastattn.testing import AttentionCase, KvcacheCase, attention_cases, cases_covered, kvcache_cases, varlen_cases
from conftest import assert_all_ok


FUZZ_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def triton_kernels_jitted():
    """Every @triton.jit function of triton_kernels, unwrapped from its autotuner/heuristics (none in the
    interpreter, where Triton specializes nothing)."""
    from triton.runtime.jit import JITFunction
    from fastattn.triton_kernels import attention, decode, softmax_gate
    found = []
    for mod in (attention, decode, softmax_gate):
        for obj in vars(mod).values():
            while not isinstance(obj, JITFunction) and hasattr(obj, "fn"):
                obj = obj.fn
            if isinstance(obj, JITFunction) and obj not in found:
                found.append(obj)
    return found


@contextlib.contextmanager
def triton_unspecialized():
    """fastattn's Triton kernels launched unspecialized: Triton compiles a kernel once per constexpr set
    and, unless told not to, once more per divisibility by 16 (and value 1) of each integer argument and
    alignment of each pointer. Fuzz cases draw odd sizes, strides and offset views, about three such
    variants each: ~10,000 compiles over the 3,600 cases of a long GPU sweep, where ~2,700 constexpr
    sets hold the same arithmetic. The long sweep runs here; the quick fuzz and test_triton.py launch
    the specialized kernels users get."""
    saved = []
    for fn in triton_kernels_jitted():
        saved.append((fn, [(p.do_not_specialize, p.do_not_specialize_on_alignment) for p in fn.params],
                      fn.device_caches))
        for p in fn.params:
            if not p.is_constexpr:
                p.do_not_specialize = p.do_not_specialize_on_alignment = True
        fn.device_caches = collections.defaultdict(fn.create_binder)  # binders read the flags once
    try:
        yield
    finally:
        for fn, flags, caches in saved:
            for p, (dns, dns_oa) in zip(fn.params, flags):
                p.do_not_specialize, p.do_not_specialize_on_alignment = dns, dns_oa
            fn.device_caches = caches


def fuzz_passes(family, backend, seeds, device, limits_of=None, inference=False, limits_device=None):
    """fastattn.fuzz's cases ``seeds`` of ``family`` on ``backend``, in the dtypes it takes, over the input
    space ``fuzz.limits`` gives it (of ``limits_of`` when set: the emulated cuda kernels as the real ones; on
    ``limits_device`` when set: the interpreter on a GPU's problem sizes); ``inference``: their forwards
    alone, with no input requiring a gradient."""
    dtypes = {"cpu": FUZZ_DTYPES, "reference": FUZZ_DTYPES, "triton": FUZZ_DTYPES[1:]}.get(backend, list(CUDA_DTYPES))
    limits = fuzz.limits(limits_of or backend, limits_device or device)
    failures = []
    for seed in seeds:
        try:
            cid, comps = fuzz.run(family, seed, backend, dtypes, device, inference=inference, **limits)
        except Exception as e:  # a crash (on a GPU it may leave the device unusable for the cases after it)
            raise AssertionError(f"{family} fuzz case seed {seed} on {backend} raised {type(e).__name__}: {e}") from e
        bad = [c for c in comps if not c.ok]
        if bad:
            failures.append(f"{cid}: " + "; ".join(f"{c.name} err {c.err:.3g} > allowed {c.allowed:.3g}" for c in bad))
    assert not failures, f"{len(failures)} of {len(seeds)} fuzz cases failed:\n" + "\n".join(failures)


def repeated_keys_keep_dq_exact(backend, device):
    """Fuzz cases of the cuda kernels' input space whose exact dq is 0 by symmetry (every key the same: k from
    expand) and whose expanded q sums many such rows into one element of its gradient: with dS rounded to
    half precision before dq's GEMM they miss docs/CONTRACT.md §4 by 1.07-3.3x."""
    for seed in (731, 1264, 2838):
        case = fuzz.attention_case(seed, list(CUDA_DTYPES), **fuzz.limits("cuda", "cuda"))
        assert "k:expand" in case.id and "q:" in case.id, case.id
        assert_all_ok(fuzz.check_attention(case, backend, device), case.id)


# cuda fuzz seeds (fp16, scale 20, 130 query rows from unfold / expand) with saturated softmax rows, where dS = P (dP -
# delta) cancels far below |dP|, so that any difference between delta and the dP of the row's key lands in dq and dk
# times the scale: on an H100 and an H200 they missed docs/CONTRACT.md §4 by 1.4-2.3x with delta summed exactly apart
# from dP's tensor-core sum
SATURATED_FP16_SEEDS = (999, 1789, 3986)


def saturated_fp16_seeds():
    """SATURATED_FP16_SEEDS, checked to draw still what they are kept for."""
    for seed in SATURATED_FP16_SEEDS:
        case = fuzz.attention_case(seed, list(CUDA_DTYPES), **fuzz.limits("cuda", "cuda"))
        assert case.dtype == torch.float16 and "-L130-" in case.id and "scale20.0" in case.id, case.id
    return SATURATED_FP16_SEEDS


# score_softmax_gate cases (scale, seed, N, D, H) whose softmax the scale and |x| ~ 4 saturate: the exact dweight
# and the score part of dx are ~0 while every term of them is large. N 37 takes Triton's one-pass kernel, N 200 and
# 300 its two passes. Without the double sums they missed docs/CONTRACT.md §4: float32 on Triton by 1.4x with
# ds = alpha (g - Σ alpha g) in float32 (scale 30, seed 3) and by 1.1-2.1x with the scores summed, or scaled to
# base 2, in float32 (every scale-100 case); float16 on cuda by 1.0-1.3x with ds in float (scales 100 and 300).
SATURATED_GATES = {
    torch.float32: [(30.0, seed, 37, 48, 3) for seed in (0, 2, 3, 10, 19)]
    + [(100.0, 0, 37, 48, 3), (100.0, 2, 37, 48, 3), (100.0, 10, 37, 48, 3), (100.0, 22, 200, 64, 2),
       (100.0, 29, 200, 64, 2), (100.0, 12, 300, 96, 3), (100.0, 29, 300, 96, 3)],
    torch.float16: [(30.0, seed, 37, 48, 3) for seed in (0, 2, 3, 10, 19)]
    + [(100.0, 25, 200, 64, 2), (100.0, 97, 200, 64, 2), (300.0, 10, 300, 96, 3)],
}
SATURATED_GATES[torch.bfloat16] = SATURATED_GATES[torch.float16]


def saturated_score_gates_meet_the_rule(backend, dtype, device="cpu", cases=None):
    """The (scale, seed, N, D, H) ``cases`` (default SATURATED_GATES[dtype]), |x| ~ 4, on ``backend``."""
    for scale, seed, N, D, H in SATURATED_GATES[dtype] if cases is None else cases:
        case = fuzz.make_gate_case(seed, dtype, op="score_softmax_gate", B=3, N=N, D=D, H=H, pool=seed % 2 == 0,
                                   scale=scale, mask="random" if seed % 3 else "none")
        case.inputs["x"].master *= 4
        assert_all_ok(fuzz.check_gate(case, backend, device), case.id)


# Many key tiles of 64 (more than the cuda kernels' 8 dq slices: a block walks several), GQA, a float mask broadcast
# over batch and heads (its gradient a sum over them) and a gate: every gradient a sum some kernel might reorder
DETERMINISM_CASE = AttentionCase(B=2, Hq=2, Hkv=1, Lq=70, Lk=600, D=64, causal="bottom_right", mask="float_bcast",
                                 gate="elementwise")


@contextlib.contextmanager
def deterministic_algorithms(on=True):
    """torch.use_deterministic_algorithms(on) inside the block (fastattn.attention's deterministic=None follows it);
    warn_only, or the reference's matmuls on a GPU would want CUBLAS_WORKSPACE_CONFIG set before the process began."""
    old, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(on, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old, warn_only=warn_only)


def gradients(backend, dtype, device="cpu", deterministic=True, case=DETERMINISM_CASE):
    """The gradients of one forward and backward of ``case`` (dq, dk, dv, dmask, dgate), with torch's
    deterministic setting ``deterministic``."""
    with deterministic_algorithms(deterministic):
        res = testing._run_attention(case, case.inputs(dtype), dtype, device, backend)
    return {n: x for n, x in res.items() if n.startswith("d")}


def same_bits(a, b):
    """Whether two gradients() results are bitwise the same."""
    return a.keys() == b.keys() and all(torch.equal(a[n].contiguous().view(torch.uint8), b[n].contiguous().view(torch.uint8))
                                        for n in a)


def backward_is_bitwise_repeatable(backend, dtype, device="cpu", runs=50, case=DETERMINISM_CASE):
    """deterministic: ``runs`` backwards give bitwise the same gradients."""
    first = gradients(backend, dtype, device, case=case)
    for run in range(1, runs):
        assert same_bits(first, gradients(backend, dtype, device, case=case)), f"run {run} differs from run 0"


def deterministic_backward_matches_reference(backend, device="cpu", case=DETERMINISM_CASE):
    """The deterministic backward of ``case`` (bfloat16) against the reference, with torch's deterministic setting
    on (which fastattn.attention follows by default)."""
    with deterministic_algorithms():
        assert_all_ok(testing.check_attention(case, torch.bfloat16, backend=backend, device=device), case.id)


def dropout_is_reproducible_and_fresh_each_call(backend, device="cpu", dtype=torch.float32, D=16):
    """The seed comes from torch's generator of q's device: torch.manual_seed repeats a call's dropout, the next
    call drops other weights, and dropout_p = 0 drops none."""
    q, k, v = (rand(2, 3, 40, D, seed=s, device=device, dtype=dtype) for s in (1, 2, 3))
    run = lambda p: fastattn.attention(q, k, v, dropout_p=p, backend=backend)
    torch.manual_seed(3)
    first, second = run(0.5), run(0.5)
    torch.manual_seed(3)
    assert torch.equal(run(0.5), first) and not torch.equal(first, second)
    assert not torch.equal(first, run(0.0)) and torch.equal(run(0.0), fastattn.attention(q, k, v, backend=backend))


def extreme_dropout_keeps_dv_finite(backend, device="cpu", D=64):
    """dropout_p = 1 - 2^-17: a kept weight near 1 times 1 / (1 - p) = 2^17 is past float16's range, while the
    output and dV it makes are not (|v| and dO small): float16's out and dv match the float64 reference, and dq, dk
    are finite."""
    p, (B, H, Lq, Lk) = 1 - 2.0 ** -17, (1, 1, 64, 512)
    for s in range(100):  # a seed that keeps at least one weight (each with probability 2^-17)
        with testing.seeded(s, device):
            keep = contract.dropout_keep(int(functional.dropout_seed(device)), p, B, H, Lq, Lk)
        if keep.any():
            break
    i, j = keep[0, 0].nonzero()[0].tolist()
    g = torch.Generator().manual_seed(0)
    q, k, v = (0.1 * torch.randn(B, H, n, D, generator=g, dtype=torch.float64) for n in (Lq, Lk, Lk))
    k[0, 0, j] = q[0, 0, i] * (40 / (D ** -0.5 * q[0, 0, i].square().sum()))  # score 40 at (i, j): P about 1
    dout = 1e-3 * torch.randn(B, H, Lq, D, generator=g, dtype=torch.float64)

    def run(dtype, backend):
        x = [t.to(device, dtype).requires_grad_() for t in (q, k, v)]
        with testing.seeded(s, device):
            out = fastattn.attention(*x, dropout_p=p, backend=backend)
        return (out, *torch.autograd.grad(out, x, dout.to(device, dtype)))

    out, dq, dk, dv = run(torch.float16, backend)
    want = run(torch.float64, "reference")
    assert want[3].abs().max() > 100 and want[3].abs().max() < 1000  # P Z = 2^17 reached dv, within float16
    torch.testing.assert_close(out.double().cpu(), want[0].cpu(), atol=1e-1, rtol=1e-2)
    torch.testing.assert_close(dv.double().cpu(), want[3].cpu(), atol=1e-1, rtol=1e-2)
    assert dq.isfinite().all() and dk.isfinite().all()


def rand(*shape, seed, device="cpu", dtype=torch.float32, requires_grad=False):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    return t.to(device, dtype).requires_grad_(requires_grad)


def fully_masked_rows_are_zero_without_nan(backend, device="cpu", dtype=torch.float32, D=16):
    q, k, v = (rand(2, 2, 9, D, seed=s, device=device, dtype=dtype, requires_grad=True) for s in (1, 2, 3))
    mask = torch.ones(2, 2, 9, 9, dtype=torch.bool, device=device)
    mask[:, :, 3] = False
    out, lse = fastattn.attention(q, k, v, attn_mask=mask, return_lse=True, backend=backend)
    assert (out[:, :, 3] == 0).all() and (lse[:, :, 3] == -math.inf).all()
    (out.float().sum() + lse[:, :, :3].sum()).backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[:, :, 3] == 0).all()


def transposed_inputs_are_not_copied(monkeypatch, backend, op_name, device="cpu", dtype=torch.float32):
    """A (B, L, H, D) tensor seen as (B, H, L, D) reaches the kernel ``torch.ops.fastattn.<op_name>`` as it is."""
    base = rand(2, 70, 4, 64, seed=1, device=device, dtype=dtype)
    q = base.transpose(1, 2)
    seen, real = [], getattr(torch.ops.fastattn, op_name)

    def spy(q, *args):
        seen.append((q.data_ptr(), q.stride()))
        return real(q, *args)

    monkeypatch.setattr(torch.ops.fastattn, op_name, spy)
    out = fastattn.attention(q, q, q, backend=backend)
    assert seen == [(base.data_ptr(), q.stride())]
    qc = q.contiguous()
    torch.testing.assert_close(out, fastattn.attention(qc, qc, qc, backend=backend))


def views_match_reference(backend, kind, dtype, device="cpu"):
    """Every input laid out as ``kind`` (fuzz.VIEW_KINDS: transposed, stride 0 from expand,
    overlapping rows from unfold, size-1 dims with odd strides), forward and every gradient: a
    prefill-like case with a broadcast float bias and a gate, and a decode case (Lq = 1)."""
    attn = {n: kind for n in ("q", "k", "v", "mask", "gate")}
    cases = [
        fuzz.make_attention_case(1, dtype, B=2, Hq=4, Hkv=2, Lq=9, Lk=13, D=16, Dv=8, mask="float_grad",
                                 mask_shape=(1, 4, 9, 13), gate="elementwise", views=attn),
        fuzz.make_attention_case(2, dtype, B=2, Hq=2, Hkv=1, Lq=1, Lk=13, D=16, causal="bottom_right", mask="bool",
                                 gate="headwise", views=attn),
    ]
    for case in cases:
        assert_all_ok(fuzz.check_attention(case, backend, device), case.id)
    views = {n: kind for n in ("x", "scores", "weight")}
    for op in ("softmax_gate", "score_softmax_gate"):
        for pool in (False, True):
            case = fuzz.make_gate_case(3, dtype, op=op, B=3, N=11, D=16, H=2, pool=pool, mask="random", views=views)
            assert_all_ok(fuzz.check_gate(case, backend, device), case.id)


def nan_reaches_rows_as_in_torch(backend, target, dtype, device="cpu"):
    """A NaN in ``target`` makes the rows it reaches NaN (output, lse, gradients) exactly where the
    float64 reference has NaN; fully masked rows stay 0 and masked keys get no NaN gradient."""
    if target in ("x", "scores", "weight"):
        ops = {"scores": ["softmax_gate"], "weight": ["score_softmax_gate"]}.get(target, ["softmax_gate", "score_softmax_gate"])
        for op, pool in itertools.product(ops, (False, True)):
            case = fuzz.make_gate_case(4, dtype, op=op, B=3, N=11, D=16, H=2, pool=pool, mask="empty", nan=target,
                                       weights_grad=True)
            assert_all_ok(fuzz.check_gate(case, backend, device), case.id)
            assert fuzz._run_gate(case, dtype, device, backend)[0]["y"].isnan().any(), "the NaN reached no output"
        return
    # A NaN value under a masked key is not promised to stay out (0 · NaN in the value GEMM), so v gets
    # no mask. A NaN key under a float mask reaches even a -inf row (NaN + -inf is NaN, as in torch),
    # so k gets a bool mask, whose fully masked row 0 must stay exactly 0.
    mask = {"v": "none", "k": "bool"}.get(target, "float_grad")
    case = fuzz.make_attention_case(5, dtype, B=2, Hq=2, Hkv=1, Lq=9, Lk=13, D=16, mask=mask, empty_rows=mask != "none",
                                    gate="elementwise", nan=target, lse_grad=True)
    assert_all_ok(fuzz.check_attention(case, backend, device), case.id)
    got = fuzz._run_attention(case, dtype, device, backend)[0]
    assert got["out"].isnan().any(), "the NaN reached no row"
    assert got["lse"].isnan().any() == (target in ("q", "k", "mask")), "lse is NaN exactly when the scores are"
    if target == "k":
        assert (got["out"][:, :, 0] == 0).all() and (got["lse"][:, :, 0] == -math.inf).all(), \
            "a fully masked row is not exactly 0"


def broadcast_mask_gradient(backend, dtype, device="cpu"):
    """A float mask's gradient comes back in the mask's own shape, summed over its broadcast dims in
    float32 inside the kernel: within docs/CONTRACT.md §4 in every dtype (a per-query bias, whose exact gradient is
    0, included), and never as a (B, Hq, Lq, Lk) tensor from the op."""
    B, Hq, Hkv, Lq, Lk = 2, 4, 2, 37, 29
    shapes = [(1, 1, Lq, 1), (1, 1, Lq, Lk), (B, 1, 1, Lk), (1, Hq, Lq, 1), (B, Hq, Lq, Lk), (1, 1, 1, 1)]
    for i, shape in enumerate(shapes):
        case = fuzz.make_attention_case(10 + i, dtype, B=B, Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk, D=16, mask="float_grad",
                                        mask_shape=shape, causal=(False, True, "bottom_right")[i % 3],
                                        lse_grad=i % 2 == 0)
        assert_all_ok(fuzz.check_attention(case, backend, device), case.id)
    prefix = "" if backend == "cpu" else backend + "_"
    q, k, v = (rand(B, h, n, 16, seed=s, device=device, dtype=dtype) for s, h, n in ((1, Hq, Lq), (2, Hkv, Lk), (3, Hkv, Lk)))
    for shape in shapes:
        bias = rand(*shape, seed=4, device=device, dtype=dtype)
        out, lse, out_acc = getattr(torch.ops.fastattn, prefix + "attention_fwd")(q, k, v, bias, None, 0.25, 1)
        saved = out_acc if out_acc.numel() else out
        grads = getattr(torch.ops.fastattn, prefix + "attention_bwd")(
            torch.randn_like(out), q, k, v, saved, lse, bias, None, None, 0.25, 1, True)
        assert grads[3].shape == shape and grads[3].dtype == dtype


# ------------------------------------------------------------------------------------ registration
def attention_samples(device="cpu", dtype=torch.float32, D=16, Dv=8):
    """Argument tuples for ``<prefix>attention_fwd``: no mask, bool mask + gate, broadcast float bias
    with gradient, strided q; GQA throughout."""
    B, H, Hkv, Lq, Lk = 2, 4, 2, 9, 13
    r = lambda *s, seed: rand(*s, seed=seed, device=device, dtype=dtype, requires_grad=True)
    q, k, v = r(B, H, Lq, D, seed=1), r(B, Hkv, Lk, D, seed=2), r(B, Hkv, Lk, Dv, seed=3)
    bias = r(1, 1, Lq, Lk, seed=4).expand(B, H, Lq, Lk)
    keep = (torch.rand(B, H, Lq, Lk, generator=torch.Generator().manual_seed(5)) < 0.8).to(device)
    gate = r(B, H, Lq, 1, seed=6).expand(B, H, Lq, Dv)
    strided_q = q.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    return [(q, k, v, None, None, 0.25, 0), (q, k, v, keep, gate, 0.25, 1), (q, k, v, bias, None, 0.25, 2),
            (strided_q, k, v, bias, gate, 0.5, 0)]


def opcheck_attention(prefix, sample, device="cpu", dtype=torch.float32, D=16, Dv=8, score_mods=False):
    """opcheck of ``<prefix>attention_fwd`` on ``attention_samples()[sample]`` and of its backward; with
    ``score_mods``, both take a window, a softcap, ALiBi slopes and deterministic=True too (every argument)."""
    ops = torch.ops.fastattn
    fwd, bwd = getattr(ops, prefix + "attention_fwd"), getattr(ops, prefix + "attention_bwd")
    samples = attention_samples(device, dtype, D, Dv)
    slopes = torch.rand(2, 4, generator=torch.Generator().manual_seed(7)).to(device, fastattn.contract.stat_dtype(dtype))
    mods = (3, 1, 2.5, slopes, True) if score_mods else ()
    torch.library.opcheck(fwd.default, samples[sample] + (True,) * bool(mods) + mods)
    q, k, v, mask, gate, scale, causal = samples[1]
    out, lse, _ = fwd(q, k, v, mask, gate, scale, causal, True, *mods)
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), mask,
            gate.detach(), torch.randn_like(lse), scale, causal, False) + mods
    torch.library.opcheck(bwd.default, args)


def opcheck_softmax_gates(prefix, pool, device="cpu", dtype=torch.float32):
    ops = torch.ops.fastattn
    op = lambda name: getattr(ops, prefix + name)
    x, scores, w = (rand(*s, seed=i, device=device, dtype=dtype, requires_grad=True)
                    for i, s in enumerate([(3, 11, 16), (3, 11, 4), (4, 16)]))
    mask = (torch.rand(3, 11, generator=torch.Generator().manual_seed(4)) < 0.7).to(device)
    torch.library.opcheck(op("softmax_gate_fwd").default, (scores, x, mask, pool))
    torch.library.opcheck(op("softmax_gate_fwd").default, (scores, x, None, pool))
    torch.library.opcheck(op("score_softmax_gate_fwd").default, (x, w, mask, 0.5, pool))
    y, alpha = op("score_softmax_gate_fwd")(x, w, mask, 0.5, pool)
    torch.library.opcheck(op("score_softmax_gate_bwd").default,
                          (torch.randn_like(y), x.detach(), w.detach(), alpha.detach(), None, 0.5, pool))
    torch.library.opcheck(op("softmax_gate_bwd").default,
                          (torch.randn_like(y), x.detach(), alpha.detach(), torch.randn_like(alpha), pool))


def opcheck_varlen_and_kvcache(prefix, device="cpu", dtype=torch.float32, D=16, Dv=8, backward=True):
    """opcheck of ``<prefix>varlen_attention_fwd`` (and its backward when ``backward``) and
    ``<prefix>attention_kvcache_fwd``, contiguous and paged."""
    ops = torch.ops.fastattn
    op = lambda name: getattr(ops, prefix + name)
    r = lambda *s, seed, grad=backward: rand(*s, seed=seed, device=device, dtype=dtype, requires_grad=grad)
    idx = lambda *v: torch.tensor(v, dtype=torch.int32, device=device)
    q, k, v, gate = r(12, 4, D, seed=1), r(15, 2, D, seed=2), r(15, 2, Dv, seed=3), r(12, 4, 1, seed=4)
    cu_q, cu_k = idx(0, 5, 5, 12), idx(0, 6, 9, 15)
    for g, causal, need_acc in ((None, 0, True), (gate, 1, False), (gate, 2, True)):
        torch.library.opcheck(op("varlen_attention_fwd").default,
                              (q, k, v, cu_q, cu_k, 7, 6, g, 0.3, causal, need_acc))
    if backward:
        out, lse, out_acc = op("varlen_attention_fwd")(q, k, v, cu_q, cu_k, 7, 6, gate, 0.3, 2)
        args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), cu_q, cu_k,
                7, 6, gate.detach(), torch.randn_like(lse), 0.3, 2)
        torch.library.opcheck(op("varlen_attention_bwd").default, args)
    q = r(3, 4, 2, D, seed=5, grad=False)
    cache_k, cache_v = r(3, 2, 20, D, seed=6, grad=False), r(3, 2, 20, Dv, seed=7, grad=False)
    seqlens = idx(20, 2, 11)
    torch.library.opcheck(op("attention_kvcache_fwd").default, (q, cache_k, cache_v, seqlens, None, None, 0.3, 2))
    pages_k, pages_v = r(9, 2, 4, D, seed=8, grad=False), r(9, 2, 4, Dv, seed=9, grad=False)
    table = idx(8, 0, 3, 1, 2, 7, 4, 5, 6).view(3, 3)
    torch.library.opcheck(op("attention_kvcache_fwd").default,
                          (q, pages_k, pages_v, idx(12, 2, 9), table, r(3, 4, 2, Dv, seed=10, grad=False), 0.3, 0))


def declared_kernels_are_registered(backend, dispatch_key=None):
    """A fused backend declares exactly the kernels of its family that exist (backends.<Backend>.kernels, what
    "auto" relies on): torch.ops.fastattn.<prefix><name>, with a kernel for ``dispatch_key`` when given."""
    from fastattn.backends import _BACKENDS, BACKWARD_KERNELS, KERNELS
    b = _BACKENDS[backend]
    for name in {n for names in (*KERNELS.values(), *BACKWARD_KERNELS.values()) for n in names}:
        op = b.op_prefix + name
        exists = hasattr(torch.ops.fastattn, op) and (
            dispatch_key is None or torch._C._dispatch_has_kernel_for_dispatch_key(f"fastattn::{op}", dispatch_key))
        assert exists == (name in b.kernels), f"{backend}: {op} {'exists' if exists else 'is missing'}, but the " \
                                             f"backend {'does not declare' if exists else 'declares'} it"


class TinyGatedModel(torch.nn.Module):
    """Attention with a fused output gate, then attention pooling: every fastattn op in one graph."""

    def __init__(self, backend="auto", dim=32, heads=4):
        super().__init__()
        self.backend, self.heads = backend, heads
        self.qkvg = torch.nn.Linear(dim, 4 * dim)
        self.pool_score = torch.nn.Parameter(torch.randn(2, dim) / dim ** 0.5)

    def forward(self, x, keep):
        B, L, C = x.shape
        q, k, v, g = self.qkvg(x).view(B, L, 4, self.heads, C // self.heads).transpose(1, 3).unbind(1)
        o = fastattn.attention(q, k, v, causal=True, gate=g, attn_mask=keep[:, None, None, :], backend=self.backend)
        o = o.transpose(1, 2).reshape(B, L, C)
        y1 = fastattn.softmax_gate(o[..., :2], o, mask=keep, backend=self.backend)
        return fastattn.score_softmax_gate(y1, self.pool_score, mask=keep, pool=True, backend=self.backend)


def torch_compile_fullgraph(backend="auto", device="cpu", dtype=torch.float32, dim=32):
    """Compiled and eager runs of TinyGatedModel agree, outputs and every parameter's gradient."""
    torch.manual_seed(0)
    model = TinyGatedModel(backend, dim=dim).to(device, dtype)
    x = torch.randn(3, 10, dim, device=device, dtype=dtype)
    keep = torch.rand(3, 10, device=device) < 0.8
    keep[:, 0] = True
    eager = model(x, keep)
    eager_grads = torch.autograd.grad(eager.float().square().sum(), list(model.parameters()))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x, keep)
    grads = torch.autograd.grad(out.float().square().sum(), list(model.parameters()))
    torch.testing.assert_close(out, eager)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)


def cuda_attention_cases():
    """The sweep of fastattn.testing moved onto what csrc/cuda covers (float16 / bfloat16, D == Dv in
    {64, 128}), plus shapes that cross several tiles of both kernels (128-query forward tiles, 64-key
    backward tiles, the K/V and Q/dO double buffers) and GQA groups: on a GPU and under the emulation."""
    cases = attention_cases(score_mods=CudaBackend.score_mods, dropout=CudaBackend.dropout) + [
        AttentionCase(B=1, Hq=2, Lq=300, Lk=517, D=128),                                   # tails of both tiles
        AttentionCase(B=1, Hq=2, Lq=517, Lk=300, D=64, causal="bottom_right"),             # empty leading rows
        AttentionCase(B=1, Hq=2, Lq=1023, Lk=1023, D=64, causal=True),                     # many tiles, diagonal
        AttentionCase(B=2, Hq=8, Hkv=2, Lq=257, Lk=190, D=128, causal=True, gate="headwise"),  # GQA group 4
        AttentionCase(B=1, Hq=4, Hkv=1, Lq=130, Lk=129, D=64, mask="float_grad", gate="elementwise"),  # MQA
        AttentionCase(B=1, Hq=2, Lq=200, Lk=333, D=128, mask="bool", masked_rows=True, lse_grad=True),
        AttentionCase(B=2, Hq=2, Lq=129, Lk=129, D=128, layout="blhd", mask="float_bcast", causal="bottom_right"),
    ]
    refuses = lambda D, Dv: cuda_kernels_unsupported(Problem("attention", "cuda", torch.float16, D=D, Dv=Dv))
    return cases_covered(cases, refuses)


def _cuda_refuses(op):
    return lambda D, Dv: cuda_kernels_unsupported(Problem(op, "cuda", torch.float16, D=D, Dv=Dv))


def cuda_varlen_cases(quick=False):
    """The varlen sweep of fastattn.testing moved onto what csrc/cuda covers (as cuda_attention_cases)."""
    return cases_covered(varlen_cases(quick), _cuda_refuses("varlen_attention"))


# Few blocks (batch x kv heads x 16-row tiles) over long caches: the cuda decode kernel splits the keys and merges
# the splits; sequences of one split, of several and of none in one batch, pages shorter than a key tile, GQA rows
# over two row tiles, a length on a tile boundary.
KV_SPLIT_CASES = [
    KvcacheCase(cache_seqlens=(700, 5, 0), Lq=3, Lnew=2, Hq=4, Hkv=1, capacity=768, page_size=16, gate="elementwise"),
    KvcacheCase(cache_seqlens=(1500, 256, 0), Lq=4, Lnew=0, Hq=8, Hkv=1, capacity=1536, causal=False, D=128,
                gate="headwise"),
]


def cuda_kvcache_cases(quick=False):
    """The kv-cache sweep of fastattn.testing moved onto what csrc/cuda covers, plus KV_SPLIT_CASES."""
    return cases_covered(kvcache_cases(quick) + KV_SPLIT_CASES, _cuda_refuses("attention_kvcache"))


def check_varlen_forward(case, dtype, backend, device="cpu"):
    """fastattn.testing.check_varlen's rule (docs/CONTRACT.md §4) on out and lse, with no input requiring a
    gradient: for a backend with a varlen forward and no varlen backward (csrc/cuda)."""
    t = case.inputs()
    lens_k = case.lens_k or case.lens_q

    def run(dt, be):
        cast = lambda n: testing._strided(testing.fresh(t[n], device, dt), case.layout)
        gate = testing.fresh(t["gate"], device, dt) if "gate" in t else None
        out, lse = fastattn.varlen_attention(
            cast("q"), cast("k"), cast("v"), t["cu_seqlens_q"].to(device), t["cu_seqlens_k"].to(device),
            max(case.lens_q, default=0), max(lens_k, default=0), causal=case.causal, scale=case.scale, gate=gate,
            return_lse=True, backend=be)
        return {"out": out, "lse": lse}

    got, lowp, truth = run(dtype, backend), run(dtype, "reference"), run(torch.float64, "reference")
    return [testing.compare(n, got[n], lowp[n], truth[n], dtype, 2) for n in ("out", "lse")]


def pool_nan_weight_reaches_no_left_out_row(backend, device, dtype):
    """A NaN in a weight with every row of a bag left out: the weights' gradients come from rows that take part alone,
    and a left-out row's dx is 0 (its activations, made from x = 0, hold the NaN: 0 · NaN must not reach anything)."""
    for gated, mask in ((False, "bag"), (True, "random")):
        case = fuzz.make_pool_case(77, dtype, bags=(2, 5), D=24, Hd=8, K=2, gated=gated, bias=gated, padded=True,
                                   mask=mask, views={"x": "transposed", "V": "size1"}, nan="V")
        assert_all_ok(fuzz.check_pool(case, backend, device), case.id)
