"""Registers the Triton kernels as ``torch.ops.fastattn.triton_*``, with the schemas of
csrc/fastattn.cpp (prefixed ``triton_``), then fake implementations and autograd through
``fastattn.ops.register_attention`` / ``register_varlen_attention`` / ``register_softmax_gates`` /
``register_attention_pool`` / ``register_kvcache``, as the C++ ops.

On a GPU the ops are ``torch.library.triton_op``s: torch.compile sees the Triton kernels inside
(``wrap_triton``) and the fake implementation is the launcher itself run on fake tensors. Under
TRITON_INTERPRET=1 they are plain ``torch.library.custom_op``s (opaque to the compiler, with
fastattn's fake implementations): the interpreter cannot run on fake tensors, and wrap_triton hands
interpreted kernels back unwrapped. FASTATTN_TRITON_CUSTOM_OP=1 forces the custom-op path on a GPU.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from fastattn import ops as _fastattn_ops
from fastattn.contract import ScoreMods

from . import attention as _attn
from . import attention_pool as _pool
from . import decode as _decode
from . import softmax_gate as _gate
from .configs import INTERPRET

USE_TRITON_OP = not INTERPRET and os.environ.get("FASTATTN_TRITON_CUSTOM_OP", "0") != "1"


def _register(name):
    def deco(fn):
        if USE_TRITON_OP:
            return torch.library.triton_op(f"fastattn::{name}", fn, mutates_args=())
        return torch.library.custom_op(f"fastattn::{name}", fn, mutates_args=())
    return deco


@_register("triton_attention_fwd")
def triton_attention_fwd(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], gate: Optional[Tensor],
                         scale: float, causal: int, need_acc: bool = True, window_left: int = -1,
                         window_right: int = -1, softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None,
                         deterministic: bool = False, dropout_p: float = 0.0,
                         dropout_seed: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    return _attn.attention_fwd(q, k, v, mask, gate, scale, causal, need_acc,
                               ScoreMods(window_left, window_right, softcap, alibi_slopes), (dropout_p, dropout_seed))


@_register("triton_attention_bwd")
def triton_attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                         mask: Optional[Tensor], gate: Optional[Tensor], dlse: Optional[Tensor], scale: float,
                         causal: int, need_dmask: bool, window_left: int = -1, window_right: int = -1,
                         softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None,
                         deterministic: bool = False, dropout_p: float = 0.0,
                         dropout_seed: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    # deterministic: these kernels always are (no atomics: attention.py)
    return _attn.attention_bwd(dout, q, k, v, out, lse, mask, gate, dlse, scale, causal, need_dmask,
                               ScoreMods(window_left, window_right, softcap, alibi_slopes), (dropout_p, dropout_seed))


@_register("triton_attention_kvcache_fwd")
def triton_attention_kvcache_fwd(q: Tensor, k_cache: Tensor, v_cache: Tensor, seqlens_k: Tensor,
                                 page_table: Optional[Tensor], gate: Optional[Tensor], scale: float,
                                 causal: int) -> tuple[Tensor, Tensor]:
    return _decode.attention_kvcache_fwd(q, k_cache, v_cache, seqlens_k, page_table, gate, scale, causal)


@_register("triton_varlen_attention_fwd")
def triton_varlen_attention_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                                max_seqlen_q: int, max_seqlen_k: int, gate: Optional[Tensor], scale: float, causal: int,
                                need_acc: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    return _attn.varlen_attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, gate, scale,
                                      causal, need_acc)


@_register("triton_varlen_attention_bwd")
def triton_varlen_attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                                cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                                gate: Optional[Tensor], dlse: Optional[Tensor], scale: float,
                                causal: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _attn.varlen_attention_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                      gate, dlse, scale, causal)


@_register("triton_softmax_gate_fwd")
def triton_softmax_gate_fwd(scores: Tensor, x: Tensor, mask: Optional[Tensor], pool: bool) -> tuple[Tensor, Tensor]:
    return _gate.softmax_gate_fwd(scores, x, mask, pool)


@_register("triton_softmax_gate_bwd")
def triton_softmax_gate_bwd(dy: Tensor, x: Tensor, alpha: Tensor, dalpha: Optional[Tensor],
                            pool: bool) -> tuple[Tensor, Tensor]:
    return _gate.softmax_gate_bwd(dy, x, alpha, dalpha, pool)


@_register("triton_score_softmax_gate_fwd")
def triton_score_softmax_gate_fwd(x: Tensor, weight: Tensor, mask: Optional[Tensor], scale: float,
                                  pool: bool) -> tuple[Tensor, Tensor]:
    return _gate.score_softmax_gate_fwd(x, weight, mask, scale, pool)


@_register("triton_score_softmax_gate_bwd")
def triton_score_softmax_gate_bwd(dy: Tensor, x: Tensor, weight: Tensor, alpha: Tensor, dalpha: Optional[Tensor],
                                  scale: float, pool: bool) -> tuple[Tensor, Tensor]:
    return _gate.score_softmax_gate_bwd(dy, x, weight, alpha, dalpha, scale, pool)


@_register("triton_attention_pool_fwd")
def triton_attention_pool_fwd(x: Tensor, offsets: Tensor, mask: Optional[Tensor], V: Tensor, U: Optional[Tensor],
                              w: Tensor, bV: Optional[Tensor], bU: Optional[Tensor],
                              return_scores: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _pool.attention_pool_fwd(x, offsets, mask, V, U, w, bV, bU, return_scores)


@_register("triton_attention_pool_bwd")
def triton_attention_pool_bwd(dy: Tensor, x: Tensor, offsets: Tensor, mask: Optional[Tensor], V: Tensor,
                              U: Optional[Tensor], w: Tensor, bV: Optional[Tensor], bU: Optional[Tensor], y: Tensor,
                              lse: Tensor, scores: Optional[Tensor], dlse: Optional[Tensor],
                              dscores: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    # the forward's scores go unused: these kernels recompute them with the rest, from lse
    return _pool.attention_pool_bwd(dy, x, offsets, mask, V, U, w, bV, bU, y, lse, dlse, dscores)


_fastattn_ops.register_attention("triton_", fake=not USE_TRITON_OP)
_fastattn_ops.register_varlen_attention("triton_", fake=not USE_TRITON_OP)
_fastattn_ops.register_softmax_gates("triton_", fake=not USE_TRITON_OP)
_fastattn_ops.register_attention_pool("triton_", fake=not USE_TRITON_OP)
if not USE_TRITON_OP:
    _fastattn_ops.register_kvcache("triton_")
