"""softmax_gate / score_softmax_gate in Triton (docs/CONTRACT.md §1.2): memory-bound kernels over x (B, N, D).

Contract (the CPU kernels' one, csrc/cpu/softmax_gate.h): x (B, N, D) and scores (B, N, H) with
stride(-1) == 1, weight (H, D), mask bool (B, N); channel c belongs to head c // (D // H);
alpha (B, N, H) float32 contiguous; y (B, N, D) or (B, D) when pooling.

Forward
    one pass  (an item's N x D slab fits on chip, configs.FUSED_MAX_ELEMS): _gate_fused_fwd, one
              program per batch item: x read once, scores loaded or made by x @ weight^T, softmax over
              N, alpha stored, y = alpha ⊙ x (or Σ_n alpha ⊙ x) stored.
    two pass  (long N): [_gate_scores: scores = scale x W^T, pass 1 over x] -> _gate_stats: online
              max / sum over N, then alpha (small: N x H) -> _gate_apply or _gate_pool (pass 2 over x).
    float32 x's scores are made in float64 (exact products; TF32 ones, where torch allows them, in fp32) and
    kept so up to s - max(s) (_weights; fp32 exponentials).
Backward (g = Σ_{c in h} dy x (+ dalpha), ds = alpha (g - Σ_n alpha g))
    _gate_bwd_rows: one pass over (dy, x): g, and dx = alpha ⊙ dy for softmax_gate;
    _gate_bwd_ds:   ds over (B, N, H) (small);
    _score_bwd:     score_softmax_gate only, second pass over (dy, x): dx = alpha ⊙ dy + scale ds W,
                    dW partials = ds^T x per program, summed over programs (no atomics: deterministic).
    The reduction over N inside ds forces the second pass for the score variant; softmax_gate needs one.
Per-channel alpha: the one-pass kernel expands alpha [N, H] to channels with a dot against a one-hot
(H, D) matrix in exact fp32 (one nonzero term per output: exact), which works for any D / H; the
other kernels gather alpha[n, c // Dh] from the small alpha buffer (L2-resident).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from ._compat import wrap_triton

from fastattn import contract

from . import configs as C
from .common import align_elems, assume_aligned, assume_aligned3, cast_rne, dot_acc, dot_precision, grid_tile

LOG2E: tl.constexpr = tl.constexpr(contract.LOG2E)


@triton.jit
def _onehot_dot(a, onehot, acc):
    """acc + a @ onehot for a 0/1 matrix that maps each row of onehot's inputs to one output (heads
    to channels, channels to heads). A plain dot would spread a NaN or inf of ``a`` to every output
    through NaN · 0 and inf · 0; here non-finite values reach only the outputs they map to, and sum
    as IEEE does (inf + -inf = NaN). The fix-up runs only for tiles that hold a non-finite value."""
    finite = tl.abs(a) < float("inf")
    acc = tl.dot(tl.where(finite, a, 0.0), onehot, acc, input_precision="ieee")
    if tl.sum((~finite).to(tl.int32)) > 0:
        n_nan = tl.dot((a != a).to(tl.float32), onehot, input_precision="ieee")
        n_pos = tl.dot((a == float("inf")).to(tl.float32), onehot, input_precision="ieee")
        n_neg = tl.dot((a == float("-inf")).to(tl.float32), onehot, input_precision="ieee")
        acc = tl.where(n_pos > 0, float("inf"), acc)
        acc = tl.where(n_neg > 0, float("-inf"), acc)
        acc = tl.where((n_nan > 0) | ((n_pos > 0) & (n_neg > 0)), float("nan"), acc)
    return acc


@triton.jit
def _scores_dot(x, w, acc, DOT_PREC: tl.constexpr):
    """acc + x @ w^T, the scores' dot. Exact float32 products ("ieee") are summed in float64, as the CPU kernel
    does (see _weights): a float32 chain of D fused multiply-adds rounds a score further than torch's blocked GEMM
    (8x the reference's error in alpha at scale 100)."""
    if x.dtype == tl.float32 and DOT_PREC == "ieee":   # one return: the two branches' types differ
        acc = tl.dot(x.to(tl.float64), tl.trans(w).to(tl.float64), acc, input_precision="ieee",
                     out_dtype=tl.float64)
    else:
        acc = dot_acc(x, tl.trans(w), acc, DOT_PREC)
    return acc


@triton.jit
def _weights(s, m):
    """exp(s - m) in fp32 for scores s and their max m (0 in place of -inf), the difference taken in the scores'
    own type: float64 for score_softmax_gate's float32 inputs with exact dots. A score scale |x| |w| ~ 1e2-1e3
    rounded to float32, or multiplied by log2(e) in float32, moves alpha by ulp(s) relatively (1e-5 at scale 100),
    and a saturated softmax carries that into dweight and dx: up to 2.1x docs/CONTRACT.md §4 at scale 100.
    s - m in float64 is exact wherever alpha is not negligible."""
    return tl.math.exp2((s - m).to(tl.float32) * LOG2E)


@triton.jit
def _load_keep(MASK, b, offs_n, N, stride_mb, stride_mn, HAS_MASK: tl.constexpr):
    """[BLOCK_N] positions that take part: in range and (with a mask) True."""
    ok = offs_n < N
    if HAS_MASK:
        ok = ok & (tl.load(MASK + b * stride_mb + offs_n * stride_mn, mask=ok, other=0) != 0)
    return ok


@triton.jit
def _gate_fused_fwd(X, S, W, MASK, Y, ALPHA,
                    stride_xb, stride_xn, stride_sb, stride_sn, stride_wh, stride_mb, stride_mn,
                    N, D, H, Dh, scale,
                    COMPUTE_SCORES: tl.constexpr, HAS_MASK: tl.constexpr, POOL: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, DOT_PREC: tl.constexpr,
                    ALIGN: tl.constexpr):
    # torch.compile types a Python float argument fp64 (triton's launcher: fp32): the scale stays fp32 either way
    scale = tl.cast(scale, tl.float32)
    D, stride_xb, stride_xn = assume_aligned3(D, stride_xb, stride_xn, ALIGN)
    stride_wh = assume_aligned(stride_wh, ALIGN)
    b = tl.program_id(0).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_D)
    offs_h = tl.arange(0, BLOCK_H)
    m_n, m_c, m_h = offs_n < N, offs_c < D, offs_h < H
    x = tl.load(X + b * stride_xb + offs_n[:, None] * stride_xn + offs_c[None, :],
                mask=m_n[:, None] & m_c[None, :], other=0.0)                              # [BLOCK_N, BLOCK_D]
    # -- scores   [BLOCK_N, BLOCK_H]
    if COMPUTE_SCORES:
        w = tl.load(W + offs_h[:, None] * stride_wh + offs_c[None, :], mask=m_h[:, None] & m_c[None, :], other=0.0)
        s = _scores_dot(x, w, None, DOT_PREC) * scale                               # fp64 for fp32 x
    else:
        s = tl.load(S + b * stride_sb + offs_n[:, None] * stride_sn + offs_h[None, :],
                    mask=m_n[:, None] & m_h[None, :], other=0.0).to(tl.float32)
    # -- softmax over positions; a head with no position left gives alpha = 0
    keep = _load_keep(MASK, b, offs_n, N, stride_mb, stride_mn, HAS_MASK)
    s = tl.where(keep[:, None] & m_h[None, :], s, float("-inf"))
    m = tl.max(s, 0)
    e = _weights(s, tl.where(m == float("-inf"), 0.0, m)[None, :])
    l = tl.sum(e, 0)
    # masked positions are exactly 0, even in a head that a NaN reached (where 0 / NaN would be NaN)
    alpha = tl.where(s == float("-inf"), 0.0, e / tl.where(l == 0.0, 1.0, l)[None, :])
    tl.store(ALPHA + (b * N + offs_n[:, None]) * H + offs_h[None, :], alpha, mask=m_n[:, None] & m_h[None, :])
    # -- alpha per channel: [BLOCK_N, BLOCK_H] @ one-hot [BLOCK_H, BLOCK_D] (exact in fp32)
    onehot = ((offs_c[None, :] // Dh) == offs_h[:, None]) & m_c[None, :]
    a_full = _onehot_dot(alpha, onehot.to(tl.float32), tl.zeros([BLOCK_N, BLOCK_D], tl.float32))
    y = a_full * x.to(tl.float32)
    if POOL:
        tl.store(Y + b * D + offs_c, cast_rne(tl.sum(y, 0), Y.dtype.element_ty), mask=m_c)
    else:
        tl.store(Y + (b * N + offs_n[:, None]) * D + offs_c[None, :], cast_rne(y, Y.dtype.element_ty),
                 mask=m_n[:, None] & m_c[None, :])


@triton.jit
def _gate_scores(X, W, S, stride_xb, stride_xn, stride_wh, N, D, H, scale,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, DOT_PREC: tl.constexpr,
                 ALIGN: tl.constexpr):
    """Pass 1 of the two-pass score_softmax_gate: S (B, N, H) = scale x W^T (float64 for float32 x: _weights)."""
    scale = tl.cast(scale, tl.float32)  # fp32 under torch.compile too (see _gate_fused_fwd)
    D, stride_xb, stride_xn = assume_aligned3(D, stride_xb, stride_xn, ALIGN)
    stride_wh = assume_aligned(stride_wh, ALIGN)
    tile_n, b = grid_tile(tl.cdiv(N, BLOCK_N), False)
    b = b.to(tl.int64)
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, BLOCK_H)
    m_n, m_h = offs_n < N, offs_h < H
    if S.dtype.element_ty == tl.float64:
        acc = tl.zeros([BLOCK_N, BLOCK_H], tl.float64)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_H], tl.float32)
    for c0 in range(0, D, BLOCK_D):
        offs_c = c0 + tl.arange(0, BLOCK_D)
        m_c = offs_c < D
        x = tl.load(X + b * stride_xb + offs_n[:, None] * stride_xn + offs_c[None, :],
                    mask=m_n[:, None] & m_c[None, :], other=0.0)
        w = tl.load(W + offs_h[:, None] * stride_wh + offs_c[None, :], mask=m_h[:, None] & m_c[None, :], other=0.0)
        acc = _scores_dot(x, w, acc, DOT_PREC)
    tl.store(S + (b * N + offs_n[:, None]) * H + offs_h[None, :], acc * scale, mask=m_n[:, None] & m_h[None, :])


