"""The Triton backend against the reference (docs/CONTRACT.md §4), forward and every gradient; opcheck of its ops;
torch.compile(fullgraph=True) through them.

On a GPU this runs the full sweeps on CUDA tensors. Without one, scripts/test.sh reruns this file
under TRITON_INTERPRET=1 (CPU tensors in Triton's interpreter): the quick attention, varlen and kv-cache
sweeps, the gate sweep through both the one-pass and the two-pass kernels, and extra cases for head dims 96-256.
"""
import inspect
import math
import os

import pytest
import torch
import torch.utils._pytree
from torch.utils._python_dispatch import TorchDispatchMode

import fastattn
from fastattn import fuzz
from fastattn.backends import TritonBackend
from fastattn.testing import (AttentionCase, KvcacheCase, PoolCase, attention_cases, check_attention, check_gate,
                              check_kvcache, check_pool, check_varlen, compare, gate_cases, kvcache_cases, pool_cases,
                              varlen_cases)
import backend_checks as bc
from conftest import assert_all_ok, dtype_id

pytest.importorskip("triton")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not (torch.cuda.is_available() or INTERPRET), reason="needs CUDA or TRITON_INTERPRET=1"),
]
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# Interpreted kernels are ~1000x slower: the quick sweep plus the cases that only the full one has
# (head dims past 64, non-powers of two, D != Dv with a gate, a float bias at D 256).
ATTN_CASES = attention_cases(quick=INTERPRET, score_mods=TritonBackend.score_mods, dropout=TritonBackend.dropout) + [
    AttentionCase(Hq=4, Hkv=2, Lq=17, Lk=33, D=111, Dv=96, causal=True, gate="headwise"),
    AttentionCase(Lq=9, Lk=21, D=256, mask="float_grad", lse_grad=True),
    AttentionCase(Lq=40, Lk=40, D=96, causal="bottom_right", mask="bool", layout="blhd"),
]
GATE_CASES = gate_cases()
KVCACHE_CASES = kvcache_cases(quick=INTERPRET)
VARLEN_CASES = varlen_cases(quick=INTERPRET)
TWO_PASS_CASES = gate_cases(quick=True) if INTERPRET else gate_cases()
# The 3,000-row bag (the CPU kernels' block loop) takes ~20 s a dtype in the interpreter: slow there; the
# interpreter checks the splits on small bags, forced (test_triton_pool_several_splits_merge_exactly)
POOL_CASES = [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if INTERPRET and sum(c.bags) > 2048 else [])
              for c in pool_cases()]


@pytest.fixture(scope="module", autouse=True)
def _registered():
    avail = fastattn.backends()["triton"]
    assert avail["available"], avail["reason"]


# CUDA's bounds on a launch grid (x, y, z). The interpreter has none, so every interpreted launch is held to them.
GRID_BOUNDS = (2**31 - 1, 65535, 65535)


def _within_bounds(grid):
    return all(n <= bound for n, bound in zip(grid, GRID_BOUNDS))


@pytest.fixture(autouse=True)
def _cuda_grid_bounds(monkeypatch):
    if INTERPRET:
        from triton.runtime import interpreter
        builder = interpreter.interpreter_builder
        set_grid_dim = builder.set_grid_dim

        def checked(*grid):
            assert _within_bounds(grid), f"launch grid {grid} is past CUDA's bounds {GRID_BOUNDS}"
            return set_grid_dim(*grid)

        monkeypatch.setattr(builder, "set_grid_dim", checked)


