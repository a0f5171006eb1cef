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
from .contract import causal_code, stat_dtype

__all__ = ["attention", "varlen_attention", "attention_with_kvcache", "kvcache_append", "softmax_gate",
           "score_softmax_gate", "attention_pool"]


def attention(q, k, v, attn_mask=None, causal=False, scale=None, gate=None, dropout_p=0.0,
              return_lse=False, dropout_mask=None, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
              dropout_seed=None):
    """out = softmax(scale·q·kᵀ + bias) · v [⊙ sigmoid(gate)], shapes as ``fastattn.attention``.

    q (B, Hq, Lq, D); k (B, Hkv, Lk, D); v (B, Hkv, Lk, Dv); attn_mask bool (True = attend) or float
    (added), broadcastable to (B, Hq, Lq, Lk); gate broadcastable to (B, Hq, Lq, Dv). Returns out
    (B, Hq, Lq, Dv) in q's dtype, and lse (B, Hq, Lq) in float32 (float64 for float64 q) when
    ``return_lse``. A row with no allowed key gives out = 0 and lse = -inf. Dropout keeps the weights
    ``dropout_mask`` names (bool, broadcastable to the scores, True = keep), else those the kernels keep
    for ``dropout_seed`` (an int64 tensor of one element: contract.dropout_keep), else a draw of torch.rand.

    Score modifiers, in this order: ``softcap`` c > 0 caps the scaled scores to c·tanh(s/c); the float mask
    is added; ``alibi_slopes`` ((Hq,) or (B, Hq)) add -slope·|i + Lk - Lq - j|; ``window_size`` = (left,
    right) hides keys j outside [i + Lk - Lq - left, i + Lk - Lq + right] (-1: that side unbounded).
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
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    allowed = contract.band_allowed(Lq, Lk, causal_code(causal), window_size[0], window_size[1], q.device)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = attn_mask if allowed is None else attn_mask & allowed
        else:
            s = s + attn_mask.to(acc)
    if alibi_slopes is not None:
        i = torch.arange(Lq, device=q.device).unsqueeze(1)
        j = torch.arange(Lk, device=q.device).unsqueeze(0)
        distance = (i + Lk - Lq - j).abs().to(acc)
        slopes = alibi_slopes.to(acc).reshape(-1 if alibi_slopes.dim() == 2 else 1, Hq, 1, 1)
        s = s - slopes * distance
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))

    # -- softmax that gives 0 (not NaN) on rows with no allowed key, and zero gradients there.
    # A NaN reaching a row (q, an allowed key, a mask entry) makes it NaN, lse included, as torch;
    # masked keys (-inf) keep weight exactly 0 even then.
    p, lse, empty = _softmax(s, dim=-1)
    lse = lse.squeeze(-1)

    if dropout_p > 0.0 or dropout_mask is not None:
        if dropout_mask is None and dropout_seed is not None:
            dropout_mask = contract.dropout_keep(int(dropout_seed), dropout_p, B, Hq, Lq, Lk, q.device)
        elif dropout_mask is None:
            dropout_mask = torch.rand_like(p) >= dropout_p
        p = contract.dropout_weights(p, dropout_mask, dropout_p)

    # -- weighted values, gate
    out = torch.matmul(p.to(v.dtype), v)  # [B, Hq, Lq, Dv]
    out = out.masked_fill(empty, 0.0)  # exactly 0, also where a masked value is inf or NaN
    if gate is not None:
        out = out * torch.sigmoid(gate.to(out.dtype))
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, causal=False,
                     scale=None, gate=None, return_lse=False):
    """:func:`attention` over B packed sequences: q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv),
    int32 cu_seqlens_q / cu_seqlens_k (B + 1): sequence b owns rows [cu[b], cu[b+1]). gate (total_q, Hq, Dv
    or 1). causal per sequence. Returns out (total_q, Hq, Dv) and lse (Hq, total_q) when ``return_lse``.
    The max_seqlen arguments only size kernel launches; here they are unused."""
    Hq, D, Dv = q.shape[1], q.shape[2], v.shape[2]
    scale = (1.0 / math.sqrt(D) if D else 1.0) if scale is None else scale
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    per_seq = lambda t, lo, hi: t[lo:hi].transpose(0, 1).unsqueeze(0)  # (1, H, L, D)
    outs, lses = [], []
    for b in range(len(cq) - 1):
        g = None if gate is None else per_seq(gate, cq[b], cq[b + 1])
        o, lse = attention(per_seq(q, cq[b], cq[b + 1]), per_seq(k, ck[b], ck[b + 1]), per_seq(v, ck[b], ck[b + 1]),
                           causal=causal, scale=scale, gate=g, return_lse=True)
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0])
    out = torch.cat(outs, 0) if outs else q.new_empty((q.shape[0], Hq, Dv))
    lse = torch.cat(lses, 1) if lses else q.new_empty((Hq, q.shape[0]), dtype=stat_dtype(q.dtype))
    return (out, lse) if return_lse else out


def kvcache_append(k_cache, v_cache, k, v, cache_seqlens, page_table=None):
    """Writes the new keys/values k, v (B, Hkv, Lnew, D / Dv) into the cache in place, at positions
    cache_seqlens[b] .. cache_seqlens[b] + Lnew - 1 of sequence b: k_cache (B, Hkv, Lcache, D), or paged
    (num_pages, Hkv, page_size, D) with page_table (B, max_pages) (position j of sequence b is row
    j % page_size of page page_table[b, j // page_size])."""
    B, _, Lnew, _ = k.shape
    pos = cache_seqlens.to(torch.long)[:, None] + torch.arange(Lnew, device=k.device)  # (B, Lnew)
    if page_table is None:
        rows = torch.arange(B, device=k.device)[:, None].expand(B, Lnew)
        slots = pos
    else:
        P = k_cache.shape[2]
        rows = page_table.to(torch.long).gather(1, pos // P)
        slots = pos % P
    # cache[rows, :, slots] is (B, Lnew, Hkv, D): advanced indices first
    k_cache[rows, :, slots] = k.transpose(1, 2).to(k_cache.dtype)
    v_cache[rows, :, slots] = v.transpose(1, 2).to(v_cache.dtype)


def attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, page_table=None, causal=False, scale=None,
                           gate=None, return_lse=False):
    """:func:`attention` of q (B, Hq, Lq, D) over the first cache_seqlens[b] keys of each sequence's cache
    (contiguous (B, Hkv, Lcache, D) or paged with ``page_table``, as :func:`kvcache_append`). causal: False, or
    True / "bottom_right": the Lq queries are the sequence's last Lq positions (query i sees keys
    j <= i + cache_seqlens[b] - Lq). gate (B, Hq, Lq, Dv or 1). Returns out (B, Hq, Lq, Dv) (and lse)."""
    B = q.shape[0]
    lengths = cache_seqlens.tolist()
    outs, lses = [], []
    for b in range(B):
        n = lengths[b]
        if page_table is None:
            kb, vb = k_cache[b:b + 1, :, :n], v_cache[b:b + 1, :, :n]
        else:
            P = k_cache.shape[2]
            pages = page_table[b, :(n + P - 1) // P].to(torch.long)
            flat = lambda c: c[pages].transpose(0, 1).reshape(c.shape[1], -1, c.shape[3])[None, :, :n]
            kb, vb = flat(k_cache), flat(v_cache)
        g = None if gate is None else gate[b:b + 1]
        o, lse = attention(q[b:b + 1], kb, vb, causal="bottom_right" if causal else False, scale=scale, gate=g,
                           return_lse=True)
        outs.append(o)
        lses.append(lse)
    out = torch.cat(outs, 0) if outs else q.new_empty((0, q.shape[1], q.shape[2], v_cache.shape[3]))
    lse = torch.cat(lses, 0) if lses else q.new_empty((0, q.shape[1], q.shape[2]), dtype=stat_dtype(q.dtype))
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


def attention_pool(x, V, w, U=None, bV=None, bU=None, offsets=None, mask=None, return_scores=False):
    """Attention pooling of bags of instances (gated ABMIL; Ilse et al. 2018), K branches at once.

    x (N, D): the instances of B bags packed one after another, bag b owning rows offsets[b] .. offsets[b+1]
    (``offsets`` (B + 1), as cu_seqlens; None: one bag); ``mask`` (N,) bool, False leaves a row out of its bag.
    For each row n and branch k: h_n = tanh(x_n V + bV) ⊙ sigmoid(x_n U + bU) (tanh alone without U), s_nk =
    h_n · w[:, k]; α_nk = softmax of s_nk over the rows of n's bag; y_bk = Σ_n α_nk x_n. V, U (D, Hd), bV, bU (Hd),
    w (Hd, K).

    The pre-activations x V + bV, x U + bU are made in x's dtype (as a Linear layer would), the rest in the
    statistics' dtype (float32; float64 for float64 x). Returns y (B, K, D) and lse (B, K), the log of each
    softmax's denominator, in the statistics' dtype; and with ``return_scores`` the scores s (N, K), -inf at
    rows left out. An empty bag gives y = 0 and lse = -inf; a left-out row takes no part at all (a NaN there
    reaches nothing).
    """
    acc = stat_dtype(x.dtype)
    # the scorer sees the rows that take part alone (a left-out row's 0 · NaN would otherwise reach the weights'
    # gradients through the activations' backward), and the pooled sum x with 0 there: nothing of a left-out row,
    # NaN included, goes anywhere
    kept = x if mask is None else x.index_select(0, mask.nonzero()[:, 0])
    h = torch.tanh(_linear(kept, V, bV).to(acc))
    if U is not None:
        h = h * torch.sigmoid(_linear(kept, U, bU).to(acc))
    s = h @ w.to(acc)  # (N, K), or the kept rows' (n, K)
    if mask is not None:
        s = s.new_full((x.shape[0], s.shape[1]), float("-inf")).index_copy(0, mask.nonzero()[:, 0], s)
        x = torch.where(mask[:, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
    y, lse, _ = pool_bags(s, x, offsets)
    return (y, lse, s) if return_scores else (y, lse)


def pool_bags(s, x, offsets):
    """(y, lse, α): α = softmax of the scores s (N, K) over each bag's rows (bags as :func:`attention_pool`; -inf
    leaves a row out), y (B, K, D) = Σ_n α_nk x_n in s's dtype, lse (B, K). x holds nothing at left-out rows."""
    bounds = [0, x.shape[0]] if offsets is None else offsets.tolist()
    ys, lses, alphas = [], [], []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        p, lse, _ = _softmax(s[lo:hi], dim=0)  # (n, K), (1, K)
        ys.append(p.transpose(0, 1) @ x[lo:hi].to(s.dtype))
        lses.append(lse[0])
        alphas.append(p)
    K, D = s.shape[1], x.shape[1]
    y = torch.stack(ys) if ys else s.new_empty((0, K, D))
    lse = torch.stack(lses) if lses else s.new_empty((0, K))
    return y, lse, torch.cat(alphas) if alphas else s


def _linear(x, weight, bias):
    return x @ weight if bias is None else torch.addmm(bias, x, weight)
