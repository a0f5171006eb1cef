"""Attention forward and backward in Triton: FlashAttention-2 (tiles of Q against streamed K/V tiles,
online softmax in base 2 with the scale folded in, lse saved; backward recomputes P from lse).

Op contract (the CPU kernels' one, csrc/cpu/attention.h):
    q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv): any strides, stride(-1) == 1
    mask (B', H', Lq', Lk'): optional, 4-D, each dim 1 or the full size of (B, Hq, Lq, Lk), any strides;
        the kernels broadcast size-1 dims themselves (stride 0). bool (True = may attend) or q's dtype
        (added to the scores)
    gate (B, Hq, Lq, Dv): optional expanded view (headwise: stride(-1) == 0), q's dtype
    causal: 0 none, 1 top_left (key j <= i), 2 bottom_right (j <= i + Lk - Lq)
    returns out (B, Hq, Lq, Dv) contiguous in q's dtype (gated); lse (B, Hq, Lq) float32 in log2 units
    (log2 of the softmax denominator of the scores in log2 units = the natural lse * LOG2E, the base the
    kernels compute in, so the backward reads it as it is; -inf on empty rows); out_acc (B, Hq, Lq, Dv):
    the gated output before rounding, float32, for float16 / bfloat16 inputs (empty for float32)
Score modifiers (contract.ScoreMods, the ops' last arguments): the sliding window reaches the kernels as the band
of keys a row sees (contract.key_band: CAUSAL with causal_off bounds keys from above, the causal rule and a right
window alike, WINDOWED with lo_off from below), key tiles outside it skipped; SOFTCAP caps the scores and the
backward takes dS through the cap; HAS_ALIBI reads the slopes (float32). _mask_scores applies all of them. With a
window or a cap the kernels visit their key (query) tiles in one loop, every tile masked, where the causal split
takes two (those spilled, scripts/check_triton_aot.py). Packed sequences take none yet.
Dropout (DROPOUT; the ops' dropout_p, dropout_seed): _dropout_kept draws each tile's Philox words again wherever a
kernel needs P (forward, dK/dV, dQ, broadcast dmask), from the seed tensor on the device; no mask is stored. One
Philox per key, of which the key's word is kept: three of four words go unused, but drawing one per four keys and
interleaving them (tl.join, permute, reshape) held more registers and spilled more (dK/dV 16x128 at D 128: 176 B
against 44). Launches with dropout take configs of their own where the others spilled (configs.py: dropout=).
Backward takes out = the forward's out_acc where it has one (float32), else out; lse as the forward
wrote it, dlse = the gradient of that log2-unit lse; returns (dq, dk, dv, dmask, dgate): dmask =
dL/dmask in the mask's own shape and dtype when need_dmask (dS summed over the mask's broadcast dims in
float32, rounded once), dgate (B, Hq, Lq, Dv); empty tensors otherwise.

Packed sequences (varlen_attention_fwd / _bwd, csrc/attention_contract.h): q (total_q, Hq, D), k / v
(total_k, Hkv, D / Dv), int32 cu_seqlens_q / _k (B + 1), max_seqlen_q / _k, gate (total_q, Hq, Dv or 1), causal
per sequence (bottom_right: j <= i + Lk_b - Lq_b), no mask; out / out_acc (total_q, Hq, Dv), lse (Hq, total_q);
the backward returns (dq, dk, dv, dgate). The same kernels run them with VARLEN set: the launchers pass the
inputs' batch strides as 0, each output's slice and row strides (_out_rows) and Lq, Lk = max_seqlen (the
grids below); each program reads its sequence's first rows, lengths and causal offset from cu_seqlens
(_seq_extent), and one whose tile lies past its sequence's length returns at once.

Kernels (programs (tile, slice), flattened tile-fastest onto the grid's first axis by common.grid_tile: the
second axis would bound B * H to 65535; _attn_bwd_dmask keeps its slices on the second axis and those past
65535 on the third, a layout that compiles without spills there):
    _attn_fwd        (Lq / BLOCK_M, B * Hq)   O, lse (and O before rounding: out_acc)
    _attn_bwd_prep   (Lq / BLOCK_M, B * Hq)   dO = dO' * sig(g), delta = rowsum(dO * O) - dlse,
                                              dgate = dO' * O' * (1 - sig(g)) (O' is the gated output)
    _attn_bwd_dkdv   (Lk / BLOCK_N, B * Hkv)  dK, dV of a key tile, summed over the GQA group's heads
    _attn_bwd_dq     (Lq / BLOCK_M, B * Hq)   dQ of a query tile (and dmask = dS for a full-shape mask)
    _attn_bwd_dmask  (tiles of (Lq', Lk'), B' * H')   dmask of a broadcast mask, one tile per program
Two backward kernels instead of one with atomics: no atomics means deterministic gradients and
autotuning without resetting outputs; the price is recomputing S and dP in both (7 tile GEMMs
instead of 5), the tutorial's choice too. Not measured against a fused atomic dQ yet (no GPU).

dmask of a broadcast float mask (some of B', H', Lq', Lk' are 1 where the scores' dims are not):
_attn_bwd_dmask owns a [BLOCK_M, BLOCK_N] tile of the mask (its rows / keys, or all of them along a
broadcast Lq' / Lk') and loops over every (batch, head) pair, query tile and key tile that broadcasts
into it, recomputing S, P, dP (2 tile GEMMs) and adding dS to one fp32 register tile, reduced over
the broadcast Lq / Lk and stored once in the mask's dtype. Deterministic (fixed loop order, no
atomics), no memory beyond the mask-shaped output. dQ then runs without dmask. Why not inside the dQ
kernel: its programs loop over keys for one (batch, head), so a dS sum across heads would need the
whole [BLOCK_M, Lk] row in registers or read-modify-writes of a global fp32 buffer, and a mask
broadcast over Lq would serialise all query tiles of a head into one program.

Half precision (float16 / bfloat16) keeps rowsum(dS) = rowsum(P * (dP - delta)) = dlse * LOG2E (0 without
an lse gradient) to fp32 accuracy,
which is what makes dq exactly 0 where it should be (repeated keys, saturated rows) and the gradient of a
mask broadcast over keys right: delta must be rowsum(P dP) for the P and dP the backward uses. Three
things see to it: delta comes from out_acc (not the rounded out); with a gate, from the dO the dots read
(dO' * sig rounded to q's dtype) times the ungated O (out_acc / sig); and the forward's P V takes P to
~16 bits as P_hi + P_lo (two tile GEMMs, configs.PRECISE_PV), not P rounded to 8 (bf16) / 11 (fp16) bits,
whose error in delta (~2^-9 |dP|) alone put dq of repeated keys at the bound of docs/CONTRACT.md §4
(bf16 2.0e-3 vs 2e-3 allowed, fp16 5.6e-4 vs 5e-4; 2.6e-6 / 4.8e-7 with the split;
test_repeated_keys_keep_dq_zero_in_bf16).
The price is one more tile GEMM per key tile in the half-precision forward (3 instead of 2), not
measured yet (no GPU).
dQ = dS K likewise takes dS as dS_hi + dS_lo (SPLIT_DS, one more tile GEMM in the dQ kernel) where q's
gradient sums rows (common.repeats_elements: q from expand or unfold): there the error of dS rounded to the
inputs' dtype adds up over the summed rows, while the exact sum may be 0 (every key the same), and dq missed
docs/CONTRACT.md §4 by up to 3.3x (bf16 / fp16; bc.repeated_keys_keep_dq_exact). Elsewhere each dq element
keeps its own rounding, within the rule, and the kernel one GEMM fewer (the cuda kernels split always).

Offsets: batch / head offsets are int64 (and a packed sequence's first row); offsets inside one (batch,
head) slice are int32, so one slice of q, k, v, out (L x row stride; packed: one sequence's) and one
(Lq x Lk) mask slice must stay below 2^31 elements.
Head-dim rows: when head dims and strides are multiples of 16 bytes the launchers say so (ALIGN, see
assume_aligned), so head dims such as 40, 72, 200 load as 16-byte vectors like multiples of 16 do. Tiles per
head dim and precision: configs.py.

float32 inputs: tl.dot runs in exact fp32 ("ieee") by default, so results match torch's fp32 matmul;
when ``torch.backends.cuda.matmul.allow_tf32`` is True the dots use TF32, as torch's matmuls do then.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from ._compat import wrap_triton

from fastattn import contract
from fastattn.contract import CAUSAL_NONE
from fastattn.ops import has_out_acc

from . import configs as C
from .common import (align_elems, assume_aligned, assume_aligned3, cast_rne, dot_acc, dot_precision, grid_tile,
                     online_softmax_step, repeats_elements)

# The contract's constants (fastattn/contract.py), as constexprs the kernels may read.
LOG2E: tl.constexpr = tl.constexpr(contract.LOG2E)
MASK_NONE: tl.constexpr = tl.constexpr(contract.MASK_NONE)
MASK_BOOL: tl.constexpr = tl.constexpr(contract.MASK_BOOL)
MASK_BIAS: tl.constexpr = tl.constexpr(contract.MASK_BIAS)
CAUSAL_BR: tl.constexpr = tl.constexpr(contract.CAUSAL_BOTTOM_RIGHT)
PHILOX_M0: tl.constexpr = tl.constexpr(contract.PHILOX_M[0])
PHILOX_M1: tl.constexpr = tl.constexpr(contract.PHILOX_M[1])
PHILOX_W0: tl.constexpr = tl.constexpr(contract.PHILOX_W[0])
PHILOX_W1: tl.constexpr = tl.constexpr(contract.PHILOX_W[1])


# ------------------------------------------------------------------------------------------ helpers
@triton.jit
def _mask_scores(s, p_mask, i2, j2, Lq, Lk, stride_mi, stride_mj, causal_off, lo_off, cap, slope2,
                 MASK_KIND: tl.constexpr, CAUSAL_TILE: tl.constexpr, WINDOW_TILE: tl.constexpr,
                 SOFTCAP: tl.constexpr, ALIBI: tl.constexpr):
    """Scores s = scale * log2(e) * q.k of query rows i2 and keys j2 (broadcastable index tiles) made the
    contract's (csrc/attention_contract.h, log2 units): capped to cap * tanh(s / cap) (SOFTCAP; cap = softcap *
    log2(e)), the float bias and ALiBi (slope2 = slope * log2(e)) added, -inf where masked: out-of-range
    rows/keys, above the causal diagonal or right window (only asked on tiles that cross it), below the left
    window (j < i + lo_off, likewise), or a False in the bool mask. Returns (s, dcap): dcap = 1 - tanh^2, the
    cap's derivative, under SOFTCAP (else s again, unused)."""
    dcap = s
    if SOFTCAP:  # tanh(|x|) = (1 - e) / (1 + e), e = 2^(-2 log2(e) |x|): no overflow; a fast division (an IEEE
        # one per element took ~20 registers more and spilled the dK/dV tiles)
        e = tl.math.exp2(tl.abs(s) * ((-2.0 * LOG2E) / cap))
        t = tl.math.fdiv(1.0 - e, 1.0 + e)
        dcap = 1.0 - t * t
        s = tl.where(s < 0, -cap, cap) * t
    ok = (i2 < Lq) & (j2 < Lk)
    if CAUSAL_TILE:
        ok = ok & (j2 <= i2 + causal_off)
    if WINDOW_TILE:
        ok = ok & (j2 >= i2 + lo_off)
    if MASK_KIND == MASK_BOOL:
        keep = tl.load(p_mask + i2 * stride_mi + j2 * stride_mj, mask=ok, other=0)
        ok = ok & (keep != 0)
    if MASK_KIND == MASK_BIAS:
        bias = tl.load(p_mask + i2 * stride_mi + j2 * stride_mj, mask=ok, other=0.0).to(tl.float32)
        s = s + bias * LOG2E
    if ALIBI:  # distance to the bottom-right diagonal
        s = s - slope2 * tl.abs(i2 + (Lk - Lq) - j2).to(tl.float32)
    return tl.where(ok, s, float("-inf")), dcap


