"""Public ops: check the inputs, pick a backend, call it (docs/CONTRACT.md §1).

Path of a call: here -> backends.select -> backend method -> torch.ops.fastattn.<op> (ops.py adds
fake + autograd) -> kernel in csrc/cpu/, csrc/cuda/ or triton_kernels/.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import guard_or_false
from torch.nn.attention.bias import CausalBias, CausalVariant

from . import _checks, reference
from .backends import Problem, select
from .contract import causal_code

__all__ = ["attention", "varlen_attention", "attention_with_kvcache", "scaled_dot_product_attention", "softmax_gate",
           "score_softmax_gate", "attention_pool"]


def attention(q, k, v, *, attn_mask=None, causal=False, scale=None, gate=None, dropout_p=0.0,
              return_lse=False, backend="auto", window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
              deterministic=None):
    """Fused attention: softmax(scale · q kᵀ + mask) v, optionally ⊙ sigmoid(gate).

    Args:
        q: (B, Hq, Lq, D). k: (B, Hkv, Lk, D). v: (B, Hkv, Lk, Dv). Hq % Hkv == 0 (GQA/MQA: query
            head h reads kv head h // (Hq // Hkv)). Same float dtype and device; any strides.
        attn_mask: None, bool (True = may attend, as SDPA) or float (added to the scores),
            broadcastable to (B, Hq, Lq, Lk). A float mask that requires grad gets its gradient.
            Fused backends read a float mask in q's dtype (it is cast when it differs).
        causal: False, True / "top_left" (query i sees keys j <= i, as SDPA), or "bottom_right"
            (j <= i + Lk - Lq, as FlashAttention). Combines with attn_mask.
        scale: multiplies q·k; default 1/sqrt(D).
        gate: None or output-gate logits broadcastable to (B, Hq, Lq, Dv), e.g. (B, Hq, Lq, Dv)
            elementwise or (B, Hq, Lq, 1) headwise: the output becomes attn ⊙ sigmoid(gate).
        dropout_p: dropout on the attention weights (after softmax, kept ones scaled by 1/(1-p)), as SDPA;
            applied whenever > 0 (pass 0.0 in eval). The kernels draw it from Philox keyed by a seed taken from
            the device's default generator (torch.manual_seed makes it reproducible) and draw it again in the
            backward (no mask is stored); every backend that has it drops the same weights for a seed
            (contract.dropout_keep). Fused on cpu, triton and cuda.
        return_lse: also return lse (B, Hq, Lq), the natural log of the softmax denominator of the
            scaled, masked scores: float32 (float64 for float64 inputs), -inf on rows with no
            allowed key. It is differentiable.
        backend: "auto", "cuda", "triton", "cpu" or "reference" (see ``fastattn.backends()``).
        window_size: (left, right), FlashAttention's sliding window: query i sees keys j with
            i + Lk - Lq - left <= j <= i + Lk - Lq + right; -1 leaves a side unbounded. Combines with
            causal and attn_mask (a key must pass all three). Key tiles outside every row's window are
            skipped: the cost is O(Lq · window).
        softcap: c > 0 caps the scaled scores to c · tanh(s / c) before the mask is added (Gemma 2);
            0 for none.
        alibi_slopes: None, or ALiBi's slopes (Hq,) or (B, Hq): adds -slope · |i + Lk - Lq - j| to the
            scores (after the cap), computed in the kernels. Constants: they get no gradient (a tensor
            that requires one is refused).
        deterministic: True for gradients that are the same, bit for bit, every time the backward runs on the
            same inputs and device (the cuda kernels then sum dq without atomics: slower, and up to 8 float32
            copies of dq as workspace); None (default) follows ``torch.use_deterministic_algorithms``. The cpu
            and triton kernels are deterministic either way.

    Returns:
        out (B, Hq, Lq, Dv) in q's dtype (rows with no allowed key are 0), and lse if asked.
    """
    attn_mask, causal = _causal_bias(attn_mask, causal)
    mods = _checks.score_mods(q, window_size, softcap, alibi_slopes)
    deterministic = _checks.deterministic(deterministic)
    if F.scaled_dot_product_attention is not _TORCH_SDPA or _maybe_dtensor(q):  # context parallelism?
        from .distributed import over_shards
        res = over_shards(q, k, v, attn_mask, causal, scale, gate, dropout_p, return_lse, backend, mods.names(),
                          deterministic)
        if res is not None:
            return res
    B, Hq, Hkv, Lq, Lk, D, Dv = _checks.attention_inputs(q, k, v, attn_mask, gate, scale, dropout_p, mods)
    code = causal_code(causal)
    scale = default_scale(D) if scale is None else float(scale)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, attn_mask, gate))
    problem = Problem("attention", q.device.type, q.dtype, D=D, Dv=Dv, dropout=dropout_p > 0, causal=code != 0,
                      float_mask=attn_mask is not None and attn_mask.is_floating_point(), grad=grad,
                      score_mods=mods.names())
    impl = select(backend, problem)
    if _maybe_zero(B, Hq, Lq, Lk, D, Dv):
        impl = select("reference", problem)  # empty problems: no kernel launch
    seed = dropout_seed(q.device) if dropout_p > 0 else None
    out, lse = impl.attention(q, k, v, attn_mask, gate, scale, code, dropout_p, grad, mods, deterministic, seed)
    return (out, lse) if return_lse else out


def dropout_seed(device):
    """A seed for dropout's Philox: 63 random bits of ``device``'s default generator, an int64 tensor there (the
    kernels read it: no host sync, and torch.compile and CUDA graphs take the draw as any other random op)."""
    return torch.empty((), dtype=torch.int64, device=device).random_()


_TORCH_SDPA = F.scaled_dot_product_attention  # torch's context_parallel() replaces it while it runs


def _maybe_dtensor(t):
    """Whether t is a DTensor, by its type's name: torch.distributed.tensor is imported only once one is seen."""
    return type(t) is not torch.Tensor and type(t).__name__ == "DTensor"


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False, scale=None,
                     gate=None, return_lse=False, backend="auto"):
    """:func:`attention` over a batch of sequences of different lengths, packed without padding
    (FlashAttention's ``flash_attn_varlen_func``).

    Args:
        q: (total_q, Hq, D), the queries of every sequence one after another. k: (total_k, Hkv, D).
            v: (total_k, Hkv, Dv). GQA as in :func:`attention`; any strides.
        cu_seqlens_q, cu_seqlens_k: int32 (B + 1) offsets: sequence b owns query rows
            [cu_seqlens_q[b], cu_seqlens_q[b+1]) and key rows [cu_seqlens_k[b], cu_seqlens_k[b+1]); they start at
            0, never decrease and end at total_q / total_k. Sequences of length 0 are allowed.
        max_seqlen_q, max_seqlen_k: ints, at least the longest query / key sequence (they size the launch).
        causal: per sequence; False, True / "top_left" (query i sees keys j <= i, as :func:`attention`), or
            "bottom_right" (j <= i + Lk_b - Lq_b: FlashAttention's ``causal=True``). Equal lengths: the same.
        scale, backend: as :func:`attention`. gate: (total_q, Hq, Dv), or headwise (total_q, Hq, 1).
        return_lse: also return lse (Hq, total_q) (FlashAttention's varlen layout), natural log, float32.

    The offsets are checked (a device sync on a GPU) except under torch.compile and CUDA-graph capture.
    Returns out (total_q, Hq, Dv) (rows with no key are 0), and lse if asked.
    """
    B, Hq, Hkv, D, Dv = _checks.varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                               gate, scale)
    code = causal_code(causal)
    scale = default_scale(D) if scale is None else float(scale)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, gate))
    problem = Problem("varlen_attention", q.device.type, q.dtype, D=D, Dv=Dv, causal=code != 0, grad=grad)
    impl = select(backend, problem)
    if _maybe_zero(B, Hq, q.shape[0], k.shape[0], D, Dv):
        impl = select("reference", problem)
    out, lse = impl.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
                                     gate, scale, code, grad)
    return (out, lse) if return_lse else out


