"""The registered ops: ``torch.ops.fastattn.*`` with fake (meta) implementations and autograd.

Schemas are defined once, in C++ (csrc/fastattn.cpp), and each device registers its kernels there
(CPU: csrc/cpu/, CUDA: csrc/cuda/). This file adds what torch.compile and autograd need:

- a fake implementation per op (shapes, dtypes, strides of the outputs, no data);
- the backward of each forward op, which calls the matching ``*_bwd`` op. Attention backward
  recomputes the probabilities from the saved lse (FlashAttention), so no Lq × Lk tensor is kept.

Forward ops return float32 statistics (float64 for float64 inputs): ``lse`` for attention, the
weights ``alpha`` for the softmax gates; both are differentiable outputs. The attention ops' lse is
in log2 units, the base the kernels compute in (``fastattn.attention`` returns it times ln 2, so the
statistic itself is never converted between forward and backward). attention_fwd also returns
``out_acc``, its output before rounding to float16/bfloat16, which the backward uses in place of out;
``need_acc=False`` (no gradient will be asked) returns it empty and lets the kernels skip what only the
backward needs.
"""
from __future__ import annotations

import torch

from .contract import ScoreMods, stat_dtype

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


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` with stride(-1) == 1, copied only when it lacks it: what every kernel needs (a gradient from
    ``.sum()`` arrives with all strides 0). 0-d tensors pass as they are. TorchScript compiles it."""
    return t if t.dim() == 0 or t.stride(-1) == 1 else t.contiguous()


def _empty(t):
    return t.new_empty((0,))


def has_out_acc(dtype):
    """Whether attention_fwd returns out_acc (float32, out before rounding) for inputs of ``dtype``."""
    return dtype in (torch.float16, torch.bfloat16)


def register_attention(prefix: str = "", *, fake: bool = True, acc_devices=("cpu", "cuda")):
    """Fake implementations and autograd for ``fastattn::{prefix}attention_{fwd,bwd}`` (schemas of
    csrc/fastattn.cpp: fwd -> (out, lse, out_acc), bwd -> (dq, dk, dv, dmask, dgate)). Every backend that
    defines such a pair (C++ here; Triton in fastattn.triton_kernels) registers it this way.
    ``fake=False`` skips the fake implementations (torch.library.triton_op makes its own);
    ``acc_devices``: the device types on which the kernels return out_acc (elsewhere it is empty)."""
    fwd, bwd = f"fastattn::{prefix}attention_fwd", f"fastattn::{prefix}attention_bwd"
    bwd_op = lambda: getattr(torch.ops.fastattn, prefix + "attention_bwd")
    with_acc = lambda q, need_acc: need_acc and has_out_acc(q.dtype) and q.device.type in acc_devices

    if fake:
        @torch.library.register_fake(fwd)
        def _fwd_fake(q, k, v, mask, gate, scale, causal, need_acc=True, window_left=-1, window_right=-1, softcap=0.0,
                      alibi_slopes=None, deterministic=False, dropout_p=0.0, dropout_seed=None):
            B, Hq, Lq, _ = q.shape
            out = q.new_empty((B, Hq, Lq, v.shape[-1]))
            lse = q.new_empty((B, Hq, Lq), dtype=stat_dtype(q.dtype))
            out_acc = q.new_empty((B, Hq, Lq, v.shape[-1]), dtype=torch.float32) if with_acc(q, need_acc) else _empty(q)
            return out, lse, out_acc

        @torch.library.register_fake(bwd)
        def _bwd_fake(dout, q, k, v, out, lse, mask, gate, dlse, scale, causal, need_dmask, window_left=-1,
                      window_right=-1, softcap=0.0, alibi_slopes=None, deterministic=False, dropout_p=0.0,
                      dropout_seed=None):
            dmask = mask.new_empty(mask.shape) if need_dmask else _empty(q)
            dgate = gate.new_empty(gate.shape) if gate is not None else _empty(q)
            return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dmask, dgate

    def setup_context(ctx, inputs, output):
        # every schema argument, defaults filled in: the score modifiers (window_left, window_right, softcap,
        # alibi_slopes), then deterministic, dropout_p and dropout_seed (the backward redraws the forward's dropout)
        q, k, v, mask, gate, scale, causal, need_acc, *rest = inputs
        mods = ScoreMods(*rest[:4])
        ctx.deterministic, ctx.dropout_p, dropout_seed = rest[4:]
        out, lse, out_acc = output
        # delta = rowsum(dout * out) is taken from the unrounded output where there is one: the rounded
        # one breaks rowsum(dS) = 0, and with it exact zeros of dq (saturated rows, repeated keys)
        ctx.save_for_backward(q, k, v, out_acc if with_acc(q, need_acc) else out, lse, mask, gate, mods.alibi_slopes,
                              dropout_seed)
        ctx.scale, ctx.causal, ctx.mods = scale, causal, mods[:3]
        ctx.need_dmask = mask is not None and mask.is_floating_point() and ctx.needs_input_grad[3]
        ctx.n_inputs = len(inputs)

    def backward(ctx, dout, dlse, _dout_acc):
        q, k, v, out, lse, mask, gate, alibi_slopes, dropout_seed = ctx.saved_tensors
        dq, dk, dv, dmask, dgate = bwd_op()(
            last_dim_contiguous(dout), q, k, v, out, lse, mask, gate, dlse,
            ctx.scale, ctx.causal, ctx.need_dmask, *ctx.mods, alibi_slopes, ctx.deterministic, ctx.dropout_p,
            dropout_seed)
        # the slopes get no gradient (fastattn.attention refuses slopes that require one)
        return (dq, dk, dv, dmask if ctx.need_dmask else None,
                dgate if gate is not None else None) + (None,) * (ctx.n_inputs - 5)

    torch.library.register_autograd(fwd, backward, setup_context=setup_context)


def register_varlen_attention(prefix: str = "", *, fake: bool = True, acc_devices=("cpu", "cuda")):
    """Fake implementations and autograd for ``fastattn::{prefix}varlen_attention_{fwd,bwd}`` (packed sequences,
    csrc/fastattn.cpp); arguments as :func:`register_attention`."""
    fwd, bwd = f"fastattn::{prefix}varlen_attention_fwd", f"fastattn::{prefix}varlen_attention_bwd"
    bwd_op = lambda: getattr(torch.ops.fastattn, prefix + "varlen_attention_bwd")
    with_acc = lambda q, need_acc: need_acc and has_out_acc(q.dtype) and q.device.type in acc_devices

    if fake:
        @torch.library.register_fake(fwd)
        def _fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, gate, scale, causal,
                      need_acc=True):
            total, Hq, _ = q.shape
            out = q.new_empty((total, Hq, v.shape[-1]))
            lse = q.new_empty((Hq, total), dtype=stat_dtype(q.dtype))
            out_acc = q.new_empty((total, Hq, v.shape[-1]), dtype=torch.float32) if with_acc(q, need_acc) else _empty(q)
            return out, lse, out_acc

        @torch.library.register_fake(bwd)
        def _bwd_fake(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, gate, dlse,
                      scale, causal):
            dgate = gate.new_empty(gate.shape) if gate is not None else _empty(q)
            return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dgate

    def setup_context(ctx, inputs, output):
        q, k, v, cu_q, cu_k, max_q, max_k, gate, scale, causal, need_acc = inputs
        out, lse, out_acc = output
        ctx.save_for_backward(q, k, v, out_acc if with_acc(q, need_acc) else out, lse, cu_q, cu_k, gate)
        ctx.args = (max_q, max_k)
        ctx.scale, ctx.causal = scale, causal

    def backward(ctx, dout, dlse, _dout_acc):
        q, k, v, out, lse, cu_q, cu_k, gate = ctx.saved_tensors
        dq, dk, dv, dgate = bwd_op()(last_dim_contiguous(dout), q, k, v, out, lse, cu_q, cu_k, *ctx.args, gate,
                                     dlse, ctx.scale, ctx.causal)
        return dq, dk, dv, None, None, None, None, dgate if gate is not None else None, None, None, None

    torch.library.register_autograd(fwd, backward, setup_context=setup_context)


def register_kvcache(prefix: str = ""):
    """The fake implementation of the forward-only ``fastattn::{prefix}attention_kvcache_fwd`` (no autograd)."""
    @torch.library.register_fake(f"fastattn::{prefix}attention_kvcache_fwd")
    def _kvcache_fake(q, k_cache, v_cache, seqlens_k, page_table, gate, scale, causal):
        B, Hq, Lq, _ = q.shape
        return q.new_empty((B, Hq, Lq, v_cache.shape[-1])), q.new_empty((B, Hq, Lq), dtype=stat_dtype(q.dtype))


def register_softmax_gates(prefix: str = "", *, fake: bool = True):
    """Fake implementations and autograd for ``fastattn::{prefix}softmax_gate_{fwd,bwd}`` and
    ``fastattn::{prefix}score_softmax_gate_{fwd,bwd}`` (schemas of csrc/fastattn.cpp).
    ``fake=False`` skips the fake implementations (torch.library.triton_op makes its own)."""
    op = lambda name: getattr(torch.ops.fastattn, prefix + name)
    name = lambda n: f"fastattn::{prefix}{n}"

    def out_fake(x, H, pool):
        B, N, D = x.shape
        y = x.new_empty((B, D) if pool else (B, N, D))
        return y, x.new_empty((B, N, H), dtype=stat_dtype(x.dtype))

    if fake:
        torch.library.register_fake(name("softmax_gate_fwd"))(
            lambda scores, x, mask, pool: out_fake(x, scores.shape[-1], pool))
        torch.library.register_fake(name("softmax_gate_bwd"))(
            lambda dy, x, alpha, dalpha, pool: (alpha.new_empty(alpha.shape, dtype=x.dtype), x.new_empty(x.shape)))
        torch.library.register_fake(name("score_softmax_gate_fwd"))(
            lambda x, weight, mask, scale, pool: out_fake(x, weight.shape[0], pool))
        torch.library.register_fake(name("score_softmax_gate_bwd"))(
            lambda dy, x, weight, alpha, dalpha, scale, pool: (x.new_empty(x.shape), weight.new_empty(weight.shape)))

    def gate_setup_context(ctx, inputs, output):
        scores, x, mask, pool = inputs
        ctx.save_for_backward(x, output[1])
        ctx.pool = pool

    def gate_backward(ctx, dy, dalpha):
        x, alpha = ctx.saved_tensors
        dscores, dx = op("softmax_gate_bwd")(
            last_dim_contiguous(dy), x, alpha, None if dalpha is None else dalpha.contiguous(), ctx.pool)
        return dscores, dx, None, None

    torch.library.register_autograd(name("softmax_gate_fwd"), gate_backward, setup_context=gate_setup_context)

    def score_setup_context(ctx, inputs, output):
        x, weight, mask, scale, pool = inputs
        ctx.save_for_backward(x, weight, output[1])
        ctx.scale, ctx.pool = scale, pool

    def score_backward(ctx, dy, dalpha):
        x, weight, alpha = ctx.saved_tensors
        dx, dweight = op("score_softmax_gate_bwd")(
            last_dim_contiguous(dy), x, weight, alpha,
            None if dalpha is None else dalpha.contiguous(), ctx.scale, ctx.pool)
        return dx, dweight, None, None, None

    torch.library.register_autograd(name("score_softmax_gate_fwd"), score_backward,
                                    setup_context=score_setup_context)


def register_attention_pool(prefix: str = "", *, fake: bool = True):
    """Fake implementations and autograd for ``fastattn::{prefix}attention_pool_{fwd,bwd}`` (schemas of
    csrc/fastattn.cpp). The forward's three outputs (y, lse, scores) are differentiable: the functional layer
    makes α from the scores and lse, so α's gradient arrives as theirs."""
    name = lambda n: f"fastattn::{prefix}{n}"
    bwd_op = lambda: getattr(torch.ops.fastattn, prefix + "attention_pool_bwd")

    if fake:
        @torch.library.register_fake(name("attention_pool_fwd"))
        def _fwd_fake(x, offsets, mask, V, U, w, bV, bU, return_scores):
            acc = stat_dtype(x.dtype)
            B, K = offsets.shape[0] - 1, w.shape[1]
            scores = x.new_empty((x.shape[0], K), dtype=acc) if return_scores else x.new_empty((0,), dtype=acc)
            return x.new_empty((B, K, x.shape[1]), dtype=acc), x.new_empty((B, K), dtype=acc), scores

        @torch.library.register_fake(name("attention_pool_bwd"))
        def _bwd_fake(dy, x, offsets, mask, V, U, w, bV, bU, y, lse, scores, dlse, dscores):
            like = lambda t: _empty(x) if t is None else t.new_empty(t.shape)
            return x.new_empty(x.shape), V.new_empty(V.shape), like(U), w.new_empty(w.shape), like(bV), like(bU)

    def setup_context(ctx, inputs, output):
        x, offsets, mask, V, U, w, bV, bU, return_scores = inputs
        y, lse, scores = output
        # the scores (N, K: K numbers per instance, not its Hd hidden units) when the forward returned them: the cpu
        # kernels take the softmax's gradient from them exactly; the others recompute
        ctx.save_for_backward(x, offsets, mask, V, U, w, bV, bU, y, lse, scores if return_scores else None)

    def backward(ctx, dy, dlse, dscores):
        x, offsets, mask, V, U, w, bV, bU, y, lse, scores = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(y)
        dx, dV, dU, dw, dbV, dbU = bwd_op()(
            dy.contiguous(), x, offsets, mask, V, U, w, bV, bU, y, lse, scores,
            None if dlse is None else dlse.contiguous(),
            None if dscores is None or dscores.numel() == 0 else dscores.contiguous())  # empty: scores not returned
        return (dx, None, None, dV, dU if U is not None else None, dw, dbV if bV is not None else None,
                dbU if bU is not None else None, None)

    torch.library.register_autograd(name("attention_pool_fwd"), backward, setup_context=setup_context)


if _C is not None:
    register_attention()
    register_varlen_attention()
    register_kvcache()
    register_softmax_gates()
    register_attention_pool()
