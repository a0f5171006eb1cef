"""Tile sizes and autotune configs of fastattn's Triton kernels, in one place, each with its reason.

Evidence: the starting points follow the Triton fused-attention tutorial (06-fused-attention.py) and
FlashAttention-2's Triton kernels on A100/H100 (BLOCK_M 128 x BLOCK_N 64 with 8 warps for D <= 128 in
the forward). What is kept is what compiles for sm_80 and sm_90 within the shared memory of a block and
without register spills, per head block and precision (scripts/check_triton_aot.py compiles every kept
config without a GPU; its table is bench/results/triton_aot.txt). Speed: ``fastattn bench`` records
which config autotuning chose per key (its JSON's ``triton_autotune``); where a GPU run chose, that
config leads its list (what FASTATTN_TRITON_AUTOTUNE=0 runs), with the run named beside it.

Under the interpreter (TRITON_INTERPRET=1, CI on CPU) every kernel gets one small config: autotuning
would only multiply the (slow) interpreted runs, and small tiles make the test shapes cross several
tiles, diagonal tiles and ragged edges, which is what the tests are for.
"""
from __future__ import annotations

import functools
import os

import triton

from fastattn.contract import MASK_BIAS, MASK_BOOL, MASK_NONE

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_enabled() -> bool:
    """FASTATTN_TRITON_AUTOTUNE=0 keeps only the first config that survives pruning (quick GPU test
    rounds: one compile per specialisation instead of one per config). Read at call time."""
    return os.environ.get("FASTATTN_TRITON_AUTOTUNE", "1") != "0"

# tl.dot needs every dimension >= 16; head dims are padded up to the next power of two (40 -> 64,
# 111 -> 128) and the padding lanes are masked on load (zeros add nothing to the dots).
MIN_DOT_DIM = 16


def dot_block(n: int) -> int:
    """Register tile covering n elements along one dim of a tl.dot (a length, a number of heads, channels):
    next power of two, at least 16."""
    return max(MIN_DOT_DIM, triton.next_power_of_2(n))


def head_block(d: int) -> int:
    """The tile of a head dim, which selects its config list (BLOCK_D, BLOCK_DV)."""
    return dot_block(d)


def length_key(n: int) -> int:
    """Autotune cache key for a sequence length: its power-of-two bucket (a config that wins at 3000
    wins at 4096; re-tuning for every length would cost more than it gains)."""
    return triton.next_power_of_2(max(int(n), 1))


