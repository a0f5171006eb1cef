"""Hugging Face transformers: ``attn_implementation="fastattn"``.

    import fastattn.integrations.transformers as fa_hf
    fa_hf.register()
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="fastattn")
    # or, on a loaded model: model.set_attn_implementation("fastattn")

``register()`` adds "fastattn" to transformers' ``AttentionInterface`` (the attention function) and
``AttentionMaskInterface`` (the mask builder: transformers' SDPA mask, a bool (B, 1, Lq, Lk) mask with
True = attend, or None when the mask is purely causal, in which case the kernel applies causality
itself). GQA/MQA run without repeating K/V. Works with transformers >= 4.56 (the interfaces' API);
transformers is an optional extra: ``pip install fastattn[hf]``.
"""
from __future__ import annotations

import torch

from .. import functional

NAME = "fastattn"


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                      is_causal=None, position_bias=None, **kwargs):
    """transformers' attention-function signature, as its ``sdpa_attention_forward``.

    query (B, Hq, Lq, D), key/value (B, Hkv, Lk, D) with Hq % Hkv == 0; attention_mask None, bool
    (True = attend) or float (added), broadcastable to (B, Hq, Lq, Lk). Returns ((B, Lq, Hq, Dv), None):
    attention weights are not materialised (use attn_implementation="eager" to inspect them).
    """
    if kwargs.get("softcap") is not None:
        raise ValueError("attn_implementation='fastattn' does not support `softcap`; use 'eager'")
    if kwargs.get("s_aux") is not None:
        raise ValueError("attn_implementation='fastattn' does not support attention sinks (`s_aux`); use 'eager'")
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # as transformers' SDPA path: the causal flag stands in for a mask that was skipped as purely causal
    # (top-left, as SDPA), never on single-token decoding
    causal = bool(query.shape[2] > 1 and attention_mask is None and is_causal)
    if position_bias is not None:  # additive bias (T5-style), combined with the mask or causality
        from transformers.integrations.sdpa_attention import create_position_bias_mask
        attention_mask = create_position_bias_mask(position_bias, attention_mask, causal, query, key)
        causal = False
    if attention_mask is not None and attention_mask.dim() == 2:
        attention_mask = attention_mask[None, None]
    out = functional.attention(query, key, value, attn_mask=attention_mask, causal=causal, scale=scaling,
                               dropout_p=float(dropout))
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register "fastattn" with transformers (idempotent). Raises ImportError without transformers."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as e:
        raise ImportError("fastattn.integrations.transformers needs Hugging Face transformers: "
                          "pip install 'fastattn[hf]' (or pip install transformers)") from e
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
