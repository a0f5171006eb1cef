"""csrc/cuda's kernels, run on the CPU under the emulation (csrc/cuda/emu/emu.h), through the binding's
own parameter filling: the CUDA backend's whole sweep against the reference (docs/CONTRACT.md §4, forward and
every gradient; varlen and kv-cache attention forward only, as the kernels are), the emulation's checks of
memory, barriers and warp collectives on every case, and a mutation test: known bugs planted in a copy of the
kernels, each of which must be caught."""
import contextlib
import dataclasses

import pytest
import torch

import backend_checks as bc
import cuda_emu
import fastattn
from conftest import assert_all_ok, dtype_id
from fastattn.testing import (AttentionCase, GateCase, KvcacheCase, PoolCase, VarlenCase, check_attention, check_gate,
                              check_kvcache, check_pool, compare, gate_cases, pool_cases)

_WHY = cuda_emu.build.requirements()
if _WHY is not None:
    _WHY = f"the CUDA emulation cannot be built here: {_WHY}"
elif torch.cuda.is_available():  # the GPU round's minutes go to the real kernels (test_cuda.py)
    _WHY = "a CUDA device runs these kernels for real (test_cuda.py, and its layout probe against the emulation)"
pytestmark = pytest.mark.skipif(_WHY is not None, reason=str(_WHY))

DTYPES = [torch.float16, torch.bfloat16]
CASES = bc.cuda_attention_cases()
# and positions past one block's chunk (pool: 256 per block, dweight: 512 (b, n) rows per block)
GATE_CASES = gate_cases() + [GateCase(op="score_softmax_gate", pool=pool, N=600, D=64, H=2, weights_grad=True)
                             for pool in (False, True)]
VARLEN_CASES = bc.cuda_varlen_cases(quick=True)
# and a bag split several times (attention_pool.cu: 256 rows a split), next to bags that start and end inside a split;
# more branches than one pass pools (4) and hidden units past one column tile, padded
POOL_SPLIT_CASE = PoolCase(bags=(700, 3, 300), D=40, Hd=40, K=5, mask="random", weights_grad=True)
POOL_CASES = pool_cases() + [POOL_SPLIT_CASE]
KVCACHE_CASES = bc.cuda_kvcache_cases(quick=True)


@pytest.fixture(scope="module", autouse=True)
def emulation():
    if _WHY is None:
        cuda_emu.load()