@pytest.mark.parametrize("case", ATTN_CASES, ids=[c.id for c in ATTN_CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_triton_attention_matches_reference(case, dtype):
    assert_all_ok(check_attention(case, dtype, backend="triton", device=DEVICE), case.id)


@pytest.mark.parametrize("case", KVCACHE_CASES, ids=[c.id for c in KVCACHE_CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_triton_kvcache_matches_reference(case, dtype):
    assert_all_ok(check_kvcache(case, dtype, backend="triton", device=DEVICE), case.id)


def _forced_splits(monkeypatch, keys, fill=float("nan")):
    """Every kvcache launch splits its keys every ``keys`` keys, whatever the shapes; the splits' workspace starts
    as ``fill`` (NaN: an entry the merge reads that no split wrote shows in the output). Returns the plans seen."""
    from fastattn.triton_kernels import decode
    plans = []

    def plan(programs, capacity, device):
        plans.append((capacity, keys))
        return keys

    monkeypatch.setattr(decode, "split_keys", plan)
    monkeypatch.setattr(decode, "workspace", lambda shape, device: torch.full(shape, fill, device=device))
    return plans


# keys per split: a multiple of the interpreter's key tile with a shorter last split (160 = 3 x 48 + 16), and one
# that is not (splits end inside a key tile). The last case has 3 rows per sequence (MQA, group 3): the merge's row
# tiles hold rows of sequences with different numbers of splits.
SPLIT_CASES = kvcache_cases(quick=True) + [
    KvcacheCase(cache_seqlens=(130, 5, 60, 0), Lq=1, Lnew=1, Hq=3, Hkv=1, D=32, gate="elementwise")]


@pytest.mark.parametrize("keys", [48, 23])
@pytest.mark.parametrize("case", SPLIT_CASES, ids=[c.id for c in SPLIT_CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_triton_kvcache_several_splits_merge_exactly(case, dtype, keys, monkeypatch):
    """Split-KV with several splits per sequence, the last one shorter, splits past a sequence's end (no keys:
    never read by the merge), causal diagonals across split boundaries, through the merge kernel."""
    plans = _forced_splits(monkeypatch, keys)
    assert_all_ok(check_kvcache(case, dtype, backend="triton", device=DEVICE), case.id)
    assert plans and all(capacity > k for capacity, k in plans), plans  # two splits or more


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_triton_kvcache_nan_reaches_rows_as_in_torch(paged, monkeypatch):
    """A NaN in q reaches its row, one in a key a sequence holds reaches every row of that kv head (through its
    split and the merge); one past a sequence's length (or in a page it does not own) reaches nothing."""
    _forced_splits(monkeypatch, 48, fill=0.0)
    B, Hq, Hkv, Lq, D, P, held = 2, 4, 2, 2, 16, 16, (37, 130)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, Hq, Lq, D, generator=g)
    table = torch.randperm(20, generator=g).view(B, 10).to(torch.int32) if paged else None
    shape = (21, Hkv, P, D) if paged else (B, Hkv, 160, D)
    k_cache, v_cache = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)

    def at(b, j):  # the cache index of key j of sequence b
        return (int(table[b, j // P]), slice(None), j % P) if paged else (b, slice(None), j)

    q[0, 3, 1, 5] = float("nan")
    k_cache[at(1, 100)][0, 7] = float("nan")    # kv head 0 of sequence 1, in its third split
    v_cache[at(0, 50)][:, 2] = float("nan")     # past sequence 0's 37 keys
    if paged:
        k_cache[-1] = float("nan")              # a page no sequence owns
    seqlens = torch.tensor(held, dtype=torch.int32)
    args = dict(cache_seqlens=seqlens, page_table=table, causal=True, return_lse=True)
    out, lse = fastattn.attention_with_kvcache(q.to(DEVICE), k_cache.to(DEVICE), v_cache.to(DEVICE),
                                               backend="triton", **{n: a.to(DEVICE) if isinstance(a, torch.Tensor)
                                                                    else a for n, a in args.items()})
    ref, ref_lse = fastattn.attention_with_kvcache(q, k_cache, v_cache, backend="reference", **args)
    nan_rows = torch.zeros(B, Hq, Lq, dtype=torch.bool)
    nan_rows[0, 3, 1] = True
    nan_rows[1, :2] = True
    assert torch.equal(ref.isnan().any(-1), nan_rows) and torch.equal(ref_lse.isnan(), nan_rows)
    assert torch.equal(out.cpu().isnan().any(-1), nan_rows) and torch.equal(lse.cpu().isnan(), nan_rows)
    torch.testing.assert_close(out.cpu(), ref, equal_nan=True, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.cpu(), ref_lse, equal_nan=True, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_triton_kvcache_rows_without_keys_are_zero(dtype, monkeypatch):
    """Empty sequences and causal rows before a short sequence's keys: out exactly 0 and lse -inf, with one split
    and with several."""
    B, Hq, Hkv, Lq, D = 3, 2, 1, 4, 16
    g = torch.Generator().manual_seed(4)
    q = torch.randn(B, Hq, Lq, D, generator=g).to(DEVICE, dtype)
    k_cache, v_cache = (torch.randn(B, Hkv, 64, D, generator=g).to(DEVICE, dtype) for _ in range(2))
    seqlens = torch.tensor([0, 2, 64], dtype=torch.int32, device=DEVICE)
    for keys in (None, 16):
        if keys:
            _forced_splits(monkeypatch, keys)
        out, lse = torch.ops.fastattn.triton_attention_kvcache_fwd(q, k_cache, v_cache, seqlens, None, None, 0.25, 2)
        empty = torch.zeros(B, Hq, Lq, dtype=torch.bool, device=DEVICE)
        empty[0] = True
        empty[1, :, :2] = True   # rows 0, 1 see keys j <= i + 2 - 4
        assert torch.equal(lse == float("-inf"), empty), keys
        assert torch.equal(out == 0, empty[..., None].expand_as(out)), keys


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_opcheck_kvcache(paged):
    B, Hq, Hkv, Lq, D, Dv, P = 2, 4, 2, 3, 16, 8, 8
    r = lambda *s, seed: bc.rand(*s, seed=seed, device=DEVICE)
    q = r(B, Hq, Lq, D, seed=1)
    rows = 7 if paged else B
    k_cache, v_cache = r(rows, Hkv, P if paged else 24, D, seed=2), r(rows, Hkv, P if paged else 24, Dv, seed=3)
    table = torch.tensor([[3, 0, 5], [1, 6, 2]], dtype=torch.int32, device=DEVICE) if paged else None
    seqlens = torch.tensor([5, 21], dtype=torch.int32, device=DEVICE)
    gate = r(B, Hq, Lq, 1, seed=4).expand(B, Hq, Lq, Dv)
    op = torch.ops.fastattn.triton_attention_kvcache_fwd.default
    torch.library.opcheck(op, (q, k_cache, v_cache, seqlens, table, gate, 0.25, 2))
    torch.library.opcheck(op, (q, k_cache, v_cache, seqlens, table, None, 0.5, 0))


@pytest.mark.parametrize("case", VARLEN_CASES, ids=[c.id for c in VARLEN_CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_triton_varlen_matches_reference(case, dtype):
    assert_all_ok(check_varlen(case, dtype, backend="triton", device=DEVICE), case.id)


@pytest.mark.parametrize("case", GATE_CASES, ids=[c.id for c in GATE_CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_triton_gates_match_reference(case, dtype):
    assert_all_ok(check_gate(case, dtype, backend="triton", device=DEVICE), case.id)


@pytest.mark.parametrize("case", TWO_PASS_CASES, ids=[c.id for c in TWO_PASS_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_triton_gates_two_pass(case, dtype, monkeypatch):
    """The long-N path (scores / stats, then apply), forced by treating every item as too large."""
    from fastattn.triton_kernels import configs
    monkeypatch.setattr(configs, "FUSED_MAX_ELEMS", 0)
    assert_all_ok(check_gate(case, dtype, backend="triton", device=DEVICE), case.id)


@pytest.mark.parametrize("case", POOL_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_triton_pool_matches_reference(case, dtype):
    assert_all_ok(check_pool(case, dtype, backend="triton", device=DEVICE), case.id)


def test_triton_pool_saturated_softmax_gradient():
    """A fuzz case whose softmax one row holds (scores 8x the unit scale, float32): its dV missed the rule by 4.5x
    while the backward took x · dy and y · dy apart, in float32, and subtracted them."""
    case = fuzz.pool_case(2, DTYPES, max_len=64, max_dim=128)
    assert "fp32" in case.id and "logits8.0" in case.id, case.id
    assert_all_ok(fuzz.check_pool(case, "triton", DEVICE), case.id)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_triton_pool_nan_weight_reaches_no_left_out_row(dtype):
    bc.pool_nan_weight_reaches_no_left_out_row("triton", DEVICE, dtype)


def _forced_pool_splits(monkeypatch, tiles):
    """Every attention_pool forward splits its bags every ``tiles`` row tiles, whatever the shapes; the splits'
    workspace starts as NaN (an entry the merge reads that no split wrote shows in y). Returns the sizes seen."""
    from fastattn.triton_kernels import attention_pool
    seen = []

    def rows(N, block_n):
        seen.append(tiles * block_n)
        return tiles * block_n

    monkeypatch.setattr(attention_pool, "split_rows", rows)
    monkeypatch.setattr(attention_pool, "workspace",
                        lambda shape, device: torch.full(shape, float("nan"), dtype=torch.float32, device=device))
    return seen


# bags longer than one split, the last split of a bag shorter, empty bags, splits whose rows are all left out
POOL_SPLIT_CASES = [PoolCase(bags=(70, 0, 33, 16, 1), K=2, mask="random"),
                    PoolCase(bags=(3, 90), mask="bag", weights_grad=True),
                    PoolCase(bags=(50, 31), K=2, logits=8.0)]


@pytest.mark.parametrize("tiles", [1, 2])
@pytest.mark.parametrize("case", POOL_SPLIT_CASES, ids=[c.id for c in POOL_SPLIT_CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_triton_pool_several_splits_merge_exactly(case, dtype, tiles, monkeypatch):
    """A bag split over several forward programs, merged by their (max, sum): y, α and every gradient as the
    reference's."""
    seen = _forced_pool_splits(monkeypatch, tiles)
    assert_all_ok(check_pool(case, dtype, backend="triton", device=DEVICE), case.id)
    assert seen and all(max(case.bags) > rows for rows in seen), (seen, case.bags)   # two splits or more


def test_opcheck_attention_pool():
    r = lambda *s, seed: bc.rand(*s, seed=seed, device=DEVICE)
    N, D, Hd, K = 37, 24, 16, 2
    x, V, U, w, bV, bU = r(N, D, seed=1), r(D, Hd, seed=2), r(D, Hd, seed=3), r(Hd, K, seed=4), r(Hd, seed=5), \
        r(Hd, seed=6)
    offsets = torch.tensor([0, 5, 5, 28, 37], device=DEVICE)
    mask = torch.rand(N, generator=torch.Generator().manual_seed(7)).to(DEVICE) < 0.8
    op = torch.ops.fastattn.triton_attention_pool_fwd.default
    for args in [(x, offsets, mask, V, U, w, bV, bU, True), (x, offsets, None, V, None, w, None, None, False)]:
        args = tuple(t.requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in args)
        torch.library.opcheck(op, args)


# Float masks broadcast along some dims (each of B, Hq, Lq, Lk kept or 1), with their gradient: the kernels
# broadcast them and return dL/dmask in the mask's own shape (dS summed over the broadcast dims in float32).
# Lq = 37 > BLOCK_M and Lk = 21 > BLOCK_N under the interpreter: several query and key tiles per mask row/column.
BCAST_MASKS = [
    # (mask shape, Hq, Hkv, causal, lse_grad)
    ((1, 1, 37, 21), 4, 2, False, False),            # one bias shared by every batch item and head (GQA)
    ((2, 1, 1, 21), 4, 2, True, False),              # per-key bias (padding-like), causal: skipped tiles give 0
    ((1, 4, 37, 1), 4, 1, "bottom_right", True),     # per-(head, query) bias: row sums of dS (= dlse), MQA
    ((2, 4, 37, 21), 4, 2, "bottom_right", False),   # full shape: dS itself
    ((1, 1, 1, 1), 2, 2, True, True),                # a scalar bias: everything summed
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("shape,Hq,Hkv,causal,lse_grad", BCAST_MASKS, ids=lambda v: "x".join(map(str, v))
                         if isinstance(v, tuple) else None)
def test_broadcast_float_mask_gradient_matches_reference(shape, Hq, Hkv, causal, lse_grad, dtype):
    case = fuzz.make_attention_case(11, dtype, B=2, Hq=Hq, Hkv=Hkv, Lq=37, Lk=21, D=16, Dv=8, causal=causal,
                                    mask="float_grad", mask_shape=shape, gate="headwise", lse_grad=lse_grad)
    assert_all_ok(fuzz.check_attention(case, "triton", DEVICE), case.id)


class _StorageSizes(TorchDispatchMode):
    """Records the largest storage (in bytes) that any aten op returns. The launch of a wrapped Triton
    kernel (a higher-order op on a GPU) passes through and runs."""
    supports_higher_order_operators = True

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("keys_major", [False, True], ids=["contiguous", "keys-major"])
@pytest.mark.parametrize("shape", [(1, 1, 19, 37), (2, 1, 1, 37), (1, 4, 19, 1), (1, 1, 1, 1)],
                         ids=lambda s: "x".join(map(str, s)))
def test_broadcast_mask_gradient_has_the_mask_shape_and_is_never_materialised(shape, keys_major):
    """The op returns dmask in the mask's shape and dtype, deterministically, and no tensor of the scores'
    size (B, Hq, Lq, Lk) is allocated on the way, not even in 16 bits (Lk >> D, Dv: the scores are the largest
    thing by far). keys_major: the mask is a transposed view (stride(-1) != 1 where Lq' > 1)."""
    from fastattn.triton_kernels import attention as attn
    B, Hq, Hkv, Lq, Lk, D, Dv = 2, 4, 2, 19, 37, 8, 8
    q, k, v = (bc.rand(*s, seed=i, device=DEVICE) for i, s in
               enumerate([(B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, Dv)]))
    mask = bc.rand(*shape, seed=4, device=DEVICE)
    if keys_major:
        mask = mask.transpose(-1, -2).contiguous().transpose(-1, -2)
    ops = torch.ops.fastattn
    out, lse, out_acc = ops.triton_attention_fwd(q, k, v, mask, None, 0.25, 1)
    assert out_acc.numel() == 0  # float32 inputs: out is out_acc already
    args = (torch.randn_like(out), q, k, v, out, lse, mask, None, torch.randn_like(lse), 0.25, 1, True)
    dmask = ops.triton_attention_bwd(*args)[3]
    assert dmask.shape == mask.shape and dmask.dtype == mask.dtype
    assert torch.equal(ops.triton_attention_bwd(*args)[3], dmask), "dmask differs between two runs"
    # the same gradient, summed by torch from the full dS that the reference materialises (the op's lse is in
    # log2 units, lse * LOG2E: its gradient dlse is dlse * LOG2E for the reference's natural-log lse)
    qr, kr, vr, mr = (t.detach().double().requires_grad_() for t in (q, k, v, mask))
    o_ref, lse_ref = fastattn.reference.attention(qr, kr, vr, attn_mask=mr, causal=True, scale=0.25, return_lse=True)
    torch.autograd.backward([o_ref, lse_ref], [args[0].double(), args[8].double() / math.log(2)])
    torch.testing.assert_close(dmask.double(), mr.grad, atol=1e-5, rtol=1e-5)
    with _StorageSizes() as sizes:
        attn.attention_bwd(*args)
    assert sizes.largest < 2 * B * Hq * Lq * Lk, f"a storage of {sizes.largest} bytes: the scores' size"


def test_repeated_keys_keep_dq_zero_in_bf16():
    """Every key the same (k expanded along Lk): the exact dq is 0, which needs rowsum(dS) = 0, i.e. delta =
    rowsum(dO * O) equal to rowsum(P * dP) for the P and dO the backward uses: O unrounded (out_acc), dO as
    the dots read it (gated, rounded), and the forward's P V with P to ~16 bits (configs.PRECISE_PV). The
    rounded bf16 output leaves dq several times the allowed error from 0."""
    views = {n: "expand" for n in ("q", "k", "v", "mask", "gate")}
    case = fuzz.make_attention_case(1, torch.bfloat16, B=2, Hq=4, Hkv=2, Lq=9, Lk=13, D=16, Dv=8, mask="float_grad",
                                    mask_shape=(1, 4, 9, 13), gate="elementwise", views=views)
    assert_all_ok(fuzz.check_attention(case, "triton", DEVICE), case.id)


@pytest.mark.skipif(INTERPRET, reason="the interpreter has one config per kernel; the GPU's lists are longer")
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("inference", [False, True], ids=["train", "inference"])
def test_every_kept_config_matches_reference(monkeypatch, D, gated, inference):
    """Autotuning may run any config the prune keeps, and the tests otherwise run the first alone: each in turn,
    forced on every autotuned attention kernel at once (the i-th kept, or the last), on a ragged causal GQA case."""
    from triton.runtime.autotuner import Autotuner
    from fastattn.triton_kernels import attention as A, configs as C
    real, state = C._select, {"i": 0, "n": 1}

    def ith(*args, **kwargs):
        keep = real(*args, **kwargs)
        state["n"] = max(state["n"], len(keep))
        return [keep[min(state["i"], len(keep) - 1)]]

    monkeypatch.setattr(C, "autotune_enabled", lambda: True)
    monkeypatch.setattr(C, "_select", ith)
    tuned = [k for k in vars(A).values() if isinstance(k, Autotuner)]
    case = fuzz.make_attention_case(D, torch.bfloat16, B=2, Hq=4, Hkv=2, Lq=300, Lk=300, D=D, causal=True,
                                    gate="elementwise" if gated else "none")
    case = fuzz.forward_only(case) if inference else case
    while state["i"] < state["n"]:
        for k in tuned:
            k.cache.clear()
        assert_all_ok(fuzz.check_attention(case, "triton", DEVICE), f"{case.id} config {state['i']}")
        state["i"] += 1


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_out_acc_is_the_unrounded_gated_output(dtype):
    """attention_fwd's third output: out before rounding (float32) for half inputs, empty for float32."""
    B, Hq, Hkv, Lq, Lk, D, Dv = 2, 4, 2, 9, 13, 16, 8
    q, k, v = (bc.rand(*s, seed=i, device=DEVICE, dtype=dtype) for i, s in
               enumerate([(B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, Dv)]))
    gate = bc.rand(B, Hq, Lq, Dv, seed=5, device=DEVICE, dtype=dtype)
    out, lse, out_acc = torch.ops.fastattn.triton_attention_fwd(q, k, v, None, gate, 0.25, 2)
    if dtype == torch.float32:
        assert out_acc.shape == (0,)
        return
    assert out_acc.shape == out.shape and out_acc.dtype == torch.float32
    assert torch.equal(out_acc.to(dtype), out)
    ref = fastattn.reference.attention(*(t.double() for t in (q, k, v)), causal="bottom_right", scale=0.25,
                                       gate=gate.double())
    assert (out_acc.double() - ref).abs().max() < (out.double() - ref).abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("layout", ["elementwise", "headwise-expand", "packed", "packed-headwise"])
def test_gate_after_the_forward_is_the_fused_gate(monkeypatch, layout, dtype):
    """A forward that keeps out_acc may run ungated and gate its rows after (configs.gate_after_forward): out,
    lse and out_acc are those of the fused gate bit for bit (a NaN gate logit included), and the gradients
    match the reference."""
    from fastattn.triton_kernels import configs as C
    Hq, Hkv, D, Dv = 4, 2, 24, 40
    cu = torch.tensor([0, 7, 7, 26], dtype=torch.int32, device=DEVICE)
    packed = layout.startswith("packed")
    rows = (26,) if packed else (2, Hq, 19)
    q, k, v = (bc.rand(*s, seed=i, device=DEVICE, dtype=dtype) for i, s in
               enumerate([rows + (Hq, D) if packed else rows + (D,),
                          (26, Hkv, D) if packed else (2, Hkv, 23, D),
                          (26, Hkv, Dv) if packed else (2, Hkv, 23, Dv)]))
    if layout == "headwise-expand":   # stride 0 over heads and one logit a row
        gate = bc.rand(2, 1, 19, 1, seed=7, device=DEVICE, dtype=dtype).expand(2, Hq, 19, 1)
    elif layout == "packed-headwise":
        gate = bc.rand(26, Hq, 1, seed=7, device=DEVICE, dtype=dtype)
    else:
        gate = bc.rand(*(q.shape[:-1] + (Dv,)), seed=7, device=DEVICE, dtype=dtype)
    if layout == "elementwise":
        gate[0, 1, 3, 5] = float("nan")
    run = (lambda: torch.ops.fastattn.triton_varlen_attention_fwd(q, k, v, cu, cu, 19, 19, gate, 0.3, 2)) if packed \
        else (lambda: torch.ops.fastattn.triton_attention_fwd(q, k, v, None, gate, 0.3, 2))
    calls = []
    monkeypatch.setattr(C, "gate_after_forward", lambda *a: calls.append(a) or False)
    fused = run()
    monkeypatch.setattr(C, "gate_after_forward", lambda *a: calls.append(a) or True)
    after = run()
    assert len(calls) == 2
    for a, b, name in zip(fused, after, ("out", "lse", "out_acc")):
        torch.testing.assert_close(b, a, rtol=0, atol=0, equal_nan=True, msg=name)
    if not packed:
        case = fuzz.make_attention_case(3, dtype, B=2, Hq=Hq, Hkv=Hkv, Lq=19, Lk=23, D=D, Dv=Dv, causal=True,
                                        gate="elementwise" if layout == "elementwise" else "headwise")
        assert_all_ok(fuzz.check_attention(case, "triton", DEVICE), case.id)


def _record_grids(monkeypatch):
    """Interpreted launches record (kernel, grid) instead of running: the grids of problems too large to
    interpret."""
    from triton.runtime import interpreter
    grids = []

    def record(self, *args, **kwargs):
        spec = inspect.getfullargspec(self.fn)
        kwargs = {k: v for k, v in kwargs.items() if k in spec.args or k in spec.kwonlyargs}
        grid = self.grid(inspect.getcallargs(self.fn, *args, **kwargs)) if callable(self.grid) else self.grid
        grids.append((self.fn.__name__, tuple(grid)))

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", record)
    return grids


def _triton_against_reference(op, *inputs, label):
    """``op(*inputs, backend=...)`` and the gradients of its inputs that require one, on triton; on a GPU
    compared by docs/CONTRACT.md §4 with the reference in the inputs' dtype and in float64 (under the
    interpreter the launches are only recorded)."""
    def run(backend, cast):
        ins = [cast(t.detach()).requires_grad_(t.requires_grad) for t in inputs]
        out = op(*ins, backend=backend)
        return [out, *torch.autograd.grad(out, [t for t in ins if t.requires_grad], torch.ones_like(out))]
    got = run("triton", lambda t: t)
    if not INTERPRET:
        lowp, truth = run("reference", lambda t: t), run("reference", lambda t: t.double())
        dtype = inputs[0].dtype
        assert_all_ok([compare(f"#{i}", g, lp, tr, dtype, 2 if i == 0 else 3)
                       for i, (g, lp, tr) in enumerate(zip(got, lowp, truth))], label)


def test_more_than_65535_heads_or_gate_row_tiles(monkeypatch):
    """B * H past 65535 (many short sequences: batch 4096 x 16 heads) and a gate over millions of positions
    launch within CUDA's grid bounds. On a GPU they run and match the reference; under the interpreter the
    launches are recorded, not run, and their grids checked."""
    grids = _record_grids(monkeypatch) if INTERPRET else None
    dt = torch.float16
    q, k, v = (torch.randn(2, 32769, 3, 16, device=DEVICE, dtype=dt, requires_grad=True) for _ in range(3))
    mask = torch.randn(2, 32769, 3, 3, device=DEVICE, dtype=dt, requires_grad=True)
    gate = torch.randn(2, 32769, 3, 16, device=DEVICE, dtype=dt, requires_grad=True)
    N = 65536 * 64 + 1   # past 65535 tiles of the largest row tile of the gate kernels
    x = torch.randn(1, N, 2, device=DEVICE, dtype=dt, requires_grad=True)
    w = torch.randn(1, 2, device=DEVICE, dtype=dt, requires_grad=True)
    for causal in (False, True):
        _triton_against_reference(lambda *t, backend: fastattn.attention(
            *t[:3], attn_mask=t[3], gate=t[4], causal=causal, backend=backend), q, k, v, mask, gate,
            label=f"attention causal={causal}")
    _triton_against_reference(lambda q, k, v, m, backend: fastattn.attention(q, k, v, attn_mask=m, backend=backend),
                              q, k.detach(), v.detach(), mask[:, :, :1], label="broadcast mask")  # the dmask kernel
    for pool in (False, True):
        _triton_against_reference(lambda x, w, backend: fastattn.score_softmax_gate(x, w, pool=pool, backend=backend),
                                  x, w, label=f"score_softmax_gate pool={pool}")
        _triton_against_reference(lambda s, x, backend: fastattn.softmax_gate(s, x, pool=pool, backend=backend),
                                  x[..., :1].detach(), x, label=f"softmax_gate pool={pool}")
    if INTERPRET:
        kernels = {name for name, _ in grids}
        assert {"_attn_fwd", "_attn_bwd_prep", "_attn_bwd_dkdv", "_attn_bwd_dq", "_attn_bwd_dmask", "_gate_scores",
                "_gate_apply", "_gate_bwd_rows"} <= kernels, kernels
        past = [(name, g) for name, g in grids if not _within_bounds(g)]
        assert not past, f"launch grids past CUDA's bounds {GRID_BOUNDS}: {past}"


def test_repeated_keys_keep_dq_exact():
    """dS in two parts for dQ where q's gradient sums rows (expand, unfold): the fuzz cases that missed the rule
    with dS rounded to half precision."""
    bc.repeated_keys_keep_dq_exact("triton", DEVICE)


def test_repeats_elements_finds_the_views_whose_gradient_autograd_sums():
    from fastattn.triton_kernels.common import repeats_elements
    base = torch.randn(2, 3, 8, 16)
    assert not repeats_elements(base) and not repeats_elements(base.transpose(1, 2))
    assert not repeats_elements(base[:, :1]) and not repeats_elements(base[:, :, ::2])
    assert repeats_elements(base[:, :, :1].expand(2, 3, 8, 16)) and repeats_elements(base[:1].expand(4, 3, 8, 16))
    assert repeats_elements(torch.randn(2, 3, 40).unfold(-1, 16, 4))       # rows 4 apart, 16 long
    assert not repeats_elements(torch.randn(2, 3, 128).unfold(-1, 16, 16))  # rows that just touch


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_score_softmax_gate_saturated(dtype):
    bc.saturated_score_gates_meet_the_rule("triton", dtype, DEVICE)


def test_fully_masked_rows_are_zero_without_nan():
    bc.fully_masked_rows_are_zero_without_nan("triton", DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("kind", fuzz.VIEW_KINDS)
def test_every_view_matches_reference(kind, dtype):
    bc.views_match_reference("triton", kind, dtype, DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("target", ["q", "k", "v", "mask", "gate", "x", "scores", "weight"])
def test_nan_reaches_rows_as_in_torch(target, dtype):
    bc.nan_reaches_rows_as_in_torch("triton", target, dtype, DEVICE)


def test_transposed_inputs_are_not_copied(monkeypatch):
    bc.transposed_inputs_are_not_copied(monkeypatch, "triton", "triton_attention_fwd", DEVICE)


def test_backend_reports():
    from fastattn.backends import Problem, select
    info = fastattn.backends()["triton"]
    assert info["available"] and "cuda" in info["devices"]
    with pytest.raises(RuntimeError, match="float64"):
        select("triton", Problem("attention", DEVICE, torch.float64, D=64, Dv=64))
    with pytest.raises(RuntimeError, match="head dims up to 256"):
        select("triton", Problem("attention", DEVICE, torch.float32, D=257, Dv=257))
    assert select("auto", Problem("attention", "cpu", torch.float32, D=64, Dv=64)).name != "triton"


# ------------------------------------------------------------------------------------ registration
@pytest.mark.parametrize("sample", range(4))
def test_opcheck_attention(sample):
    bc.opcheck_attention("triton_", sample, DEVICE)


def test_opcheck_varlen_and_kvcache():
    """The varlen ops' fakes (out (total_q, Hq, Dv), lse (Hq, total_q)) and autograd, GQA, an empty sequence; the
    kv-cache op, contiguous and paged."""
    bc.opcheck_varlen_and_kvcache("triton_", DEVICE)


@pytest.mark.parametrize("pool", [False, True])
def test_opcheck_softmax_gates(pool):
    bc.opcheck_softmax_gates("triton_", pool, DEVICE)


def test_triton_backend_declares_its_kernels():
    bc.declared_kernels_are_registered("triton")


def test_torch_compile_fullgraph():
    bc.torch_compile_fullgraph("triton", DEVICE)


def test_check_cli_runs_triton_where_it_can_without_a_device(capsys):
    """`fastattn check --backend triton` without --device: on the GPU, or on CPU tensors in the interpreter."""
    from fastattn.__main__ import main
    assert main(["check", "--quick", "--backend", "triton", "--op", "softmax_gate", "--dtype", "fp32"]) == 0
    assert f"cases on {DEVICE}" in capsys.readouterr().out


def test_check_cli_covers_the_dtypes_triton_supports(capsys):
    """`fastattn check --backend triton` checks fp32/bf16/fp16 and does not count float64 (refused by design)."""
    from fastattn.__main__ import main
    assert main(["check", "--quick", "--backend", "triton", "--op", "softmax_gate", "--device", DEVICE]) == 0
    out = capsys.readouterr().out
    assert "fp32" in out and "bf16" in out and "fp64" not in out



@pytest.mark.skipif(INTERPRET, reason="the interpreter runs the programs one after another: only a GPU reorders them")
def test_backward_is_bitwise_repeatable():
    """No atomics in these kernels: 50 backwards, the same bits."""
    bc.backward_is_bitwise_repeatable("triton", torch.bfloat16, DEVICE)


def test_extreme_dropout_keeps_dv_finite():
    bc.extreme_dropout_keeps_dv_finite("triton", DEVICE)


def test_dropout_is_reproducible_and_fresh_each_call():
    bc.dropout_is_reproducible_and_fresh_each_call("triton", DEVICE)
