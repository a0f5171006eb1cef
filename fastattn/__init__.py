"""fastattn: fused score -> softmax -> gating attention kernels for PyTorch.

    fastattn.attention(q, k, v, attn_mask=..., causal=..., gate=..., backend="auto")
    fastattn.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, ...)  # packed sequences of any lengths
    fastattn.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=...)  # decoding over a (paged) cache
    fastattn.scaled_dot_product_attention(...)     # drop-in for F.scaled_dot_product_attention
    fastattn.softmax_gate(scores, x, mask=..., pool=...)
    fastattn.score_softmax_gate(x, weight, mask=..., pool=...)
    fastattn.attention_pool(x, V, w, U, offsets=...)  # gated attention pooling of bags (ABMIL)
    fastattn.backends()                            # which backends run here, and why not

``fastattn.reference`` holds the plain-PyTorch definitions every backend is measured against.
"""
from . import ops, reference  # noqa: F401  (ops registers fake kernels and autograd)
from .backends import backends
from .functional import (attention, attention_pool, attention_with_kvcache, scaled_dot_product_attention,
                         score_softmax_gate, softmax_gate, varlen_attention)
from .version import __version__
from . import nn  # noqa: E402  (modules; after the functional API they build on)
from .nn import replace_attention

__all__ = ["attention", "varlen_attention", "attention_with_kvcache", "scaled_dot_product_attention", "softmax_gate", "score_softmax_gate",
           "attention_pool", "backends", "reference", "nn", "replace_attention", "__version__"]