@triton.jit
def _dropout_kept(offs_m, start_n, b, h, SEED, drop_thr, BLOCK_N: tl.constexpr, KEYS_ON_ROWS: tl.constexpr):
    """Dropout's verdicts (1.0 kept, 0.0 dropped) on the tile of query rows offs_m and keys start_n + [0, BLOCK_N):
    [BLOCK_M, BLOCK_N], or [BLOCK_N, BLOCK_M] with KEYS_ON_ROWS (the dK/dV kernel's transposed tiles). Key j of row i
    takes word j % 4 of Philox4x32-10 at counter (j // 4, i, h, b) under key (the seed's low, high 32 bits), kept
    when at least drop_thr (csrc/attention_contract.h's dropout_words and dropout_kept: the same bits). The seed is
    read from SEED, on the device (no host sync)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if KEYS_ON_ROWS:
        i2 = offs_m[None, :]
        j2 = offs_n[:, None]
    else:
        i2 = offs_m[:, None]
        j2 = offs_n[None, :]
    seed = tl.load(SEED).to(tl.int64)
    k0 = seed.to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    zero = (i2 * 0 + j2 * 0).to(tl.uint32)
    c0 = zero + (j2 >> 2).to(tl.uint32)
    c1 = zero + i2.to(tl.uint32)
    c2 = zero + h.to(tl.uint32)
    c3 = zero + b.to(tl.uint32)
    for _ in tl.static_range(10):
        c0_, c2_ = c0, c2
        c0 = tl.umulhi(c2_, PHILOX_M1) ^ c1 ^ k0
        c2 = tl.umulhi(c0_, PHILOX_M0) ^ c3 ^ k1
        c1 = c2_ * PHILOX_M1
        c3 = c0_ * PHILOX_M0
        k0 = k0 + PHILOX_W0
        k1 = k1 + PHILOX_W1
    t = j2 & 3
    w = tl.where(t == 0, c0, tl.where(t == 1, c1, tl.where(t == 2, c2, c3)))
    return tl.where(w.to(tl.int64) >= drop_thr, 1.0, 0.0)


@triton.jit
def _alibi_slope2(ALIBI, b, h, stride_ab, stride_ah, HAS_ALIBI: tl.constexpr):
    """ALiBi's slope of (b, h) times log2(e); 0 without slopes."""
    if HAS_ALIBI:
        return tl.load(ALIBI + b * stride_ab + h * stride_ah).to(tl.float32) * LOG2E
    else:
        return 0.0


@triton.jit
def _causal_bounds_q(start_m, Lk, causal_off, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For the query tile at start_m: keys [0, mid) are visible to all its rows (no causal mask),
    keys [mid, hi) cross the diagonal (masked tile by tile), keys >= hi are skipped."""
    hi = tl.maximum(tl.minimum(Lk, start_m + BLOCK_M + causal_off), 0)
    mid = (tl.maximum(start_m + causal_off + 1, 0) // BLOCK_N) * BLOCK_N
    return tl.minimum(mid, hi), hi


@triton.jit
def _band_keys_q(start_m, Lk, causal_off, lo_off, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The key tiles [lo, hi) the query tile at start_m sees, the others skipped: from the first row's left window
    edge (WINDOWED) to the last row's causal diagonal or right window (CAUSAL)."""
    hi = Lk
    if CAUSAL:
        _, hi = _causal_bounds_q(start_m, Lk, causal_off, BLOCK_M, BLOCK_N)
    lo = hi * 0
    if WINDOWED:
        lo = tl.minimum((tl.maximum(start_m + lo_off, 0) // BLOCK_N) * BLOCK_N, hi)
    return lo, hi


@triton.jit
def _seq_rows(CU, b):
    """Packed sequence b's first row (int64) and length: rows [cu[b], cu[b+1]) of cu_seqlens."""
    row0 = tl.load(CU + b)
    return row0.to(tl.int64), tl.load(CU + b + 1) - row0


@triton.jit
def _seq_extent(CU_Q, CU_K, b, causal_code):
    """Packed sequence b's first query / key rows, lengths and causal offset (seq_extent of
    csrc/attention_contract.h): bottom_right sees keys j <= i + Lk_b - Lq_b, top_left j <= i."""
    q0, Lq = _seq_rows(CU_Q, b)
    k0, Lk = _seq_rows(CU_K, b)
    return q0, k0, Lq, Lk, tl.where(causal_code == CAUSAL_BR, Lk - Lq, 0)


@triton.jit
def _slice_rows(s, stride_os, stride_ls, VARLEN: tl.constexpr):
    """The first row of a program's slice s of its out-shaped outputs (in rows) and of its lse-shaped ones (see
    _out_rows). lse (B, Hq, Lq) holds one value per row of (B, Hq, Lq, X): the same offset, one product (the
    forward's 128 x 64 tile had no register left for a second: a spill at D 128, sm_90); packed (Hq, total_q)
    has its own."""
    o_row0 = s * stride_os
    if VARLEN:
        return o_row0, s * stride_ls
    else:
        return o_row0, o_row0


# ------------------------------------------------------------------------------------------ forward
@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, p_k, p_v, p_mask, offs_m, offs_d, offs_dv, lo, hi,
               Lq, Lk, D, Dv, stride_kn, stride_vn, stride_mi, stride_mj, scale_log2, causal_off, lo_off, cap, slope2,
               b, h, SEED, drop_thr,
               MASK_KIND: tl.constexpr, CAUSAL_TILE: tl.constexpr, WINDOW_TILE: tl.constexpr, SOFTCAP: tl.constexpr,
               ALIBI: tl.constexpr, DROPOUT: tl.constexpr, SPLIT_P: tl.constexpr, BLOCK_N: tl.constexpr,
               DOT_PREC: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        # -- scores S = Q K^T, in log2 units   [BLOCK_M, BLOCK_N]
        kT = tl.load(p_k + offs_n[None, :] * stride_kn + offs_d[:, None],
                     mask=(offs_n[None, :] < Lk) & (offs_d[:, None] < D), other=0.0)     # [BLOCK_D, BLOCK_N]
        s = dot_acc(q, kT, None, DOT_PREC) * scale_log2
        s, _ = _mask_scores(s, p_mask, offs_m[:, None], offs_n[None, :], Lq, Lk, stride_mi, stride_mj, causal_off,
                            lo_off, cap, slope2, MASK_KIND, CAUSAL_TILE, WINDOW_TILE, SOFTCAP, ALIBI)
        # -- online softmax update
        p, corr, l_i, m_i = online_softmax_step(s, m_i, l_i)
        if DROPOUT:  # the weights P V takes (l_i keeps the undropped sum; 1 / (1 - p) comes in the epilogue)
            p = p * _dropout_kept(offs_m, start_n, b, h, SEED, drop_thr, BLOCK_N, False)
        # -- O += P V   [BLOCK_M, BLOCK_DV]
        v = tl.load(p_v + offs_n[:, None] * stride_vn + offs_dv[None, :],
                    mask=(offs_n[:, None] < Lk) & (offs_dv[None, :] < Dv), other=0.0)    # [BLOCK_N, BLOCK_DV]
        p_hi = cast_rne(p, v.dtype)
        acc = dot_acc(p_hi, v, acc * corr[:, None], DOT_PREC)
        if SPLIT_P:  # + (P - P_hi) V: P to ~16 bits, not 8 (bf16) / 11 (fp16); see the module docstring
            acc = dot_acc(cast_rne(p - p_hi.to(tl.float32), v.dtype), v, acc, DOT_PREC)
    return acc, l_i, m_i


@triton.autotune(configs=C.FWD_CONFIGS, key=["LQ_KEY", "LK_KEY", "BLOCK_D", "BLOCK_DV", "MASK_KIND", "CAUSAL",
                                             "HAS_GATE", "STORE_ACC", "SPLIT_P", "VARLEN", "WINDOWED", "SOFTCAP",
                                             "HAS_ALIBI", "DROPOUT"],
                 prune_configs_by={"early_config_prune": C.prune_fwd})
@triton.jit
def _attn_fwd(Q, K, V, MASK, GATE, OUT, LSE, OUT_ACC, CU_Q, CU_K, ALIBI, SEED,
              stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
              stride_mb, stride_mh, stride_mi, stride_mj, stride_gb, stride_gh, stride_gi, stride_gc,
              stride_os, stride_om, stride_ls, stride_ab, stride_ah,
              Hq, GROUP, Lq, Lk, D, Dv, scale_log2, causal_off, lo_off, cap, drop_thr, drop_scale, LQ_KEY, LK_KEY,
              MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, HAS_GATE: tl.constexpr, STORE_ACC: tl.constexpr,
              SPLIT_P: tl.constexpr, VARLEN: tl.constexpr, WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr,
              HAS_ALIBI: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
              DOT_PREC: tl.constexpr, ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """OUT, OUT_ACC: slice and row strides stride_os, stride_om in rows of Dv; LSE: slice stride stride_ls when
    packed (see _out_rows). Score modifiers (_mask_scores): CAUSAL bounds keys from above (the causal rule, a
    right window or both: causal_off), WINDOWED from below (lo_off); SOFTCAP caps at cap; HAS_ALIBI reads the
    slopes ALIBI[b * stride_ab + h * stride_ah]. Packed sequences take none of them. DROPOUT drops the weights
    _dropout_kept drops (the seed at SEED, threshold drop_thr) and scales the output by drop_scale."""
    # torch.compile types a Python float argument fp64 (triton's launcher: fp32): the math stays fp32
    scale_log2 = tl.cast(scale_log2, tl.float32)
    cap = tl.cast(cap, tl.float32)
    drop_scale = tl.cast(drop_scale, tl.float32)
    D, Dv = assume_aligned(D, ALIGN), assume_aligned(Dv, ALIGN)
    stride_qb, stride_qh, stride_qm = assume_aligned3(stride_qb, stride_qh, stride_qm, ALIGN)
    stride_kb, stride_kh, stride_kn = assume_aligned3(stride_kb, stride_kh, stride_kn, ALIGN)
    stride_vb, stride_vh, stride_vn = assume_aligned3(stride_vb, stride_vh, stride_vn, ALIGN)
    pid_m, pid_bh = grid_tile(tl.cdiv(Lq, BLOCK_M), CAUSAL)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    # GQA / MQA: kv head shared by GROUP query heads (divided in 32 bits: a 64-bit division is a call
    # into ptxas's runtime, with a stack frame)
    hk = ((pid_bh % Hq) // GROUP).to(tl.int64)
    start_m = pid_m * BLOCK_M
    o_slice = pid_bh.to(tl.int64)   # of OUT, OUT_ACC, LSE (see _out_rows)
    if VARLEN:  # packed sequences (batch strides 0): sequence b's rows; tiles past its length have no work
        q0, k0, Lq, Lk, causal_off = _seq_extent(CU_Q, CU_K, b, causal_off)
        if start_m >= Lq:
            return
        o_slice = h
        Q += q0 * stride_qm
        K += k0 * stride_kn
        V += k0 * stride_vn
        GATE += q0 * stride_gi
        OUT += q0 * stride_om * Dv
        OUT_ACC += q0 * stride_om * Dv
        LSE += q0
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    p_k = K + b * stride_kb + hk * stride_kh
    p_v = V + b * stride_vb + hk * stride_vh
    p_mask = MASK + b * stride_mb + h * stride_mh
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < D), other=0.0)            # [BLOCK_M, BLOCK_D]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    slope2 = _alibi_slope2(ALIBI, b, h, stride_ab, stride_ah, HAS_ALIBI)
    if WINDOWED or SOFTCAP:
        # one loop, every tile it visits masked, where the causal split takes two: with the cap's registers or the
        # window's bounds those spilled (sm_80 D 64, sm_90 D 128: 12-104 B; the backward kernels likewise)
        lo, hi = _band_keys_q(start_m, Lk, causal_off, lo_off, CAUSAL, WINDOWED, BLOCK_M, BLOCK_N)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, p_k, p_v, p_mask, offs_m, offs_d, offs_dv, lo, hi,
                                   Lq, Lk, D, Dv, stride_kn, stride_vn, stride_mi, stride_mj, scale_log2, causal_off,
                                   lo_off, cap, slope2, b, h, SEED, drop_thr, MASK_KIND, CAUSAL, WINDOWED, SOFTCAP,
                                   HAS_ALIBI, DROPOUT, SPLIT_P, BLOCK_N, DOT_PREC)
    elif CAUSAL:
        mid, hi = _causal_bounds_q(start_m, Lk, causal_off, BLOCK_M, BLOCK_N)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, p_k, p_v, p_mask, offs_m, offs_d, offs_dv, 0, mid,
                                   Lq, Lk, D, Dv, stride_kn, stride_vn, stride_mi, stride_mj, scale_log2, causal_off,
                                   lo_off, cap, slope2, b, h, SEED, drop_thr, MASK_KIND, False, False, SOFTCAP,
                                   HAS_ALIBI, DROPOUT, SPLIT_P, BLOCK_N, DOT_PREC)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, p_k, p_v, p_mask, offs_m, offs_d, offs_dv, mid, hi,
                                   Lq, Lk, D, Dv, stride_kn, stride_vn, stride_mi, stride_mj, scale_log2, causal_off,
                                   lo_off, cap, slope2, b, h, SEED, drop_thr, MASK_KIND, True, False, SOFTCAP,
                                   HAS_ALIBI, DROPOUT, SPLIT_P, BLOCK_N, DOT_PREC)
    else:
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, p_k, p_v, p_mask, offs_m, offs_d, offs_dv, 0, Lk,
                                   Lq, Lk, D, Dv, stride_kn, stride_vn, stride_mi, stride_mj, scale_log2, causal_off,
                                   lo_off, cap, slope2, b, h, SEED, drop_thr, MASK_KIND, False, False, SOFTCAP,
                                   HAS_ALIBI, DROPOUT, SPLIT_P, BLOCK_N, DOT_PREC)

    # -- epilogue: normalise, lse (log2 units), output gate; empty rows give 0 and -inf
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    if DROPOUT:  # kept weights times 1 / (1 - p) (0 for p = 1)
        o = o * drop_scale
    o = tl.where(empty[:, None], 0.0, o)  # exactly 0, also where a masked value is NaN
    lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(l_safe))  # log2 units (the op's contract)
    m_row = offs_m < Lq
    m_o = m_row[:, None] & (offs_dv[None, :] < Dv)
    if HAS_GATE:
        g = tl.load(GATE + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gi + offs_dv[None, :] * stride_gc,
                    mask=m_o, other=0.0).to(tl.float32)
        o = o * tl.sigmoid(g)
    o_row0, l_row0 = _slice_rows(o_slice, stride_os, stride_ls, VARLEN)
    p_o = (o_row0 + offs_m[:, None] * stride_om) * Dv + offs_dv[None, :]
    tl.store(OUT + p_o, cast_rne(o, OUT.dtype.element_ty), mask=m_o)
    if STORE_ACC:  # half inputs: the fp32 tile just rounded into OUT, for the backward's delta
        tl.store(OUT_ACC + p_o, o, mask=m_o)
    tl.store(LSE + l_row0 + offs_m, lse, mask=m_row)


