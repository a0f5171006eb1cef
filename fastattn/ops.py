"""The registered ops: ``torch.ops.fastattn.*`` with fake (meta) implementations and autograd.

Schemas are defined once, in C++ (csrc/fastattn.cpp), and each device registers its kernels there
(CPU: csrc/cpu/, CUDA: csrc/cuda/). This file adds what torch.compile and autograd need:

- a fake implementation per op (shapes, dtypes, strides of the outputs, no data);
- the backward of each forward op, which calls the matching ``*_bwd`` op. Attention backward
  recomputes the probabilities from the saved lse (FlashAttention), so no Lq × Lk tensor is kept.

Forward ops return float32 statistics (float64 for float64 inputs): ``lse`` for attention, the
weights ``alpha`` for the softmax gates; both are differentiable outputs.
"""
from __future__ import annotations

import torch

_EXTENSION_ERROR: str | None = None
try:
    from . import _C  # noqa: F401  (loading it registers the schemas and kernels)
except ImportError as e:  # reported by fastattn.backends(); the reference backend still works
    _C = None
    _EXTENSION_ERROR = f"the C++ extension fastattn._C could not be loaded ({e}); reinstall with " \
                       "`pip install --no-build-isolation .`"


def extension_error() -> str | None:
    """None when fastattn._C is loaded, else why it is not."""
    return _EXTENSION_ERROR


def _stat_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _last_dim_contiguous(t):
    """Kernels need stride(-1) == 1 (a gradient from ``.sum()`` arrives with all strides 0)."""
    return t if t is None or t.stride(-1) == 1 or t.dim() == 0 else t.contiguous()


def _empty(t):
    return t.new_empty((0,))


if _C is not None:
    # ----------------------------------------------------------------------------- attention
    @torch.library.register_fake("fastattn::attention_fwd")
    def _attention_fwd_fake(q, k, v, mask, gate, scale, causal):
        B, Hq, Lq, _ = q.shape
        out = q.new_empty((B, Hq, Lq, v.shape[-1]))
        lse = q.new_empty((B, Hq, Lq), dtype=_stat_dtype(q.dtype))
        return out, lse

    @torch.library.register_fake("fastattn::attention_bwd")
    def _attention_bwd_fake(dout, q, k, v, out, lse, mask, gate, dlse, scale, causal, need_dmask):
        dmask = mask.new_empty(mask.shape) if need_dmask else _empty(q)
        dgate = gate.new_empty(gate.shape) if gate is not None else _empty(q)
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dmask, dgate

    def _attention_setup_context(ctx, inputs, output):
        q, k, v, mask, gate, scale, causal = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, mask, gate)
        ctx.scale, ctx.causal = scale, causal
        ctx.need_dmask = mask is not None and mask.is_floating_point() and ctx.needs_input_grad[3]

    def _attention_backward(ctx, dout, dlse):
        q, k, v, out, lse, mask, gate = ctx.saved_tensors
        dq, dk, dv, dmask, dgate = torch.ops.fastattn.attention_bwd(
            _last_dim_contiguous(dout), q, k, v, out, lse, mask, gate, dlse,
            ctx.scale, ctx.causal, ctx.need_dmask)
        return (dq, dk, dv, dmask if ctx.need_dmask else None,
                dgate if gate is not None else None, None, None)

    torch.library.register_autograd("fastattn::attention_fwd", _attention_backward,
                                    setup_context=_attention_setup_context)

    # -------------------------------------------------------------------------- softmax gates
    def _gate_out_fake(x, H, pool):
        B, N, D = x.shape
        y = x.new_empty((B, D) if pool else (B, N, D))
        return y, x.new_empty((B, N, H), dtype=_stat_dtype(x.dtype))

    @torch.library.register_fake("fastattn::softmax_gate_fwd")
    def _softmax_gate_fwd_fake(scores, x, mask, pool):
        return _gate_out_fake(x, scores.shape[-1], pool)

    @torch.library.register_fake("fastattn::softmax_gate_bwd")
    def _softmax_gate_bwd_fake(dy, x, alpha, dalpha, pool):
        return alpha.new_empty(alpha.shape, dtype=x.dtype), x.new_empty(x.shape)

    @torch.library.register_fake("fastattn::score_softmax_gate_fwd")
    def _score_softmax_gate_fwd_fake(x, weight, mask, scale, pool):
        return _gate_out_fake(x, weight.shape[0], pool)

    @torch.library.register_fake("fastattn::score_softmax_gate_bwd")
    def _score_softmax_gate_bwd_fake(dy, x, weight, alpha, dalpha, scale, pool):
        return x.new_empty(x.shape), weight.new_empty(weight.shape)

    def _softmax_gate_setup_context(ctx, inputs, output):
        scores, x, mask, pool = inputs
        ctx.save_for_backward(x, output[1])
        ctx.pool = pool

    def _softmax_gate_backward(ctx, dy, dalpha):
        x, alpha = ctx.saved_tensors
        dscores, dx = torch.ops.fastattn.softmax_gate_bwd(
            _last_dim_contiguous(dy), x, alpha, None if dalpha is None else dalpha.contiguous(), ctx.pool)
        return dscores, dx, None, None

    torch.library.register_autograd("fastattn::softmax_gate_fwd", _softmax_gate_backward,
                                    setup_context=_softmax_gate_setup_context)

    def _score_softmax_gate_setup_context(ctx, inputs, output):
        x, weight, mask, scale, pool = inputs
        ctx.save_for_backward(x, weight, output[1])
        ctx.scale, ctx.pool = scale, pool

    def _score_softmax_gate_backward(ctx, dy, dalpha):
        x, weight, alpha = ctx.saved_tensors
        dx, dweight = torch.ops.fastattn.score_softmax_gate_bwd(
            _last_dim_contiguous(dy), x, weight, alpha,
            None if dalpha is None else dalpha.contiguous(), ctx.scale, ctx.pool)
        return dx, dweight, None, None, None

    torch.library.register_autograd("fastattn::score_softmax_gate_fwd", _score_softmax_gate_backward,
                                    setup_context=_score_softmax_gate_setup_context)