def attention_with_kvcache(q, k_cache, v_cache, *, k=None, v=None, cache_seqlens, page_table=None, causal=False,
                           scale=None, gate=None, return_lse=False, backend="auto"):
    """Decoding: attention of a few new queries per sequence over a KV cache, optionally appending their
    keys and values to it first (FlashAttention's ``flash_attn_with_kvcache``, in fastattn's (B, H, L, D)
    layout). Forward only (inference).

    Args:
        q: (B, Hq, Lq, D): Lq >= 1 new queries per sequence (1 for decoding, more for speculative decoding
            or a prefill chunk).
        k_cache, v_cache: the cache, (B, Hkv, Lcache, D / Dv) (Hugging Face's layout), or, with
            ``page_table``, paged: (num_pages, Hkv, page_size, D / Dv).
        k, v: None, or the new keys / values (B, Hkv, Lnew, D / Dv): written into the cache in place at
            positions cache_seqlens[b] .. cache_seqlens[b] + Lnew - 1 of sequence b before attending.
        cache_seqlens: int32 (B): how many keys each sequence holds before the new ones. The queries attend
            to keys [0, cache_seqlens[b] + Lnew). It is not updated: add Lnew yourself for the next step.
        page_table: None, or int32 (B, max_pages): key j of sequence b lives in row j % page_size of page
            page_table[b, j // page_size] (vLLM / FlashInfer / FlashAttention paging).
        causal: False (every key of the sequence), or True / "bottom_right": the Lq queries are the
            sequence's last Lq positions, query i sees keys j <= i + cache_seqlens[b] + Lnew - Lq (what
            FlashAttention's ``causal=True`` means here; "top_left" has no meaning over a cache and is refused).
        scale, gate, backend: as :func:`attention` (gate broadcastable to (B, Hq, Lq, Dv)).
        return_lse: also return lse (B, Hq, Lq), natural log, float32.

    The lengths and page ids are checked against the cache (a device sync on a GPU) except under
    torch.compile and CUDA-graph capture. Returns out (B, Hq, Lq, Dv), and lse if asked.
    """
    B, Hq, Hkv, Lq, D, Dv, Lnew = _checks.kvcache_inputs(q, k_cache, v_cache, k, v, cache_seqlens, page_table, gate,
                                                         scale)
    code = causal_code(causal)
    if code == causal_code("top_left") and causal is not True:
        raise ValueError("causal: over a kv cache the queries are the last positions: pass True or 'bottom_right' "
                         "(or False), not 'top_left'")
    code = causal_code("bottom_right") if code else code
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k_cache, v_cache, k, v, gate)):
        raise RuntimeError("attention_with_kvcache is forward-only (inference): run it under torch.no_grad(), or "
                           "train with fastattn.attention / fastattn.varlen_attention")
    scale = default_scale(D) if scale is None else float(scale)
    if k is not None:
        reference.kvcache_append(k_cache, v_cache, k, v, cache_seqlens, page_table)
    seqlens_k = cache_seqlens + Lnew if Lnew else cache_seqlens
    problem = Problem("attention_kvcache", q.device.type, q.dtype, D=D, Dv=Dv, causal=code != 0)
    impl = select(backend, problem)
    if _maybe_zero(B, Hq, Lq, D, Dv):
        impl = select("reference", problem)
    out, lse = impl.attention_kvcache(q, k_cache, v_cache, seqlens_k, page_table, gate, scale, code)
    return (out, lse) if return_lse else out