@triton.jit
def _gate_rows(OUT_ACC, GATE, OUT, R, N1, N2, stride_g0, stride_g1, stride_g2, stride_gc, Dv,
               BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr):
    """The output gate of a forward launched without it (configs.gate_after_forward): out_acc *= sigmoid(gate)
    and out = out_acc rounded, the epilogue's arithmetic on the fp32 tile it stored, so the results are the
    fused launch's bit for bit. Rows r of the contiguous outputs (R of them, Dv wide) are (i0, i1, i2) of the
    gate's first three dims (N1, N2 the last two; packed (total, H, Dv): (0, t, h))."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_DV)
    i2 = r % N2
    i1 = (r // N2) % N1
    i0 = r // N2 // N1
    m = (r < R)[:, None] & (c < Dv)[None, :]
    p = r[:, None] * Dv + c[None, :]
    g = tl.load(GATE + (i0 * stride_g0 + i1 * stride_g1 + i2 * stride_g2)[:, None] + c[None, :] * stride_gc,
                mask=m, other=0.0).to(tl.float32)
    o = tl.load(OUT_ACC + p, mask=m, other=0.0) * tl.sigmoid(g)
    tl.store(OUT_ACC + p, o, mask=m)
    tl.store(OUT + p, cast_rne(o, OUT.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------------------- backward
@triton.jit
def _attn_bwd_prep(OUT, DOUT, GATE, DLSE, LSE, DELTA, DO_GATED, DGATE, CU_Q,
                   stride_db, stride_dh, stride_dm, stride_gb, stride_gh, stride_gi, stride_gc,
                   stride_os, stride_om, stride_ls,
                   Hq, Lq, Dv,
                   HAS_GATE: tl.constexpr, HAS_DLSE: tl.constexpr, ROUNDED_DO: tl.constexpr,
                   HEADWISE: tl.constexpr, VARLEN: tl.constexpr, ALIGN: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_DV: tl.constexpr):
    """OUT, DO_GATED and DGATE have the layout of _attn_fwd's OUT (a headwise DGATE one value a row), LSE, DLSE and
    DELTA that of its LSE."""
    Dv = assume_aligned(Dv, ALIGN)
    stride_db, stride_dh, stride_dm = assume_aligned3(stride_db, stride_dh, stride_dm, ALIGN)
    pid_m, pid_bh = grid_tile(tl.cdiv(Lq, BLOCK_M), False)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    start_m = pid_m * BLOCK_M
    # first rows of the program's slice: o_row0 of OUT, DO_GATED, DGATE (in rows, see _out_rows), row0 of LSE, DLSE,
    # DELTA (one value per row of out, as in _slice_rows), and those of DOUT and GATE. Packed, the sequence's first
    # row is added to these rather than to eight base pointers (kernel arguments cost no registers, the pointers
    # would: a spill at fp32 D 128 on sm_80)
    o_row0 = pid_bh.to(tl.int64) * stride_os
    row0 = o_row0
    do_row0 = b * stride_db + h * stride_dh
    g_row0 = b * stride_gb + h * stride_gh
    if VARLEN:  # as in _attn_fwd
        q0, Lq = _seq_rows(CU_Q, b)
        if start_m >= Lq:
            return
        o_row0 = h * stride_os + q0 * stride_om
        row0 = h * stride_ls + q0
        do_row0 += q0 * stride_dm
        g_row0 += q0 * stride_gi
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_row = offs_m < Lq
    m_o = m_row[:, None] & (offs_dv[None, :] < Dv)
    p_row = (o_row0 + offs_m[:, None] * stride_om) * Dv + offs_dv[None, :]   # of OUT, DO_GATED
    o = tl.load(OUT + p_row, mask=m_o, other=0.0).to(tl.float32)
    do = tl.load(DOUT + do_row0 + offs_m[:, None] * stride_dm + offs_dv[None, :], mask=m_o, other=0.0).to(tl.float32)
    # -- delta = rowsum(dO * O) - dlse, with O ungated and dO = dO' * sig(g) as the dots will read it (rounded
    # to q's dtype): rowsum(dS) = rowsum(P * (dP - delta)) is then 0 up to fp32 sums, which keeps exact zeros
    # of dq (repeated keys, saturated rows). O is the forward's unrounded out_acc for half inputs. dlse is the
    # gradient of the log2-unit lse, so dL/d(natural lse) = dlse * LOG2E.
    if HAS_GATE:
        g = tl.load(GATE + g_row0 + offs_m[:, None] * stride_gi + offs_dv[None, :] * stride_gc, mask=m_o,
                    other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        # a row with no allowed key passes no gradient to v, even through a NaN gate (P = 0, but 0 * NaN
        # inside the dV dot would be NaN)
        empty = tl.load(LSE + row0 + offs_m, mask=m_row, other=0.0) == float("-inf")
        do_g = cast_rne(tl.where(empty[:, None], 0.0, do * sig), DO_GATED.dtype.element_ty)
        tl.store(DO_GATED + p_row, do_g, mask=m_o)
        if ROUNDED_DO:  # O = O' / sig (where sig = 0, dO is 0 too and the term is 0)
            delta = tl.sum(tl.where(sig == 0.0, 0.0, do_g.to(tl.float32) * (o / sig)), 1)
        else:           # float32: dO' * O' == (dO' * sig) * O
            delta = tl.sum(o * do, 1)
    else:
        delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + row0 + offs_m, mask=m_row, other=0.0) * LOG2E
    tl.store(DELTA + row0 + offs_m, delta, mask=m_row)
    if HAS_GATE:
        dg = do * o * (1.0 - sig)
        if HEADWISE:  # one logit per row (DGATE is (B, Hq, Lq, 1)): its gradient is the row's fp32 sum
            tl.store(DGATE + o_row0 + offs_m * stride_om,
                     cast_rne(tl.sum(tl.where(m_o, dg, 0.0), 1), DGATE.dtype.element_ty), mask=m_row)
        else:         # DGATE has OUT's shape and strides
            tl.store(DGATE + p_row, cast_rne(dg, DGATE.dtype.element_ty), mask=m_o)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, MASK, ALIBI, b, h0, GROUP, q_slice0, start_n_k, offs_n, offs_d, offs_dv,
                lo, hi,
                Lq, Lk, D, Dv, stride_qb, stride_qh, stride_qm, stride_dob, stride_doh, stride_dom,
                stride_mb, stride_mh, stride_mi, stride_mj, stride_ls, stride_ab, stride_ah, scale_log2, causal_off,
                lo_off, cap, SEED, drop_thr, drop_scale, MASK_KIND: tl.constexpr, CAUSAL_TILE: tl.constexpr,
                WINDOW_TILE: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, DROPOUT: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    # Transposed orientation (keys along rows): the tiles dK += dS^T Q and dV += P^T dO need no transposes.
    # One flat loop over (query head h0 + g of the GQA group, query tile in [lo, hi)), pipelined as a whole:
    # a loop over heads around the loop over tiles needed ~50 more registers and spilled (GQA + mask +
    # causal, scripts/check_triton_aot.py).
    n_m = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_M)
    for it in range(0, GROUP * n_m):
        g = it // n_m
        h = h0 + g
        start_m = lo + (it - g * n_m) * BLOCK_M
        row0 = (q_slice0 + h) * stride_ls
        p_q = Q + b * stride_qb + h * stride_qh
        p_do = DO + b * stride_dob + h * stride_doh
        p_lse = LSE + row0
        p_delta = DELTA + row0
        p_mask = MASK + b * stride_mb + h * stride_mh
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_row = offs_m < Lq
        qT = tl.load(p_q + offs_m[None, :] * stride_qm + offs_d[:, None],
                     mask=m_row[None, :] & (offs_d[:, None] < D), other=0.0)              # [BLOCK_D, BLOCK_M]
        do = tl.load(p_do + offs_m[:, None] * stride_dom + offs_dv[None, :],
                     mask=m_row[:, None] & (offs_dv[None, :] < Dv), other=0.0)           # [BLOCK_M, BLOCK_DV]
        lse = tl.load(p_lse + offs_m, mask=m_row, other=float("-inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse)  # empty row -> P = 0
        delta = tl.load(p_delta + offs_m, mask=m_row, other=0.0)
        # -- recompute P^T = 2^(S^T - lse2)   [BLOCK_N, BLOCK_M]
        sT = dot_acc(k, qT, None, DOT_PREC) * scale_log2
        slope2 = _alibi_slope2(ALIBI, b, h, stride_ab, stride_ah, HAS_ALIBI)
        sT, dcapT = _mask_scores(sT, p_mask, offs_m[None, :], offs_n[:, None], Lq, Lk, stride_mi, stride_mj,
                                 causal_off, lo_off, cap, slope2, MASK_KIND, CAUSAL_TILE, WINDOW_TILE, SOFTCAP,
                                 HAS_ALIBI)
        # masked keys (-inf) get P = 0 and dS = 0 even in a row that a NaN reached (NaN lse / delta)
        pT = tl.where(sT == float("-inf"), 0.0, tl.math.exp2(sT - lse2[None, :]))
        # -- dV += (P Z)^T dO, Z dropout's factors (0 or 1 / (1 - p)), regenerated: P times 0 or 1 here, 1 / (1 - p)
        # in the epilogue (P Z itself may be past float16's range where dV is not)
        if DROPOUT:
            zT = _dropout_kept(offs_m, start_n_k, b, h, SEED, drop_thr, BLOCK_N, True)
            dv = dot_acc(cast_rne(pT * zT, do.dtype), do, dv, DOT_PREC)
            zT = zT * drop_scale
        else:
            dv = dot_acc(cast_rne(pT, do.dtype), do, dv, DOT_PREC)
        if SOFTCAP:  # dS through the cap, folded into P here: one tile fewer alive across the next dot
            pT = pT * dcapT
        # -- dP^T = V dO^T (times Z through dropout), dS^T = P^T * (dP^T - delta)
        dpT = dot_acc(v, tl.trans(do), None, DOT_PREC)
        if DROPOUT:
            dpT = dpT * zT
        dsT = tl.where(sT == float("-inf"), 0.0, pT * (dpT - delta[None, :]))
        # -- dK += dS^T Q (scale applied once at the end)
        dk = dot_acc(cast_rne(dsT, qT.dtype), tl.trans(qT), dk, DOT_PREC)
    return dk, dv


@triton.autotune(configs=C.BWD_DKDV_CONFIGS, key=["LQ_KEY", "LK_KEY", "BLOCK_D", "BLOCK_DV", "MASK_KIND", "CAUSAL",
                                                  "VARLEN", "WINDOWED", "SOFTCAP", "HAS_ALIBI", "DROPOUT"],
                 prune_configs_by={"early_config_prune": C.prune_dkdv})
@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, MASK, DK, DV, CU_Q, CU_K, ALIBI, SEED,
                   stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                   stride_dob, stride_doh, stride_dom, stride_mb, stride_mh, stride_mi, stride_mj,
                   stride_ls, stride_dks, stride_dkn, stride_ab, stride_ah,
                   Hq, Hkv, GROUP, Lq, Lk, D, Dv, scale, scale_log2, causal_off, lo_off, cap, drop_thr, drop_scale,
                   LQ_KEY, LK_KEY, MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
                   WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, DROPOUT: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PREC: tl.constexpr, ALIGN: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """DK, DV: slice and row strides stride_dks, stride_dkn in rows of D / Dv (the same for both); LSE, DELTA:
    slice stride stride_ls (see _out_rows). Score modifiers and dropout as _attn_fwd."""
    scale = tl.cast(scale, tl.float32)
    scale_log2 = tl.cast(scale_log2, tl.float32)  # fp32 under torch.compile too (see _attn_fwd)
    cap = tl.cast(cap, tl.float32)
    drop_scale = tl.cast(drop_scale, tl.float32)
    D, Dv = assume_aligned(D, ALIGN), assume_aligned(Dv, ALIGN)
    stride_qb, stride_qh, stride_qm = assume_aligned3(stride_qb, stride_qh, stride_qm, ALIGN)
    stride_kb, stride_kh, stride_kn = assume_aligned3(stride_kb, stride_kh, stride_kn, ALIGN)
    stride_vb, stride_vh, stride_vn = assume_aligned3(stride_vb, stride_vh, stride_vn, ALIGN)
    stride_dob, stride_doh, stride_dom = assume_aligned3(stride_dob, stride_doh, stride_dom, ALIGN)
    pid_n, pid_bk = grid_tile(tl.cdiv(Lk, BLOCK_N), False)
    b = (pid_bk // Hkv).to(tl.int64)
    hk = (pid_bk % Hkv).to(tl.int64)
    start_n = pid_n * BLOCK_N
    kv_slice = pid_bk.to(tl.int64)   # of DK, DV; the query heads' slices of LSE, DELTA are q_slice0 + h
    q_slice0 = b * Hq
    if VARLEN:  # as in _attn_fwd, over the sequence's keys
        q0, k0, Lq, Lk, causal_off = _seq_extent(CU_Q, CU_K, b, causal_off)
        if start_n >= Lk:
            return
        kv_slice = hk
        q_slice0 = 0
        Q += q0 * stride_qm
        DO += q0 * stride_dom
        LSE += q0
        DELTA += q0
        K += k0 * stride_kn
        V += k0 * stride_vn
        DK += k0 * stride_dkn * D
        DV += k0 * stride_dkn * Dv
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_key = offs_n < Lk
    k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=m_key[:, None] & (offs_d[None, :] < D), other=0.0)                   # [BLOCK_N, BLOCK_D]
    v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vn + offs_dv[None, :],
                mask=m_key[:, None] & (offs_dv[None, :] < Dv), other=0.0)                 # [BLOCK_N, BLOCK_DV]
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)

    lo = 0
    mid = 0
    if CAUSAL:
        # first query row that sees key start_n: i >= start_n - off; rows that see the whole key tile:
        # i >= start_n + BLOCK_N - 1 - off. Tiles before lo are skipped, [lo, mid) are diagonal tiles.
        lo = (tl.maximum(start_n - causal_off, 0) // BLOCK_M) * BLOCK_M
        mid = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - causal_off, 0), BLOCK_M) * BLOCK_M
        mid = tl.maximum(tl.minimum(mid, Lq), lo)
    # the GROUP query heads that share this kv head: dK, dV summed in registers
    if WINDOWED or SOFTCAP:
        # one loop, as in _attn_fwd. Rows past q_hi see no key of the tile (j < i + lo_off for every one).
        q_hi = Lq
        if WINDOWED:
            q_hi = tl.minimum(Lq, tl.maximum(start_n + BLOCK_N - lo_off, 0))
        dk, dv = _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, MASK, ALIBI, b, hk * GROUP, GROUP, q_slice0, start_n,
                             offs_n,
                             offs_d, offs_dv, lo, tl.maximum(q_hi, lo), Lq, Lk, D, Dv, stride_qb, stride_qh, stride_qm,
                             stride_dob, stride_doh, stride_dom, stride_mb, stride_mh, stride_mi, stride_mj, stride_ls,
                             stride_ab, stride_ah, scale_log2, causal_off, lo_off, cap, SEED, drop_thr, drop_scale,
                             MASK_KIND, CAUSAL, WINDOWED, SOFTCAP, HAS_ALIBI, DROPOUT, BLOCK_M, BLOCK_N, DOT_PREC)
    elif CAUSAL:
        dk, dv = _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, MASK, ALIBI, b, hk * GROUP, GROUP, q_slice0, start_n,
                             offs_n,
                             offs_d, offs_dv, lo, mid, Lq, Lk, D, Dv, stride_qb, stride_qh, stride_qm, stride_dob,
                             stride_doh, stride_dom, stride_mb, stride_mh, stride_mi, stride_mj, stride_ls, stride_ab,
                             stride_ah, scale_log2, causal_off, lo_off, cap, SEED, drop_thr, drop_scale, MASK_KIND, True,
                             False, SOFTCAP, HAS_ALIBI, DROPOUT, BLOCK_M, BLOCK_N, DOT_PREC)
        dk, dv = _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, MASK, ALIBI, b, hk * GROUP, GROUP, q_slice0, start_n,
                             offs_n,
                             offs_d, offs_dv, mid, Lq, Lq, Lk, D, Dv, stride_qb, stride_qh, stride_qm, stride_dob,
                             stride_doh, stride_dom, stride_mb, stride_mh, stride_mi, stride_mj, stride_ls, stride_ab,
                             stride_ah, scale_log2, causal_off, lo_off, cap, SEED, drop_thr, drop_scale, MASK_KIND,
                             False, False, SOFTCAP, HAS_ALIBI, DROPOUT, BLOCK_M, BLOCK_N, DOT_PREC)
    else:
        dk, dv = _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, MASK, ALIBI, b, hk * GROUP, GROUP, q_slice0, start_n,
                             offs_n,
                             offs_d, offs_dv, 0, Lq, Lq, Lk, D, Dv, stride_qb, stride_qh, stride_qm, stride_dob,
                             stride_doh, stride_dom, stride_mb, stride_mh, stride_mi, stride_mj, stride_ls, stride_ab,
                             stride_ah, scale_log2, causal_off, lo_off, cap, SEED, drop_thr, drop_scale, MASK_KIND,
                             False, False, SOFTCAP, HAS_ALIBI, DROPOUT, BLOCK_M, BLOCK_N, DOT_PREC)

    m_k = m_key[:, None] & (offs_d[None, :] < D)
    m_v = m_key[:, None] & (offs_dv[None, :] < Dv)
    kv_row = kv_slice * stride_dks + offs_n[:, None] * stride_dkn
    tl.store(DK + kv_row * D + offs_d[None, :], cast_rne(dk * scale, DK.dtype.element_ty), mask=m_k)
    if DROPOUT:
        dv = dv * drop_scale
    tl.store(DV + kv_row * Dv + offs_dv[None, :], cast_rne(dv, DV.dtype.element_ty), mask=m_v)


@triton.jit
def _dq_tiles(dq, q, do, lse2, delta, p_k, p_v, p_mask, p_dmask, offs_m, offs_d, offs_dv, lo, hi,
              Lq, Lk, D, Dv, stride_kn, stride_vn, stride_mi, stride_mj, scale_log2, causal_off, lo_off, cap, slope2,
              b, h, SEED, drop_thr, drop_scale,
              MASK_KIND: tl.constexpr, CAUSAL_TILE: tl.constexpr, WINDOW_TILE: tl.constexpr, SOFTCAP: tl.constexpr,
              ALIBI: tl.constexpr, DROPOUT: tl.constexpr, NEED_DMASK: tl.constexpr, SPLIT_DS: tl.constexpr,
              BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        m_key = offs_n < Lk
        kT = tl.load(p_k + offs_n[None, :] * stride_kn + offs_d[:, None],
                     mask=m_key[None, :] & (offs_d[:, None] < D), other=0.0)             # [BLOCK_D, BLOCK_N]
        vT = tl.load(p_v + offs_n[None, :] * stride_vn + offs_dv[:, None],
                     mask=m_key[None, :] & (offs_dv[:, None] < Dv), other=0.0)           # [BLOCK_DV, BLOCK_N]
        # -- recompute P   [BLOCK_M, BLOCK_N]
        s = dot_acc(q, kT, None, DOT_PREC) * scale_log2
        s, dcap = _mask_scores(s, p_mask, offs_m[:, None], offs_n[None, :], Lq, Lk, stride_mi, stride_mj, causal_off,
                               lo_off, cap, slope2, MASK_KIND, CAUSAL_TILE, WINDOW_TILE, SOFTCAP, ALIBI)
        p = tl.where(s == float("-inf"), 0.0, tl.math.exp2(s - lse2[:, None]))  # as in _dkdv_tiles
        if SOFTCAP and not NEED_DMASK:  # dS through the cap, folded into P (as in _dkdv_tiles)
            p = p * dcap
        # -- dP = dO V^T (times dropout's factors Z), dS = P * (dP - delta)
        dp = dot_acc(do, vT, None, DOT_PREC)
        if DROPOUT:
            dp = dp * (_dropout_kept(offs_m, start_n, b, h, SEED, drop_thr, BLOCK_N, False) * drop_scale)
        ds = tl.where(s == float("-inf"), 0.0, p * (dp - delta[:, None]))
        if NEED_DMASK:  # dL/d(bias) = dS (the bias enters the scores with weight 1)
            tl.store(p_dmask + offs_m[:, None] * Lk + offs_n[None, :], cast_rne(ds, p_dmask.dtype.element_ty),
                     mask=(offs_m[:, None] < Lq) & m_key[None, :])
            if SOFTCAP:  # the bias is added past the cap: its gradient is dS before the cap's
                ds = ds * dcap
        # -- dQ += dS K
        ds_hi = cast_rne(ds, kT.dtype)
        dq = dot_acc(ds_hi, tl.trans(kT), dq, DOT_PREC)
        if SPLIT_DS:  # + (dS - dS_hi) K: dS to ~16 bits, not 8 (bf16) / 11 (fp16); see the module docstring
            dq = dot_acc(cast_rne(ds - ds_hi.to(tl.float32), kT.dtype), tl.trans(kT), dq, DOT_PREC)
    return dq


@triton.autotune(configs=C.BWD_DQ_CONFIGS, key=["LQ_KEY", "LK_KEY", "BLOCK_D", "BLOCK_DV", "MASK_KIND", "CAUSAL",
                                                "NEED_DMASK", "SPLIT_DS", "VARLEN", "WINDOWED", "SOFTCAP", "HAS_ALIBI",
                                                "DROPOUT"],
                 prune_configs_by={"early_config_prune": C.prune_dq})
@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, MASK, DQ, DMASK, CU_Q, CU_K, ALIBI, SEED,
                 stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                 stride_dob, stride_doh, stride_dom, stride_mb, stride_mh, stride_mi, stride_mj,
                 stride_ls, stride_dqs, stride_dqm, stride_ab, stride_ah,
                 Hq, GROUP, Lq, Lk, D, Dv, scale, scale_log2, causal_off, lo_off, cap, drop_thr, drop_scale, LQ_KEY,
                 LK_KEY, MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, NEED_DMASK: tl.constexpr,
                 SPLIT_DS: tl.constexpr, VARLEN: tl.constexpr, WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr,
                 HAS_ALIBI: tl.constexpr, DROPOUT: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PREC: tl.constexpr,
                 ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """DQ: slice and row strides stride_dqs, stride_dqm in rows of D; LSE, DELTA: slice stride stride_ls when
    packed (see _out_rows); DMASK (NEED_DMASK): a contiguous (B, Hq, Lq, Lk) dS. Score modifiers and dropout as
    _attn_fwd."""
    scale = tl.cast(scale, tl.float32)
    scale_log2 = tl.cast(scale_log2, tl.float32)  # fp32 under torch.compile too (see _attn_fwd)
    cap = tl.cast(cap, tl.float32)
    drop_scale = tl.cast(drop_scale, tl.float32)
    D, Dv = assume_aligned(D, ALIGN), assume_aligned(Dv, ALIGN)
    stride_qb, stride_qh, stride_qm = assume_aligned3(stride_qb, stride_qh, stride_qm, ALIGN)
    stride_kb, stride_kh, stride_kn = assume_aligned3(stride_kb, stride_kh, stride_kn, ALIGN)
    stride_vb, stride_vh, stride_vn = assume_aligned3(stride_vb, stride_vh, stride_vn, ALIGN)
    stride_dob, stride_doh, stride_dom = assume_aligned3(stride_dob, stride_doh, stride_dom, ALIGN)
    pid_m, pid_bh = grid_tile(tl.cdiv(Lq, BLOCK_M), CAUSAL)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    hk = ((pid_bh % Hq) // GROUP).to(tl.int64)   # in 32 bits, as in _attn_fwd
    start_m = pid_m * BLOCK_M
    q_slice = pid_bh.to(tl.int64)
    if VARLEN:  # as in _attn_fwd
        q0, k0, Lq, Lk, causal_off = _seq_extent(CU_Q, CU_K, b, causal_off)
        if start_m >= Lq:
            return
        q_slice = h
        Q += q0 * stride_qm
        DO += q0 * stride_dom
        LSE += q0
        DELTA += q0
        DQ += q0 * stride_dqm * D
        K += k0 * stride_kn
        V += k0 * stride_vn
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_row = offs_m < Lq
    dq_row0, row0 = _slice_rows(q_slice, stride_dqs, stride_ls, VARLEN)   # row0: of LSE, DELTA

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=m_row[:, None] & (offs_d[None, :] < D), other=0.0)                    # [BLOCK_M, BLOCK_D]
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_dv[None, :],
                 mask=m_row[:, None] & (offs_dv[None, :] < Dv), other=0.0)                 # [BLOCK_M, BLOCK_DV]
    lse = tl.load(LSE + row0 + offs_m, mask=m_row, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse)  # empty row -> P = 0
    delta = tl.load(DELTA + row0 + offs_m, mask=m_row, other=0.0)

    p_k = K + b * stride_kb + hk * stride_kh
    p_v = V + b * stride_vb + hk * stride_vh
    p_mask = MASK + b * stride_mb + h * stride_mh
    p_dmask = DMASK + (pid_bh.to(tl.int64) * Lq) * Lk
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    slope2 = _alibi_slope2(ALIBI, b, h, stride_ab, stride_ah, HAS_ALIBI)
    if WINDOWED or SOFTCAP:  # one loop, as in _attn_fwd
        lo, hi = _band_keys_q(start_m, Lk, causal_off, lo_off, CAUSAL, WINDOWED, BLOCK_M, BLOCK_N)
        dq = _dq_tiles(dq, q, do, lse2, delta, p_k, p_v, p_mask, p_dmask, offs_m, offs_d, offs_dv, lo, hi,
                       Lq, Lk, D, Dv, stride_kn, stride_vn, stride_mi, stride_mj, scale_log2, causal_off, lo_off, cap,
                       slope2, b, h, SEED, drop_thr, drop_scale, MASK_KIND, CAUSAL, WINDOWED, SOFTCAP, HAS_ALIBI,
                       DROPOUT, NEED_DMASK, SPLIT_DS, BLOCK_N, DOT_PREC)
    elif CAUSAL:
        mid, hi = _causal_bounds_q(start_m, Lk, causal_off, BLOCK_M, BLOCK_N)
        dq = _dq_tiles(dq, q, do, lse2, delta, p_k, p_v, p_mask, p_dmask, offs_m, offs_d, offs_dv, 0, mid,
                       Lq, Lk, D, Dv, stride_kn, stride_vn, stride_mi, stride_mj, scale_log2, causal_off, lo_off, cap,
                       slope2, b, h, SEED, drop_thr, drop_scale, MASK_KIND, False, False, SOFTCAP, HAS_ALIBI,
                       DROPOUT, NEED_DMASK, SPLIT_DS, BLOCK_N, DOT_PREC)
        dq = _dq_tiles(dq, q, do, lse2, delta, p_k, p_v, p_mask, p_dmask, offs_m, offs_d, offs_dv, mid, hi,
                       Lq, Lk, D, Dv, stride_kn, stride_vn, stride_mi, stride_mj, scale_log2, causal_off, lo_off, cap,
                       slope2, b, h, SEED, drop_thr, drop_scale, MASK_KIND, True, False, SOFTCAP, HAS_ALIBI,
                       DROPOUT, NEED_DMASK, SPLIT_DS, BLOCK_N, DOT_PREC)
    else:
        dq = _dq_tiles(dq, q, do, lse2, delta, p_k, p_v, p_mask, p_dmask, offs_m, offs_d, offs_dv, 0, Lk,
                       Lq, Lk, D, Dv, stride_kn, stride_vn, stride_mi, stride_mj, scale_log2, causal_off, lo_off, cap,
                       slope2, b, h, SEED, drop_thr, drop_scale, MASK_KIND, False, False, SOFTCAP, HAS_ALIBI,
                       DROPOUT, NEED_DMASK, SPLIT_DS, BLOCK_N, DOT_PREC)
    tl.store(DQ + (dq_row0 + offs_m[:, None] * stride_dqm) * D + offs_d[None, :],
             cast_rne(dq * scale, DQ.dtype.element_ty), mask=m_row[:, None] & (offs_d[None, :] < D))


@triton.jit
def _load_rows(p_q, p_do, p_lse, p_delta, offs_m, offs_d, offs_dv, Lq, D, Dv, stride_qm, stride_dom):
    """Q [BLOCK_M, BLOCK_D] and dO [BLOCK_M, BLOCK_DV] rows, their lse (+inf for an empty row: P = 0) and delta."""
    m_row = offs_m < Lq
    q = tl.load(p_q + offs_m[:, None] * stride_qm + offs_d[None, :], mask=m_row[:, None] & (offs_d[None, :] < D),
                other=0.0)
    do = tl.load(p_do + offs_m[:, None] * stride_dom + offs_dv[None, :],
                 mask=m_row[:, None] & (offs_dv[None, :] < Dv), other=0.0)
    lse = tl.load(p_lse + offs_m, mask=m_row, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse)
    return q, do, lse2, tl.load(p_delta + offs_m, mask=m_row, other=0.0)


@triton.jit
def _load_kv_t(p_k, p_v, offs_n, offs_d, offs_dv, Lk, D, Dv, stride_kn, stride_vn):
    """K^T [BLOCK_D, BLOCK_N] and V^T [BLOCK_DV, BLOCK_N] of keys offs_n (0 past Lk)."""
    m_key = offs_n < Lk
    kT = tl.load(p_k + offs_n[None, :] * stride_kn + offs_d[:, None], mask=m_key[None, :] & (offs_d[:, None] < D),
                 other=0.0)
    vT = tl.load(p_v + offs_n[None, :] * stride_vn + offs_dv[:, None], mask=m_key[None, :] & (offs_dv[:, None] < Dv),
                 other=0.0)
    return kT, vT


@triton.jit
def _dmask_tile(acc, q, do, lse2, delta, kT, vT, p_mask, offs_m, start_n, offs_n, Lq, Lk, stride_mi, stride_mj,
                scale_log2, causal_off, lo_off, cap, slope2, b, h, SEED, drop_thr, drop_scale, CAUSAL: tl.constexpr,
                WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DROPOUT: tl.constexpr,
                BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    """acc + dS of one (query tile, key tile), computed exactly as in _dq_tiles (0 where masked): the gradient of the
    bias, which the scores take past the cap."""
    s = dot_acc(q, kT, None, DOT_PREC) * scale_log2
    s, _ = _mask_scores(s, p_mask, offs_m[:, None], offs_n[None, :], Lq, Lk, stride_mi, stride_mj, causal_off,
                        lo_off, cap, slope2, 2, CAUSAL, WINDOWED, SOFTCAP, ALIBI)
    p = tl.where(s == float("-inf"), 0.0, tl.math.exp2(s - lse2[:, None]))
    dp = dot_acc(do, vT, None, DOT_PREC)
    if DROPOUT:
        dp = dp * (_dropout_kept(offs_m, start_n, b, h, SEED, drop_thr, BLOCK_N, False) * drop_scale)
    return acc + tl.where(s == float("-inf"), 0.0, p * (dp - delta[:, None]))


@triton.autotune(configs=C.BWD_DMASK_CONFIGS, key=["LQ_KEY", "LK_KEY", "BLOCK_D", "BLOCK_DV", "CAUSAL", "BCAST_Q",
                                                   "BCAST_K", "WINDOWED", "SOFTCAP", "HAS_ALIBI", "DROPOUT"],
                 prune_configs_by={"early_config_prune": C.prune_dmask})
@triton.jit
def _attn_bwd_dmask(Q, K, V, DO, LSE, DELTA, MASK, DMASK, ALIBI, SEED,
                    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                    stride_dob, stride_doh, stride_dom, stride_mb, stride_mh, stride_mi, stride_mj,
                    stride_db, stride_dh, stride_di, stride_ab, stride_ah,
                    Hq, GROUP, Lq, Lk, D, Dv, scale_log2, causal_off, lo_off, cap, drop_thr, drop_scale, HM, LKM,
                    NSLICES, NB, NH, LQ_KEY, LK_KEY, CAUSAL: tl.constexpr, BCAST_Q: tl.constexpr,
                    BCAST_K: tl.constexpr, WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                    DROPOUT: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PREC: tl.constexpr, ALIGN: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dL/dmask of a broadcast float mask (B', H', Lq', Lk'), contiguous in DMASK. Program (tile, b' * H' + h')
    owns rows [BLOCK_M] x keys [BLOCK_N] of the mask (one row / one key when that dim is broadcast) and sums
    dS over the NB batch items b' + [0, NB) and NH heads h' + [0, NH) that read it (NB = B when B' = 1, else
    1; NH likewise), over all query tiles when BCAST_Q (Lq' = 1 < Lq) and all key tiles when BCAST_K
    (Lk' = 1 < Lk), in one fp32 register tile, in a fixed order; one store at the end. Score modifiers as
    _attn_fwd; a left window masks every tile (none is skipped for it). Dropout as _attn_fwd."""
    scale_log2 = tl.cast(scale_log2, tl.float32)  # fp32 under torch.compile too (see _attn_fwd)
    cap = tl.cast(cap, tl.float32)
    drop_scale = tl.cast(drop_scale, tl.float32)
    D, Dv = assume_aligned(D, ALIGN), assume_aligned(Dv, ALIGN)
    stride_qb, stride_qh, stride_qm = assume_aligned3(stride_qb, stride_qh, stride_qm, ALIGN)
    stride_kb, stride_kh, stride_kn = assume_aligned3(stride_kb, stride_kh, stride_kn, ALIGN)
    stride_vb, stride_vh, stride_vn = assume_aligned3(stride_vb, stride_vh, stride_vn, ALIGN)
    stride_dob, stride_doh, stride_dom = assume_aligned3(stride_dob, stride_doh, stride_dom, ALIGN)
    n_tiles_k = tl.cdiv(LKM, BLOCK_N)
    pid_m = tl.program_id(0) // n_tiles_k
    pid_n = tl.program_id(0) % n_tiles_k
    # slices (b' * H' + h') on the grid's second axis, the ones past its 65535 on the third
    pid_bh = tl.program_id(1) + tl.program_id(2) * tl.num_programs(1)
    if pid_bh >= NSLICES:
        return
    bm = pid_bh // HM                                  # the mask's own batch / head index
    hm = pid_bh % HM
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    if BCAST_Q:
        m_lo = 0
        m_hi = Lq
    else:
        m_lo = pid_m * BLOCK_M
        m_hi = m_lo + BLOCK_M
    if BCAST_K:
        n_lo = 0
        n_hi = Lk
    else:
        n_lo = pid_n * BLOCK_N
        n_hi = n_lo + BLOCK_N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)     # entries never reached (skipped tiles, empty loops) stay 0
    for bi in range(NB):
        b = (bm + bi).to(tl.int64)
        for hi_ in range(NH):
            h = (hm + hi_).to(tl.int64)
            hk = ((hm + hi_) // GROUP).to(tl.int64)   # GQA / MQA, in 32 bits as in _attn_fwd
            row0 = (b * Hq + h) * Lq
            p_q = Q + b * stride_qb + h * stride_qh
            p_do = DO + b * stride_dob + h * stride_doh
            p_k = K + b * stride_kb + hk * stride_kh
            p_v = V + b * stride_vb + hk * stride_vh
            p_mask = MASK + b * stride_mb + h * stride_mh
            slope2 = _alibi_slope2(ALIBI, b, h, stride_ab, stride_ah, HAS_ALIBI)
            if BCAST_Q and not BCAST_K:
                # one key tile against every query tile: K, V loaded once per head
                offs_n = n_lo + tl.arange(0, BLOCK_N)
                m_key = offs_n < Lk
                kT, vT = _load_kv_t(p_k, p_v, offs_n, offs_d, offs_dv, Lk, D, Dv, stride_kn, stride_vn)
                m_start = m_lo
                if CAUSAL:  # query tiles wholly above this key tile's diagonal see none of its keys
                    m_start = (tl.maximum(n_lo - causal_off, 0) // BLOCK_M) * BLOCK_M
                for start_m in range(m_start, m_hi, BLOCK_M):
                    offs_m = start_m + tl.arange(0, BLOCK_M)
                    q, do, lse2, delta = _load_rows(p_q, p_do, LSE + row0, DELTA + row0, offs_m, offs_d, offs_dv,
                                                    Lq, D, Dv, stride_qm, stride_dom)
                    acc = _dmask_tile(acc, q, do, lse2, delta, kT, vT, p_mask, offs_m, n_lo, offs_n, Lq, Lk,
                                      stride_mi, stride_mj, scale_log2, causal_off, lo_off, cap, slope2, b, h, SEED,
                                      drop_thr, drop_scale, CAUSAL, WINDOWED, SOFTCAP, HAS_ALIBI, DROPOUT, BLOCK_N,
                                      DOT_PREC)
            else:
                for start_m in range(m_lo, m_hi, BLOCK_M):
                    offs_m = start_m + tl.arange(0, BLOCK_M)
                    q, do, lse2, delta = _load_rows(p_q, p_do, LSE + row0, DELTA + row0, offs_m, offs_d, offs_dv,
                                                    Lq, D, Dv, stride_qm, stride_dom)
                    n_end = n_hi
                    if CAUSAL:  # key tiles past the diagonal are skipped (dS = 0 there)
                        _, hi = _causal_bounds_q(start_m, Lk, causal_off, BLOCK_M, BLOCK_N)
                        n_end = tl.minimum(n_hi, hi)
                    for start_n in range(n_lo, n_end, BLOCK_N):
                        offs_n = start_n + tl.arange(0, BLOCK_N)
                        kT, vT = _load_kv_t(p_k, p_v, offs_n, offs_d, offs_dv, Lk, D, Dv, stride_kn, stride_vn)
                        acc = _dmask_tile(acc, q, do, lse2, delta, kT, vT, p_mask, offs_m, start_n, offs_n, Lq, Lk,
                                          stride_mi, stride_mj, scale_log2, causal_off, lo_off, cap, slope2, b, h,
                                          SEED, drop_thr, drop_scale, CAUSAL, WINDOWED, SOFTCAP, HAS_ALIBI, DROPOUT,
                                          BLOCK_N, DOT_PREC)

    # -- reduce over the broadcast query / key axis, round once, store the program's own entries
    p_out = DMASK + bm.to(tl.int64) * stride_db + hm.to(tl.int64) * stride_dh
    if BCAST_Q and BCAST_K:
        total = tl.sum(tl.sum(acc, 1), 0)
        tl.store(p_out, cast_rne(total, DMASK.dtype.element_ty))
    elif BCAST_Q:
        offs_n = n_lo + tl.arange(0, BLOCK_N)
        tl.store(p_out + offs_n, cast_rne(tl.sum(acc, 0), DMASK.dtype.element_ty), mask=offs_n < Lk)
    elif BCAST_K:
        offs_m = m_lo + tl.arange(0, BLOCK_M)
        tl.store(p_out + offs_m * stride_di, cast_rne(tl.sum(acc, 1), DMASK.dtype.element_ty), mask=offs_m < Lq)
    else:
        offs_m = m_lo + tl.arange(0, BLOCK_M)
        offs_n = n_lo + tl.arange(0, BLOCK_N)
        tl.store(p_out + offs_m[:, None] * stride_di + offs_n[None, :], cast_rne(acc, DMASK.dtype.element_ty),
                 mask=(offs_m[:, None] < Lq) & (offs_n[None, :] < Lk))


# ---------------------------------------------------------------------------------------- launchers
# The launchers serve attention_* (q (B, Hq, Lq, D), ...) and varlen_attention_* (packed: q (total_q, Hq, D), ...)
# alike. ``packed`` is None for the former, (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) for the
# latter: the kernels then run with VARLEN, batch strides 0 and the launch lengths max_seqlen.
def _rows(t, packed):
    """(batch, head, row) strides of t as the kernels step them: (B, H, L, ...), or packed (total, H, ...) with batch
    stride 0 (a program finds its sequence's first row in cu_seqlens)."""
    return (0, t.stride(1), t.stride(0)) if packed else (t.stride(0), t.stride(1), t.stride(2))


def _out_rows(t, packed):
    """(slice, row) strides, in rows of its last dim X, of an output the launcher made contiguous. A program writes
    one slice of it: of (B, H, L, X) the L rows of its (batch, head), slice b * H + h, rows 1 apart; of packed
    (total, H, X) the rows of head h, slice h, rows H apart, from its sequence's first row (cu_seqlens) on. Element
    x of row i is at (slice * ss + i * si) * X + x: for (B, H, L, X) (si = 1, a constant) the arithmetic of a plain
    contiguous output; (batch, head, row) element strides cost registers where the kernels had none to spare
    (spills at D 128 and 256, scripts/check_triton_aot.py)."""
    X = max(t.shape[-1], 1)
    return (t.stride(1) // X, t.stride(0) // X) if packed else (t.stride(1) // X, 1)


def _lse_slice(lse, packed):
    """The slice stride of lse (B, Hq, Lq), or packed (Hq, total_q) (a head's row): slices as in _out_rows, each
    contiguous."""
    return lse.stride(0) if packed else lse.stride(1)


def _gate_strides(gate, packed=None):
    """A headwise (..., 1) gate is read with stride 0 over Dv."""
    return _rows(gate, packed) + ((0,) if gate.shape[-1] == 1 else (gate.stride(-1),))


def _dims(q, k, v, packed):
    """(B, Hq, Hkv, Lq, Lk, D, Dv) of the launch; packed: B sequences of up to max_seqlen_q / _k rows."""
    if packed:
        return packed[0].numel() - 1, q.shape[1], k.shape[1], packed[2], packed[3], q.shape[2], v.shape[2]
    B, Hq, Lq, D = q.shape
    return B, Hq, k.shape[1], Lq, k.shape[2], D, v.shape[3]


def _band(causal, Lq, Lk, packed, mods):
    """The kernels' band of keys: dict(CAUSAL, WINDOWED) and (causal_off, lo_off): query i sees keys j <= i +
    causal_off (CAUSAL: the causal rule, a right window or both) and j >= i + lo_off (WINDOWED), as
    contract.key_band; packed, causal_off is the causal code itself (each sequence's offset comes from its own
    lengths, _seq_extent), and there is no window."""
    if packed:
        return dict(CAUSAL=causal != CAUSAL_NONE, WINDOWED=False), (causal, 0)
    has_hi, hi, has_lo, lo = contract.key_band(Lq, Lk, causal, mods.window_left, mods.window_right)
    return dict(CAUSAL=has_hi, WINDOWED=has_lo), (hi, lo)


def _score_mod_args(mods, q):
    """dict(SOFTCAP, HAS_ALIBI) and the kernels' (ALIBI, stride_ab, stride_ah, cap): the slopes (q where there are
    none; (Hq,) slopes have batch stride 0) and softcap * LOG2E."""
    flags = dict(SOFTCAP=mods.softcap > 0, HAS_ALIBI=mods.alibi_slopes is not None)
    a = mods.alibi_slopes
    if a is None:
        return flags, (q, 0, 0, mods.softcap * contract.LOG2E)
    return flags, (a, a.stride(0) if a.dim() == 2 else 0, a.stride(-1), mods.softcap * contract.LOG2E)


def _dropout_args(dropout, q):
    """dict(DROPOUT) and the kernels' (SEED, drop_thr, drop_scale) for dropout = (dropout_p, seed tensor): the seed
    (q where there is none: never read), the keep threshold and the kept weights' scale (contract's)."""
    p, seed = dropout
    if not p:
        return dict(DROPOUT=False), (q, 0, 1.0)
    return dict(DROPOUT=True), (seed, contract.dropout_threshold(p), contract.dropout_scale(p))


def _check_tensors(op, q, k, v, names=("q", "k", "v")):
    """What every attention launcher needs of q, k, v (any rank): a shared float dtype, head dims up to 256, unit
    stride along the head dim."""
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{op}: {', '.join(names)} must share a dtype among float16, bfloat16, float32, got "
                        f"{q.dtype}, {k.dtype}, {v.dtype}")
    if max(q.shape[-1], v.shape[-1]) > 256:
        raise ValueError(f"{op}: head dims up to 256, got D={q.shape[-1]}, Dv={v.shape[-1]}")
    for n, t in zip(names, (q, k, v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{op}: {n} must have stride(-1) == 1")


def _check_causal(op, causal):
    if causal not in (contract.CAUSAL_NONE, contract.CAUSAL_TOP_LEFT, contract.CAUSAL_BOTTOM_RIGHT):
        raise ValueError(f"{op}: causal must be 0, 1 or 2, got {causal}")


def _check(q, k, v, mask, gate, causal, mods=contract.ScoreMods(), dropout=(0.0, None)):
    """Boundary checks of the op (the public API checks user input; this guards direct op calls)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("triton_attention: q, k, v must be 4-D (B, H, L, D)")
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if k.shape != (B, Hkv, Lk, D) or v.shape[:3] != (B, Hkv, Lk) or Hq % Hkv != 0:
        raise ValueError(f"triton_attention: k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    _check_tensors("triton_attention", q, k, v)
    _check_causal("triton_attention", causal)
    if mask is not None and (mask.dim() != 4 or any(m not in (1, n) for m, n in zip(mask.shape, (B, Hq, Lq, Lk)))):
        raise ValueError(f"triton_attention: mask must be 4-D with each dim 1 or that of {(B, Hq, Lq, Lk)}, "
                         f"got {tuple(mask.shape)}")
    if gate is not None and tuple(gate.shape) not in ((B, Hq, Lq, v.shape[3]), (B, Hq, Lq, 1)):
        raise ValueError(f"triton_attention: gate must be {(B, Hq, Lq, v.shape[3])} or headwise {(B, Hq, Lq, 1)}, "
                         f"got {tuple(gate.shape)}")
    if min(mods.window_left, mods.window_right) < -1:
        raise ValueError(f"triton_attention: window_left and window_right must be >= -1, got {mods[:2]}")
    if not (mods.softcap >= 0 and math.isfinite(mods.softcap)):
        raise ValueError(f"triton_attention: softcap must be finite and >= 0, got {mods.softcap}")
    a = mods.alibi_slopes
    if a is not None and (a.dtype != torch.float32 or tuple(a.shape) not in ((Hq,), (B, Hq)) or a.device != q.device):
        raise ValueError(f"triton_attention: alibi_slopes must be float32 (Hq,) = {(Hq,)} or (B, Hq) = {(B, Hq)} on "
                         f"q's device, got {a.dtype} {tuple(a.shape)} on {a.device}")
    p, seed = dropout
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"triton_attention: dropout_p must be in [0, 1], got {p}")
    if p > 0 and (seed is None or seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != q.device):
        raise ValueError("triton_attention: dropout_p > 0 needs dropout_seed, an int64 tensor of one element on q's "
                         f"device, got {None if seed is None else (seed.dtype, tuple(seed.shape), seed.device)}")


def _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, gate, causal):
    """As _check, for packed sequences (the offsets' values are the caller's: reading them would sync); returns
    ``packed``."""
    op = "triton_varlen_attention"
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"{op}: q, k, v must be 3-D (total, H, D)")
    total_q, Hq, D = q.shape
    total_k, Hkv = k.shape[0], k.shape[1]
    if k.shape[2] != D or v.shape[:2] != (total_k, Hkv) or Hq % Hkv != 0:
        raise ValueError(f"{op}: k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    _check_tensors(op, q, k, v)
    _check_causal(op, causal)
    for n, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1 or not cu.is_contiguous() \
                or cu.device != q.device:
            raise ValueError(f"{op}: {n} must be a contiguous 1-D int32 tensor of B + 1 >= 1 offsets on q's device")
    if cu_seqlens_k.numel() != cu_seqlens_q.numel():
        raise ValueError(f"{op}: cu_seqlens_q and cu_seqlens_k must have the same length")
    if min(max_seqlen_q, max_seqlen_k) < 0:
        raise ValueError(f"{op}: max_seqlen_q / max_seqlen_k must be >= 0")
    if gate is not None and tuple(gate.shape) not in ((total_q, Hq, v.shape[2]), (total_q, Hq, 1)):
        raise ValueError(f"{op}: gate must be {(total_q, Hq, v.shape[2])} or headwise {(total_q, Hq, 1)}, "
                         f"got {tuple(gate.shape)}")
    return cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k


def _mask_args(mask, q):
    """(kind, tensor, 4 strides); a bool mask is passed as it is (Triton reads torch.bool as bytes, and a
    dtype view would stop Inductor from lowering the op), a float mask in q's dtype. A size-1 dim gets
    stride 0: the kernels index it with every b, h, i or j of the scores (broadcast)."""
    if mask is None:
        return contract.MASK_NONE, q, (0, 0, 0, 0)
    strides = tuple(0 if n == 1 else st for n, st in zip(mask.shape, mask.stride()))
    if mask.dtype == torch.bool:
        return contract.MASK_BOOL, mask, strides
    if mask.dtype != q.dtype:
        raise TypeError(f"triton_attention: a float mask must have q's dtype {q.dtype}, got {mask.dtype}")
    return contract.MASK_BIAS, mask, strides


def attention_fwd(q, k, v, mask, gate, scale, causal, need_acc=True, mods=contract.ScoreMods(), dropout=(0.0, None)):
    """dropout: (dropout_p, dropout_seed) as the op's."""
    _check(q, k, v, mask, gate, causal, mods, dropout)
    return _fwd(q, k, v, mask, gate, scale, causal, need_acc, None, mods, dropout)


def varlen_attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, gate, scale, causal,
                         need_acc=True):
    packed = _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, gate, causal)
    return _fwd(q, k, v, None, gate, scale, causal, need_acc, packed)


def attention_bwd(dout, q, k, v, out, lse, mask, gate, dlse, scale, causal, need_dmask, mods=contract.ScoreMods(),
                  dropout=(0.0, None)):
    _check(q, k, v, mask, gate, causal, mods, dropout)
    return _bwd(dout, q, k, v, out, lse, mask, gate, dlse, scale, causal, need_dmask, None, mods, dropout)


def varlen_attention_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, gate, dlse,
                         scale, causal):
    packed = _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, gate, causal)
    dq, dk, dv, _, dgate = _bwd(dout, q, k, v, out, lse, None, gate, dlse, scale, causal, False, packed)
    return dq, dk, dv, dgate