@triton.jit
def _load_scores(S, MASK, b, offs_n, offs_h, m_h, N, stride_sb, stride_sn, stride_mb, stride_mn,
                 HAS_MASK: tl.constexpr):
    """[BLOCK_N, BLOCK_H] scores of item b (float64 ones kept, others in fp32), -inf at masked positions and
    out-of-range lanes."""
    keep = _load_keep(MASK, b, offs_n, N, stride_mb, stride_mn, HAS_MASK)
    s = tl.load(S + b * stride_sb + offs_n[:, None] * stride_sn + offs_h[None, :],
                mask=keep[:, None] & m_h[None, :], other=0.0)
    if S.dtype.element_ty != tl.float64:
        s = s.to(tl.float32)
    return tl.where(keep[:, None] & m_h[None, :], s, float("-inf"))


@triton.jit
def _gate_stats(S, MASK, ALPHA, stride_sb, stride_sn, stride_mb, stride_mn, N, H,
                HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
    """alpha for heads [pid_h * BLOCK_H, ...) of item b: online max / sum over N, then a second sweep
    writes alpha (scores are N x H: small next to x). ALPHA may alias S (read before written)."""
    b = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    m_h = offs_h < H
    if S.dtype.element_ty == tl.float64:
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float64)
    else:
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        s = _load_scores(S, MASK, b, offs_n, offs_h, m_h, N, stride_sb, stride_sn, stride_mb, stride_mn, HAS_MASK)
        m_new = tl.maximum(m_i, tl.max(s, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * _weights(m_i, m_safe) + tl.sum(_weights(s, m_safe[None, :]), 0)
        m_i = m_new
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    inv_l = 1.0 / tl.where(l_i == 0.0, 1.0, l_i)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        s = _load_scores(S, MASK, b, offs_n, offs_h, m_h, N, stride_sb, stride_sn, stride_mb, stride_mn, HAS_MASK)
        alpha = tl.where(s == float("-inf"), 0.0, _weights(s, m_safe[None, :]) * inv_l[None, :])
        tl.store(ALPHA + (b * N + offs_n[:, None]) * H + offs_h[None, :], alpha,
                 mask=(offs_n[:, None] < N) & m_h[None, :])


@triton.jit
def _alpha_channels(ALPHA, b, offs_n, offs_c, N, D, H, Dh):
    """alpha[b, n, c // Dh] as a [BLOCK_N, BLOCK_D] fp32 tile (gathered from the (B, N, H) buffer)."""
    return tl.load(ALPHA + (b * N + offs_n[:, None]) * H + offs_c[None, :] // Dh,
                   mask=(offs_n[:, None] < N) & (offs_c[None, :] < D), other=0.0)


@triton.jit
def _gate_apply(X, ALPHA, Y, stride_xb, stride_xn, N, D, H, Dh, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                ALIGN: tl.constexpr):
    D, stride_xb, stride_xn = assume_aligned3(D, stride_xb, stride_xn, ALIGN)
    tile_n, b = grid_tile(tl.cdiv(N, BLOCK_N), False)
    b = b.to(tl.int64)
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m = (offs_n[:, None] < N) & (offs_c[None, :] < D)
    x = tl.load(X + b * stride_xb + offs_n[:, None] * stride_xn + offs_c[None, :], mask=m, other=0.0)
    a = _alpha_channels(ALPHA, b, offs_n, offs_c, N, D, H, Dh)
    tl.store(Y + (b * N + offs_n[:, None]) * D + offs_c[None, :], cast_rne(a * x.to(tl.float32), Y.dtype.element_ty), mask=m)


@triton.jit
def _gate_pool(X, ALPHA, PART, stride_xb, stride_xn, N, D, H, Dh, N_PER_SPLIT,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr):
    """PART[b, split, c] = Σ_{n in split} alpha[b, n, h(c)] x[b, n, c] (fp32; summed over splits after)."""
    D, stride_xb, stride_xn = assume_aligned3(D, stride_xb, stride_xn, ALIGN)
    b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    offs_c = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_D], tl.float32)
    n_lo = split * N_PER_SPLIT
    for n0 in range(n_lo, tl.minimum(n_lo + N_PER_SPLIT, N), BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        x = tl.load(X + b * stride_xb + offs_n[:, None] * stride_xn + offs_c[None, :],
                    mask=(offs_n[:, None] < N) & (offs_c[None, :] < D), other=0.0)
        acc += tl.sum(_alpha_channels(ALPHA, b, offs_n, offs_c, N, D, H, Dh) * x.to(tl.float32), 0)
    tl.store(PART + (b * tl.num_programs(1) + split) * D + offs_c, acc, mask=offs_c < D)


@triton.jit
def _gate_bwd_rows(DY, X, ALPHA, DALPHA, G, DX, stride_dyb, stride_dyn, stride_xb, stride_xn, N, D, H, Dh,
                   HAS_DALPHA: tl.constexpr, WRITE_DX: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, ALIGN: tl.constexpr):
    """g[b, n, h] = Σ_{c in h} dy x (+ dalpha) and (softmax_gate) dx = alpha ⊙ dy, in one pass.
    dy of a pooled output is (B, D): stride_dyn = 0 broadcasts it over n."""
    D, stride_xb, stride_xn = assume_aligned3(D, stride_xb, stride_xn, ALIGN)
    stride_dyb, stride_dyn = assume_aligned(stride_dyb, ALIGN), assume_aligned(stride_dyn, ALIGN)
    tile_n, b = grid_tile(tl.cdiv(N, BLOCK_N), False)
    b = b.to(tl.int64)
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, BLOCK_H)
    m_n = offs_n < N
    g = tl.zeros([BLOCK_N, BLOCK_H], tl.float32)
    for c0 in range(0, D, BLOCK_D):
        offs_c = c0 + tl.arange(0, BLOCK_D)
        m = m_n[:, None] & (offs_c[None, :] < D)
        dy = tl.load(DY + b * stride_dyb + offs_n[:, None] * stride_dyn + offs_c[None, :], mask=m, other=0.0)
        dy = dy.to(tl.float32)
        x = tl.load(X + b * stride_xb + offs_n[:, None] * stride_xn + offs_c[None, :], mask=m, other=0.0)
        if WRITE_DX:
            a = _alpha_channels(ALPHA, b, offs_n, offs_c, N, D, H, Dh)
            tl.store(DX + (b * N + offs_n[:, None]) * D + offs_c[None, :], cast_rne(a * dy, DX.dtype.element_ty), mask=m)
        # -- per-head row sums: [BLOCK_N, BLOCK_D] @ one-hot [BLOCK_D, BLOCK_H]
        onehot = ((offs_c[:, None] // Dh) == offs_h[None, :]) & (offs_c[:, None] < D)
        g = _onehot_dot(dy * x.to(tl.float32), onehot.to(tl.float32), g)
    m_g = m_n[:, None] & (offs_h[None, :] < H)
    p_g = (b * N + offs_n[:, None]) * H + offs_h[None, :]
    if HAS_DALPHA:
        g += tl.load(DALPHA + p_g, mask=m_g, other=0.0).to(tl.float32)
    tl.store(G + p_g, g, mask=m_g)


@triton.jit
def _gate_bwd_ds(ALPHA, G, DS, N, H, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
    """ds = alpha (g - Σ_n alpha g), softmax's backward over positions, as alpha (g S - Σ_n alpha g) with
    S = Σ_n alpha, in float64 (as the CPU kernel): the same value when S = 1, without leaning on the rounded
    alphas summing to 1. With a saturated softmax (alpha one-hot) the exact ds is ~0 while g is large, and
    g - Σ alpha g carried ulp(1) g of error from alpha's rounding alone (times scale in dweight and dx: float32
    missed docs/CONTRACT.md §4 by up to 1.4x at scale 30-100). DS may alias G."""
    b = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    m_h = offs_h < H
    dot = tl.zeros([BLOCK_H], tl.float64)
    total = tl.zeros([BLOCK_H], tl.float64)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        m = (offs_n[:, None] < N) & m_h[None, :]
        p = (b * N + offs_n[:, None]) * H + offs_h[None, :]
        a = tl.load(ALPHA + p, mask=m, other=0.0).to(tl.float64)
        g = tl.load(G + p, mask=m, other=0.0).to(tl.float64)
        dot += tl.sum(tl.where(a == 0.0, 0.0, a * g), 0)  # masked: 0 even if g is NaN
        total += tl.sum(a, 0)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        m = (offs_n[:, None] < N) & m_h[None, :]
        p = (b * N + offs_n[:, None]) * H + offs_h[None, :]
        a = tl.load(ALPHA + p, mask=m, other=0.0).to(tl.float64)
        g = tl.load(G + p, mask=m, other=0.0).to(tl.float64)
        ds = tl.where(a == 0.0, 0.0, a * (g * total[None, :] - dot[None, :]))
        tl.store(DS + p, cast_rne(ds.to(tl.float32), DS.dtype.element_ty), mask=m)


@triton.jit
def _score_bwd(DY, X, W, ALPHA, DS, DX, DW_PART, stride_dyb, stride_dyn, stride_xb, stride_xn, stride_wh,
               N, D, H, Dh, scale, N_PER_SPLIT,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, ALIGN: tl.constexpr):
    """score_softmax_gate, pass 2: dx = alpha ⊙ dy + scale ds W; DW_PART[b, split] = ds^T x."""
    scale = tl.cast(scale, tl.float32)  # fp32 under torch.compile too (see _gate_fused_fwd)
    D, stride_xb, stride_xn = assume_aligned3(D, stride_xb, stride_xn, ALIGN)
    stride_dyb, stride_dyn = assume_aligned(stride_dyb, ALIGN), assume_aligned(stride_dyn, ALIGN)
    stride_wh = assume_aligned(stride_wh, ALIGN)
    b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    offs_c = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_h = tl.arange(0, BLOCK_H)
    m_c, m_h = offs_c < D, offs_h < H
    w = tl.load(W + offs_h[:, None] * stride_wh + offs_c[None, :], mask=m_h[:, None] & m_c[None, :],
                other=0.0).to(tl.float32)                                                 # [BLOCK_H, BLOCK_D]
    dw = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    n_lo = split * N_PER_SPLIT
    for n0 in range(n_lo, tl.minimum(n_lo + N_PER_SPLIT, N), BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        m_n = offs_n < N
        m = m_n[:, None] & m_c[None, :]
        dy = tl.load(DY + b * stride_dyb + offs_n[:, None] * stride_dyn + offs_c[None, :], mask=m, other=0.0)
        x = tl.load(X + b * stride_xb + offs_n[:, None] * stride_xn + offs_c[None, :], mask=m, other=0.0)
        ds = tl.load(DS + (b * N + offs_n[:, None]) * H + offs_h[None, :], mask=m_n[:, None] & m_h[None, :],
                     other=0.0)                                                           # [BLOCK_N, BLOCK_H]
        a = _alpha_channels(ALPHA, b, offs_n, offs_c, N, D, H, Dh)
        dx = a * dy.to(tl.float32) + scale * tl.dot(ds, w, input_precision="ieee")
        tl.store(DX + (b * N + offs_n[:, None]) * D + offs_c[None, :], cast_rne(dx, DX.dtype.element_ty), mask=m)
        dw = tl.dot(tl.trans(ds), x.to(tl.float32), dw, input_precision="ieee")
    part = b * tl.num_programs(1) + split
    tl.store(DW_PART + (part * H + offs_h[:, None]) * D + offs_c[None, :], dw, mask=m_h[:, None] & m_c[None, :])


# ---------------------------------------------------------------------------------------- launchers
def _check(x, other, other_name, mask):
    if x.dim() != 3 or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"triton softmax gate: x must be (B, N, D) float16/bfloat16/float32, got "
                         f"{tuple(x.shape)} {x.dtype}")
    if other.dtype != x.dtype:
        raise TypeError(f"triton softmax gate: {other_name} must have x's dtype {x.dtype}, got {other.dtype}")
    H = other.shape[-1] if other_name == "scores" else other.shape[0]
    if H == 0 or x.shape[2] % H != 0:
        raise ValueError(f"triton softmax gate: {H} heads do not divide D = {x.shape[2]}")
    if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != tuple(x.shape[:2])):
        raise ValueError(f"triton softmax gate: mask must be bool {tuple(x.shape[:2])}")
    if x.stride(-1) != 1 or other.stride(-1) != 1:
        raise ValueError(f"triton softmax gate: x and {other_name} need stride(-1) == 1")


def _mask_args(mask, x):
    if mask is None:
        return x, 0, 0
    return mask, mask.stride(0), mask.stride(1)


def _splits(B, N, d_blocks):
    """Programs over N for the reductions (pool, dW): enough to fill the GPU, deterministic sums."""
    n_blocks = triton.cdiv(N, C.GATE_BLOCK_N)
    split = max(1, min(n_blocks, C.GATE_SPLIT_PROGRAMS // max(1, B * d_blocks)))
    n_per = triton.cdiv(n_blocks, split) * C.GATE_BLOCK_N
    return triton.cdiv(N, n_per), n_per


def _forward(x, scores, weight, mask, scale, pool):
    B, N, D = x.shape
    H = scores.shape[-1] if scores is not None else weight.shape[0]
    Dh = D // H
    dev = x.device
    alpha = torch.empty((B, N, H), dtype=torch.float32, device=dev)
    y = torch.empty((B, D) if pool else (B, N, D), dtype=x.dtype, device=dev)
    mask_t, smb, smn = _mask_args(mask, x)
    align = align_elems(x.dtype, (D,), x, *([weight] if weight is not None else []))
    bn, bd, bh = C.dot_block(N), C.dot_block(D), C.dot_block(H)
    fp32 = x.dtype == torch.float32
    scores_f64 = fp32 and dot_precision(x.dtype) == "ieee"   # as _scores_dot decides
    if bn * bd <= C.FUSED_MAX_ELEMS and (not fp32 or (bn <= C.FUSED_FP32_MAX_N and (
            scores is not None or bd <= C.FUSED_FP32_SCORES_MAX_D))):
        # -- one pass over x
        s_t, ss = (scores, scores.stride()) if scores is not None else (x, (0, 0, 0))
        w_t, swh = (weight, weight.stride(0)) if weight is not None else (x, 0)
        wrap_triton(_gate_fused_fwd)[(B,)](
            x, s_t, w_t, mask_t, y, alpha, x.stride(0), x.stride(1), ss[0], ss[1], swh, smb, smn,
            N, D, H, Dh, scale, COMPUTE_SCORES=scores is None, HAS_MASK=mask is not None, POOL=pool,
            BLOCK_N=bn, BLOCK_D=bd, BLOCK_H=bh, DOT_PREC=dot_precision(x.dtype), ALIGN=align,
            num_warps=C.GATE_FUSED_WARPS)
        return y, alpha
    # -- two passes: scores (score variant) and alpha, then y
    if scores is None:
        # float64 scores for exact float32 products (_weights); else alpha's buffer, turned into alpha in place
        s_t = torch.empty((B, N, H), dtype=torch.float64, device=dev) if scores_f64 else alpha
        block_d = C.GATE_F64_SCORES_BLOCK_D if scores_f64 else C.GATE_FP32_SCORES_BLOCK_D if fp32 else C.GATE_BLOCK_D
        wrap_triton(_gate_scores)[(triton.cdiv(N, C.GATE_BLOCK_N) * B,)](
            x, weight, s_t, x.stride(0), x.stride(1), weight.stride(0), N, D, H, scale,
            BLOCK_N=C.GATE_BLOCK_N, BLOCK_D=min(bd, block_d),
            BLOCK_H=bh, DOT_PREC=dot_precision(x.dtype), ALIGN=align, num_warps=C.GATE_WARPS)
        ss = s_t.stride()
    else:
        s_t, ss = scores, scores.stride()
    bh_stats = min(bh, C.GATE_STATS_MAX_BLOCK_H)
    wrap_triton(_gate_stats)[(B, triton.cdiv(H, bh_stats))](
        s_t, mask_t, alpha, ss[0], ss[1], smb, smn, N, H,
        HAS_MASK=mask is not None, BLOCK_N=C.GATE_STATS_BLOCK_N, BLOCK_H=bh_stats, num_warps=C.GATE_WARPS)
    bd = min(bd, C.gate_block_d(x.dtype, align))
    d_blocks = triton.cdiv(D, bd)
    if pool:
        split, n_per = _splits(B, N, d_blocks)
        part = torch.empty((B, split, D), dtype=torch.float32, device=dev)
        wrap_triton(_gate_pool)[(B, split, d_blocks)](
            x, alpha, part, x.stride(0), x.stride(1), N, D, H, Dh, n_per,
            BLOCK_N=C.GATE_POOL_BLOCK_N, BLOCK_D=bd, ALIGN=align, num_warps=C.GATE_WARPS)
        y = part.sum(1).to(x.dtype)
    else:
        wrap_triton(_gate_apply)[(triton.cdiv(N, C.GATE_BLOCK_N) * B, d_blocks)](
            x, alpha, y, x.stride(0), x.stride(1), N, D, H, Dh,
            BLOCK_N=C.GATE_BLOCK_N, BLOCK_D=bd, ALIGN=align, num_warps=C.GATE_WARPS)
    return y, alpha


def softmax_gate_fwd(scores, x, mask, pool):
    _check(x, scores, "scores", mask)
    return _forward(x, scores, None, mask, 1.0, pool)


def score_softmax_gate_fwd(x, weight, mask, scale, pool):
    _check(x, weight, "weight", mask)
    return _forward(x, None, weight, mask, scale, pool)


def _rows_and_ds(dy, x, alpha, dalpha, pool, dx, ds):
    """g (and dx = alpha ⊙ dy when dx is given) in one pass over (dy, x); then ds into ``ds``."""
    B, N, D = x.shape
    H = alpha.shape[-1]
    g = torch.empty((B, N, H), dtype=torch.float32, device=x.device)
    sdn = 0 if pool else dy.stride(1)
    dalpha_t = dalpha.contiguous() if dalpha is not None else g
    bh = C.dot_block(H)
    align = align_elems(x.dtype, (D,), x, dy)
    bn = C.gate_rows_block_n(x.dtype, align)
    wrap_triton(_gate_bwd_rows)[(triton.cdiv(N, bn) * B,)](
        dy, x, alpha, dalpha_t, g, dx if dx is not None else g, dy.stride(0), sdn, x.stride(0), x.stride(1),
        N, D, H, D // H, HAS_DALPHA=dalpha is not None, WRITE_DX=dx is not None,
        BLOCK_N=bn, BLOCK_D=min(C.dot_block(D), C.GATE_ROWS_BLOCK_D), BLOCK_H=bh,
        ALIGN=align, num_warps=C.GATE_ROWS_WARPS)
    bh_ds = min(bh, 64)
    wrap_triton(_gate_bwd_ds)[(B, triton.cdiv(H, bh_ds))](
        alpha, g, ds if ds is not None else g, N, H, BLOCK_N=C.GATE_STATS_BLOCK_N, BLOCK_H=bh_ds,
        num_warps=C.GATE_WARPS)
    return g


def softmax_gate_bwd(dy, x, alpha, dalpha, pool):
    B, N, D = x.shape
    alpha = alpha.contiguous()
    dx = torch.empty((B, N, D), dtype=x.dtype, device=x.device)
    dscores = torch.empty(alpha.shape, dtype=x.dtype, device=x.device)
    _rows_and_ds(dy, x, alpha, dalpha, pool, dx, dscores)
    return dscores, dx


def score_softmax_gate_bwd(dy, x, weight, alpha, dalpha, scale, pool):
    B, N, D = x.shape
    H = weight.shape[0]
    alpha = alpha.contiguous()
    ds = _rows_and_ds(dy, x, alpha, dalpha, pool, None, None)   # ds written over g (fp32)
    dx = torch.empty((B, N, D), dtype=x.dtype, device=x.device)
    align = align_elems(x.dtype, (D,), x, dy, weight)
    bd = min(C.dot_block(D), C.gate_block_d(x.dtype, align))
    d_blocks = triton.cdiv(D, bd)
    split, n_per = _splits(B, N, d_blocks)
    dw_part = torch.empty((B * split, H, D), dtype=torch.float32, device=x.device)
    wrap_triton(_score_bwd)[(B, split, d_blocks)](
        dy, x, weight, alpha, ds, dx, dw_part, dy.stride(0), 0 if pool else dy.stride(1), x.stride(0), x.stride(1),
        weight.stride(0), N, D, H, D // H, scale, n_per,
        BLOCK_N=C.GATE_SCORE_BWD_BLOCK_N, BLOCK_D=bd, BLOCK_H=C.dot_block(H), ALIGN=align,
        num_warps=C.GATE_WARPS)
    dweight = (dw_part.sum(0) * scale).to(weight.dtype)
    return dx, dweight
