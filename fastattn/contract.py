"""The kernel contract's names and values for Python: the codes the ops ``torch.ops.fastattn.*`` take
and the base-2 constants every kernel computes with.

``csrc/attention_contract.h`` defines them for the C++ and CUDA kernels; ``fastattn._C.contract()``
exports that definition, and tests/test_package.py checks that these are the same. They live here
too so that the reference backend and the Triton launchers need no compiled extension.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

# The ops' ``causal`` argument.
CAUSAL_NONE = 0
CAUSAL_TOP_LEFT = 1      # query i sees keys j <= i (SDPA's is_causal)
CAUSAL_BOTTOM_RIGHT = 2  # query i sees keys j <= i + Lk - Lq (FlashAttention's; decoding)

# What a mask is, from its dtype (the kernels' specialisation).
MASK_NONE = 0
MASK_BOOL = 1
MASK_BIAS = 2

LOG2E = 1.4426950408889634  # softmax in base 2: e^x = 2^(x * LOG2E)
LN2 = 0.6931471805599453    # the kernels' lse is in log2 units: natural lse = lse2 * LN2

_CAUSAL_CODES = {False: CAUSAL_NONE, None: CAUSAL_NONE, True: CAUSAL_TOP_LEFT, "top_left": CAUSAL_TOP_LEFT,
                 "bottom_right": CAUSAL_BOTTOM_RIGHT}


def causal_code(causal) -> int:
    """The ops' code for the API's ``causal`` (False, True / "top_left", "bottom_right")."""
    try:
        return _CAUSAL_CODES[causal]
    except (KeyError, TypeError):
        raise ValueError(
            f"causal: expected False, True, 'top_left' or 'bottom_right', got {causal!r}"
        ) from None


def causal_arg(code: int):
    """The API's ``causal`` value for an op code (the inverse of ``causal_code``)."""
    return (False, True, "bottom_right")[code]


def causal_offset(code: int, Lq: int, Lk: int) -> int:
    """Under causal mode ``code`` query i sees keys j <= i + causal_offset (the kernels' causal_off)."""
    return Lk - Lq if code == CAUSAL_BOTTOM_RIGHT else 0


