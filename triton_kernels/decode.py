"""Attention over a KV cache in Triton (attention_kvcache_fwd): decoding, split over the keys (flash-decoding).

Op contract (csrc/attention_contract.h):
    q (B, Hq, Lq, D): any strides, stride(-1) == 1
    k_cache, v_cache (B, Hkv, Lcache, D / Dv), or paged (num_pages, Hkv, page_size, D / Dv) with page_table
        int32 (B, max_pages): key j of sequence b is row j % page_size of page page_table[b, j // page_size];
        any strides, stride(-1) == 1
    seqlens_k int32 (B): sequence b attends to its keys [0, seqlens_k[b])
    gate (B, Hq, Lq, Dv) or headwise (B, Hq, Lq, 1): optional, q's dtype, any strides
    causal: 0 none, 2 bottom_right (query i sees keys j <= i + seqlens_k[b] - Lq); 1 (top_left) is refused
    returns out (B, Hq, Lq, Dv) contiguous in q's dtype (gated) and lse (B, Hq, Lq) float32 in log2 units;
    a row with no key gets out 0 and lse -inf

Kernels:
    _decode_split  grid (B * Hkv * row tiles, splits)   one split of a sequence's keys against the rows of a kv
                                                        head: the GQA group's Hq / Hkv query heads x Lq queries
    _decode_merge  grid (B * Hq * Lq / BLOCK_M)         the splits' partial results, combined exactly
A decoding step has one query row per head (Lq = 1) and a long cache: one program per (sequence, head) would
leave most of a GPU idle and stream each cache alone. Instead the query heads that share a kv head form one tile
of rows (padded to 16 rows for tl.dot), so the kv head is read once for the group, and the keys are cut into
splits of ``split_keys`` keys, each its own program. A split runs the online softmax in base 2 over its keys and
writes its normalised output (fp32) and lse to a workspace; the merge combines them by their lse (a log-sum-exp:
exact up to fp32 rounding) and applies the gate. With one split the first kernel writes the output itself and the
merge does not run. A sequence's splits past its length hold no keys: they write nothing and the merge reads only
the splits that hold keys (seqlens_k tells both kernels which).

The split count comes from the launch's shapes (batch x kv heads x row tiles, against the device's SMs) and from
the cache's capacity, not from seqlens_k: reading the lengths on the host would synchronise with the device, and
CUDA-graph capture and torch.compile could not run the op. A batch of sequences much shorter than the capacity
gets fewer useful splits than it could (FlashAttention sizes its splits the same way).

Keys: tiles wholly inside a split and visible to every row run without masks; the split's last tiles (the
sequence's ragged end, the causal diagonal: keys past seqlens_k - Lq) are masked. A paged tile gathers its rows
through the page table; entries past a sequence's length are never read (they may hold anything, -1 say).
Offsets: batch, page and workspace offsets are int64; those inside one (batch, head) slice of q or of a
contiguous cache, or one page, int32.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from ._compat import wrap_triton

from fastattn import contract
from fastattn.contract import CAUSAL_BOTTOM_RIGHT, CAUSAL_NONE

from . import configs as C
from .attention import _check_tensors, _gate_strides
from .common import (align_elems, assume_aligned, assume_aligned3, cast_rne, dot_acc, dot_precision,
                     online_softmax_step)


@triton.jit
def _decode_tiles(acc, l_i, m_i, q, p_k, p_v, p_pt, offs_i, offs_d, offs_dv, lo, hi, D, Dv,
                  stride_kp, stride_kn, stride_vp, stride_vn, page_size, scale_log2, causal_off,
                  PAGED: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
                  DOT_PREC: tl.constexpr):
    """Keys [lo, hi) of one sequence against the rows' q, online softmax in log2 units. MASKED: keys past hi and
    (CAUSAL) past row i's diagonal i + causal_off are hidden; otherwise every key of [lo, hi) is visible to every
    row and hi - lo is a multiple of BLOCK_N."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        m_key = offs_n < hi
        if PAGED:  # row offsets of the keys through the page table (past hi: page 0, never loaded)
            if MASKED:
                page = tl.load(p_pt + offs_n // page_size, mask=m_key, other=0).to(tl.int64)
            else:
                page = tl.load(p_pt + offs_n // page_size).to(tl.int64)
            slot = offs_n % page_size
            row_k = page * stride_kp + slot * stride_kn
            row_v = page * stride_vp + slot * stride_vn
        else:
            row_k = offs_n * stride_kn
            row_v = offs_n * stride_vn
        if MASKED:
            kT = tl.load(p_k + row_k[None, :] + offs_d[:, None], mask=m_key[None, :] & (offs_d[:, None] < D),
                         other=0.0)                                                             # [BLOCK_D, BLOCK_N]
        else:
            kT = tl.load(p_k + row_k[None, :] + offs_d[:, None], mask=offs_d[:, None] < D, other=0.0)
        s = dot_acc(q, kT, None, DOT_PREC) * scale_log2                                        # [BLOCK_M, BLOCK_N]
        if MASKED:
            ok = m_key[None, :]
            if CAUSAL:
                ok = ok & (offs_n[None, :] <= offs_i[:, None] + causal_off)
            s = tl.where(ok, s, float("-inf"))
        # -- online softmax update
        p, corr, l_i, m_i = online_softmax_step(s, m_i, l_i)
        if MASKED:
            v = tl.load(p_v + row_v[:, None] + offs_dv[None, :], mask=m_key[:, None] & (offs_dv[None, :] < Dv),
                        other=0.0)                                                             # [BLOCK_N, BLOCK_DV]
        else:
            v = tl.load(p_v + row_v[:, None] + offs_dv[None, :], mask=offs_dv[None, :] < Dv, other=0.0)
        acc = dot_acc(cast_rne(p, v.dtype), v, acc * corr[:, None], DOT_PREC)
    return acc, l_i, m_i


@triton.autotune(configs=C.DECODE_CONFIGS, key=["LK_KEY", "BLOCK_M", "BLOCK_D", "BLOCK_DV", "CAUSAL", "PAGED",
                                                "HAS_GATE", "SPLIT"],
                 prune_configs_by={"early_config_prune": C.prune_decode})
@triton.jit
def _decode_split(Q, K, V, PT, SEQLENS, GATE, OUT, LSE, PART_O, PART_LSE,
                  stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                  stride_pt, stride_gb, stride_gh, stride_gi, stride_gc,
                  Hkv, GROUP, Lq, D, Dv, page_size, split_keys, M_TILES, R, scale_log2, LK_KEY,
                  CAUSAL: tl.constexpr, PAGED: tl.constexpr, HAS_GATE: tl.constexpr, SPLIT: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PREC: tl.constexpr,
                  ALIGN: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (bh * M_TILES + row tile, split): rows r of kv head hk of sequence b (query head hk * GROUP + r // Lq,
    query r % Lq) against keys [split * split_keys, (split + 1) * split_keys) of the sequence. stride_kb / stride_vb
    step sequences, or pages when PAGED. SPLIT: the normalised fp32 output and the lse go to PART_O (splits, R, Dv)
    and PART_LSE (splits, R), row (b * Hq + h) * Lq + i, for the merge; else the gated output to OUT, LSE."""
    scale_log2 = tl.cast(scale_log2, tl.float32)  # fp32 under torch.compile too (see attention._attn_fwd)
    D, Dv = assume_aligned(D, ALIGN), assume_aligned(Dv, ALIGN)
    stride_qb, stride_qh, stride_qm = assume_aligned3(stride_qb, stride_qh, stride_qm, ALIGN)
    stride_kb, stride_kh, stride_kn = assume_aligned3(stride_kb, stride_kh, stride_kn, ALIGN)
    stride_vb, stride_vh, stride_vn = assume_aligned3(stride_vb, stride_vh, stride_vn, ALIGN)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    bh = pid // M_TILES
    b = (bh // Hkv).to(tl.int64)
    hk = (bh % Hkv).to(tl.int64)
    Lk = tl.load(SEQLENS + b)
    lo = split * split_keys
    hi = tl.minimum(lo + split_keys, Lk)

    # -- the rows: query head g of the group, query i
    rows = GROUP * Lq
    offs_r = (pid % M_TILES) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_row = offs_r < rows
    offs_g = offs_r // Lq
    offs_i = offs_r - offs_g * Lq
    offs_h = hk * GROUP + offs_g
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_row = b * stride_qb + offs_h * stride_qh + offs_i * stride_qm
    q = tl.load(Q + q_row[:, None] + offs_d[None, :], mask=m_row[:, None] & (offs_d[None, :] < D), other=0.0)

    p_k = K + hk * stride_kh
    p_v = V + hk * stride_vh
    p_pt = PT + b * stride_pt
    if not PAGED:
        p_k += b * stride_kb
        p_v += b * stride_vb
    causal_off = Lk - Lq
    # keys [lo, full) are visible to every row: all of the split's, or (causal) those up to row 0's diagonal
    vis = hi
    if CAUSAL:
        vis = tl.minimum(hi, causal_off + 1)
    full = lo + tl.maximum(vis - lo, 0) // BLOCK_N * BLOCK_N
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    acc, l_i, m_i = _decode_tiles(acc, l_i, m_i, q, p_k, p_v, p_pt, offs_i, offs_d, offs_dv, lo, full, D, Dv,
                                  stride_kb, stride_kn, stride_vb, stride_vn, page_size, scale_log2, causal_off,
                                  PAGED, False, CAUSAL, BLOCK_N, DOT_PREC)
    acc, l_i, m_i = _decode_tiles(acc, l_i, m_i, q, p_k, p_v, p_pt, offs_i, offs_d, offs_dv, full, hi, D, Dv,
                                  stride_kb, stride_kn, stride_vb, stride_vn, page_size, scale_log2, causal_off,
                                  PAGED, True, CAUSAL, BLOCK_N, DOT_PREC)

    # -- normalise; a row with no visible key gives 0 and -inf
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    o = tl.where(empty[:, None], 0.0, acc / l_safe[:, None])
    lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(l_safe))
    row = (b * Hkv + hk) * rows + offs_r                                   # (b * Hq + h) * Lq + i
    m_o = m_row[:, None] & (offs_dv[None, :] < Dv)
    if SPLIT:
        if lo < Lk:  # a split past the sequence's end holds no key: the merge does not read it
            part = split.to(tl.int64) * R + row
            tl.store(PART_O + part[:, None] * Dv + offs_dv[None, :], o, mask=m_o)
            tl.store(PART_LSE + part, lse, mask=m_row)
    else:
        if HAS_GATE:
            g = tl.load(GATE + b * stride_gb + offs_h[:, None] * stride_gh + offs_i[:, None] * stride_gi
                        + offs_dv[None, :] * stride_gc, mask=m_o, other=0.0).to(tl.float32)
            o = o * tl.sigmoid(g)
        tl.store(OUT + row[:, None] * Dv + offs_dv[None, :], cast_rne(o, OUT.dtype.element_ty), mask=m_o)
        tl.store(LSE + row, lse, mask=m_row)


@triton.jit
def _decode_merge(PART_O, PART_LSE, SEQLENS, GATE, OUT, LSE, stride_gb, stride_gh, stride_gi, stride_gc,
                  Hq, Lq, Dv, R, split_keys, HAS_GATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Rows (b * Hq + h) * Lq + i of OUT / LSE from the splits of sequence b that hold keys (the first
    cdiv(seqlens_k[b], split_keys)): lse = log2 sum_s 2^lse_s, out = sum_s 2^(lse_s - lse) o_s, gated. Split by
    split, rescaled to the running maximum as in the forward's online softmax; a row with no key in any split
    (every lse_s -inf, or no split) gives 0 and -inf, a NaN in any split reaches the row."""
    offs_r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_row = offs_r < R
    bh = offs_r // Lq
    offs_i = offs_r - bh * Lq
    b = bh // Hq
    offs_h = bh - b * Hq
    offs_dv = tl.arange(0, BLOCK_DV)
    m_o = m_row[:, None] & (offs_dv[None, :] < Dv)
    Lk = tl.load(SEQLENS + b, mask=m_row, other=0)
    n_used = tl.cdiv(Lk, split_keys)
    row = offs_r.to(tl.int64)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for s in range(0, tl.max(n_used, 0)):
        used = m_row & (s < n_used)
        part = tl.cast(s, tl.int64) * R + row
        lse_s = tl.load(PART_LSE + part, mask=used, other=float("-inf"))
        o_s = tl.load(PART_O + part[:, None] * Dv + offs_dv[None, :], mask=used[:, None] & m_o, other=0.0)
        m_new = tl.maximum(m_i, lse_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        corr = tl.math.exp2(m_i - m_safe)
        w = tl.math.exp2(lse_s - m_safe)
        l_i = l_i * corr + w
        acc = acc * corr[:, None] + w[:, None] * o_s
        m_i = m_new
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    o = tl.where(empty[:, None], 0.0, acc / l_safe[:, None])
    lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(l_safe))
    if HAS_GATE:
        g_row = b.to(tl.int64) * stride_gb + offs_h.to(tl.int64) * stride_gh + offs_i * stride_gi
        g = tl.load(GATE + g_row[:, None] + offs_dv[None, :] * stride_gc, mask=m_o, other=0.0).to(tl.float32)
        o = o * tl.sigmoid(g)
    tl.store(OUT + row[:, None] * Dv + offs_dv[None, :], cast_rne(o, OUT.dtype.element_ty), mask=m_o)
    tl.store(LSE + row, lse, mask=m_row)


# ---------------------------------------------------------------------------------------- launchers
@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def split_keys(programs: int, capacity: int, device) -> int:
    """Keys per split for ``programs`` programs per split (batch x kv heads x row tiles) over a cache of
    ``capacity`` keys per sequence (configs.py: DECODE_PROGRAMS_PER_SM per SM, DECODE_MIN_SPLIT_KEYS at least,
    multiples of DECODE_SPLIT_GRANULE). ``capacity`` (or more) means one split."""
    if C.INTERPRET:
        sms = C.DECODE_INTERPRET_SMS
    elif device.type == "cuda" and torch.cuda.is_available():
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:
        sms = C.DECODE_SM_COUNT
    splits = min(C.DECODE_PROGRAMS_PER_SM * sms // max(programs, 1),
                 triton.cdiv(capacity, C.DECODE_MIN_SPLIT_KEYS), C.DECODE_MAX_SPLITS)
    if splits <= 1:
        return max(capacity, 1)
    return triton.cdiv(triton.cdiv(capacity, splits), C.DECODE_SPLIT_GRANULE) * C.DECODE_SPLIT_GRANULE


def workspace(shape, device):
    """The splits' partial results (float32), written only where a split holds keys (tests fill it with NaN)."""
    return torch.empty(shape, dtype=torch.float32, device=device)


def _check(q, k_cache, v_cache, seqlens_k, page_table, gate, causal):
    """Boundary checks of the op (fastattn.attention_with_kvcache checks user input and the index values; this
    guards direct op calls)."""
    if q.dim() != 4 or k_cache.dim() != 4 or v_cache.dim() != 4:
        raise ValueError("triton_attention_kvcache: q, k_cache, v_cache must be 4-D")
    B, Hq, Lq, D = q.shape
    Hkv = k_cache.shape[1]
    rows = k_cache.shape[0]
    if (k_cache.shape[1:] != (Hkv, k_cache.shape[2], D) or v_cache.shape[:3] != k_cache.shape[:3] or Hkv == 0
            or Hq % Hkv != 0 or (page_table is None and rows != B)):
        raise ValueError(f"triton_attention_kvcache: k_cache {tuple(k_cache.shape)} / v_cache {tuple(v_cache.shape)} "
                         f"do not match q {tuple(q.shape)}")
    _check_tensors("triton_attention_kvcache", q, k_cache, v_cache, names=("q", "k_cache", "v_cache"))
    if seqlens_k.dtype != torch.int32 or tuple(seqlens_k.shape) != (B,):
        raise ValueError(f"triton_attention_kvcache: seqlens_k must be int32 ({B},), got {seqlens_k.dtype} "
                         f"{tuple(seqlens_k.shape)}")
    if page_table is not None and (page_table.dtype != torch.int32 or page_table.dim() != 2
                                   or page_table.shape[0] != B):
        raise ValueError(f"triton_attention_kvcache: page_table must be int32 ({B}, max_pages), got "
                         f"{page_table.dtype} {tuple(page_table.shape)}")
    if gate is not None and tuple(gate.shape) not in ((B, Hq, Lq, v_cache.shape[3]), (B, Hq, Lq, 1)):
        raise ValueError(f"triton_attention_kvcache: gate must be {(B, Hq, Lq, v_cache.shape[3])} or headwise "
                         f"{(B, Hq, Lq, 1)}, got {tuple(gate.shape)}")
    if causal not in (CAUSAL_NONE, CAUSAL_BOTTOM_RIGHT):
        raise ValueError(f"triton_attention_kvcache: causal must be 0 (none) or 2 (bottom_right), got {causal}")


def attention_kvcache_fwd(q, k_cache, v_cache, seqlens_k, page_table, gate, scale, causal):
    _check(q, k_cache, v_cache, seqlens_k, page_table, gate, causal)
    B, Hq, Lq, D = q.shape
    Hkv, Dv = k_cache.shape[1], v_cache.shape[3]
    dev = q.device
    out = torch.empty((B, Hq, Lq, Dv), dtype=q.dtype, device=dev)
    lse = torch.empty((B, Hq, Lq), dtype=torch.float32, device=dev)
    R = B * Hq * Lq
    if R == 0:
        return out, lse
    paged = page_table is not None
    if paged:
        page_table = page_table if page_table.stride(-1) == 1 else page_table.contiguous()
        capacity = page_table.shape[1] * k_cache.shape[2]
    else:
        capacity = k_cache.shape[2]
    seqlens_k = seqlens_k.contiguous()
    group = Hq // Hkv
    bd, bdv = C.head_block(D), C.head_block(Dv)
    align = align_elems(q.dtype, (D, Dv), q, k_cache, v_cache)
    block_m = C.decode_block_m(group * Lq, C.decode_head(bd, bdv, q.element_size(), align), q.dtype == torch.float32)
    m_tiles = triton.cdiv(group * Lq, block_m)
    keys = split_keys(B * Hkv * m_tiles, capacity, dev)
    splits = max(1, triton.cdiv(capacity, keys))
    split = splits > 1
    if split:
        part_o, part_lse = workspace((splits, R, Dv), dev), workspace((splits, R), dev)
    else:
        part_o, part_lse = out, lse
    gate_t, gs = (gate, _gate_strides(gate)) if gate is not None else (q, (0, 0, 0, 0))
    pt, spt = (page_table, page_table.stride(0)) if paged else (seqlens_k, 0)

    wrap_triton(_decode_split)[(B * Hkv * m_tiles, splits)](
        q, k_cache, v_cache, pt, seqlens_k, gate_t, out, lse, part_o, part_lse,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), spt, *gs,
        Hkv, group, Lq, D, Dv, k_cache.shape[2], keys, m_tiles, R, scale * contract.LOG2E,
        C.length_key(min(keys, capacity)),
        CAUSAL=causal != CAUSAL_NONE, PAGED=paged, HAS_GATE=gate is not None, SPLIT=split,
        BLOCK_M=block_m, BLOCK_D=bd, BLOCK_DV=bdv, DOT_PREC=dot_precision(q.dtype),
        ALIGN=align)
    if split:
        merge_m = C.decode_merge_block_m(bdv)
        wrap_triton(_decode_merge)[(triton.cdiv(R, merge_m),)](
            part_o, part_lse, seqlens_k, gate_t, out, lse, *gs, Hq, Lq, Dv, R, keys,
            HAS_GATE=gate is not None, BLOCK_M=merge_m, BLOCK_DV=bdv)
    return out, lse
