"""The kernel contract's names and values for Python: the codes the ops ``torch.ops.fastattn.*`` take
and the base-2 constants every kernel computes with.

``csrc/attention_contract.h`` defines them for the C++ and CUDA kernels; ``fastattn._C.contract()``
exports that definition, and tests/test_package.py checks that these are the same. They live here
too so that the reference backend and the Triton launchers need no compiled extension.
"""
from __future__ import annotations

from typing import Optional

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


def dropout_weights(p: torch.Tensor, keep: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """Dropout as torch's: kept weights scaled by 1 / (1 - dropout_p); dropout_p = 1 multiplies every
    weight by 0 (a NaN stays NaN, as in torch), where 1 / (1 - p) would turn the zeros into NaN.
    TorchScript compiles it."""
    return p * keep * (1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0)


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the softmax statistics an op returns (lse, alpha): float64 for float64 inputs, else
    float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