def causal_allowed(Lq: int, Lk: int, offset: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """Bool (Lq, Lk), True where query i may see key j <= i + offset. TorchScript compiles it (the scripted
    modules call it)."""
    i = torch.arange(Lq, device=device).unsqueeze(1)
    j = torch.arange(Lk, device=device).unsqueeze(0)
    return j <= i + offset


class ScoreMods(NamedTuple):
    """The ops' score modifiers (attention_contract.h), as ``fastattn.attention`` takes them: the sliding window's
    two sides (-1: unbounded), the softcap (0: none), ALiBi's slopes ((Hq,) or (B, Hq), or None). The defaults
    change nothing. Their order is the schemas' (attention_fwd / attention_bwd take them last)."""
    window_left: int = -1
    window_right: int = -1
    softcap: float = 0.0
    alibi_slopes: Optional[torch.Tensor] = None

    NAMES = ("window", "softcap", "alibi")  # what names() may return

    def names(self) -> frozenset:
        """The modifiers in use (what a backend may refuse)."""
        used = (self.window_left >= 0 or self.window_right >= 0, self.softcap != 0, self.alibi_slopes is not None)
        return frozenset(n for n, on in zip(self.NAMES, used) if on)


def band_allowed(Lq: int, Lk: int, causal: int, window_left: int, window_right: int,
                 device: Optional[torch.device] = None) -> Optional[torch.Tensor]:
    """Bool (Lq, Lk), True where query i may see key j under the causal mode ``causal`` (a code) and the sliding
    window (i + Lk - Lq - window_left <= j <= i + Lk - Lq + window_right, a side at -1 unbounded); None when
    nothing bounds the keys."""
    bounds = []
    if causal != CAUSAL_NONE:
        bounds.append(causal_allowed(Lq, Lk, causal_offset(causal, Lq, Lk), device))
    if window_left >= 0:
        bounds.append(~causal_allowed(Lq, Lk, Lk - Lq - window_left - 1, device))
    if window_right >= 0:
        bounds.append(causal_allowed(Lq, Lk, Lk - Lq + window_right, device))
    allowed = None
    for b in bounds:
        allowed = b if allowed is None else allowed & b
    return allowed


def key_band(Lq: int, Lk: int, causal: int, window_left: int, window_right: int):
    """(has_hi, hi_off, has_lo, lo_off): query i sees keys j <= i + hi_off (when has_hi) and j >= i + lo_off (when
    has_lo) under causal mode ``causal`` and the window; csrc/attention_contract.h's key_band, which the kernels
    take (a window side that hides no key is dropped)."""
    has_lo = 0 <= window_left < Lk - 1
    has_hi, hi = causal != CAUSAL_NONE, causal_offset(causal, Lq, Lk)
    if 0 <= window_right < Lq - 1:
        w = Lk - Lq + window_right
        has_hi, hi = True, min(hi, w) if has_hi else w
    return has_hi, hi, has_lo, Lk - Lq - window_left if has_lo else 0


_U32 = 0xFFFFFFFF
PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # Philox4x32's multipliers and Weyl key increments
PHILOX_W = (0x9E3779B9, 0xBB67AE85)


def _mulhilo(a: int, b: torch.Tensor):
    """The high and low 32 bits of a * b, a < 2^32 a constant, b int64 in [0, 2^32): in 16-bit halves of b, so
    that no product leaves int64."""
    lo_part, hi_part = a * (b & 0xFFFF), a * (b >> 16)  # each < 2^48
    t = ((hi_part & 0xFFFF) << 16) + lo_part
    return (hi_part >> 16) + (t >> 32), t & _U32


def philox4x32_10(c, key):
    """Philox4x32-10 (csrc/attention_contract.h) on int64 tensors holding 32-bit words: counter c = (c0, c1, c2,
    c3), key = (k0, k1) ints; returns the four output words."""
    c0, c1, c2, c3 = c
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = _mulhilo(PHILOX_M[0], c0)
        hi1, lo1 = _mulhilo(PHILOX_M[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W[0]) & _U32, (k1 + PHILOX_W[1]) & _U32
    return c0, c1, c2, c3


def dropout_threshold(dropout_p: float) -> int:
    """A weight is kept when its 32-bit word is at least floor(dropout_p * 2^32) (2^32 for p = 1: none is)."""
    return int(math.ldexp(dropout_p, 32))


def dropout_keep(seed: int, dropout_p: float, B: int, H: int, Lq: int, Lk: int, device=None) -> torch.Tensor:
    """The kernels' dropout keep-mask, (B, H, Lq, Lk) bool (True = kept), for a call with ``seed`` (the
    dropout_seed tensor's value) and ``dropout_p``: weight (b, h, i, j) takes word j % 4 of
    philox4x32_10((j // 4, i, h, b), (seed's low and high 32 bits)) and is kept when it is at least
    dropout_threshold(dropout_p). The reference materialises it to check the kernels' dropout exactly."""
    seed &= (1 << 64) - 1
    ar = lambda n, dims: torch.arange(n, dtype=torch.int64, device=device).reshape(dims)
    c = [t.expand(B, H, Lq, (Lk + 3) // 4) for t in (ar((Lk + 3) // 4, (1, 1, 1, -1)), ar(Lq, (1, 1, Lq, 1)),
                                                      ar(H, (1, H, 1, 1)), ar(B, (B, 1, 1, 1)))]
    words = torch.stack(philox4x32_10(c, (seed & _U32, seed >> 32)), dim=-1).flatten(-2)[..., :Lk]
    return words >= dropout_threshold(dropout_p)


def dropout_scale(dropout_p: float) -> float:
    """What kept weights are multiplied by: 1 / (1 - dropout_p); 0 for dropout_p = 1, where every weight is
    dropped and 1 / (1 - p) would turn the zeros into NaN. TorchScript compiles it."""
    return 1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0


def dropout_weights(p: torch.Tensor, keep: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """Dropout as torch's: kept weights scaled by dropout_scale; dropout_p = 1 multiplies every weight by 0 (a
    NaN stays NaN, as in torch). TorchScript compiles it."""
    return p * keep * dropout_scale(dropout_p)


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the softmax statistics an op returns (lse, alpha): float64 for float64 inputs, else
    float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