def _fwd(q, k, v, mask, gate, scale, causal, need_acc, packed, mods=contract.ScoreMods(), dropout=(0.0, None)):
    B, Hq, Hkv, Lq, Lk, D, Dv = _dims(q, k, v, packed)
    out = torch.empty(q.shape[:-1] + (Dv,), dtype=q.dtype, device=q.device)
    lse = torch.empty((Hq, q.shape[0]) if packed else (B, Hq, Lq), dtype=torch.float32, device=q.device)
    store_acc = need_acc and has_out_acc(q.dtype)
    out_acc = torch.empty(out.shape, dtype=torch.float32, device=q.device) if store_acc else q.new_empty((0,))
    mask_kind, mask_t, ms = _mask_args(mask, q)
    align = align_elems(q.dtype, (D, Dv), q, k, v)
    gate_after = (gate is not None and store_acc and mask_kind == MASK_NONE
                  and C.gate_after_forward(q, max(C.head_block(D), C.head_block(Dv)), align))
    fused_gate = gate is not None and not gate_after
    gate_t, gs = (gate, _gate_strides(gate, packed)) if fused_gate else (q, (0, 0, 0, 0))
    cu_q, cu_k = packed[:2] if packed else (q, q)
    band, (causal_off, lo_off) = _band(causal, Lq, Lk, packed, mods)
    mod_flags, (alibi, sab, sah, cap) = _score_mod_args(mods, q)
    drop_flag, (seed, drop_thr, drop_scale) = _dropout_args(dropout, q)

    def grid(meta):
        return (triton.cdiv(Lq, meta["BLOCK_M"]) * B * Hq,)

    wrap_triton(_attn_fwd)[grid](
        q, k, v, mask_t, gate_t, out, lse, out_acc if store_acc else out, cu_q, cu_k, alibi, seed,
        *_rows(q, packed), *_rows(k, packed), *_rows(v, packed), *ms, *gs, *_out_rows(out, packed),
        _lse_slice(lse, packed), sab, sah,
        Hq, Hq // Hkv, Lq, Lk, D, Dv, scale * contract.LOG2E, causal_off, lo_off, cap, drop_thr, drop_scale,
        C.length_key(Lq), C.length_key(Lk),
        MASK_KIND=mask_kind, HAS_GATE=fused_gate, STORE_ACC=store_acc,
        SPLIT_P=store_acc and C.PRECISE_PV, VARLEN=packed is not None, **band, **mod_flags, **drop_flag,
        BLOCK_D=C.head_block(D), BLOCK_DV=C.head_block(Dv), DOT_PREC=dot_precision(q.dtype), ALIGN=align)
    if gate_after and out.numel():
        sb, sh, si, sc = _gate_strides(gate, packed)
        # rows (b, h, i) of (B, Hq, Lq, Dv), or (0, t, h) of packed (total, Hq, Dv)
        n1, n2, g = (*out.shape[:2], (0, si, sh)) if packed else (*out.shape[1:3], (sb, sh, si))
        R = out.numel() // max(Dv, 1)
        wrap_triton(_gate_rows)[(triton.cdiv(R, C.GATE_ROWS_BLOCK_R),)](
            out_acc, gate, out, R, n1, n2, *g, sc, Dv,
            BLOCK_R=C.GATE_ROWS_BLOCK_R, BLOCK_DV=C.head_block(Dv), num_warps=C.GATE_ROWS_WARPS)
    return out, lse, out_acc