@pytest.mark.parametrize("B, H", [(1, 65537), (65537, 1)])
def test_emulated_grid_past_65535_heads(B, H):
    """B * H, H or B past 65535, the bound of a grid's y and z axes: the launches pass the emulation's check of their
    grids (a GPU's), and the far end of each grid computes the (batch, head) slices it belongs to. Only the first
    and last two blocks of each launch run (the whole grid is too large to emulate); the slices they own, 0, 1 and
    the last two, are compared with the reference, forward and every gradient."""
    q, k, v = (torch.randn(B, H, 3, 64, dtype=torch.float16, requires_grad=True) for _ in range(3))
    with cuda_emu.settings(block_ends=2):
        out = fastattn.attention(q, k, v, backend="cuda_emu")
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), dout)
    ends = [0, 1, B * H - 2, B * H - 1]
    flat = lambda t: t.detach().flatten(0, 1)[ends].unsqueeze(0)
    qe, ke, ve = (flat(t).double().requires_grad_() for t in (q, k, v))
    want = fastattn.attention(qe, ke, ve, backend="reference")
    want_grads = torch.autograd.grad(want, (qe, ke, ve), flat(dout).double())
    for got, ref in zip((out, *grads), (want, *want_grads)):
        torch.testing.assert_close(flat(got).double(), ref, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_emulated_attention_matches_reference(case, dtype):
    assert_all_ok(check_attention(case, dtype, backend="cuda_emu"), case.id)


@pytest.mark.parametrize("case", GATE_CASES, ids=[c.id for c in GATE_CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_emulated_softmax_gates_match_reference(case, dtype):
    assert_all_ok(check_gate(case, dtype, backend="cuda_emu"), case.id)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_emulated_score_softmax_gate_saturated(dtype):
    bc.saturated_score_gates_meet_the_rule("cuda_emu", dtype)


def test_float_softmax_backward_misses_on_saturated_gates():
    """The softmax backward over positions summed in float, planted back: ds = alpha (g - Σ alpha g) misses the rule
    on float16's saturated gates."""
    planted = cuda_emu.kernels([
        ("softmax_gate.cu", "double dot = 0.0, total = 0.0;", "float dot = 0.f; double total = 0.0;"),
        ("softmax_gate.cu", "dot += double(p.alpha[k]) * p.g[k];", "dot += p.alpha[k] * p.g[k];"),
        ("softmax_gate.cu", "dot = block_reduce<false>(dot, red);",
         "__shared__ float red_f[32]; dot = block_reduce<false>(dot, red_f);"),
        ("softmax_gate.cu", "float(p.alpha[k] * (double(p.g[k]) * total - dot))", "p.alpha[k] * (p.g[k] - dot)"),
        *SMALL_BUILD])
    with cuda_emu.using(planted), pytest.raises(AssertionError, match="dweight"):
        bc.saturated_score_gates_meet_the_rule("cuda_emu", torch.float16)


@pytest.mark.parametrize("case", POOL_CASES, ids=[c.id for c in POOL_CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_emulated_attention_pool_matches_reference(case, dtype):
    assert_all_ok(check_pool(case, dtype, backend="cuda_emu"), case.id)


@pytest.mark.parametrize("arch, schedule, mma", [(80, 1, (16, 23)), (90, 2 + 5, (8, 23))],
                         ids=["sm80-reversed-tc16", "sm90-random-tc8"])
def test_emulated_attention_pool_other_orders_and_sums(arch, schedule, mma):
    """The split bags on either architecture's limits, in other thread and block orders, mma.sync summing as the
    tensor cores do."""
    with cuda_emu.settings(arch=arch, schedule=schedule, mma=mma):
        assert_all_ok(check_pool(POOL_SPLIT_CASE, torch.bfloat16, backend="cuda_emu"), POOL_SPLIT_CASE.id)


def test_emulated_attention_pool_nan_reaches_its_bag_only():
    """NaN in a row of bag 0 (a bag of several splits) makes bag 0 NaN through the merge, and nothing else; NaN in a
    left-out row of bag 1 reaches nothing, its dx is 0; an empty bag and a bag left out entirely give 0 and -inf."""
    g = torch.Generator().manual_seed(0)
    N, D, Hd, K = 700, 24, 16, 2
    x = torch.randn(N, D, generator=g).half()
    V, U = (torch.randn(D, Hd, generator=g).div(D ** 0.5).half() for _ in range(2))
    w, bV, bU = torch.randn(Hd, K, generator=g).half(), torch.randn(Hd, generator=g).half(), torch.randn(Hd).half()
    offsets = torch.tensor([0, 600, 650, 650, 700])  # bag 2 empty, bag 3 left out
    mask = torch.ones(N, dtype=torch.bool)
    mask[620] = mask[650:] = False
    x[300, 5] = x[620, 3] = x[660, 0] = float("nan")
    xg = x.clone().requires_grad_()
    y, a = fastattn.attention_pool(xg, V, w, U, bV=bV, bU=bU, offsets=offsets, mask=mask, return_weights=True,
                                   backend="cuda_emu")
    assert y[0].isnan().all() and y[1].isfinite().all() and (y[2:] == 0).all()
    assert a[600:].isfinite().all() and (a[620] == 0).all() and (a[650:] == 0).all()
    (y[1:].sum() + a[600:].sum()).backward()
    assert xg.grad[600:].isfinite().all() and (xg.grad[620] == 0).all() and (xg.grad[650:] == 0).all()
    _, lse, _ = torch.ops.fastattn.cuda_emu_attention_pool_fwd(x, offsets, mask, V, U, w, bV, bU, False)
    assert lse[0].isnan().all() and lse[1].isfinite().all() and (lse[2:] == float("-inf")).all()


def test_emulated_attention_pool_opcheck():
    g = torch.Generator().manual_seed(0)
    x, V, U = torch.randn(13, 16, generator=g).half(), torch.randn(16, 8).half(), torch.randn(16, 8).half()
    w, bV, bU = torch.randn(8, 3).half(), torch.randn(8).half(), torch.randn(8).half()
    offsets, mask = torch.tensor([0, 4, 4, 13]), torch.rand(13, generator=g) < 0.8
    op = torch.ops.fastattn.cuda_emu_attention_pool_fwd.default
    for args in [(x, offsets, mask, V, U, w, bV, bU, True), (x, offsets, None, V, None, w, None, None, False)]:
        args = tuple(t.requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in args)
        torch.library.opcheck(op, args)


def test_emulated_attention_pool_more_than_16_branches():
    """The kernels take 16 branches at once; the binding runs more 16 at a time and sums their gradients."""
    case = PoolCase(bags=(40, 0, 90), D=16, Hd=8, K=19, mask="random", weights_grad=True)
    assert_all_ok(check_pool(case, torch.float16, backend="cuda_emu"), case.id)


@pytest.mark.parametrize("case", VARLEN_CASES, ids=[c.id for c in VARLEN_CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_emulated_varlen_forward_matches_reference(case, dtype):
    assert_all_ok(bc.check_varlen_forward(case, dtype, "cuda_emu"), case.id)


def test_emulated_varlen_gradient_is_refused():
    """csrc/cuda has no varlen backward: a call that will want a gradient is refused by name, not run."""
    q, k, v = (torch.randn(9, 2, 64, dtype=torch.float16, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="varlen_attention_bwd"):
        fastattn.varlen_attention(q, k, v, cu, cu, 5, 5, backend="cuda_emu")
    with torch.no_grad():
        fastattn.varlen_attention(q, k, v, cu, cu, 5, 5, backend="cuda_emu")


def test_emulated_opcheck_varlen_kvcache():
    bc.opcheck_varlen_and_kvcache("cuda_emu_", dtype=torch.float16, D=64, Dv=64, backward=False)


def test_emulated_backend_declares_its_kernels():
    bc.declared_kernels_are_registered("cuda_emu", "CPU")


@pytest.mark.parametrize("case", KVCACHE_CASES, ids=[c.id for c in KVCACHE_CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_emulated_kvcache_matches_reference(case, dtype):
    assert_all_ok(check_kvcache(case, dtype, backend="cuda_emu"), case.id)


@pytest.mark.parametrize("case, launches", [(KvcacheCase(), 1), *((c, 2) for c in bc.KV_SPLIT_CASES)],
                         ids=lambda x: x.id if isinstance(x, KvcacheCase) else f"launches{x}")
@pytest.mark.parametrize("arch, schedule", [(80, 1), (90, 2 + 5)], ids=["sm80-reversed", "sm90-random"])
def test_emulated_kvcache_splits(case, launches, arch, schedule):
    """Enough blocks: one decode launch writes out itself; few blocks over a long cache: the keys are split and a
    second launch merges the splits. Both on either architecture's limits and in another thread and block order."""
    with cuda_emu.settings(arch=arch, schedule=schedule):
        cuda_emu.stats(reset=True)
        comps = check_kvcache(case, torch.bfloat16, backend="cuda_emu")
        assert cuda_emu.stats()["launches"] == launches
    assert_all_ok(comps, case.id)


def test_emulated_kvcache_reads_only_the_keys_it_holds():
    """NaN in a paged cache past each sequence's length and in pages no sequence holds, and page ids past what
    each sequence uses pointing nowhere, change nothing; NaN in one key a sequence holds makes its rows NaN
    (through the merge of its splits) and no other sequence's."""
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, Lq, D, P, per_seq = 2, 4, 1, 2, 64, 16, 48
    lens = torch.tensor([700, 40], dtype=torch.int32)
    q = torch.randn(B, Hq, Lq, D, generator=g, dtype=torch.float64)
    k_cache = torch.full((B * per_seq + 2, Hkv, P, D), float("nan"), dtype=torch.float64)
    v_cache = k_cache.clone()
    table = torch.randperm(B * per_seq, generator=g).view(B, per_seq).to(torch.int32)
    for b in range(B):
        for j in range(int(lens[b])):
            k_cache[table[b, j // P], :, j % P] = torch.randn(Hkv, D, generator=g, dtype=torch.float64)
            v_cache[table[b, j // P], :, j % P] = torch.randn(Hkv, D, generator=g, dtype=torch.float64)
        table[b, (int(lens[b]) + P - 1) // P:] = 1 << 30

    def run(backend, dtype):
        return fastattn.attention_with_kvcache(q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), cache_seqlens=lens,
                                               page_table=table, causal=True, return_lse=True, backend=backend)

    cuda_emu.stats(reset=True)
    got = run("cuda_emu", torch.float16)
    assert cuda_emu.stats()["launches"] == 2  # the keys were split
    lowp, truth = run("reference", torch.float16), run("reference", torch.float64)
    assert_all_ok([compare(n, got[i], lowp[i], truth[i], torch.float16, 2) for i, n in enumerate(("out", "lse"))],
                  "NaN past the lengths")
    k_cache[table[0, 3], 0, 5] = float("nan")  # key 53 of sequence 0, in the first of its splits
    out, lse = run("cuda_emu", torch.float16)
    assert out[0].isnan().all() and lse[0].isnan().all()
    assert torch.equal(out[1], got[0][1]) and torch.equal(lse[1], got[1][1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_pool_nan_weight_reaches_no_left_out_row(dtype):
    bc.pool_nan_weight_reaches_no_left_out_row("cuda_emu", "cpu", dtype)


@pytest.mark.parametrize("family, n", [("attention", 200), ("gates", 400), ("pool", 300)])
def test_emulated_fuzz(family, n):
    """The fuzz of the cuda backend (test_fuzz.py on a GPU), fewer cases: NaN anywhere (in a float mask under
    the causal rule, in a gate input, at masked positions), broadcast float masks with their gradient, gates
    with saturated softmax rows, pooling of empty and left-out bags with NaN weights, attention pooling's bags, masks
    and branches, every view kind."""
    bc.fuzz_passes(family, "cuda_emu", range(n), "cpu", limits_of="cuda")


# How mma.sync sums (cuda_emu.settings(mma=...)): exactly, rounded once; or as the tensor cores do, groups of 16 or 8
# products and the accumulator cut toward zero 23 bits below their largest term (csrc/cuda/emu/runtime.cpp)
MMA_SUMS = [(0, 0), (16, 23), (8, 23)]
MMA_SUM_IDS = ["exact-sum", "tensor-cores-16", "tensor-cores-8"]


@pytest.mark.parametrize("mma", MMA_SUMS, ids=MMA_SUM_IDS)
def test_emulated_fuzz_cases_the_gpu_missed(mma):
    """The saturated fp16 rows of bc.SATURATED_FP16_SEEDS, mma.sync summing each way: with delta summed exactly apart
    from dP they missed on the GPU, and miss here under the tensor cores' sum (the test below)."""
    with cuda_emu.settings(mma=mma):
        bc.fuzz_passes("attention", "cuda_emu", bc.saturated_fp16_seeds(), "cpu", limits_of="cuda")


def test_delta_apart_from_dp_misses_under_the_tensor_cores_sum():
    """The bug the GPU showed, planted back: delta summed exactly (in double) instead of by dP's chain of MMAs. Exact
    sums pass it; the tensor cores' truncating sum makes dq and dk miss the rule on the seeds above."""
    planted = _mutated("attention_bwd_rows.cu", "ohi[r][e] = p.dropout ||", "ohi[r][e] = true ||")
    with cuda_emu.using(planted):
        bc.fuzz_passes("attention", "cuda_emu", bc.saturated_fp16_seeds(), "cpu", limits_of="cuda")
        with cuda_emu.settings(mma=(16, 23)), pytest.raises(AssertionError, match=r"3 of 3 fuzz cases failed"):
            bc.fuzz_passes("attention", "cuda_emu", bc.saturated_fp16_seeds(), "cpu", limits_of="cuda")


def test_emulated_fuzz_with_the_tensor_cores_sum():
    """A slice of the cuda fuzz (past test_emulated_fuzz's seeds) with mma.sync summing as the tensor cores do."""
    with cuda_emu.settings(mma=(16, 23)):
        bc.fuzz_passes("attention", "cuda_emu", range(200, 300), "cpu", limits_of="cuda")


def test_emulated_fuzz_forward_only():
    """Inference: with no gradient to follow the forward skips out_acc and rounds P to half precision for P V
    (one MMA per tile), which must still meet docs/CONTRACT.md §4 on every input."""
    bc.fuzz_passes("attention", "cuda_emu", range(300), "cpu", limits_of="cuda", inference=True)


def test_repeated_keys_keep_dq_exact():
    bc.repeated_keys_keep_dq_exact("cuda_emu", "cpu")


def test_fully_masked_rows_are_zero_without_nan():
    bc.fully_masked_rows_are_zero_without_nan("cuda_emu", "cpu", torch.float16, D=64)


def test_transposed_inputs_are_not_copied(monkeypatch):
    bc.transposed_inputs_are_not_copied(monkeypatch, "cuda_emu", "cuda_emu_attention_fwd", "cpu", torch.float16)


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("schedule", [1, 2 + 7], ids=["reversed", "random"])
def test_other_architectures_and_thread_orders(arch, schedule):
    """The launches fit both architectures' limits, and no result depends on the order in which
    threads and blocks run (a race the shadow checks missed would show here)."""
    case = AttentionCase(B=1, Hq=4, Hkv=2, Lq=150, Lk=140, D=128, causal="bottom_right", mask="float_grad",
                         gate="elementwise", lse_grad=True)
    with cuda_emu.settings(arch=arch, schedule=schedule):
        assert_all_ok(check_attention(case, torch.bfloat16, backend="cuda_emu"), case.id)


@pytest.mark.parametrize("case", [bc.DETERMINISM_CASE, AttentionCase(B=1, Hq=3, Hkv=3, Lq=40, Lk=530, D=128),
                                  dataclasses.replace(bc.DETERMINISM_CASE, dropout=0.2)],
                         ids=["mask-gate-gqa-D64", "plain-D128", "dropout-D64"])
def test_deterministic_backward_matches_reference(case):
    """The deterministic kernels (their own, with the score modifiers' code: here with no modifier; and those with
    dropout) against the reference, with torch's deterministic setting on (which fastattn.attention follows by
    default)."""
    bc.deterministic_backward_matches_reference("cuda_emu", "cpu", case)


def test_deterministic_backward_is_the_same_in_any_block_order():
    """deterministic: bitwise the same gradients whatever order the blocks run in (as a GPU may run them); without
    it, dq and the broadcast mask's gradient are float atomics, whose sums differ with the order (which shows the
    comparison can tell)."""
    def grads(deterministic, schedule):
        with cuda_emu.settings(schedule=schedule):
            return bc.gradients("cuda_emu", torch.float16, deterministic=deterministic)

    first = grads(True, 0)
    for schedule in (1, 2 + 3, 2 + 11):
        assert bc.same_bits(first, grads(True, schedule)), schedule
    atomic = grads(False, 0)
    assert not bc.same_bits(atomic, grads(False, 2 + 3))


def test_extreme_dropout_keeps_dv_finite():
    bc.extreme_dropout_keeps_dv_finite("cuda_emu")


def test_dropout_is_reproducible_and_fresh_each_call():
    bc.dropout_is_reproducible_and_fresh_each_call("cuda_emu", dtype=torch.float16, D=64)


def test_deterministic_argument_overrides_torch():
    """deterministic=True with torch's setting off, and False with it on: the argument decides."""
    case = bc.DETERMINISM_CASE
    t = case.inputs(torch.float16)

    def run(deterministic, schedule):
        q, k, v = (t[n].half().requires_grad_() for n in "qkv")
        with bc.deterministic_algorithms(not deterministic), cuda_emu.settings(schedule=schedule):
            out = fastattn.attention(q, k, v, causal=case.causal, backend="cuda_emu", deterministic=deterministic)
            out.backward(t["dout"].half())
        return {"dq": q.grad}

    assert bc.same_bits(run(True, 0), run(True, 2 + 3))
    assert not bc.same_bits(run(False, 0), run(False, 2 + 3))


# ------------------------------------------------------------------------------------- mutations
# Known bugs, planted one at a time in a copy of csrc/cuda: (id, file, text, replacement[, "dropout"]). Each must
# make the emulation fail the case below (with dropout where marked: an error of its checks, or a result outside
# docs/CONTRACT.md §4).
FWD, BWD = "attention_fwd_kernel.h", "attention_bwd_kernel.h"
MUTATIONS = [
    ("ldmatrix-lane-offsets-swapped", FWD,
     "(lane & 7) + ((lane >> 4) & 1) * 8) * kLd + kk * 16 +\n                                  ((lane >> 3) & 1) * 8));",
     "(lane & 7) + ((lane >> 3) & 1) * 8) * kLd + kk * 16 +\n                                  ((lane >> 4) & 1) * 8));"),
    ("ldmatrix-trans-column-offset-missing", FWD,
     "dt2 * 16 +\n                                        (lane >> 4) * 8));", "dt2 * 16));"),
    ("quad-reduction-dropped", FWD, "const float l = quad_sum(row_l[r]);", "const float l = row_l[r];"),
    ("causal-off-by-one", "mask.h", "(p.causal && j > i + sd.causal_off)", "(p.causal && j >= i + sd.causal_off)"),
    ("cp-async-wait-late-fwd", FWD, "cp_async_wait<2>();  // V_n landed", "cp_async_wait<3>();"),
    ("cp-async-wait-late-bwd", BWD, "cp_async_wait<0>();  // this step's Q, dO (and at step 0 K, V) landed",
     "cp_async_wait<1>();"),
    ("final-syncthreads-missing-fwd", FWD, "__syncthreads();  // this step's K/V buffer is free", "//"),
    ("k-prefetch-past-the-end", FWD, "k_ptr + int64_t(n1) * p.k_sl, p.k_sl,\n                                            sd.Lk - n1",
     "k_ptr + int64_t(n1) * p.k_sl, p.k_sl,\n                                            sd.Lk - n0"),
    ("syncthreads-before-dv-dk-missing", BWD, "__syncthreads();  // sP, sdS complete", ""),
    ("dmask-row-of-the-wrong-tile", BWD, "const int i = m0 + sr, j = n0 + sc;\n          if (i < p.Lq) {\n            T* d",
     "const int i = sr, j = n0 + sc;\n          if (i < p.Lq) {\n            T* d"),
    ("dgate-sign", "attention_bwd_rows.cu", "dc * oc * (1.f - s)", "dc * oc * (1.f + s)"),
    ("block-reduce-first-barrier-missing", "softmax_gate.cu", "__syncthreads();  // red may still be read", "//"),
    ("barrier-in-divergent-code", "softmax_gate.cu", "if (lane == 0) red[warp] = x;",
     "if (lane == 0) {\n    red[warp] = x;\n    __syncthreads();\n    return x;\n  }"),
    ("dynamic-smem-attribute-missing", "static_switch.h",
     "cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);",
     "cudaError_t err = cudaSuccess;"),
]
# Dropout's bugs, caught on the same case with dropout
MUTATIONS += [(*m, "dropout") for m in [
    ("dropout-partner-rows-swapped", "mask.h",
     "{odd ? got0 : own0, odd ? got1 : own1, odd ? own0 : got0, odd ? own1 : got1}",
     "{odd ? own0 : got0, odd ? own1 : got1, odd ? got0 : own0, odd ? got1 : own1}"),
    ("dropout-draw-of-the-other-key-pair", "mask.h", "(col0 >> 2) + 2 * nt + (t >> 1)", "(col0 >> 2) + 2 * nt"),
    ("dropout-scale-missing-fwd", FWD, "(kDropout ? p.dropout_scale : 1.f) / l", "1.f / l"),
    ("dropout-dv-of-undropped-weights", BWD, "pack2<T>(p0 * k0, p1 * k1)", "pack2<T>(p0, p1)"),
    ("dropout-dv-scale-missing", BWD, "acc_dv[dt][2 * r] * dv_scale, acc_dv[dt][2 * r + 1] * dv_scale",
     "acc_dv[dt][2 * r], acc_dv[dt][2 * r + 1]"),
    ("dropout-dp-not-dropped", BWD, "p0 * (acc_dp[nt][2 * r] * (k0 * z) - delta[r])",
     "p0 * (acc_dp[nt][2 * r] - delta[r])"),
]]
MUTATION_CASE = AttentionCase(B=1, Hq=2, Hkv=1, Lq=150, Lk=140, D=64, causal="bottom_right", mask="float_grad",
                              gate="elementwise")
# Every mutation case is float16 at head dim 64, and a mutation test spends its time on its build, not its check: the
# builds take the dtype switch's float16 branch for bfloat16 too and leave out the head dim 128 kernels (calls that
# would run them fail), so each compiles about a quarter of the kernels
SMALL_BUILD = [("static_switch.h", "using T = __nv_bfloat16;", "using T = __half;"),
               ("attention_fwd_hdim128.cu", "return run_attention_fwd<128>(p, stream);", "return cudaErrorNotSupported;"),
               ("attention_bwd_hdim128.cu", "return run_attention_bwd<128>(p, stream);", "return cudaErrorNotSupported;"),
               ("decode.cu", ": launch_decode<T, 128>(p, stream);", ": cudaErrorNotSupported;")]


def _mutated(file, old, new):
    return cuda_emu.kernels([(file, old, new), *SMALL_BUILD])
MUTATION_GATE_CASE = dict(case=[c for c in GATE_CASES if c.op == "softmax_gate" and c.N > 100][0])


def _mutation_outcome(check):
    """'error: ...' when the emulation's checks stop the kernel, 'wrong: ...' when the results miss
    docs/CONTRACT.md §4, None when the case passes."""
    try:
        bad = [c for c in check() if not c.ok]
    except RuntimeError as e:
        detail = str(e).split("CUDA emulation: ", 1)[-1]
        # no finding of the emulation's: an entry point's own error code (such as the head dim 128 entry points of
        # SMALL_BUILD), not a bug caught
        if "CUDA emulation" not in str(e) or not detail.strip():
            raise
        return "error: " + detail[:300]
    return "wrong: " + ", ".join(f"{c.name} {c.ratio:.3g}x" for c in bad) if bad else None


def _mutation_check(file, dropout=False):
    if file == "softmax_gate.cu":
        return lambda: check_gate(MUTATION_GATE_CASE["case"], torch.float16, backend="cuda_emu")
    case = dataclasses.replace(MUTATION_CASE, dropout=0.3) if dropout else MUTATION_CASE
    return lambda: check_attention(case, torch.float16, backend="cuda_emu")


@pytest.mark.parametrize("small", [False, True], ids=["clean", "small-build"])
def test_mutation_cases_pass_unmutated(small):
    """On the clean build, and on the mutation tests' smaller one unmutated: a mutation then fails by its bug, not by
    what that build leaves out."""
    with cuda_emu.using(cuda_emu.kernels(SMALL_BUILD)) if small else contextlib.nullcontext():
        assert _mutation_outcome(_mutation_check(FWD)) is None
        assert _mutation_outcome(_mutation_check(FWD, dropout=True)) is None
        assert _mutation_outcome(_mutation_check("softmax_gate.cu")) is None


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_planted_bug_is_caught(mutation):
    name, file, old, new, *dropout = mutation
    with cuda_emu.using(_mutated(file, old, new)):
        outcome = _mutation_outcome(_mutation_check(file, dropout=bool(dropout)))
    print(f"{name}: {outcome}")
    assert outcome is not None, f"the emulation did not catch {name}"


# Bugs of the varlen forward and the decode kernel: (id, file, text, replacement, case), the case run forward only.
DECODE = "decode.cu"
VARLEN_MUTATION_CASE = VarlenCase(lens_q=(130, 3, 77), lens_k=(100, 9, 140), causal="bottom_right", Hq=4, Hkv=2,
                                  gate="elementwise")
KV_MUTATION_CASE = bc.KV_SPLIT_CASES[0]
VARLEN_KV_MUTATIONS = [
    ("varlen-q-sequence-offset-dropped", FWD, "int64_t(q_row0 + m0) * p.q_sl", "int64_t(m0) * p.q_sl",
     VARLEN_MUTATION_CASE),
    ("varlen-k-sequence-offset-off-by-one", "mask.h", "int(e.k_row0), int(e.Lq)", "int(e.k_row0) + 1, int(e.Lq)",
     VARLEN_MUTATION_CASE),
    ("varlen-causal-offset-of-the-batch", "mask.h", "int(e.Lk), int(e.causal_off)}", "int(e.Lk), p.causal_off}",
     VARLEN_MUTATION_CASE),
    ("varlen-lse-column-offset-dropped", FWD, "* p.lse_sl + q_row0 + i]", "* p.lse_sl + i]", VARLEN_MUTATION_CASE),
    ("decode-split-dropped-in-merge", DECODE, "const int splits = seq_splits<kD>(p, seq_dims(p, b).Lk);",
     "const int splits = max(1, seq_splits<kD>(p, seq_dims(p, b).Lk) - 1);", KV_MUTATION_CASE),
    ("decode-splits-overlap", DECODE, "min(n_begin + p.split_tiles, (j_end", "min(n_begin + p.split_tiles + 1, (j_end",
     KV_MUTATION_CASE),
    ("decode-page-of-sequence-0", DECODE, "p.page_table[b * p.pt_sb + j / p.page_size]",
     "p.page_table[j / p.page_size]", KV_MUTATION_CASE),
    ("decode-row-in-page", DECODE, "row = j % p.page_size;", "row = j / p.page_size;", KV_MUTATION_CASE),
    ("decode-gqa-packing-transposed", DECODE, "(hk * p.group + pr / sd.Lq) * p.q_sh + int64_t(pr % sd.Lq) * p.q_sl",
     "(hk * p.group + pr % p.group) * p.q_sh + int64_t(pr / p.group) * p.q_sl", KV_MUTATION_CASE),
    ("decode-causal-off-by-one", DECODE, "j > qi[e >> 1] + sd.causal_off", "j >= qi[e >> 1] + sd.causal_off",
     KV_MUTATION_CASE),
    ("decode-warp-weights-dropped", DECODE, "o0 += m_w[w] * src[0];", "o0 += src[0];", KV_MUTATION_CASE),
    ("decode-barrier-before-warp-merge-missing", DECODE,
     "quad_sum(row_l[0]), quad_sum(row_l[1]));\n  __syncthreads();", "quad_sum(row_l[0]), quad_sum(row_l[1]));",
     KV_MUTATION_CASE),
]


def _forward_check(case):
    if isinstance(case, VarlenCase):
        return lambda: bc.check_varlen_forward(case, torch.float16, "cuda_emu")
    return lambda: check_kvcache(case, torch.float16, backend="cuda_emu")


@pytest.mark.parametrize("small", [False, True], ids=["clean", "small-build"])
def test_varlen_kvcache_mutation_cases_pass_unmutated(small):
    with cuda_emu.using(cuda_emu.kernels(SMALL_BUILD)) if small else contextlib.nullcontext():
        assert _mutation_outcome(_forward_check(VARLEN_MUTATION_CASE)) is None
        assert _mutation_outcome(_forward_check(KV_MUTATION_CASE)) is None


@pytest.mark.parametrize("mutation", VARLEN_KV_MUTATIONS, ids=[m[0] for m in VARLEN_KV_MUTATIONS])
def test_planted_varlen_kvcache_bug_is_caught(mutation):
    name, file, old, new, case = mutation
    with cuda_emu.using(_mutated(file, old, new)):
        outcome = _mutation_outcome(_forward_check(case))
    print(f"{name}: {outcome}")
    assert outcome is not None, f"the emulation did not catch {name}"


# Bugs of attention_pool.cu: (id, text, replacement, case), the case run forward and backward in float16.
POOL = "attention_pool.cu"
POOL_PADDED_CASE = [c for c in POOL_CASES if c.layout == "padded"][0]  # NaN in the padding, left out
POOL_MUTATIONS = [
    ("pool-merge-rescale-dropped", "v += expf(p.part_m[s * K + k] - m_use) * p.part_acc", "v += p.part_acc",
     POOL_SPLIT_CASE),
    ("pool-split-end-off-by-one", "hi = min(p.offsets[b + 1], (chunk + 1) * kSplitRows)",
     "hi = min(p.offsets[b + 1], (chunk + 1) * kSplitRows - 1)", POOL_SPLIT_CASE),
    ("pool-left-out-row-pooled", "if (p.mask != nullptr && !p.mask[lo + r]) continue;", "", POOL_PADDED_CASE),
    ("pool-sigmoid-columns-of-the-next-tile", "sigmoidf(acc[nt + kVT][e] + p.bias[col + kUnits]);\n        const",
     "sigmoidf(acc[nt + kVT][e] + p.bias[col + kUnits + 1]);\n        const", POOL_SPLIT_CASE),
    ("pool-dx-pooled-term-dropped", "if (c + j < p.D) v[j] += a * dy[c + j];", "(void)a;", POOL_SPLIT_CASE),
    ("pool-dw-lanes-not-summed", "v += __shfl_xor_sync(0xffffffffu, v, 16);", "", POOL_SPLIT_CASE),
]


def _pool_check(case):
    return lambda: check_pool(case, torch.float16, backend="cuda_emu")


def test_pool_mutation_cases_pass_unmutated():
    with cuda_emu.using(cuda_emu.kernels(SMALL_BUILD)):
        for case in (POOL_SPLIT_CASE, POOL_PADDED_CASE):
            assert _mutation_outcome(_pool_check(case)) is None


@pytest.mark.parametrize("mutation", POOL_MUTATIONS, ids=[m[0] for m in POOL_MUTATIONS])
def test_planted_pool_bug_is_caught(mutation):
    name, old, new, case = mutation
    with cuda_emu.using(_mutated(POOL, old, new)):
        outcome = _mutation_outcome(_pool_check(case))
    print(f"{name}: {outcome}")
    assert outcome is not None, f"the emulation did not catch {name}"


@pytest.mark.parametrize("bf16", [False, True], ids=["fp16", "bf16"])
def test_layout_probe_multiplies(bf16):
    """The probe that a GPU round compares with the hardware (test_cuda.py): its ldmatrix'd fragments
    through mma give D = A B, read back in the PTX ISA's accumulator layout; a quad sum sums a quad."""
    regs = cuda_emu.layout_probe(bf16)
    i, j = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    A = (i * 16 + j).double()
    B = ((i * 7 + j * 3) % 17 - 8).double()[:8].T  # the probe stores B^T [n][k]
    d = regs[:, 12:16].contiguous().view(torch.float32)
    D = torch.empty(16, 8, dtype=torch.float64)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for e in range(4):
            D[g + 8 * (e >= 2), 2 * t + e % 2] = float(d[lane, e])
    assert torch.equal(D, A @ B)
    quad = regs[:, 16].contiguous().view(torch.float32)
    assert torch.equal(quad, torch.tensor([float(sum(range(l // 4 * 4, l // 4 * 4 + 4))) for l in range(32)]))


@pytest.mark.parametrize("op", ["softmax_gate", "score_softmax_gate"])
def test_gate_mask_view_outlives_its_copy(op):
    """A strided bool mask is made contiguous for the kernel: that copy must live until the kernel has read it
    (the emulation reports a read of freed memory; on a GPU it would be a silently wrong alpha)."""
    import fastattn
    from fastattn import reference
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 37, 64, generator=g).half()
    other = torch.randn(2, 37, 4, generator=g).half() if op == "softmax_gate" else torch.randn(4, 64, generator=g).half()
    mask = (torch.rand(2, 74, generator=g) > 0.3)[:, ::2]
    mask[:, 0] = True
    args = (other, x) if op == "softmax_gate" else (x, other)
    y, alpha = getattr(fastattn, op)(*args, mask=mask, return_weights=True, backend="cuda_emu")
    y_ref, alpha_ref = getattr(reference, op)(*(t.float() for t in args), mask=mask, return_weights=True)
    torch.testing.assert_close(alpha.float(), alpha_ref, atol=2e-3, rtol=2e-2)
    torch.testing.assert_close(y.float(), y_ref, atol=2e-2, rtol=2e-2)
