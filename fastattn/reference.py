"""Plain-PyTorch reference: the executable definition of every fastattn op (docs/CONTRACT.md §1).

Short and obviously right, any device, any float dtype including float64. It materialises the
scores. In float16/bfloat16 the matmuls run in that dtype and the softmax statistics in float32
(docs/CONTRACT.md §2.1), so the reference run "in the same low precision" is a fair yardstick for the
kernels (docs/CONTRACT.md §4), and the same call in float64 is the truth they are measured against.

Inputs are assumed valid here: ``fastattn.functional`` checks them before any backend runs.
"""
from __future__ import annotations

import math

import torch

from . import contract
from .contract import CAUSAL_NONE, causal_code, stat_dtype

__all__ = ["attention", "softmax_gate", "score_softmax_gate"]


def causal_allowed(Lq: int, Lk: int, causal, device=None) -> torch.Tensor | None:
    """Bool (Lq, Lk), True where query i may see key j, or None when not causal."""
    code = causal_code(causal)
    if code == CAUSAL_NONE:
        return None
    return contract.causal_allowed(Lq, Lk, contract.causal_offset(code, Lq, Lk), device)


def attention(q, k, v, attn_mask=None, causal=False, scale=None, gate=None, dropout_p=0.0,
              return_lse=False, dropout_mask=None):
    """out = softmax(scale·q·kᵀ + bias) · v [⊙ sigmoid(gate)], shapes as ``fastattn.attention``.

    q (B, Hq, Lq, D); k (B, Hkv, Lk, D); v (B, Hkv, Lk, Dv); attn_mask bool (True = attend) or float
    (added), broadcastable to (B, Hq, Lq, Lk); gate broadcastable to (B, Hq, Lq, Dv). Returns out
    (B, Hq, Lq, Dv) in q's dtype, and lse (B, Hq, Lq) in float32 (float64 for float64 q) when
    ``return_lse``. A row with no allowed key gives out = 0 and lse = -inf. ``dropout_mask`` (bool,
    broadcastable to the scores, True = keep) replaces the random draw, for tests.
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    scale = (1.0 / math.sqrt(D) if D else 1.0) if scale is None else scale  # D = 0: every score is 0
    if Hkv != Hq and Hkv > 0:  # GQA / MQA: query head h reads kv head h // (Hq // Hkv)
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
    acc = stat_dtype(q.dtype)

    # -- scores, in the inputs' precision, then the statistics' precision
    s = torch.matmul(q, k.transpose(-1, -2)).to(acc) * scale  # [B, Hq, Lq, Lk]
    allowed = causal_allowed(Lq, Lk, causal, q.device)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = attn_mask if allowed is None else attn_mask & allowed
        else:
            s = s + attn_mask.to(acc)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))

    # -- softmax that gives 0 (not NaN) on rows with no allowed key, and zero gradients there.
    # A NaN reaching a row (q, an allowed key, a mask entry) makes it NaN, lse included, as torch;
    # masked keys (-inf) keep weight exactly 0 even then.
    p, lse, empty = _softmax(s, dim=-1)
    lse = lse.squeeze(-1)

    if dropout_p > 0.0 or dropout_mask is not None:
        if dropout_mask is None:
            dropout_mask = torch.rand_like(p) >= dropout_p
        p = p * dropout_mask / (1.0 - dropout_p)

    # -- weighted values, gate
    out = torch.matmul(p.to(v.dtype), v)  # [B, Hq, Lq, Dv]
    out = out.masked_fill(empty, 0.0)  # exactly 0, also where a masked value is inf or NaN
    if gate is not None:
        out = out * torch.sigmoid(gate.to(out.dtype))
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def _softmax(s, dim):
    """(p, lse, empty) of softmax over ``dim`` (keepdim): p = 0 where s = -inf, and rows with no
    finite-or-NaN entry (empty) get p = 0 and lse = -inf with zero gradients; NaN spreads as torch."""
    if s.shape[dim] == 0:  # nothing to attend to: every row is empty
        shape = list(s.shape)
        shape[dim] = 1
        return s, s.new_full(shape, float("-inf")), torch.ones(shape, dtype=torch.bool, device=s.device)
    m = s.amax(dim=dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    masked = s == float("-inf")
    # where, not exp(-inf) = 0: no gradient (NaN or not) reaches a masked entry through the sum
    e = torch.where(masked, torch.zeros_like(s), torch.exp(s - m))
    denom = e.sum(dim=dim, keepdim=True)
    empty = denom == 0
    safe = torch.where(empty, torch.ones_like(denom), denom)  # log(1), x / 1: finite gradients
    p = torch.where(masked, torch.zeros_like(e), e / safe)
    lse = (torch.log(safe) + m).masked_fill(empty, float("-inf"))
    return p, lse, empty


def _masked_softmax_over_positions(scores, mask):
    """softmax over dim 1 of (B, N, H), positions with mask False excluded; all-masked -> 0."""
    acc = stat_dtype(scores.dtype)
    s = scores.to(acc)
    if mask is not None:
        s = s.masked_fill(~mask[:, :, None], float("-inf"))
    return _softmax(s, dim=1)[0]


def softmax_gate(scores, x, mask=None, pool=False, return_weights=False):
    """α = softmax over positions of scores; y = x ⊙ α per head (or Σₙ α x when ``pool``).

    scores (B, N, H), x (B, N, D) with H dividing D (channel c belongs to head c // (D // H)),
    mask bool (B, N), True = position takes part. y is (B, N, D), or (B, D) when pooling; α is
    (B, N, H) in scores' dtype.
    """
    B, N, D = x.shape
    H = scores.shape[-1]
    alpha = _masked_softmax_over_positions(scores, mask)  # [B, N, H]
    a = alpha.to(x.dtype).repeat_interleave(D // H, dim=-1)  # [B, N, D]
    y = (a * x).sum(dim=1) if pool else a * x
    return (y, alpha.to(scores.dtype)) if return_weights else y


def score_softmax_gate(x, weight, mask=None, scale=1.0, pool=False, return_weights=False):
    """softmax_gate with scores[b, n, h] = scale · Σ_c x[b, n, c] · weight[h, c], weight (H, D)."""
    scores = torch.matmul(x, weight.t()) * scale
    return softmax_gate(scores, x, mask=mask, pool=pool, return_weights=return_weights)