def _bwd(dout, q, k, v, out, lse, mask, gate, dlse, scale, causal, need_dmask, packed, mods=contract.ScoreMods(),
         dropout=(0.0, None)):
    B, Hq, Hkv, Lq, Lk, D, Dv = _dims(q, k, v, packed)
    mask_kind, mask_t, ms = _mask_args(mask, q)
    if need_dmask and mask_kind != contract.MASK_BIAS:
        raise ValueError("triton_attention_bwd: need_dmask requires a float mask")
    dev = q.device
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    op = "triton_varlen_attention_bwd" if packed else "triton_attention_bwd"
    if tuple(out.shape) != tuple(q.shape[:-1]) + (Dv,):
        raise ValueError(f"{op}: out must be {tuple(q.shape[:-1]) + (Dv,)}, got {tuple(out.shape)}")
    lse_shape = (Hq, q.shape[0]) if packed else (B, Hq, Lq)
    if tuple(lse.shape) != lse_shape:
        raise ValueError(f"{op}: lse must be {lse_shape}, got {tuple(lse.shape)}")
    out = out.contiguous()  # any float dtype (the forward's float32 out_acc, or out): read as fp32
    lse = lse.contiguous()
    dlse_t = dlse.to(torch.float32).contiguous() if dlse is not None else lse
    ls = _lse_slice(lse, packed)    # of lse, dlse and delta alike
    cu_q, cu_k = packed[:2] if packed else (q, q)

    # -- preprocess: delta (and, with a gate, dO = dO' * sig(g) and dgate)
    delta = torch.empty(lse.shape, dtype=torch.float32, device=dev)
    if gate is not None:
        do_gated = torch.empty(out.shape, dtype=q.dtype, device=dev)
        dgate = torch.empty(tuple(gate.shape), dtype=gate.dtype, device=dev)
        gate_t, gs = gate, _gate_strides(gate, packed)
    else:
        do_gated, dgate, gate_t, gs = delta, q.new_empty((0,)), q, (0, 0, 0, 0)
    prep_m = C.prep_block_m(C.head_block(Dv))
    wrap_triton(_attn_bwd_prep)[(triton.cdiv(Lq, prep_m) * B * Hq,)](
        out, dout, gate_t, dlse_t, lse, delta, do_gated, dgate if gate is not None else delta, cu_q,
        *_rows(dout, packed), *gs, *_out_rows(out, packed), ls, Hq, Lq, Dv,
        HAS_GATE=gate is not None, HAS_DLSE=dlse is not None, ROUNDED_DO=q.dtype != torch.float32,
        HEADWISE=gate is not None and gate.shape[-1] == 1 and Dv != 1, VARLEN=packed is not None,
        ALIGN=align_elems(q.dtype, (Dv,), dout), BLOCK_M=prep_m, BLOCK_DV=C.head_block(Dv))
    do = do_gated if gate is not None else dout

    dq = torch.empty(q.shape, dtype=q.dtype, device=dev)
    dk = torch.empty(k.shape, dtype=k.dtype, device=dev)
    dv = torch.empty(v.shape, dtype=v.dtype, device=dev)
    # dmask of a full-shape mask is dS, written by the dQ kernel; entries in skipped (fully masked causal)
    # tiles are never written, so start at 0. A broadcast mask gets its own kernel (see the docstring).
    bcast = need_dmask and tuple(mask.shape) != (B, Hq, Lq, Lk)
    if not need_dmask:
        dmask = q.new_empty((0,))
    elif bcast:
        dmask = torch.empty(tuple(mask.shape), dtype=mask.dtype, device=dev)  # every entry written once
    else:
        dmask = torch.zeros((B, Hq, Lq, Lk), dtype=mask.dtype, device=dev)
    band, (off, lo_off) = _band(causal, Lq, Lk, packed, mods)
    mod_flags, (alibi, sab, sah, cap) = _score_mod_args(mods, q)
    drop_flag, (seed, drop_thr, drop_scale) = _dropout_args(dropout, q)
    common = dict(MASK_KIND=mask_kind, BLOCK_D=C.head_block(D), BLOCK_DV=C.head_block(Dv),
                  DOT_PREC=dot_precision(q.dtype), ALIGN=align_elems(q.dtype, (D, Dv), q, k, v, do), **band, **mod_flags,
                  **drop_flag)
    strides = (*_rows(q, packed), *_rows(k, packed), *_rows(v, packed), *_rows(do, packed), *ms)
    wrap_triton(_attn_bwd_dkdv)[lambda meta: (triton.cdiv(Lk, meta["BLOCK_N"]) * B * Hkv,)](
        q, k, v, do, lse, delta, mask_t, dk, dv, cu_q, cu_k, alibi, seed, *strides, ls, *_out_rows(dk, packed), sab,
        sah, Hq, Hkv, Hq // Hkv, Lq, Lk, D, Dv, scale, scale * contract.LOG2E, off, lo_off, cap, drop_thr, drop_scale,
        C.length_key(Lq), C.length_key(Lk), VARLEN=packed is not None, **common)
    fused_dmask = need_dmask and not bcast
    wrap_triton(_attn_bwd_dq)[lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]) * B * Hq,)](
        q, k, v, do, lse, delta, mask_t, dq, dmask if fused_dmask else dq, cu_q, cu_k, alibi, seed, *strides, ls,
        *_out_rows(dq, packed), sab, sah, Hq, Hq // Hkv, Lq, Lk, D, Dv, scale, scale * contract.LOG2E, off, lo_off,
        cap, drop_thr, drop_scale, C.length_key(Lq), C.length_key(Lk), NEED_DMASK=fused_dmask,
        SPLIT_DS=q.dtype != torch.float32 and repeats_elements(q), VARLEN=packed is not None, **common)
    if bcast and dmask.numel():
        Bm, Hm, Lqm, Lkm = mask.shape
        common.pop("MASK_KIND")
        slices = (min(Bm * Hm, 65535), triton.cdiv(Bm * Hm, 65535))
        wrap_triton(_attn_bwd_dmask)[
                lambda meta: (triton.cdiv(Lqm, meta["BLOCK_M"]) * triton.cdiv(Lkm, meta["BLOCK_N"]), *slices)](
            q, k, v, do, lse, delta, mask_t, dmask, alibi, seed, *strides, dmask.stride(0), dmask.stride(1),
            dmask.stride(2), sab, sah, Hq, Hq // Hkv, Lq, Lk, D, Dv, scale * contract.LOG2E, off, lo_off, cap, drop_thr,
            drop_scale, Hm, Lkm, Bm * Hm,
            B if Bm == 1 else 1, Hq if Hm == 1 else 1, C.length_key(Lq), C.length_key(Lk),
            BCAST_Q=Lqm != Lq, BCAST_K=Lkm != Lk, **common)
    return dq, dk, dv, dmask, dgate
