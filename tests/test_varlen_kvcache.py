"""varlen_attention (packed sequences) and attention_with_kvcache (decoding over a contiguous or paged cache): the
reference against torch's SDPA, the named errors of bad input, and the CPU kernels against the reference
(docs/CONTRACT.md §4). The Triton and emulated CUDA kernels run the same sweeps in test_triton.py and
test_cuda_emu.py."""
import itertools
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn import reference
from fastattn.testing import (KvcacheCase, VarlenCase, check_kvcache, check_varlen, kvcache_cases,
                              varlen_cases)
from conftest import DTYPES, assert_all_ok, dtype_id

VARLEN = varlen_cases()
KVCACHE = kvcache_cases()


def rand(*shape, seed, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def cu(lens):
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)


# ------------------------------------------------------------------------------------ the reference
@pytest.mark.parametrize("causal", [False, True, "bottom_right"])
def test_reference_varlen_is_attention_per_sequence(causal):
    lens_q, lens_k = (3, 8, 1), (5, 8, 6)
    q, k, v = rand(12, 4, 8, seed=1), rand(19, 2, 8, seed=2), rand(19, 2, 5, seed=3)
    out, lse = reference.varlen_attention(q, k, v, cu(lens_q), cu(lens_k), causal=causal, return_lse=True)
    assert out.shape == (12, 4, 5) and lse.shape == (4, 12)
    for b in range(3):
        qs = slice(sum(lens_q[:b]), sum(lens_q[:b + 1]))
        ks = slice(sum(lens_k[:b]), sum(lens_k[:b + 1]))
        Lq, Lk = lens_q[b], lens_k[b]
        allowed = None
        if causal:
            off = Lk - Lq if causal == "bottom_right" else 0
            allowed = torch.ones(Lq, Lk, dtype=torch.bool).tril(off)
        expect = F.scaled_dot_product_attention(q[qs].transpose(0, 1), k[ks].transpose(0, 1), v[ks].transpose(0, 1),
                                                attn_mask=allowed, enable_gqa=True)
        torch.testing.assert_close(out[qs], expect.transpose(0, 1).nan_to_num(0.0))


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_reference_kvcache_appends_and_attends_over_each_prefix(paged):
    B, Hq, Hkv, D, P = 2, 4, 2, 8, 4
    held, Lnew = [5, 9], 2
    full_k, full_v = rand(B, Hkv, 16, D, seed=1), rand(B, Hkv, 16, D, seed=2)
    q = rand(B, Hq, Lnew, D, seed=3)
    if paged:  # pages 0..7 shuffled over the two sequences, plus two never used
        table = torch.tensor([[5, 0, 7, 2], [1, 6, 3, 4]], dtype=torch.int32)
        k_cache, v_cache = torch.full((10, Hkv, P, D), float("nan"), dtype=torch.float64), None
        v_cache = k_cache.clone()
        for b, j in itertools.product(range(B), range(max(held))):
            if j < held[b]:
                k_cache[table[b, j // P], :, j % P] = full_k[b, :, j]
                v_cache[table[b, j // P], :, j % P] = full_v[b, :, j]
    else:
        table = None
        k_cache, v_cache = full_k.clone(), full_v.clone()
    new = slice(None), slice(None), slice(16 - Lnew, 16)
    seqlens = torch.tensor(held, dtype=torch.int32)
    out = fastattn.attention_with_kvcache(q, k_cache, v_cache, k=full_k[new], v=full_v[new], cache_seqlens=seqlens,
                                          page_table=table, causal=True, backend="reference")
    for b in range(B):
        keys = torch.cat([full_k[b, :, :held[b]], full_k[b, :, 16 - Lnew:]], dim=1)
        vals = torch.cat([full_v[b, :, :held[b]], full_v[b, :, 16 - Lnew:]], dim=1)
        n = held[b] + Lnew
        allowed = torch.ones(Lnew, n, dtype=torch.bool).tril(n - Lnew)
        expect = F.scaled_dot_product_attention(q[b], keys.repeat_interleave(2, 0), vals.repeat_interleave(2, 0),
                                                attn_mask=allowed)
        torch.testing.assert_close(out[b], expect)
        if not paged:  # the new keys landed right after the held ones
            torch.testing.assert_close(k_cache[b, :, held[b]:held[b] + Lnew], full_k[b, :, 16 - Lnew:])


# ------------------------------------------------------------------------------------------- errors
def varlen_args():
    q, k, v = rand(10, 2, 8, seed=1), rand(12, 1, 8, seed=2), rand(12, 1, 8, seed=3)
    return dict(q=q, k=k, v=v, cu_seqlens_q=cu((4, 6)), cu_seqlens_k=cu((5, 7)), max_seqlen_q=6, max_seqlen_k=7)


@pytest.mark.parametrize("change,error,match", [
    (dict(cu_seqlens_q=cu((4, 6)).long()), TypeError, "cu_seqlens_q: expected dtype torch.int32"),
    (dict(cu_seqlens_q=torch.tensor([0, 6, 4, 10], dtype=torch.int32)), ValueError, "cu_seqlens_q: expected non-decreasing"),
    (dict(cu_seqlens_k=cu((5, 6))), ValueError, "cu_seqlens_k: expected non-decreasing offsets from 0 to the packed length 12"),
    (dict(cu_seqlens_k=cu((5, 6, 1))), ValueError, "cu_seqlens_k: expected 3 offsets"),
    (dict(max_seqlen_q=5), ValueError, "max_seqlen_q: 5 is shorter than the longest sequence"),
    (dict(max_seqlen_k=-1), ValueError, "max_seqlen_k: expected an int >= 0"),
    (dict(q=rand(10, 3, 8, seed=1), k=rand(12, 2, 8, seed=2), v=rand(12, 2, 8, seed=3)), ValueError,
     "k: number of kv heads"),
    (dict(k=rand(12, 1, 4, seed=1)), ValueError, "k: head dim"),
    (dict(v=rand(11, 1, 8, seed=1)), ValueError, "v: expected total_k = 12"),
    (dict(q=rand(1, 10, 2, 8, seed=1)), ValueError, "q: expected a 3-D tensor"),
])
def test_varlen_errors_name_the_argument(change, error, match):
    args = varlen_args()
    args.update(change)
    with pytest.raises(error, match=match):
        fastattn.varlen_attention(**args)


def kvcache_args(paged=False):
    q = rand(2, 4, 1, 8, seed=1)
    if paged:
        cache = rand(5, 2, 4, 8, seed=2)
        return dict(q=q, k_cache=cache, v_cache=cache.clone(), cache_seqlens=torch.tensor([3, 7], dtype=torch.int32),
                    page_table=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32))
    cache = rand(2, 2, 8, 8, seed=2)
    return dict(q=q, k_cache=cache, v_cache=cache.clone(), cache_seqlens=torch.tensor([3, 7], dtype=torch.int32))


@pytest.mark.parametrize("paged,change,error,match", [
    (False, dict(cache_seqlens=torch.tensor([3, 9], dtype=torch.int32)), ValueError, r"cache_seqlens: lengths .* \[0, 8\]"),
    (False, dict(cache_seqlens=torch.tensor([3, 7])), TypeError, "cache_seqlens: expected dtype torch.int32"),
    (False, dict(cache_seqlens=torch.tensor([-1, 7], dtype=torch.int32)), ValueError, "cache_seqlens: lengths"),
    (False, dict(k=rand(2, 2, 2, 8, seed=3), v=rand(2, 2, 2, 8, seed=4)), ValueError, r"cache_seqlens: lengths \(with the 2 new keys\)"),
    (False, dict(k=rand(2, 2, 1, 8, seed=3)), ValueError, "k, v: pass both"),
    (False, dict(k=rand(2, 2, 1, 4, seed=3), v=rand(2, 2, 1, 8, seed=4)), ValueError, "k: expected shape"),
    (False, dict(causal="top_left"), ValueError, "causal: over a kv cache"),
    (False, dict(q=rand(3, 4, 1, 8, seed=1)), ValueError, "k_cache: expected batch B=3"),
    (True, dict(page_table=torch.tensor([[0, 1], [2, 5]], dtype=torch.int32)), ValueError, r"page_table: page ids must lie in \[0, 5\)"),
    (True, dict(page_table=torch.tensor([[0, 1]], dtype=torch.int32)), ValueError, "page_table: expected B=2 rows"),
    (True, dict(cache_seqlens=torch.tensor([3, 9], dtype=torch.int32)), ValueError, r"cache_seqlens: lengths .* \[0, 8\]"),
])
def test_kvcache_errors_name_the_argument(paged, change, error, match):
    args = kvcache_args(paged)
    args.update(change)
    with pytest.raises(error, match=match):
        fastattn.attention_with_kvcache(**args)


def test_kvcache_unused_page_ids_are_not_checked():
    # sequence 0 holds 3 keys: its second page is never read, and may hold anything (vLLM pads with -1)
    args = kvcache_args(paged=True)
    args["page_table"] = torch.tensor([[0, -1], [2, 3]], dtype=torch.int32)
    fastattn.attention_with_kvcache(**args, backend="reference")


def test_kvcache_is_forward_only():
    args = kvcache_args()
    args["q"].requires_grad_()
    with pytest.raises(RuntimeError, match="forward-only"):
        fastattn.attention_with_kvcache(**args)


# ---------------------------------------------------------------------------------------- the CPU kernels
@pytest.mark.parametrize("case", VARLEN, ids=[c.id for c in VARLEN])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_cpu_varlen_matches_reference(case, dtype):
    assert_all_ok(check_varlen(case, dtype, backend="cpu"), case.id)


# Sequences over several of the CPU kernels' tiles (forward: 256 queries x 512 keys, backward: 128 x 128), starting
# at offsets that are no multiple of a tile, one longer than its keys under bottom_right (rows with no key).
CPU_TILES = [VarlenCase(lens_q=(5, 300, 270), lens_k=(700, 530, 20), causal="bottom_right", Hq=2, Hkv=1, D=16,
                        gate="elementwise", lse_grad=True),
             VarlenCase(lens_q=(520, 3), lens_k=(600, 1030), causal=True, D=16, gate="headwise")]


@pytest.mark.parametrize("case", CPU_TILES, ids=[c.id for c in CPU_TILES])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=dtype_id)
def test_cpu_varlen_spans_tiles(case, dtype):
    assert_all_ok(check_varlen(case, dtype, backend="cpu"), case.id)


@pytest.mark.parametrize("causal,gate", [(False, "headwise"), (True, "elementwise"), ("bottom_right", "elementwise"),
                                         ("bottom_right", "headwise")])
def test_cpu_varlen_gradcheck(causal, gate):
    # every input's gradient, through out and lse, against finite differences of the kernels' own forward;
    # GQA, q strided, an empty query sequence (its keys get no gradient), Lq != Lk per sequence
    lens_q, lens_k = (3, 0, 5, 1), (4, 2, 6, 3)
    q = rand(9, 4, 8, seed=1)[..., :4].requires_grad_()
    k, v = rand(15, 2, 4, seed=2).requires_grad_(), rand(15, 2, 3, seed=3).requires_grad_()
    g = rand(9, 4, 3 if gate == "elementwise" else 1, seed=4).requires_grad_()

    def f(q, k, v, g):
        return fastattn.varlen_attention(q, k, v, cu(lens_q), cu(lens_k), 5, 6, causal=causal, gate=g,
                                         return_lse=True, backend="cpu")
    assert torch.autograd.gradcheck(f, (q, k, v, g))


def test_cpu_varlen_ops_take_empty_sequences_and_totals():
    # the kernels themselves (fastattn.varlen_attention sends total 0 to the reference)
    fwd, bwd = torch.ops.fastattn.varlen_attention_fwd, torch.ops.fastattn.varlen_attention_bwd
    for lens_q, lens_k in [((0, 0), (3, 2)), ((2, 1), (0, 0)), ((), ()), ((0, 4), (3, 0))]:
        tq, tk = sum(lens_q), sum(lens_k)
        q, k, v = rand(tq, 2, 8, seed=1), rand(tk, 1, 8, seed=2), rand(tk, 1, 4, seed=3)
        args = (cu(lens_q), cu(lens_k), max(lens_q, default=0), max(lens_k, default=0), None, 0.5, 2)
        out, lse, _ = fwd(q, k, v, *args)
        expect = reference.varlen_attention(q, k, v, cu(lens_q), cu(lens_k), causal="bottom_right", scale=0.5)
        torch.testing.assert_close(out, expect)
        assert out.shape == (tq, 2, 4) and lse.shape == (2, tq)
        lq, lk = torch.tensor(lens_q, dtype=torch.long), torch.tensor(lens_k, dtype=torch.long)
        no_key, no_query = torch.repeat_interleave(lk == 0, lq), torch.repeat_interleave(lq == 0, lk)
        assert (lse[:, no_key] == float("-inf")).all()
        dout = rand(tq, 2, 4, seed=4)
        dq, dk, dv, dgate = bwd(dout, q, k, v, out, lse, *args[:4], None, None, 0.5, 2)
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape and dgate.numel() == 0
        assert not dq[no_key].any() and not dk[no_query].any() and not dv[no_query].any()


@pytest.mark.parametrize("case", KVCACHE, ids=[c.id for c in KVCACHE])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_cpu_kvcache_matches_reference(case, dtype):
    assert_all_ok(check_kvcache(case, dtype, backend="cpu"), case.id)


# The CPU kernel splits long caches into key chunks (merged by log-sum-exp) when sequences x kv heads leave threads
# idle, and gathers tiles for GEMMs when a task has many rows (Lq x the GQA group): a single MQA sequence long enough
# for several chunks with an uneven last one (contiguous, and paged with pages that cross the kernel's key blocks),
# speculative decoding over chunks, and a prefill chunk of 160 rows in two row blocks.
CPU_KVCACHE_SPLITS = [
    KvcacheCase(cache_seqlens=(2999,), Hq=8, Hkv=1, D=128, capacity=3072),
    KvcacheCase(cache_seqlens=(2999,), Hq=8, Hkv=1, D=128, capacity=3072, page_size=48, gate="elementwise"),
    KvcacheCase(cache_seqlens=(1700, 5), Lq=3, Lnew=3, Hq=4, Hkv=1, capacity=1760, page_size=32, causal=False),
    KvcacheCase(cache_seqlens=(1100, 0), Lq=40, Lnew=40, Hq=8, Hkv=2, D=32, capacity=1152, gate="headwise"),
]


@pytest.mark.parametrize("case", CPU_KVCACHE_SPLITS, ids=[c.id for c in CPU_KVCACHE_SPLITS])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_cpu_kvcache_splits_and_row_blocks(case, dtype):
    assert_all_ok(check_kvcache(case, dtype, backend="cpu"), case.id)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_cpu_kvcache_reads_nothing_past_a_row(dtype):
    """A cache whose rows are views into wider rows holding NaN past D (and Dv): a kernel that reads a whole vector
    at the end of a row, beyond D, makes its output NaN."""
    B, Hkv, L, D, Dv = 2, 2, 300, 40, 24
    rows = torch.full((2, B, Hkv, L, 64), float("nan"), dtype=torch.float64)
    rows[0, ..., :D], rows[1, ..., :Dv] = rand(B, Hkv, L, D, seed=1), rand(B, Hkv, L, Dv, seed=2)
    rows = rows.to(dtype)
    k, v, q = rows[0, ..., :D], rows[1, ..., :Dv], rand(B, 8, 3, D, seed=3).to(dtype)
    seqlens = torch.tensor([300, 123], dtype=torch.int32)
    out, lse = torch.ops.fastattn.attention_kvcache_fwd(q, k, v, seqlens, None, None, 0.3, 2)
    want = reference.attention_with_kvcache(q.double(), k.double(), v.double(), seqlens, causal=True, scale=0.3)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("tiles", ["narrow", "no-bf16-dot"])
def test_cpu_kvcache_other_tiles(tiles):
    """The decoding kernel's vector paths this CPU would not take (docs: decode.cpp): the tiles of 32-byte vectors
    (CPUs without AVX-512) and bfloat16 scores without AVX512-BF16, in a fresh process through the test hook
    FASTATTN_TEST_DECODE_TILES; head dims that end in part-vectors, and chunks."""
    cases = [KvcacheCase(cache_seqlens=(10, 0, 1), Lq=5, Lnew=2, causal=True, D=40, Dv=24), *CPU_KVCACHE_SPLITS[1:3]]
    code = (f"import torch\nfrom fastattn.testing import KvcacheCase, check_kvcache\n"
            f"for case in {cases!r}:\n"
            f"    for dtype in (torch.float32, torch.bfloat16, torch.float16):\n"
            f"        for c in check_kvcache(case, dtype, backend='cpu'):\n"
            f"            print(case.id, dtype, c.name, 'ok' if c.ok else f'err {{c.err:.3g}} > {{c.allowed:.3g}}')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, FASTATTN_TEST_DECODE_TILES=tiles))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == len(cases) * 3 * 4 and all(ln.endswith(" ok") for ln in lines), "\n".join(lines)


def test_auto_runs_the_new_ops_on_cpu_kernels(monkeypatch):
    calls = []
    for name in ("varlen_attention_fwd", "attention_kvcache_fwd"):
        real = getattr(torch.ops.fastattn, name)
        monkeypatch.setattr(torch.ops.fastattn, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    args = varlen_args()
    fastattn.varlen_attention(**{n: t.float() if t.is_floating_point() else t for n, t in args.items()
                                 if isinstance(t, torch.Tensor)}, max_seqlen_q=6, max_seqlen_k=7)
    args = kvcache_args()
    fastattn.attention_with_kvcache(**{n: t.float() if t.is_floating_point() else t for n, t in args.items()})
    assert calls == ["varlen_attention_fwd", "attention_kvcache_fwd"]
