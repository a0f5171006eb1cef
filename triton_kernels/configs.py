"""Tile sizes and autotune configs of fastattn's Triton kernels, in one place, each with its reason.

Evidence: the GPU numbers below follow the Triton fused-attention tutorial (06-fused-attention.py) and
FlashAttention-2's Triton kernels on A100/H100 (BLOCK_M 128 x BLOCK_N 64 with 8 warps for D <= 128 in
the forward; 64 x 64 / 128 x 32 tiles in the backward). They are a starting set for the autotuner, not
measured on our kernels yet (no GPU run so far): ``fastattn bench`` on an H100 is the next step,
and each line should then carry what won and what lost.

Under the interpreter (TRITON_INTERPRET=1, CI on CPU) every kernel gets one small config: autotuning
would only multiply the (slow) interpreted runs, and small tiles make the test shapes cross several
tiles, diagonal tiles and ragged edges, which is what the tests are for.
"""
from __future__ import annotations

import os

import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_enabled() -> bool:
    """FASTATTN_TRITON_AUTOTUNE=0 keeps only the first config that survives pruning (quick GPU test
    rounds: one compile per specialisation instead of one per config). Read at call time."""
    return os.environ.get("FASTATTN_TRITON_AUTOTUNE", "1") != "0"

LOG2E = 1.4426950408889634   # softmax in base 2: e^x = 2^(x * LOG2E)
LN2 = 0.6931471805599453

# tl.dot needs every dimension >= 16; head dims are padded up to the next power of two (40 -> 64,
# 111 -> 128) and the padding lanes are masked on load (zeros add nothing to the dots).
MIN_DOT_DIM = 16


def head_block(d: int) -> int:
    """Register tile width for a head dim: next power of two, at least 16."""
    return max(MIN_DOT_DIM, triton.next_power_of_2(d))


def length_key(n: int) -> int:
    """Autotune cache key for a sequence length: its power-of-two bucket (a config that wins at 3000
    wins at 4096; re-tuning for every length would cost more than it gains)."""
    return triton.next_power_of_2(max(int(n), 1))


def _cfg(num_warps, num_stages, **tiles):
    return triton.Config(tiles, num_warps=num_warps, num_stages=num_stages)


# ----------------------------------------------------------------------------------- attention fwd
# Tiles: BLOCK_M query rows stay in registers (with their O accumulator [BLOCK_M, Dv]); BLOCK_N keys
# stream through shared memory, num_stages deep.
if INTERPRET:
    FWD_CONFIGS = [_cfg(4, 1, BLOCK_M=32, BLOCK_N=16)]   # BLOCK_M != BLOCK_N: exercises the causal bounds
else:
    FWD_CONFIGS = [
        _cfg(8, 3, BLOCK_M=128, BLOCK_N=64),    # tutorial / FA2 default for D 64-128 on H100
        _cfg(8, 4, BLOCK_M=128, BLOCK_N=128),   # D <= 64: more work per K/V load
        _cfg(4, 3, BLOCK_M=64, BLOCK_N=64),     # few (batch, head) pairs: more programs per SM
        _cfg(4, 4, BLOCK_M=64, BLOCK_N=32),     # D = 256: registers (acc 64 x 256 fp32 = 128 regs/thread)
        _cfg(8, 2, BLOCK_M=128, BLOCK_N=32),    # D = 256 with 8 warps
        _cfg(4, 3, BLOCK_M=16, BLOCK_N=128),    # decode (Lq <= 16): do not waste 112 of 128 query rows
        _cfg(4, 3, BLOCK_M=16, BLOCK_N=64),     # decode at D = 256
    ]


def prune_fwd(configs, named_args, **kwargs):
    """Drops configs that cannot fit (tiles x head dim beyond the register budget) or waste work
    (BLOCK_M far above Lq); always keeps at least one."""
    if INTERPRET:
        return configs
    d = max(named_args["BLOCK_D"] if "BLOCK_D" in named_args else kwargs["BLOCK_D"],
            named_args["BLOCK_DV"] if "BLOCK_DV" in named_args else kwargs["BLOCK_DV"])
    lq = named_args["Lq"]
    keep = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if bm * d > 128 * 128 or bn * d > 128 * 128:   # register / shared memory limit (H100, 2 stages)
            continue
        if bm > max(MIN_DOT_DIM, triton.next_power_of_2(lq)):
            continue
        if bm == 16 and lq > 64:                        # tiny query tiles only for decode-like shapes
            continue
        keep.append(c)
    keep = keep or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
    return keep if autotune_enabled() else keep[:1]


# float16 / bfloat16 forward: P V as P_hi V + P_lo V (P to ~16 bits) instead of P rounded to the inputs'
# dtype: one more tile GEMM per key tile (3 instead of 2 in the forward), so that out_acc, and the
# backward's delta taken from it, match the backward's P (see attention.py's docstring). False brings back
# the tutorial's single GEMM; the repeated-key / broadcast-over-keys mask gradients then miss SPEC §4 in
# half precision (tests/test_triton.py: test_repeated_keys_keep_dq_zero_in_bf16, expand views).
PRECISE_PV = True