def default_scale(D):
    """1/sqrt(D); 1 for D = 0, where every score is 0 whatever the scale (SDPA's output there is
    the plain mean of the values)."""
    return 1.0 / math.sqrt(D) if D else 1.0


def _maybe_zero(*sizes):
    """Whether any size is 0, decided without a guard: an unknown symbolic size (torch.export with a
    data-dependent batch) counts as nonzero, and the kernels handle 0 at run time."""
    return any(guard_or_false(n == 0) for n in sizes)


def _causal_bias(attn_mask, causal):
    """torch's CausalBias masks (torch.nn.attention.bias.causal_upper_left / causal_lower_right) map
    onto fastattn's own causal modes, which are faster than any mask; other masks pass through."""
    if not isinstance(attn_mask, CausalBias):
        return attn_mask, causal
    if causal:
        raise ValueError("CausalBias should not be used with causal=True")
    square = attn_mask.seq_len_q == attn_mask.seq_len_kv
    return None, True if square or attn_mask.variant == CausalVariant.UPPER_LEFT else "bottom_right"


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False):
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` on fastattn's kernels.

    Same signature, shapes ((N, ..., Hq, L, E) with any leading dims, broadcast as SDPA does), mask
    semantics (bool True = attend, float added; dtype bool, float32 or query's; torch's CausalBias
    masks), errors (torch's exception types and messages), and results (rows with no allowed key
    give 0, as SDPA; zero-size dims give SDPA's shapes and values).

    Jagged nested tensors (B, H, j, E) (``torch.nested.nested_tensor(seqs, layout=torch.jagged)`` of (j, H, E)
    sequences, ``.transpose(1, 2)``, as torch's SDPA docs show) run :func:`varlen_attention`: query sequence b
    attends to key sequence b, and the output is jagged like the query, as torch returns it. ``is_causal`` is
    causal within each sequence, where query and key sequences have the same lengths (self-attention); with
    other lengths torch's kernels disagree (flash aligns bottom-right, memory-efficient top-left) and its CPU
    path refuses it, so it is refused. Masks are refused, as by torch; dropout is not supported.
    """
    if any(isinstance(t, torch.Tensor) and t.is_nested for t in (query, key, value)):
        return _jagged_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    attn_mask, causal = _causal_bias(attn_mask, bool(is_causal))  # first, as torch's CausalBias dispatch
    _checks.sdpa_inputs(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)

    def heads(t):
        return t.shape[-3] if t.dim() >= 3 else 1

    Hq, Hk = heads(query), heads(key)
    lead = torch.broadcast_shapes(query.shape[:-3], key.shape[:-3], value.shape[:-3])
    N = math.prod(lead)
    L, S, E, Ev = query.shape[-2], key.shape[-2], query.shape[-1], value.shape[-1]

    def to4d(t, h, length, d):
        return t.expand(*lead, *t.shape[-3 if t.dim() >= 3 else -2:]).reshape(N, h, length, d)

    q4 = to4d(query, Hq, L, E)
    k4 = to4d(key, Hk, S, E)
    v4 = to4d(value, Hk, S, Ev)
    mask4 = None
    if attn_mask is not None:
        mask4 = attn_mask.expand(*lead, Hq, L, S).reshape(N, Hq, L, S)
    out = attention(q4, k4, v4, attn_mask=mask4, causal=causal, scale=scale, dropout_p=dropout_p)
    return out.reshape(*lead, *query.shape[-3:-2] if query.dim() >= 3 else (), L, Ev)


def _jagged_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """scaled_dot_product_attention on jagged nested tensors (B, H, j, E) through varlen_attention."""
    qkv = (("query", query), ("key", key), ("value", value))
    nested = [isinstance(t, torch.Tensor) and t.is_nested for _, t in qkv]
    if not all(nested):  # torch's checks and messages
        raise ValueError(f"Expected query, key, and value to be nested tensors, but got query.is_nested: {nested[0]}, "
                         f"key.is_nested: {nested[1]}, and value.is_nested: {nested[2]} instead.")
    if not query.dtype == key.dtype == value.dtype:
        raise ValueError(f"Expected query, key, and value to have the same dtype, but got query.dtype: {query.dtype}, "
                         f"key.dtype: {key.dtype}, and value.dtype: {value.dtype} instead.")
    if not query.device == key.device == value.device:
        raise ValueError(f"Expected query, key, and value to have the same device type, but got query.device: "
                         f"{query.device}, key.device: {key.device}, and value.device: {value.device} instead.")
    if attn_mask is not None:
        raise ValueError("Masks are not yet supported!")
    for name, t in qkv:
        if t.layout != torch.jagged or t.dim() != 4 or t._ragged_idx != 2:
            raise ValueError(f"{name}: expected a jagged nested tensor (B, H, j, E): "
                             f"torch.nested.nested_tensor(seqs, layout=torch.jagged) of (j, H, E) sequences, "
                             f".transpose(1, 2); got {t.layout} of shape {tuple(t.shape)}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0.0 <= dropout_p <= 1.0:
        raise RuntimeError(f"dropout probability has to be between 0 and 1, but got {dropout_p}")
    if dropout_p > 0:
        raise NotImplementedError("fastattn.scaled_dot_product_attention: dropout on jagged nested tensors is not "
                                  "supported (varlen_attention has none)")
    B, Hq, Hk, Hv = query.size(0), query.size(1), key.size(1), value.size(1)
    if not B == key.size(0) == value.size(0):
        raise RuntimeError(f"Expected query, key and value to have the same batch size, got query {B}, key "
                           f"{key.size(0)} and value {value.size(0)}")
    if Hk != Hv or not (Hq == Hk or enable_gqa and Hk and Hq % Hk == 0):
        raise RuntimeError(f"Number of heads: query {Hq}, key {Hk}, value {Hv}: key and value need the same, and "
                           f"query the same or, with enable_gqa=True, a multiple of it")
    if query.size(-1) != key.size(-1):
        raise RuntimeError(f"Expected query and key to have the same head dim (last dim), got query "
                           f"{query.size(-1)} and key {key.size(-1)}")
    (q, cu_q, max_q), (k, cu_k, max_k), (v, cu_v, _) = (_packed_rows(t.transpose(1, 2)) for t in (query, key, value))
    if not _same(cu_k, cu_v):
        raise RuntimeError("Expected key and value to have the same sequence lengths")
    if is_causal and not _same(cu_q, cu_k):
        raise RuntimeError("is_causal=True on jagged query and key sequences of different lengths: torch's kernels "
                           "align causality differently there; use fastattn.varlen_attention with causal="
                           "'top_left' or 'bottom_right'")
    out = varlen_attention(q, k, v, cu_q.to(torch.int32), cu_k.to(torch.int32), max_q, max_k, causal=bool(is_causal),
                           scale=scale)
    return torch.nested.nested_tensor_from_jagged(out, cu_q, max_seqlen=max_q).transpose(1, 2)


def _packed_rows(t):
    """(values (total, H, E), offsets (B + 1), longest length) of a jagged (B, j, H, E): its own values and
    offsets (the output then shares the query's ragged dim; the length is cached on it), or, for a tensor with
    holes between its sequences (torch.nested.narrow), the rows of each sequence gathered one after another."""
    if t.lengths() is None:
        return t.values(), t.offsets(), t._get_max_seqlen()
    lengths = t.lengths()
    cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    rows = torch.arange(int(cu[-1]), device=cu.device) + torch.repeat_interleave(t.offsets()[:-1] - cu[:-1], lengths)
    return t.values().index_select(0, rows), cu, int(lengths.max())


def _same(a, b):
    return a is b or torch.equal(a, b)


def softmax_gate(scores, x, *, mask=None, pool=False, return_weights=False, backend="auto"):
    """Attention allocation over positions: α = softmax over n of scores; y = x ⊙ α (or Σₙ α x).

    Args:
        scores: (B, N, H) scores E(x) from any network; H divides D.
        x: (B, N, D), same dtype and device. Channel c belongs to head c // (D // H).
        mask: None or bool (B, N), True = position takes part; masked positions get α = 0, and a
            batch item with every position masked gives y = 0 and zero gradients.
        pool: False -> y = x ⊙ α, (B, N, D); True -> y = Σₙ α ⊙ x, (B, D).
        return_weights: also return α, (B, N, H), in scores' dtype (differentiable).
        backend: "auto", "cuda", "triton", "cpu" or "reference".
    """
    B, N, D, H = _checks.gate_inputs(x, scores=scores, mask=mask)
    impl = _gate_backend(backend, "softmax_gate", x)
    y, alpha = impl.softmax_gate(scores, x, mask, bool(pool))
    return (y, alpha.to(scores.dtype)) if return_weights else y


def score_softmax_gate(x, weight, *, mask=None, scale=1.0, pool=False, return_weights=False,
                       backend="auto"):
    """softmax_gate with the scores made inside the kernel by a linear map.

    scores[b, n, h] = scale · Σ_c x[b, n, c] · weight[h, c]; x (B, N, D), weight (H, D) with H
    dividing D; the rest as :func:`softmax_gate`. Gradients flow to x and weight.
    """
    B, N, D, H = _checks.gate_inputs(x, weight=weight, mask=mask)
    _checks.scale(scale)
    impl = _gate_backend(backend, "score_softmax_gate", x)
    y, alpha = impl.score_softmax_gate(x, weight, mask, float(scale), bool(pool))
    return (y, alpha.to(x.dtype)) if return_weights else y


def attention_pool(x, V, w, U=None, *, bV=None, bU=None, offsets=None, mask=None, return_weights=False,
                   backend="auto"):
    """Attention pooling of bags of instances, as multiple-instance learning does it (ABMIL, Ilse et al. 2018;
    CLAM's gated scorer and its multi-branch variant), fused: the scorer, the softmax over each bag and the pooled
    sum run in one op, forward and backward, without storing the hidden activations (the backward recomputes them).

    For instance n of bag b and branch k: h_n = tanh(x_n V + bV) ⊙ sigmoid(x_n U + bU) (gated; tanh alone when U
    is None), s_nk = h_n · w[:, k], α_nk = softmax of s_nk over the instances of bag b, y_bk = Σ_n α_nk x_n.

    Args:
        x: the bags, either packed, (N_total, D), bag b owning rows offsets[b] .. offsets[b+1] (one bag without
            ``offsets``), or padded, (B, N, D) with ``mask`` marking the real instances. Any strides.
        V: (D, Hd), the tanh branch's weight (a Linear(D, Hd)'s weight transposed). U: None or (D, Hd), the
            sigmoid branch's. w: (Hd, K), one column per branch. bV, bU: None or (Hd,). All in x's dtype and
            device. A bias of w would cancel in the softmax, so there is none.
        offsets: None, or int32 / int64 (B + 1) offsets from 0 to N_total, never decreasing (cu_seqlens); empty
            bags are allowed. Only with a packed x. Checked (a device sync on a GPU) except under torch.compile and
            CUDA-graph capture.
        mask: None, or bool, (N_total,) for a packed x or (B, N) for a padded one: False leaves the instance out of
            its bag (weight 0, nothing of it reaches any output or gradient, NaN included).
        return_weights: also return α in x's dtype, (N_total, K) packed or (B, N, K) padded, 0 at left-out
            instances; differentiable.
        backend: "auto", "cuda", "triton", "cpu" or "reference" (see ``fastattn.backends()``).

    Returns:
        y (B, K, D) in x's dtype (0 for a bag with no instance), and α if asked. Gradients flow to x, V, U, w, bV
        and bU. A NaN in an instance that takes part makes its bag's y (every branch) and gradients NaN.
    """
    B, N, D, Hd, K = _checks.pool_inputs(x, V, w, U, bV, bU, offsets, mask)
    padded = x.dim() == 3
    rows = x.reshape(B * N, D) if padded else x  # a view where the strides allow it
    if padded:
        offsets = torch.arange(0, B * N + 1, N, device=x.device) if N else torch.zeros(B + 1, device=x.device,
                                                                                    dtype=torch.long)
        mask = None if mask is None else mask.reshape(-1)
    elif offsets is None:
        offsets = torch.tensor([0, N], device=x.device)
    offsets = offsets.to(torch.long).contiguous()
    mask = None if mask is None else mask.contiguous()
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, V, U, w, bV, bU))
    problem = Problem("attention_pool", x.device.type, x.dtype, grad=grad)
    impl = select(backend, problem)
    if _maybe_zero(B, rows.shape[0], D, Hd, K):
        impl = select("reference", problem)
    # the scores (N, K) come back for α, and for a backward (the cpu kernels' softmax gradient is taken from them)
    y, lse, scores = impl.attention_pool(rows, offsets, mask, V, U, w, bV, bU, bool(return_weights) or grad)
    y = y.to(x.dtype)
    if not return_weights:
        return y
    # α = exp(s - lse of the instance's bag): its gradient reaches the op as those of the scores and of lse
    bag = torch.repeat_interleave(torch.arange(B, device=x.device), offsets.diff(), output_size=rows.shape[0])
    left_out = scores == float("-inf")
    # (where around the difference too: a bag with no row left has lse = -inf, and exp(0 - -inf) would send
    # 0 · inf = NaN back to its lse)
    alpha = torch.where(left_out, 0.0, torch.exp(torch.where(left_out, 0.0, scores - lse[bag])))
    alpha = alpha.to(x.dtype)
    return y, (alpha.reshape(B, N, K) if padded else alpha)


def _gate_backend(backend, op, x):
    impl = select(backend, Problem(op, x.device.type, x.dtype, gate_size=x.shape[1] * x.shape[2]))
    if _maybe_zero(*x.shape):
        impl = select("reference", Problem(op, x.device.type, x.dtype))
    return impl