def _cfg(num_warps, num_stages, BLOCK_M, BLOCK_N, min_cc=0, max_cc=1000, maxnreg=None, light_only=False,
         packed_causal_acc=True, split_ds=True, score_mods=True, dropout=None):
    """A config for the compute capabilities [min_cc, max_cc]: Hopper (wgmma, operands from shared
    memory) and Ampere (mma, operands in registers) spill at different tiles. ``maxnreg`` states a
    register budget to ptxas (.maxnreg): without one, ptxas settles on a count of its own (80, 96, 128)
    and may spill a few bytes there; with one, some kernels compile without spills, others (most fp32
    ones) spill more, so it is set only on the configs where it removed the spills. Stage and warp
    counts that look arbitrary were picked the same way: the nearest setting that spills in no launch of
    ``scripts/check_triton_aot.py --full`` under either triton's ptxas (3.6: 12.8; 3.9: 12.9 and 13.4;
    e.g. fp32 dK/dV at D 65-128 spilled 16 B with a bool mask at 2 stages). ``light_only``: kept
    only for launches without a mask, and with a gate only where out_acc is not kept (inference): the
    forward's registers grow with each, and such a tile spills there. ``packed_causal_acc=False``: not kept
    for packed-sequence (varlen) causal launches that keep out_acc, whose per-sequence lengths and causal
    offset take registers that a padded launch has as kernel arguments. ``split_ds=False``: not kept for dQ launches
    that take dS in two parts (SPLIT_DS), one more tile in registers. ``score_mods=False``: not kept for launches
    with a score modifier (WINDOWED, SOFTCAP, HAS_ALIBI) or dropout, whose bounds, cap, slope and random words take
    registers. ``dropout``: None for every launch, False not for launches with dropout (DROPOUT: its Philox words,
    drawn per tile, take the registers), True for those alone."""
    c = triton.Config({"BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N}, num_warps=num_warps, num_stages=num_stages,
                      maxnreg=None if INTERPRET else maxnreg)
    c.min_cc, c.max_cc, c.light_only, c.packed_causal_acc = min_cc, max_cc, light_only, packed_causal_acc
    c.split_ds, c.score_mods, c.dropout = split_ds, score_mods, dropout
    return c


# ------------------------------------------------------------------------------------- launchability
# Configs come per head block (BLOCK_D, BLOCK_DV <= the key) and per input precision, each list best guess
# first (FASTATTN_TRITON_AUTOTUNE=0 keeps the first that fits). Register tiles grow with the head dim, so
# one list for every head dim either spills at 256 or wastes the GPU at 64. Each list is what compiles
# without spills for sm_80 and sm_90 in scripts/check_triton_aot.py (table: bench/results/triton_aot.txt).
# H200 below: bench/results/2026-11-26-nvidia-h200*.json, bf16; D 128 at L 1k and 4k, causal or not, gated
# or not, float mask or not; D 64 at L 512-16k, causal or not: how many of the kernel's keys autotuning
# gave the config (tests/test_triton_aot.py checks that the most chosen leads). The prune
# functions then drop what cannot launch on the device (shared memory per block, below) or would only add
# masked work (tiles far past the sequence).
#
# Shared memory a block may opt in to, per compute capability (CUDA programming guide).
SMEM_PER_BLOCK = {80: 166_912, 86: 101_376, 87: 166_912, 89: 101_376, 90: 232_448, 100: 232_448,
                  103: 232_448, 120: 101_376}


@functools.lru_cache(maxsize=None)
def _cuda_target(index: int) -> tuple[int, int]:
    import torch
    props = torch.cuda.get_device_properties(index)
    cc = props.major * 10 + props.minor
    return cc, getattr(props, "shared_memory_per_block_optin", 0) or SMEM_PER_BLOCK.get(cc, 101_376)


def target(named_args) -> tuple[int, int]:
    """(compute capability, shared memory per block) of the launch's device. Tensors on no GPU (meta
    tensors in scripts/check_triton_aot.py, fake CUDA tensors traced on a machine without one) take the
    capability FASTATTN_TRITON_AOT_ARCH names (default 90)."""
    import torch
    dev = next(v.device for v in named_args.values() if hasattr(v, "device"))
    if dev.type == "cuda" and torch.cuda.is_available():
        return _cuda_target(dev.index if dev.index is not None else torch.cuda.current_device())
    cc = int(os.environ.get("FASTATTN_TRITON_AOT_ARCH", "90"))
    return cc, SMEM_PER_BLOCK.get(cc, 101_376)


def _union(*tables):
    out = []
    for table in tables:
        for cfgs in table.values():
            out += [c for c in cfgs if all(c is not o for o in out)]
    return out


def _for_head(table, d):
    return next(cfgs for top, cfgs in sorted(table.items()) if d <= top)


def _arg(named_args, kwargs, name):
    return named_args[name] if name in named_args else kwargs[name]


# elements of the tiles a kernel streams (one set per pipeline stage) and of those it loads once, given
# (BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV)
_TILES = {
    "fwd": (lambda m, n, d, dv: n * (d + dv), lambda m, n, d, dv: m * d),        # K, V / Q
    "dkdv": (lambda m, n, d, dv: m * (d + dv), lambda m, n, d, dv: n * (d + dv)),  # Q, dO / K, V
    "dq": (lambda m, n, d, dv: n * (d + dv), lambda m, n, d, dv: m * (d + dv)),    # K, V / Q, dO
    "dmask": (lambda m, n, d, dv: (m + n) * (d + dv), lambda m, n, d, dv: 0),     # all four
}


def _smem_bytes(kernel, c, d, dv, esize, mask_esize):
    """Upper estimate of a config's shared memory as triton 3.6-3.9 lay it out: num_stages buffers of the
    tiles the loop streams (with the mask tile), the tiles loaded once, and one [max(BLOCK_M, BLOCK_N),
    head] tile of layout-conversion scratch. The compiled sizes in the check stay below it."""
    m, n, stages = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages
    streamed, owned = _TILES[kernel]
    return (stages * (streamed(m, n, d, dv) * esize + m * n * mask_esize) + owned(m, n, d, dv) * esize
            + max(m, n) * max(d, dv) * esize)


def _list_head(esize, head, align):
    """The head block whose config list serves a launch. Half-precision rows not 16-byte aligned (ALIGN 1:
    D = 111) load element by element through registers instead of cp.async into shared memory: the tiles of
    the next head block (fp32 tiles are small already)."""
    return min(2 * head, 256) if esize < 4 and align == 1 else head


def gate_after_forward(q, head, align) -> bool:
    """Whether a forward with a gate that keeps out_acc (and has no mask) runs ungated, the gate then applied
    to its rows by a pass over out_acc (attention._gate_rows): where the device's list for the head block has
    a light_only tile, which a launch with both may not take. H100 (2026-11-26-nvidia-h100-905d3cb.json, bf16
    D 128 L 4096, forward+backward less backward): the training forward took 1.73 ms ungated on 128x64,
    4.96 gated on 32x64. The pass moves 12 bytes an element (0.4 GB there: ~0.15 ms expected, not measured)."""
    esize = q.element_size()
    cc, _ = target({"q": q})
    table = FWD_FP32 if esize == 4 else FWD_HALF
    return any(c.light_only and c.min_cc <= cc <= c.max_cc for c in _for_head(table, _list_head(esize, head, align)))


# attention._gate_rows, memory-bound: a program's 16 rows of Dv 128 are 8 fp32 elements of out_acc a thread
# at 8 warps (at 4, ptxas took 168 registers on sm_90 for 16; few resident warps for a streaming pass)
GATE_ROWS_BLOCK_R = 16
GATE_ROWS_WARPS = 8


def _select(kernel, half, fp32, named_args, kwargs, length_ok):
    """The configs of the head block's list (``half`` or ``fp32`` by the inputs' element size) meant for the
    device's capability (not ``light_only`` where a launch has a mask, or a gate and out_acc; not
    ``packed_causal_acc=False`` where a varlen launch is causal and keeps out_acc; not ``split_ds=False`` where a
    dQ launch splits dS; not ``score_mods=False`` where a launch has a score modifier or dropout; ``dropout`` True
    only where it has dropout, False only where it has none) that fit its
    shared memory, those that pass ``length_ok`` if any do; at least one
    (the smallest, should none fit)."""
    bd, bdv = _arg(named_args, kwargs, "BLOCK_D"), _arg(named_args, kwargs, "BLOCK_DV")
    esize = named_args["Q"].element_size()
    head = _list_head(esize, max(bd, bdv), _arg(named_args, kwargs, "ALIGN"))
    # mask tile: none, bytes (bool), q's dtype (a bias, and the dmask kernel, which has no kind)
    kind = kwargs.get("MASK_KIND", MASK_BIAS)
    mask_esize = {MASK_NONE: 0, MASK_BOOL: 1}.get(kind, esize)
    cc, smem = target(named_args)
    gate_and_acc = kwargs.get("HAS_GATE", True) and kwargs.get("STORE_ACC", True)
    light = kind == MASK_NONE and not gate_and_acc
    packed_causal_acc = kwargs.get("VARLEN", False) and kwargs.get("CAUSAL", False) and kwargs.get("STORE_ACC", False)
    split_ds = kwargs.get("SPLIT_DS", False)
    mods = any(kwargs.get(flag, False) for flag in ("WINDOWED", "SOFTCAP", "HAS_ALIBI", "DROPOUT"))
    dropout = bool(kwargs.get("DROPOUT", False))
    cands = [c for c in _for_head(fp32 if esize == 4 else half, head)
             if c.min_cc <= cc <= c.max_cc and (light or not c.light_only)
             and (c.packed_causal_acc or not packed_causal_acc) and (c.split_ds or not split_ds)
             and (c.score_mods or not mods) and c.dropout in (None, dropout)]
    size = {id(c): _smem_bytes(kernel, c, bd, bdv, esize, mask_esize) for c in cands}
    keep = [c for c in cands if size[id(c)] <= smem]
    keep = [c for c in keep if length_ok(c)] or keep or [min(cands, key=lambda c: size[id(c)])]
    return keep if autotune_enabled() else keep[:1]


def _covers(block: int, n: int) -> bool:
    """A tile of ``block`` rows is not far past a length ``n`` (decode: Lq = 1): it only adds masked work."""
    return block <= max(MIN_DOT_DIM, triton.next_power_of_2(n))


# ----------------------------------------------------------------------------------- attention fwd
# Tiles: BLOCK_M query rows stay in registers (with their O accumulator [BLOCK_M, Dv]); BLOCK_N keys
# stream through shared memory, num_stages deep. BLOCK_M = 16 configs are for decode (Lq <= 64).
# float32 runs its dots on FMA units (exact "ieee" products): each thread holds its rows and columns of
# both operands over the whole reduction, so fp32 tiles are a quarter of the half-precision ones.
if INTERPRET:
    FWD_HALF = FWD_FP32 = {256: [_cfg(4, 1, 32, 16)]}   # BLOCK_M != BLOCK_N: exercises the causal bounds
else:
    FWD_HALF = {
        # H200: 12 of 12 keys (L 512-16k, causal or not). Padded launches reach 252-255 registers here with a
        # gate and out_acc; packed causal ones that keep out_acc spilled 4-16 B (scripts/check_triton_aot.py)
        64: [_cfg(4, 3, 64, 64, packed_causal_acc=False),
             _cfg(8, 3, 128, 64),     # tutorial / FA2 default on H100
             _cfg(4, 3, 16, 64, maxnreg=255)],
        # the tutorial's Hopper tile (wgmma takes 64 rows a warpgroup); with a mask, or a gate and out_acc, it
        # spills on triton 3.6 (56-112 B at 255 registers). Chosen by autotuning on every key where it may run:
        # H200 20 of 20 (-bb42c89, -2782909.json), H100 19 of 19 (-h100-905d3cb.json); gated inference at
        # L4096: 2.12 ms against 3.49 with 32x64 (H200). First, so that it also runs with autotuning off
        128: [_cfg(8, 3, 128, 64, min_cc=90, light_only=True),
              _cfg(8, 3, 32, 64),     # where 128x64 may not run: H200 32 of 60 keys, H100 8 of 12
              # 16x64 spilled 4-8 B at 168 registers in packed causal launches that keep out_acc under triton 3.6
              # (sm_80 and sm_90, D 72 and 128; the same with a 255-register budget), not under 3.9
              _cfg(8, 3, 64, 32), _cfg(4, 2, 16, 64, packed_causal_acc=False)],
        256: [_cfg(8, 2, 32, 32, maxnreg=255),   # O accumulator 32 x 256 fp32 over 8 warps: 32 registers a thread
              _cfg(4, 2, 16, 32, packed_causal_acc=False)],   # as 16x64 above (sm_80, D 111)
    }
    FWD_FP32 = {
        # scripts/check_triton_aot.py --full, triton 3.9: without a register budget ptxas 12.9 settled on 96 for
        # sm_80 and spilled 4 B in a causal gated varlen launch at D 16; given 255 on sm_90 it spilled 16-48 B where
        # it compiled clean without a budget; 4 warps without one spilled 8 B at 255 under 3.6 in causal varlen
        # inference launches at D 40-64 (sm_90), 8 warps (half the accumulator a thread) did not
        64: [_cfg(4, 3, 32, 32, max_cc=89, maxnreg=255), _cfg(8, 3, 32, 32, min_cc=90), _cfg(4, 2, 16, 16)],
        # 4 warps at 255 registers spilled 40 B in causal varlen launches at D 111 (sm_80); 8 warps (8 accumulator
        # registers a thread, not 16) without a budget settled on 64 and spilled 8 B at D 111 (sm_90)
        128: [_cfg(8, 2, 16, 16, maxnreg=128)],
        256: [_cfg(4, 2, 16, 16)],
    }
FWD_CONFIGS = _union(FWD_HALF, FWD_FP32)


def prune_fwd(configs, named_args, **kwargs):
    if INTERPRET:
        return configs
    lq = named_args["Lq"]
    # tiny query tiles only for decode-like shapes
    return _select("fwd", FWD_HALF, FWD_FP32, named_args, kwargs,
                   lambda c: _covers(c.kwargs["BLOCK_M"], lq) and (c.kwargs["BLOCK_M"] > 16 or lq <= 64))


# float16 / bfloat16 forward: P V as P_hi V + P_lo V (P to ~16 bits) instead of P rounded to the inputs'
# dtype: one more tile GEMM per key tile (3 instead of 2 in the forward), so that out_acc, and the
# backward's delta taken from it, match the backward's P (see attention.py's docstring). False brings back
# the tutorial's single GEMM; the repeated-key / broadcast-over-keys mask gradients then miss the rule of
# docs/CONTRACT.md §4 in half precision (tests/test_triton.py: test_repeated_keys_keep_dq_zero_in_bf16,
# expand views).
PRECISE_PV = True


# ----------------------------------------------------------------------------------- attention bwd
# dK/dV kernel: one program owns BLOCK_N keys (dK, dV accumulators [BLOCK_N, D] in registers, with K and V)
# and streams BLOCK_M query rows; dQ kernel: the mirror image (dQ [BLOCK_M, D] in registers, keys stream).
# The owned side is the larger tile, as in the tutorial, until the accumulators fill the registers: at
# D 256 the owned tile is 16-32 keys / 16-32 rows.
if INTERPRET:
    DKDV_HALF = DKDV_FP32 = {256: [_cfg(4, 1, 16, 32)]}
    DQ_HALF = DQ_FP32 = {256: [_cfg(4, 1, 32, 16)]}
    PREP_BLOCK_M = 32
else:
    DKDV_HALF = {
        64: [_cfg(8, 3, 32, 128, min_cc=90),   # H200: 9 of 12 keys (the rest 16 x 64, 4 warps, 2 stages)
             _cfg(8, 2, 16, 128), _cfg(4, 2, 16, 64)],
        # with dropout (its Philox words per tile) 16x128 and 32x64 spilled 36-184 B (bf16 D 72-128, sm_80 and sm_90)
        128: [_cfg(8, 3, 16, 128, min_cc=90, dropout=False),   # H200: 8 of 8 keys
              _cfg(8, 3, 32, 64, dropout=False), _cfg(8, 2, 32, 32, dropout=True)],
        # with dropout 32x32 spilled 16-40 B (bf16 D 200-256), 32x16 at 2 stages too
        256: [_cfg(8, 1, 32, 32, dropout=False), _cfg(8, 2, 32, 16, dropout=False), _cfg(8, 1, 32, 16, dropout=True)],
    }
    DKDV_FP32 = {
        64: [_cfg(4, 2, 16, 16, maxnreg=255)],
        # 3 stages spilled 12 B with a float mask at D 72 (sm_90, ptxas 13.4: 96 registers without a budget;
        # with 128-255, 28-336 B); 2 stages compiled clean on sm_80 and sm_90
        128: [_cfg(4, 2, 16, 16)],
        # 2 stages spilled 44 B with dropout (sm_80)
        256: [_cfg(8, 2, 16, 16, dropout=False), _cfg(8, 1, 16, 16, dropout=True)],
    }
    DQ_HALF = {
        # 128x32 and 64x32 at 8 warps spilled 16-36 B with SPLIT_DS (bf16: sm_80 D 16, sm_90 D 72-128)
        64: [_cfg(8, 3, 128, 32, split_ds=False),     # H200: 6 of 12 keys, the next the other 6 (a tie)
             # without a budget ptxas settled on 96 (16x32: sm_90, D 40-64, ptxas 12.8) or 128 registers (64x32:
             # sm_80, bf16 D 32, ptxas 12.9) and spilled 4 B with a float mask's gradient
             _cfg(4, 3, 64, 32, maxnreg=255), _cfg(4, 3, 16, 32, maxnreg=255)],
        # with dropout 64x16 and 64x32 spilled 8-100 B (sm_80, bf16 D 72-128)
        128: [_cfg(4, 2, 64, 16, dropout=False),     # H200: 8 of 8 keys
              _cfg(8, 3, 64, 32, split_ds=False, dropout=False), _cfg(4, 3, 16, 64)],
        # with dropout 32x32 spilled 48 B (sm_90, bf16 D 200-256)
        256: [_cfg(8, 2, 32, 32, maxnreg=255, dropout=False), _cfg(4, 2, 16, 32, maxnreg=255)],
    }
    DQ_FP32 = {
        64: [_cfg(4, 2, 32, 16, maxnreg=255)],
        # without a budget ptxas 12.8 settled on 80 registers and spilled 20 B in causal varlen launches at D 111
        # (sm_90); with 128, 52 B
        128: [_cfg(8, 2, 16, 16, maxnreg=255)],
        256: [_cfg(8, 1, 16, 16, maxnreg=255)],
    }
    PREP_BLOCK_M = 64
BWD_DKDV_CONFIGS = _union(DKDV_HALF, DKDV_FP32)
BWD_DQ_CONFIGS = _union(DQ_HALF, DQ_FP32)

# memory-bound row pass (_attn_bwd_prep): out, dout, gate and their products are [BLOCK_M, Dv] fp32 tiles
# in registers; 2048 elements per tile (16 per thread at 4 warps; 16 rows at Dv 256) keeps the five of
# them clear of spills.
PREP_TILE_ELEMS = 2048


def prep_block_m(block_dv: int) -> int:
    if INTERPRET:
        return PREP_BLOCK_M
    return max(16, min(PREP_BLOCK_M, PREP_TILE_ELEMS // block_dv))


# dmask of a broadcast float mask (_attn_bwd_dmask): a program owns a [BLOCK_M, BLOCK_N] fp32 tile of the
# summed dS and streams q/dO (BLOCK_M rows) and k/v (BLOCK_N keys) tiles of every (batch, head) that reads it:
# 2 tile GEMMs per step (S, dP), no accumulator beyond the tile, so square-ish tiles as in the forward.
if INTERPRET:
    DMASK_HALF = DMASK_FP32 = {256: [_cfg(4, 1, 32, 16)]}
else:
    DMASK_HALF = {
        # without a budget ptxas 12.9 settled on 128 registers and spilled 12 B (sm_80, bf16 D 32, broadcast over Lq)
        # with dropout 64x32 spilled 16 B (sm_80, bf16 D 40-64)
        64: [_cfg(8, 3, 64, 32, maxnreg=255, dropout=False), _cfg(8, 2, 16, 32, maxnreg=255, dropout=True)],
        # 32x64 spilled 12 B with every score modifier (sm_90, bf16 D 72-128, broadcast over Lq); 16x64 44 B with
        # dropout (sm_90)
        128: [_cfg(8, 3, 32, 64, score_mods=False),     # H200: 4 of 4 keys
              _cfg(8, 3, 16, 64, dropout=False), _cfg(8, 2, 16, 32, dropout=True)],
        # with dropout 16x32 spilled 44 B (sm_90, bf16 D 200-256)
        256: [_cfg(8, 2, 16, 32, dropout=False), _cfg(8, 1, 16, 16, dropout=True)],
    }
    DMASK_FP32 = {
        64: [_cfg(4, 2, 16, 16, maxnreg=255)],
        128: [_cfg(8, 1, 16, 16, maxnreg=255)],
        # 16x16 spilled 8 B with every score modifier (sm_80, broadcast over Lq); 32x32 24 B with dropout (sm_80)
        256: [_cfg(8, 2, 32, 32, dropout=False), _cfg(4, 1, 16, 16, score_mods=False),
              _cfg(8, 1, 16, 16, dropout=True)],
    }
BWD_DMASK_CONFIGS = _union(DMASK_HALF, DMASK_FP32)

_BWD_TABLES = {"dkdv": (DKDV_HALF, DKDV_FP32), "dq": (DQ_HALF, DQ_FP32), "dmask": (DMASK_HALF, DMASK_FP32)}


def _prune_bwd(kernel, configs, named_args, kwargs):
    if INTERPRET:
        return configs
    half, fp32 = _BWD_TABLES[kernel]
    lq, lk = named_args["Lq"], named_args["Lk"]
    return _select(kernel, half, fp32, named_args, kwargs,
                   lambda c: _covers(c.kwargs["BLOCK_M"], lq) and _covers(c.kwargs["BLOCK_N"], lk))


def prune_dkdv(configs, named_args, **kwargs):
    return _prune_bwd("dkdv", configs, named_args, kwargs)


def prune_dq(configs, named_args, **kwargs):
    return _prune_bwd("dq", configs, named_args, kwargs)


def prune_dmask(configs, named_args, **kwargs):
    return _prune_bwd("dmask", configs, named_args, kwargs)


# ---------------------------------------------------------------------------------- kv-cache decode
# decode.py, split-KV: a program holds BLOCK_M query rows (the GQA group's heads x Lq, padded to >= 16 for
# tl.dot and capped by DECODE_MAX_BLOCK_M: more rows take more programs) with their O accumulator, and streams
# one split of its sequence's keys in BLOCK_N tiles, num_stages deep. The configs set BLOCK_N alone. Decode is
# memory-bound (one pass over the cache, a few rows of math per key): key tiles as large as the rows' registers
# allow, since each stage is a load in flight. Sizes are what compiles for sm_80 and sm_90 without spills in
# scripts/check_triton_aot.py, not tuned: on an H100 (2026-11-26-nvidia-h100-905d3cb-varlen-decode-gates.json,
# bf16, Hq 32, Hkv 8, D 128, 16k keys) they read 4% (B 1) and 28% (B 8) of the memory bandwidth.
def _decode_cfg(num_warps, num_stages, BLOCK_N, min_cc=0, max_cc=1000, maxnreg=None):
    c = triton.Config({"BLOCK_N": BLOCK_N}, num_warps=num_warps, num_stages=num_stages,
                      maxnreg=None if INTERPRET else maxnreg)
    c.min_cc, c.max_cc = min_cc, max_cc
    return c


if INTERPRET:
    DECODE_HALF = DECODE_FP32 = {256: [_decode_cfg(4, 1, 16)]}
    DECODE_MAX_BLOCK_M_HALF = DECODE_MAX_BLOCK_M_FP32 = {256: 16}   # Lq x group > 16 crosses row tiles
else:
    DECODE_HALF = {
        # 4 warps without a register budget: ptxas 12.8 (triton 3.6) settled on 96 and spilled 28 B at D 16 (sm_90);
        # with 128, 3.9 spilled 16 B in paged gated launches at D 40-64; with 255 both compile clean
        64: [_decode_cfg(4, 3, 64, maxnreg=255), _decode_cfg(8, 3, 128)],
        128: [_decode_cfg(4, 3, 64)],   # 128 keys at 64 rows spilled on sm_90 (4 warps, 2 stages)
        256: [_decode_cfg(4, 2, 32)],   # 64 keys spilled on sm_90 at 4 warps (255 registers) and at 8 (128)
    }
    DECODE_FP32 = {
        # 4 warps spilled a few bytes on sm_80 at D 16-32, with 32 keys and with 16 (ptxas settled on 72 registers)
        64: [_decode_cfg(8, 2, 32)],
        128: [_decode_cfg(4, 2, 16)],
        256: [_decode_cfg(4, 2, 16)],
    }
    # rows per program: the O accumulator [BLOCK_M, BLOCK_DV] is fp32 in registers
    DECODE_MAX_BLOCK_M_HALF = {64: 64, 128: 64, 256: 32}
    DECODE_MAX_BLOCK_M_FP32 = {64: 32, 128: 16, 256: 16}
DECODE_CONFIGS = _union(DECODE_HALF, DECODE_FP32)


def decode_head(block_d: int, block_dv: int, esize: int, align: int) -> int:
    """The head block whose decode lists serve a launch: half-precision rows not 16-byte aligned (ALIGN 1) load
    element by element, each with its own 64-bit address (a paged tile's rows are gathered), so they take the
    next block's smaller tiles, as in the forward."""
    head = max(block_d, block_dv)
    return min(2 * head, 256) if esize < 4 and align == 1 else head


def decode_block_m(rows: int, head: int, fp32: bool) -> int:
    """Query rows per decode program for ``rows`` (group x Lq) rows at head block ``head`` (decode_head)."""
    cap = _for_head(DECODE_MAX_BLOCK_M_FP32 if fp32 else DECODE_MAX_BLOCK_M_HALF, head)
    return min(dot_block(rows), cap)


def prune_decode(configs, named_args, **kwargs):
    """The head block's list for the inputs' precision and the device's capability, those whose streamed K / V
    stages and Q tile fit its shared memory (at least the smallest)."""
    if INTERPRET:
        return configs
    bd, bdv, bm, align = (_arg(named_args, kwargs, n) for n in ("BLOCK_D", "BLOCK_DV", "BLOCK_M", "ALIGN"))
    esize = named_args["Q"].element_size()
    cc, smem = target(named_args)
    cands = [c for c in _for_head(DECODE_FP32 if esize == 4 else DECODE_HALF, decode_head(bd, bdv, esize, align))
             if c.min_cc <= cc <= c.max_cc]
    size = lambda c: (c.num_stages * c.kwargs["BLOCK_N"] * (bd + bdv) + bm * bd
                      + max(bm, c.kwargs["BLOCK_N"]) * max(bd, bdv)) * esize
    keep = [c for c in cands if size(c) <= smem] or [min(cands, key=size)]
    return keep if autotune_enabled() else keep[:1]


# How many splits: about DECODE_PROGRAMS_PER_SM programs per SM over (batch x kv heads x row tiles x splits), two
# since two blocks of the D 128 config fit in an SM's shared memory and their loads overlap; a split holds at least
# DECODE_MIN_SPLIT_KEYS keys (fewer would make the merge cost more than the split saves) and starts at a multiple
# of DECODE_SPLIT_GRANULE keys (every BLOCK_N divides it: only a sequence's last tile is ragged). The interpreter
# stands in a GPU of DECODE_INTERPRET_SMS SMs, so that the test sweep runs one-split and split launches alike.
DECODE_PROGRAMS_PER_SM = 2
DECODE_SM_COUNT = 132           # H100 / H200, where the launch's device is not a GPU (meta tensors)
DECODE_INTERPRET_SMS = 4
DECODE_MIN_SPLIT_KEYS = 32 if INTERPRET else 256
DECODE_SPLIT_GRANULE = 16 if INTERPRET else 128
DECODE_MAX_SPLITS = 128
# merge kernel (memory-bound): [rows, Dv] fp32 tiles of 2048 elements, as _attn_bwd_prep's
DECODE_MERGE_TILE_ELEMS = 2048


def decode_merge_block_m(block_dv: int) -> int:
    if INTERPRET:
        return 4
    return max(1, DECODE_MERGE_TILE_ELEMS // block_dv)


# ----------------------------------------------------------------------------------- softmax gates
# Memory-bound: a program moves GATE_BLOCK_N x GATE_BLOCK_D elements of x per step (16-32 KiB), enough
# in flight to cover HBM latency without spilling. FUSED_MAX_ELEMS is the largest (N x D) slab of one
# batch item that the one-pass kernel keeps in registers (x, the expanded alpha and y: 3 x 4096 fp32
# over 8 warps = 48 registers per thread, with room for the fp32 dots); larger items take the two-pass
# path (scores/stats, then apply).
# The kernels with fp32 dots on FMA units (_gate_bwd_rows: [N, D] @ one-hot [D, H]; _score_bwd: ds W and
# ds^T x) take smaller tiles: an FMA dot holds each thread's rows and columns of both operands over the
# whole reduction, (rows + columns) x K registers, so K (16 channels a step in the rows kernel, 16
# positions in _score_bwd) and the output tile per thread must both stay small.
if INTERPRET:
    GATE_BLOCK_N, GATE_BLOCK_D, GATE_WARPS = 16, 32, 4
    GATE_POOL_BLOCK_N = 16
    GATE_ROWS_BLOCK_N, GATE_ROWS_BLOCK_D, GATE_SCORE_BWD_BLOCK_N = 16, 32, 16
    FUSED_MAX_ELEMS = 128 * 64
else:
    GATE_BLOCK_N, GATE_BLOCK_D, GATE_WARPS = 64, 128, 4
    # the pool kernel also holds the gathered alpha tile (fp32, with a 64-bit address per element)
    GATE_POOL_BLOCK_N = 32
    GATE_ROWS_BLOCK_N, GATE_ROWS_BLOCK_D, GATE_SCORE_BWD_BLOCK_N = 64, 16, 16
    FUSED_MAX_ELEMS = 4096
# float32 scores x W^T reduce over D on FMA units, in float64 with exact products (softmax_gate._scores_dot):
# chunks of 16 channels in _gate_scores (32 float64 ones spilled 28 B at 96 registers on sm_90 with triton 3.6),
# 32 with TF32; the one-pass kernel (the whole D at once) takes them only up to D 64
GATE_F64_SCORES_BLOCK_D, GATE_FP32_SCORES_BLOCK_D, FUSED_FP32_SCORES_MAX_D = 16, 32, 64
# float32 alpha expanded to the channels ([N, H] x one-hot [H, D] on FMA units) in the one-pass kernel: at
# most 128 positions (256 x 16 spilled at 255 registers)
FUSED_FP32_MAX_N = 128


def gate_rows_block_n(dtype, align: int) -> int:
    """Rows of _gate_bwd_rows: 16-bit rows not 16-byte aligned (ALIGN 1) load dy and x element by element,
    whose addresses spilled at 64 rows with the dx store (sm_80, 8 warps)."""
    return GATE_ROWS_BLOCK_N // (2 if align == 1 and dtype.itemsize == 2 and not INTERPRET else 1)


def gate_block_d(dtype, align: int) -> int:
    """Channel tile of the two-pass kernels: float32 tiles take twice the registers, and rows not 16-byte
    aligned (ALIGN 1) load element by element, so each halves it."""
    if INTERPRET:
        return GATE_BLOCK_D
    return GATE_BLOCK_D // (2 if dtype.itemsize == 4 else 1) // (2 if align == 1 else 1)


# the rows kernel over 8 warps: at 4, ptxas spilled a few bytes at 128 registers (triton 3.6, sm_90, dx
# written) and at 16 or 32 rows it capped registers at 72-80 and spilled too (both triton versions)
GATE_ROWS_WARPS = 8
GATE_STATS_BLOCK_N = 32 if INTERPRET else 256   # scores are (B, N, H): small, long tiles over N
GATE_STATS_MAX_BLOCK_H = 64  # heads per _gate_stats program (H up to 64 in one; more take several)
# Reductions over N (pool, dW) run as about this many programs, split over N, whose partial sums are added
# in a fixed order (deterministic): 4 per SM of an H100 / H200 (132 SMs) fill the GPU.
GATE_SPLIT_PROGRAMS = 16 if INTERPRET else 4 * 132
GATE_FUSED_WARPS = 8