# ----------------------------------------------------------------------------------- attention bwd
# dK/dV kernel: one program owns BLOCK_N keys (dK, dV accumulators [BLOCK_N, D] in registers) and
# streams BLOCK_M query rows; dQ kernel: the mirror image (dQ [BLOCK_M, D] in registers, keys stream).
# The owned side is the larger tile, as in the tutorial (BLOCK_M1 32 x BLOCK_N1 128 / BLOCK_M2 128 x
# BLOCK_N2 32 at D 64); at D 256 both halve to stay within registers.
if INTERPRET:
    BWD_DKDV_CONFIGS = [_cfg(4, 1, BLOCK_M=16, BLOCK_N=32)]
    BWD_DQ_CONFIGS = [_cfg(4, 1, BLOCK_M=32, BLOCK_N=16)]
    PREP_BLOCK_M = 32
else:
    BWD_DKDV_CONFIGS = [
        _cfg(4, 3, BLOCK_M=32, BLOCK_N=128),   # tutorial's H100 choice, D 64
        _cfg(8, 3, BLOCK_M=64, BLOCK_N=128),   # D 64-128, many key tiles
        _cfg(4, 3, BLOCK_M=32, BLOCK_N=64),    # D 128-256
        _cfg(4, 2, BLOCK_M=16, BLOCK_N=64),    # D 256 (dK + dV accumulators: 2 x 64 x 256 fp32)
    ]
    BWD_DQ_CONFIGS = [
        _cfg(4, 3, BLOCK_M=128, BLOCK_N=32),
        _cfg(8, 3, BLOCK_M=128, BLOCK_N=64),
        _cfg(4, 3, BLOCK_M=64, BLOCK_N=32),
        _cfg(4, 2, BLOCK_M=64, BLOCK_N=16),
        _cfg(4, 3, BLOCK_M=16, BLOCK_N=64),    # short query side (Lq <= 16)
    ]
    PREP_BLOCK_M = 64   # memory-bound row pass: 64 rows x Dv of out and dout per program

# dmask of a broadcast float mask (_attn_bwd_dmask): a program owns a [BLOCK_M, BLOCK_N] fp32 tile of the
# summed dS and streams q/dO (BLOCK_M rows) and k/v (BLOCK_N keys) tiles of every (batch, head) that reads it:
# 2 tile GEMMs per step (S, dP), no accumulator beyond the tile, so square-ish tiles as in the forward.
# Unmeasured starting set, like the others (no GPU yet).
if INTERPRET:
    BWD_DMASK_CONFIGS = [_cfg(4, 1, BLOCK_M=32, BLOCK_N=16)]
else:
    BWD_DMASK_CONFIGS = [
        _cfg(4, 3, BLOCK_M=64, BLOCK_N=64),
        _cfg(8, 3, BLOCK_M=128, BLOCK_N=64),
        _cfg(4, 3, BLOCK_M=64, BLOCK_N=32),    # D 128-256
        _cfg(4, 2, BLOCK_M=32, BLOCK_N=32),    # D 256
        _cfg(4, 3, BLOCK_M=16, BLOCK_N=64),    # short query side (Lq <= 16)
    ]


def prune_bwd(configs, named_args, **kwargs):
    if INTERPRET:
        return configs
    d = max(kwargs.get("BLOCK_D", named_args.get("BLOCK_D")), kwargs.get("BLOCK_DV", named_args.get("BLOCK_DV")))
    keep = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * d <= 128 * 64 * 128]
    keep = [c for c in keep if (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * d <= 160 * 128]
    # tiles far longer than the sequence only add masked work (decode: Lq = 1)
    fits = [c for c in keep if c.kwargs["BLOCK_M"] <= max(MIN_DOT_DIM, triton.next_power_of_2(named_args["Lq"]))
            and c.kwargs["BLOCK_N"] <= max(MIN_DOT_DIM, triton.next_power_of_2(named_args["Lk"]))]
    keep = fits or keep
    keep = keep or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
    return keep if autotune_enabled() else keep[:1]


# ----------------------------------------------------------------------------------- softmax gates
# Memory-bound: a program moves GATE_BLOCK_N x GATE_BLOCK_D elements of x per step (16-32 KiB), enough
# in flight to cover HBM latency without spilling. FUSED_MAX_ELEMS is the largest (N x D) slab of one
# batch item that the one-pass kernel keeps in registers (x, the expanded alpha and y: 3 x 8192 fp32
# over 8 warps = 96 registers per thread); larger items take the two-pass path (scores/stats, then apply).
if INTERPRET:
    GATE_BLOCK_N, GATE_BLOCK_D, GATE_WARPS = 16, 32, 4
    FUSED_MAX_ELEMS = 128 * 64
else:
    GATE_BLOCK_N, GATE_BLOCK_D, GATE_WARPS = 64, 128, 4
    FUSED_MAX_ELEMS = 8192
GATE_STATS_BLOCK_N = 32 if INTERPRET else 256   # scores are (B, N, H) fp32: small, long tiles over N
GATE_FUSED_WARPS = 8
