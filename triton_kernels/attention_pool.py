"""attention_pool in Triton: attention pooling of packed bags (the gated ABMIL scorer, K branches), fused.

Math: fastattn/reference.py's attention_pool; op contract: csrc/cpu/attention_pool.h. Here x (N, D) is float16,
bfloat16 or float32 with stride(-1) == 1 and any row stride (0 from expand, less than D from unfold); offsets int64
(B + 1); mask bool (N) or None; V, U (D, Hd), w (Hd, K), bV, bU (Hd) in x's dtype. The forward returns y (B, K, D),
lse (B, K) (natural log) and, when asked, the scores (N, K), all float32; the backward (dx, dV, dU, dw, dbV, dbU) in
x's dtype. K (branches) is small: a constexpr padded to 16 (tl.dot's least dim).

Work units. The launch may not read offsets on the host (a device sync; torch.compile runs the launcher on fake
tensors), so the grid comes from the shapes alone: bag b is cut into splits of ``split_rows`` rows (whole tiles of
BLOCK_N) from its first row, at most cdiv(N, split_rows) + B splits in all. _plan (a few torch ops on offsets, on the
device) tells program p its bag and rows [lo, hi); programs past the last split get no rows and do nothing. So every
tile lies in one bag: the bag's dy and lse are one row each, and the products with them are tl.dots.

Forward
    _pool_fwd    grid (splits,)      per tile of the split: the scorer's GEMM x [V|U] (Hd chunks outer, D chunks
                                     inner, fp32 accumulation), tanh ⊙ sigmoid, s = h w (K columns), scores stored;
                                     then the online softmax per branch (log2 units) and the pooled sum Σ p x, kept
                                     unnormalised in the split's fp32 rows of the workspace: read, rescaled, added to
                                     and written back over D chunks (x's tile is read again, from L2; a (K, D)
                                     accumulator does not fit in registers for the D of MIL features, 512-2048).
    _pool_merge  grid (B, D chunks)  a bag's splits combined exactly by their (m, l) (decode.py's split-KV merge):
                                     y = acc / l, lse = m + log l; a bag with no kept row gives y = 0, lse = -inf.
Backward (s and α = exp(s - lse) recomputed)
    _pool_bwd_rows  grid (tiles,)           s and α; ds = α ((x - y_b) · dy_b + dlse) (+ dscores); then per Hd
                                            chunk the GEMM again, dh = ds wᵀ, d(pre) through the activations,
                                            stored in x's dtype (the gradient of a Linear output, as the CPU kernel
                                            rounds it); dw = hᵀ ds and d(bias) = Σ d(pre) as per-tile partials.
    _pool_bwd_dx    grid (tiles, D chunks)  dx = α dy_b + d(pre) [V|U]ᵀ.
    _pool_bwd_dw    grid (D x G tiles, row splits)  d[V|U] = xᵀ d(pre), per-split partials.
The weight gradients reduce over all N rows while dx reduces over Hd: a program that kept d(pre) in registers for
both would hold a (D, G) partial per program (D x 2 Hd fp32: megabytes each) or recompute the GEMM per D chunk. So
d(pre) (N, G) in x's dtype is the backward's one per-row workspace (G / D of x's bytes, freed when it returns);
the forward keeps nothing per row but the scores. Partials are summed after in a fixed order (no atomics:
deterministic). Rows the mask leaves out load as 0 (a NaN there reaches nothing) and get dx = 0.

Precision: fp32 accumulation throughout. The scorer's GEMM and the weight-gradient GEMMs take x's dtype as it is
(float32 as exact "ieee" products unless torch allows TF32: common.dot_precision); the small statistics' dots (h w,
ds wᵀ, x dyᵀ, α dy, hᵀ ds) are float32 "ieee"; the pooled sum takes p as p_hi + p_lo in half precision (~16 bits,
as attention.py's P V), not p rounded to 8 / 11 bits.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from ._compat import wrap_triton

from fastattn import contract

from .common import cast_rne, dot_acc, dot_precision, online_softmax_step
from .configs import INTERPRET, MIN_DOT_DIM

LOG2E: tl.constexpr = tl.constexpr(contract.LOG2E)
LN2: tl.constexpr = tl.constexpr(contract.LN2)

# Tiles (rows x channels x hidden units) and warps per kernel, for half precision and float32. float32 dots run on
# FMA units (each thread holds its rows and columns of both operands over the reduction): smaller tiles. Under the
# interpreter every tile is 16, so that the test shapes cross several row, channel and hidden tiles.
if INTERPRET:
    FWD_TILES = {"half": (16, 16, 16, 4, 1), "fp32": (16, 16, 16, 4, 1)}
    BWD_ROWS_TILES = FWD_TILES
    BWD_DX_TILES = {"half": (16, 16, 16, 4, 1), "fp32": (16, 16, 16, 4, 1)}
    BWD_DW_TILES = BWD_DX_TILES
    MERGE_BLOCK_D = 16
    # the interpreter stands in for a GPU of 4 programs' worth: a long bag splits, short ones take one split each
    SPLIT_PROGRAMS = 4
else:
    # (BLOCK_N, BLOCK_D, BLOCK_H, num_warps, num_stages): what compiles for sm_80 / sm_90 without spills in
    # scripts/check_triton_aot.py's pool variant (4 warps spilled 30-640 B at D 72 in the forward and the rows
    # kernel), not tuned on a GPU. The lighter pool-plain launches (--full) still spill 4-16 B in 4 compiles
    # where ptxas settles on 64-128 registers: a register budget would need the launches to take triton.Configs
    FWD_TILES = {"half": (64, 32, 64, 8, 3), "fp32": (32, 16, 32, 8, 2)}
    BWD_ROWS_TILES = {"half": (32, 32, 64, 8, 2), "fp32": (16, 16, 16, 4, 2)}
    BWD_DX_TILES = {"half": (64, 64, 64, 8, 3), "fp32": (32, 32, 32, 4, 2)}   # (rows, channels, G chunk)
    BWD_DW_TILES = {"half": (64, 64, 64, 4, 3), "fp32": (32, 32, 32, 4, 2)}   # (rows, channels, G chunk)
    MERGE_BLOCK_D = 128
    # programs over the rows: 4 per SM of an H100 / H200 (132 SMs), as the gate kernels' reductions
    SPLIT_PROGRAMS = 4 * 132


@triton.jit
def _activations(pv, pu, GATED: tl.constexpr):
    """(tanh pv, sigmoid pu or 1, h = their product), fp32. tanh as 1 - 2 / (1 + e^2x): ±1 at ±inf, NaN kept."""
    t = 1.0 - 2.0 / (1.0 + tl.math.exp2(pv * (2.0 * LOG2E)))
    if GATED:
        g = tl.sigmoid(pu)
    else:
        g = tl.full(pv.shape, 1.0, tl.float32)
    return t, g, t * g


@triton.jit
def _pre_chunk(X, WV, WU, BV, BU, x_row, keep, offs_h, D, Hd, stride_wd,
               GATED: tl.constexpr, HAS_BV: tl.constexpr, HAS_BU: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, DOT_PREC: tl.constexpr):
    """The pre-activations of hidden units offs_h for a tile's rows (x_row: their offsets in X): x V + bV and x U + bU,
    fp32, over D in BLOCK_D chunks. Rows not kept load as 0."""
    m_h = offs_h < Hd
    pv = tl.zeros([BLOCK_N, BLOCK_H], tl.float32)
    pu = tl.zeros([BLOCK_N, BLOCK_H], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        m_d = offs_d < D
        x = tl.load(X + x_row[:, None] + offs_d[None, :], mask=keep[:, None] & m_d[None, :], other=0.0)
        w_off = offs_d[:, None] * stride_wd + offs_h[None, :]
        m_w = m_d[:, None] & m_h[None, :]
        pv = dot_acc(x, tl.load(WV + w_off, mask=m_w, other=0.0), pv, DOT_PREC)
        if GATED:
            pu = dot_acc(x, tl.load(WU + w_off, mask=m_w, other=0.0), pu, DOT_PREC)
    if HAS_BV:
        pv += tl.load(BV + offs_h, mask=m_h, other=0.0).to(tl.float32)[None, :]
    if HAS_BU:
        pu += tl.load(BU + offs_h, mask=m_h, other=0.0).to(tl.float32)[None, :]
    return pv, pu


@triton.jit
def _branch_weights(WK, offs_h, offs_k, Hd, K, stride_wk):
    """w[offs_h, offs_k] (BLOCK_H, KP) in fp32, 0 past Hd and K."""
    return tl.load(WK + offs_h[:, None] * stride_wk + offs_k[None, :],
                   mask=(offs_h < Hd)[:, None] & (offs_k < K)[None, :], other=0.0).to(tl.float32)


@triton.jit
def _scores(X, WV, WU, BV, BU, WK, x_row, keep, offs_k, D, Hd, K, stride_wd, stride_wk,
            GATED: tl.constexpr, HAS_BV: tl.constexpr, HAS_BU: tl.constexpr, KP: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, DOT_PREC: tl.constexpr):
    """s = h w (BLOCK_N, KP) fp32 for a tile's rows, -inf at rows not kept."""
    s = tl.zeros([BLOCK_N, KP], tl.float32)
    for h0 in range(0, Hd, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        pv, pu = _pre_chunk(X, WV, WU, BV, BU, x_row, keep, offs_h, D, Hd, stride_wd, GATED, HAS_BV, HAS_BU,
                            BLOCK_N, BLOCK_D, BLOCK_H, DOT_PREC)
        _, _, h = _activations(pv, pu, GATED)
        s = tl.dot(h, _branch_weights(WK, offs_h, offs_k, Hd, K, stride_wk), s, input_precision="ieee")
    return tl.where(keep[:, None], s, float("-inf"))


@triton.jit
def _tile_rows(MASK, start, hi, HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr):
    """(rows, in_split, keep) of the tile at ``start``: in_split = rows < hi; keep = in_split and the mask's True."""
    rows = start + tl.arange(0, BLOCK_N)
    in_split = rows < hi
    keep = in_split
    if HAS_MASK:
        keep = keep & (tl.load(MASK + rows, mask=in_split, other=0) != 0)
    return rows, in_split, keep


@triton.jit
def _pool_fwd(X, MASK, WV, WU, BV, BU, WK, PLAN, SCORES, PART_ACC, PART_M, PART_L,
              stride_xn, stride_wd, stride_wk, D, Hd, K, P,
              HAS_MASK: tl.constexpr, GATED: tl.constexpr, HAS_BV: tl.constexpr, HAS_BU: tl.constexpr,
              KP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
              SPLIT_P: tl.constexpr, DOT_PREC: tl.constexpr):
    """Program p: the rows [lo, hi) of one split (PLAN), tile by tile. Writes the scores of its rows and the split's
    partial result: PART_ACC rows p K .. p K + K - 1 = Σ 2^(s log2e - m) x, PART_M = m (log2 units), PART_L = Σ 2^(...)."""
    pid = tl.program_id(0)
    lo = tl.load(PLAN + P + pid)
    hi = tl.load(PLAN + 2 * P + pid)
    offs_k = tl.arange(0, KP)
    m_k = offs_k < K
    part = pid.to(tl.int64) * K + offs_k                                       # the split's workspace rows
    m_i = tl.full([KP], float("-inf"), tl.float32)
    l_i = tl.zeros([KP], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        rows, in_split, keep = _tile_rows(MASK, start, hi, HAS_MASK, BLOCK_N)
        x_row = rows * stride_xn
        s = _scores(X, WV, WU, BV, BU, WK, x_row, keep, offs_k, D, Hd, K, stride_wd, stride_wk, GATED, HAS_BV,
                    HAS_BU, KP, BLOCK_N, BLOCK_D, BLOCK_H, DOT_PREC)
        tl.store(SCORES + rows[:, None] * K + offs_k[None, :], s, mask=in_split[:, None] & m_k[None, :])
        # -- online softmax per branch: branches as rows, the tile's instances as columns
        p, corr, l_i, m_i = online_softmax_step(tl.trans(s * LOG2E), m_i, l_i)          # p (KP, BLOCK_N)
        if SPLIT_P:
            p_hi = cast_rne(p, X.dtype.element_ty)
            p_lo = cast_rne(p - p_hi.to(tl.float32), X.dtype.element_ty)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            m_d = offs_d < D
            x = tl.load(X + x_row[:, None] + offs_d[None, :], mask=keep[:, None] & m_d[None, :], other=0.0)
            p_acc = PART_ACC + part[:, None] * D + offs_d[None, :]
            m_acc = m_k[:, None] & m_d[None, :]
            acc = tl.zeros([KP, BLOCK_D], tl.float32)
            if start > lo:   # the split's sum so far, rescaled to the new maximum
                acc = tl.load(p_acc, mask=m_acc, other=0.0) * corr[:, None]
            if SPLIT_P:
                acc = dot_acc(p_lo, x, dot_acc(p_hi, x, acc, DOT_PREC), DOT_PREC)
            else:
                acc = dot_acc(p, x, acc, DOT_PREC)
            tl.store(p_acc, acc, mask=m_acc)
        # the next tile reads these rows back, perhaps in other threads: the stores must be visible to the block
        tl.debug_barrier()
    tl.store(PART_M + part, m_i, mask=m_k)
    tl.store(PART_L + part, l_i, mask=m_k)


@triton.jit
def _pool_merge(PART_ACC, PART_M, PART_L, SPLIT_OFF, Y, LSE, D, K,
                KP: tl.constexpr, BLOCK_D: tl.constexpr):
    """y[b, :, chunk] and lse[b] from bag b's splits (programs SPLIT_OFF[b] .. SPLIT_OFF[b + 1] - 1 of _pool_fwd),
    rescaled to the running maximum split by split as in the online softmax. No split, or only splits without a
    kept row: y = 0, lse = -inf; a NaN in any split reaches the bag."""
    b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, KP)
    m_k = offs_k < K
    m_o = m_k[:, None] & (offs_d[None, :] < D)
    m_i = tl.full([KP], float("-inf"), tl.float32)
    l_i = tl.zeros([KP], tl.float32)
    acc = tl.zeros([KP, BLOCK_D], tl.float32)
    for sp in range(tl.load(SPLIT_OFF + b), tl.load(SPLIT_OFF + b + 1)):
        part = sp * K + offs_k
        m_s = tl.load(PART_M + part, mask=m_k, other=float("-inf"))
        l_s = tl.load(PART_L + part, mask=m_k, other=0.0)
        a_s = tl.load(PART_ACC + part[:, None] * D + offs_d[None, :], mask=m_o, other=0.0)
        m_new = tl.maximum(m_i, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        corr = tl.math.exp2(m_i - m_safe)
        w = tl.math.exp2(m_s - m_safe)
        l_i = l_i * corr + l_s * w
        acc = acc * corr[:, None] + a_s * w[:, None]
        m_i = m_new
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    y = tl.where(empty[:, None], 0.0, acc / l_safe[:, None])
    tl.store(Y + (b * K + offs_k[:, None]) * D + offs_d[None, :], y, mask=m_o)
    if tl.program_id(1) == 0:
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
        tl.store(LSE + b * K + offs_k, lse, mask=m_k)


@triton.jit
def _pool_bwd_rows(X, MASK, WV, WU, BV, BU, WK, PLAN, LSE, DLSE, Y, DY, DSCORES, ALPHA, DPRE, PART_DW, PART_DB,
                   stride_xn, stride_wd, stride_wk, D, Hd, K, P, G,
                   HAS_MASK: tl.constexpr, GATED: tl.constexpr, HAS_BV: tl.constexpr, HAS_BU: tl.constexpr,
                   HAS_DSCORES: tl.constexpr, KN: tl.constexpr, KP: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, DOT_PREC: tl.constexpr):
    """Program p: one tile of one bag b (PLAN, splits of BLOCK_N rows). Writes α (N, K) and d(pre) (N, G) of its rows
    (0 at rows not kept), and its partials PART_DW[p] = hᵀ ds (Hd, K), PART_DB[p] = Σ_rows d(pre) (G)."""
    pid = tl.program_id(0)
    b = tl.load(PLAN + pid)
    lo = tl.load(PLAN + P + pid)
    hi = tl.load(PLAN + 2 * P + pid)
    offs_k = tl.arange(0, KP)
    m_k = offs_k < K
    lse = tl.load(LSE + b * K + offs_k, mask=m_k, other=0.0)
    dlse = tl.load(DLSE + b * K + offs_k, mask=m_k, other=0.0)
    for start in range(lo, hi, BLOCK_N):   # one tile, none for a program past the last one
        rows, in_split, keep = _tile_rows(MASK, start, hi, HAS_MASK, BLOCK_N)
        x_row = rows * stride_xn
        kept = keep[:, None] & m_k[None, :]
        s = _scores(X, WV, WU, BV, BU, WK, x_row, keep, offs_k, D, Hd, K, stride_wd, stride_wk, GATED, HAS_BV,
                    HAS_BU, KP, BLOCK_N, BLOCK_D, BLOCK_H, DOT_PREC)
        alpha = tl.where(kept, tl.math.exp2((s - lse[None, :]) * LOG2E), 0.0)
        tl.store(ALPHA + rows[:, None] * K + offs_k[None, :], alpha, mask=in_split[:, None] & m_k[None, :])
        # -- ds = α (g - delta) + α dlse, g - delta = x · dy_bk - y_bk · dy_bk summed as (x - y_bk) · dy_bk: where
        #    one row holds nearly all of α its x is nearly y, and the two sums, taken apart, would cancel to their
        #    rounding
        g = tl.zeros([BLOCK_N, KP], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            m_d = offs_d < D
            x = tl.load(X + x_row[:, None] + offs_d[None, :], mask=keep[:, None] & m_d[None, :], other=0.0)
            x = x.to(tl.float32)
            for k in tl.static_range(KN):
                y_k = tl.load(Y + (b * K + k) * D + offs_d, mask=m_d, other=0.0)
                dy_k = tl.load(DY + (b * K + k) * D + offs_d, mask=m_d, other=0.0)
                part = tl.sum((x - y_k[None, :]) * dy_k[None, :], 1)                   # (BLOCK_N,)
                g += tl.where(offs_k[None, :] == k, part[:, None], 0.0)
        ds = alpha * (g + dlse[None, :])
        if HAS_DSCORES:
            ds += tl.load(DSCORES + rows[:, None] * K + offs_k[None, :], mask=kept, other=0.0)
        ds = tl.where(kept, ds, 0.0)   # left-out rows: their scores' gradient reaches nothing (masked_fill)
        # -- per Hd chunk: the activations again, d(pre), and the partials of dw and the biases
        for h0 in range(0, Hd, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            m_h = offs_h < Hd
            pv, pu = _pre_chunk(X, WV, WU, BV, BU, x_row, keep, offs_h, D, Hd, stride_wd, GATED, HAS_BV, HAS_BU,
                                BLOCK_N, BLOCK_D, BLOCK_H, DOT_PREC)
            t, sg, h = _activations(pv, pu, GATED)
            wk = _branch_weights(WK, offs_h, offs_k, Hd, K, stride_wk)
            dh = tl.dot(ds, tl.trans(wk), input_precision="ieee")                      # (BLOCK_N, BLOCK_H)
            m_store = in_split[:, None] & m_h[None, :]
            p_dpre = DPRE + rows[:, None] * G + offs_h[None, :]
            # 0 at rows left out, also where a weight or bias is NaN (their activations come from x = 0 and would be)
            dpv = tl.where(keep[:, None], dh * sg * (1.0 - t * t), 0.0)
            tl.store(p_dpre, cast_rne(dpv, DPRE.dtype.element_ty), mask=m_store)
            tl.store(PART_DB + pid * G + offs_h, tl.sum(dpv, 0), mask=m_h)
            if GATED:
                dpu = tl.where(keep[:, None], dh * t * sg * (1.0 - sg), 0.0)
                tl.store(p_dpre + Hd, cast_rne(dpu, DPRE.dtype.element_ty), mask=m_store)
                tl.store(PART_DB + pid * G + Hd + offs_h, tl.sum(dpu, 0), mask=m_h)
            dw = tl.dot(tl.trans(tl.where(keep[:, None], h, 0.0)), ds, input_precision="ieee")   # (BLOCK_H, KP)
            tl.store(PART_DW + (pid * Hd + offs_h[:, None]) * K + offs_k[None, :], dw,
                     mask=m_h[:, None] & m_k[None, :])


@triton.jit
def _pool_bwd_dx(DY, ALPHA, DPRE, WV, WU, MASK, PLAN, DX, stride_wd, D, Hd, K, P, G,
                 HAS_MASK: tl.constexpr, GATED: tl.constexpr, KP: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, DOT_PREC: tl.constexpr):
    """dx[rows, chunk] = α dy_b + d(pre) [V|U]ᵀ for program p's tile of bag b (PLAN, as _pool_bwd_rows) and D chunk
    program_id(1); 0 at rows left out (their α and d(pre) are 0, but 0 times a NaN weight is not)."""
    pid = tl.program_id(0)
    b = tl.load(PLAN + pid)
    lo = tl.load(PLAN + P + pid)
    hi = tl.load(PLAN + 2 * P + pid)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = offs_d < D
    offs_k = tl.arange(0, KP)
    m_k = offs_k < K
    for start in range(lo, hi, BLOCK_N):   # one tile, none for a program past the last one
        rows, in_split, keep = _tile_rows(MASK, start, hi, HAS_MASK, BLOCK_N)
        alpha = tl.load(ALPHA + rows[:, None] * K + offs_k[None, :], mask=in_split[:, None] & m_k[None, :],
                        other=0.0)
        dy = tl.load(DY + (b * K + offs_k[:, None]) * D + offs_d[None, :], mask=m_k[:, None] & m_d[None, :],
                     other=0.0)
        dx = tl.dot(alpha, dy, input_precision="ieee")
        for h0 in range(0, Hd, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            m_h = offs_h < Hd
            p_dpre = DPRE + rows[:, None] * G + offs_h[None, :]
            m_dpre = in_split[:, None] & m_h[None, :]
            w_off = offs_d[None, :] * stride_wd + offs_h[:, None]                      # [V|U]ᵀ (BLOCK_H, BLOCK_D)
            m_w = m_h[:, None] & m_d[None, :]
            dx = dot_acc(tl.load(p_dpre, mask=m_dpre, other=0.0), tl.load(WV + w_off, mask=m_w, other=0.0), dx,
                         DOT_PREC)
            if GATED:
                dx = dot_acc(tl.load(p_dpre + Hd, mask=m_dpre, other=0.0), tl.load(WU + w_off, mask=m_w, other=0.0),
                             dx, DOT_PREC)
        dx = tl.where(keep[:, None], dx, 0.0)
        tl.store(DX + rows[:, None] * D + offs_d[None, :], cast_rne(dx, DX.dtype.element_ty),
                 mask=in_split[:, None] & m_d[None, :])


@triton.jit
def _pool_bwd_dw(X, MASK, DPRE, PART_DW, stride_xn, N, D, G, rows_per_split,
                 HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
                 DOT_PREC: tl.constexpr):
    """PART_DW[split, d chunk, g chunk] = Σ_rows of the split x[:, d chunk]ᵀ d(pre)[:, g chunk] (fp32); rows left out
    load x as 0 (their d(pre) is 0, and a NaN there must not reach the sum)."""
    g_blocks = tl.cdiv(G, BLOCK_G)
    offs_d = (tl.program_id(0) // g_blocks) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_g = (tl.program_id(0) % g_blocks) * BLOCK_G + tl.arange(0, BLOCK_G)
    m_d, m_g = offs_d < D, offs_g < G
    split = tl.program_id(1).to(tl.int64)
    lo = split * rows_per_split
    acc = tl.zeros([BLOCK_D, BLOCK_G], tl.float32)
    for start in range(lo, tl.minimum(lo + rows_per_split, N), BLOCK_N):
        rows, in_split, keep = _tile_rows(MASK, start, N, HAS_MASK, BLOCK_N)
        x = tl.load(X + rows[:, None] * stride_xn + offs_d[None, :], mask=keep[:, None] & m_d[None, :], other=0.0)
        dp = tl.load(DPRE + rows[:, None] * G + offs_g[None, :], mask=in_split[:, None] & m_g[None, :], other=0.0)
        acc = dot_acc(tl.trans(x), dp, acc, DOT_PREC)
    tl.store(PART_DW + (split * D + offs_d[:, None]) * G + offs_g[None, :], acc, mask=m_d[:, None] & m_g[None, :])


# ---------------------------------------------------------------------------------------- launchers
def split_rows(N: int, block_n: int) -> int:
    """Rows per forward split: about SPLIT_PROGRAMS programs over N rows (a bag as long as all of N fills the GPU;
    each split adds a (K, D) row to the workspace and the merge), whole tiles, at least one."""
    return max(1, triton.cdiv(triton.cdiv(N, block_n), SPLIT_PROGRAMS)) * block_n


def workspace(shape, device):
    """The forward splits' partial results (float32); the merge reads only those of splits that exist (tests fill
    it with NaN)."""
    return torch.empty(shape, dtype=torch.float32, device=device)


def _plan(offsets, N, rows):
    """Programs over the bags' splits of ``rows`` rows, from the shapes: P = cdiv(N, rows) + B bounds their number
    (sum over bags of cdiv(n_b, rows)). Returns plan (3, P) int64: bag, first row and end row of program p's split
    (end <= first past the last split: no rows); and split_off (B + 1): bag b's splits are programs split_off[b] ..
    split_off[b + 1] - 1. Torch ops on the device: no sync, and they run on fake tensors."""
    B = offsets.shape[0] - 1
    P = triton.cdiv(N, rows) + B
    n_splits = torch.div(offsets[1:] - offsets[:-1] + (rows - 1), rows, rounding_mode="floor")
    split_off = torch.cat([offsets.new_zeros(1), torch.cumsum(n_splits, 0)])
    pid = torch.arange(P, device=offsets.device, dtype=torch.int64)
    bag = torch.searchsorted(split_off[1:], pid, right=True).clamp(max=max(B - 1, 0))
    lo = offsets[bag] + (pid - split_off[bag]) * rows
    hi = torch.minimum(lo + rows, offsets[bag + 1])
    return torch.stack([bag, lo, hi]).contiguous(), split_off, P


def _check(x, offsets, mask, V, U, w, bV, bU):
    if x.dim() != 2 or x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or x.stride(-1) != 1:
        raise ValueError(f"triton attention_pool: x must be (N, D) float16/bfloat16/float32 with stride(-1) == 1, "
                         f"got {tuple(x.shape)} {x.dtype} strides {x.stride()}")
    if offsets.dtype != torch.int64 or offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError("triton attention_pool: offsets must be an int64 (B + 1) tensor")
    if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (x.shape[0],)):
        raise ValueError(f"triton attention_pool: mask must be bool ({x.shape[0]},)")
    D, Hd = x.shape[1], V.shape[1]
    if tuple(V.shape) != (D, Hd) or w.dim() != 2 or w.shape[0] != Hd or (U is not None and U.shape != V.shape):
        raise ValueError(f"triton attention_pool: V, U must be (D, Hd) = ({D}, Hd) and w (Hd, K)")
    for name, t in (("V", V), ("U", U), ("w", w), ("bV", bV), ("bU", bU)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"triton attention_pool: {name} must have x's dtype {x.dtype}, got {t.dtype}")


def _tiles(table, dtype):
    return table["fp32" if dtype == torch.float32 else "half"]


def _kernel_args(x, mask, V, U, w, bV, bU):
    """The scorer's tensors as the kernels take them (small: made contiguous), with the flags that go with them."""
    flags = dict(HAS_MASK=mask is not None, GATED=U is not None, HAS_BV=bV is not None, HAS_BU=bU is not None)
    V, w = V.contiguous(), w.contiguous()
    U = U.contiguous() if U is not None else V
    return (mask if mask is not None else x, V, U, bV.contiguous() if bV is not None else V,
            bU.contiguous() if bU is not None else V, w), flags


def attention_pool_fwd(x, offsets, mask, V, U, w, bV, bU, return_scores):
    _check(x, offsets, mask, V, U, w, bV, bU)
    N, D = x.shape
    Hd, K = w.shape
    B = offsets.shape[0] - 1
    dev = x.device
    y = torch.empty((B, K, D), dtype=torch.float32, device=dev)
    lse = torch.empty((B, K), dtype=torch.float32, device=dev)
    scores = torch.empty((N, K), dtype=torch.float32, device=dev)
    if B == 0:
        return y, lse, scores if return_scores else scores.new_empty((0,))
    (mask_t, V, U, bV_t, bU_t, w), flags = _kernel_args(x, mask, V, U, w, bV, bU)
    bn, bd, bh, warps, stages = _tiles(FWD_TILES, x.dtype)
    plan, split_off, P = _plan(offsets.contiguous(), N, split_rows(N, bn))
    kp = max(MIN_DOT_DIM, triton.next_power_of_2(K))
    part_acc, part_m, part_l = workspace((P * K, D), dev), workspace((P * K,), dev), workspace((P * K,), dev)
    wrap_triton(_pool_fwd)[(P,)](
        x, mask_t, V, U, bV_t, bU_t, w, plan, scores, part_acc, part_m, part_l,
        x.stride(0), V.stride(0), w.stride(0), D, Hd, K, P, **flags,
        KP=kp, BLOCK_N=bn, BLOCK_D=bd, BLOCK_H=bh, SPLIT_P=x.dtype != torch.float32,
        DOT_PREC=dot_precision(x.dtype), num_warps=warps, num_stages=stages)
    wrap_triton(_pool_merge)[(B, triton.cdiv(max(D, 1), MERGE_BLOCK_D))](
        part_acc, part_m, part_l, split_off, y, lse, D, K, KP=kp, BLOCK_D=MERGE_BLOCK_D, num_warps=4)
    return y, lse, scores if return_scores else scores.new_empty((0,))


def attention_pool_bwd(dy, x, offsets, mask, V, U, w, bV, bU, y, lse, dlse, dscores):
    _check(x, offsets, mask, V, U, w, bV, bU)
    N, D = x.shape
    Hd, K = w.shape
    B = offsets.shape[0] - 1
    dev, dt = x.device, x.dtype
    G = 2 * Hd if U is not None else Hd
    dx = torch.empty((N, D), dtype=dt, device=dev)
    dW = torch.zeros((D, G), dtype=torch.float32, device=dev)
    dw = torch.zeros((Hd, K), dtype=torch.float32, device=dev)
    dbias = torch.zeros((G,), dtype=torch.float32, device=dev)
    if B > 0 and N > 0:
        (mask_t, V, U, bV_t, bU_t, w), flags = _kernel_args(x, mask, V, U, w, bV, bU)
        dy = dy.to(torch.float32).contiguous()
        y = y.to(torch.float32).contiguous()
        dlse = (dlse.to(torch.float32) if dlse is not None else torch.zeros_like(lse, dtype=torch.float32)).contiguous()
        lse = lse.to(torch.float32).contiguous()
        kp = max(MIN_DOT_DIM, triton.next_power_of_2(K))
        prec = dot_precision(dt)
        # -- per tile: α, d(pre) and the partials of dw, d(bias)
        bn, bd, bh, warps, stages = _tiles(BWD_ROWS_TILES, dt)
        plan, _, P = _plan(offsets.contiguous(), N, bn)
        alpha = torch.empty((N, K), dtype=torch.float32, device=dev)
        dpre = torch.empty((N, G), dtype=dt, device=dev)
        part_dw = torch.zeros((P, Hd, K), dtype=torch.float32, device=dev)    # programs without rows add 0
        part_db = torch.zeros((P, G), dtype=torch.float32, device=dev)
        ds_in = dscores.to(torch.float32).contiguous() if dscores is not None else alpha
        wrap_triton(_pool_bwd_rows)[(P,)](
            x, mask_t, V, U, bV_t, bU_t, w, plan, lse, dlse, y, dy, ds_in, alpha, dpre, part_dw, part_db,
            x.stride(0), V.stride(0), w.stride(0), D, Hd, K, P, G, **flags, HAS_DSCORES=dscores is not None,
            KN=K, KP=kp, BLOCK_N=bn, BLOCK_D=bd, BLOCK_H=bh, DOT_PREC=prec, num_warps=warps, num_stages=stages)
        dw, dbias = part_dw.sum(0), part_db.sum(0)
        # -- dx over the same tiles
        bn_dx, bd_dx, bh_dx, warps, stages = _tiles(BWD_DX_TILES, dt)
        if bn_dx != bn:
            plan, _, P = _plan(offsets.contiguous(), N, bn_dx)
        wrap_triton(_pool_bwd_dx)[(P, triton.cdiv(D, bd_dx))](
            dy, alpha, dpre, V, U, mask_t, plan, dx, V.stride(0), D, Hd, K, P, G, HAS_MASK=flags["HAS_MASK"],
            GATED=flags["GATED"],
            KP=kp, BLOCK_N=bn_dx, BLOCK_D=bd_dx, BLOCK_H=bh_dx, DOT_PREC=prec, num_warps=warps, num_stages=stages)
        # -- d[V|U] = xᵀ d(pre), split over the rows
        bn_w, bd_w, bg_w, warps, stages = _tiles(BWD_DW_TILES, dt)
        tiles = triton.cdiv(D, bd_w) * triton.cdiv(G, bg_w)
        n_blocks = triton.cdiv(N, bn_w)
        splits = max(1, min(n_blocks, SPLIT_PROGRAMS // tiles))
        rows_per = triton.cdiv(n_blocks, splits) * bn_w
        splits = triton.cdiv(N, rows_per)
        part_dW = torch.empty((splits, D, G), dtype=torch.float32, device=dev)
        wrap_triton(_pool_bwd_dw)[(tiles, splits)](
            x, mask_t, dpre, part_dW, x.stride(0), N, D, G, rows_per, HAS_MASK=flags["HAS_MASK"],
            BLOCK_N=bn_w, BLOCK_D=bd_w, BLOCK_G=bg_w, DOT_PREC=prec, num_warps=warps, num_stages=stages)
        dW = part_dW.sum(0)
    elif N > 0:
        dx.zero_()
    # fresh tensors, never views of one another nor one empty tensor twice: an op's outputs may not alias
    out = lambda t, present=True: t.to(dt, copy=True) if present else x.new_empty((0,))
    return (dx, out(dW[:, :Hd]), out(dW[:, Hd:], U is not None), out(dw), out(dbias[:Hd], bV is not None),
            out(dbias[Hd:], bU is not None))
