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

Gemma 2's ``softcap`` (``attn_logit_softcapping``) runs in the kernels (``fastattn.attention``'s softcap). A
sliding-window layer (Mistral, Gemma 2: transformers passes ``sliding_window``) whose mask is exactly the causal
sliding window runs as ``causal="bottom_right", window_size=(sliding_window - 1, 0)`` without the mask (the
kernels skip the key tiles outside the window); any other mask (padding) is read as it is.

Two calls take a faster op than :func:`fastattn.attention` over the mask, computing the same thing
(calls with a softcap keep the general path):

- decoding (``generate()``): a few query rows over the cache's keys (Lq < Lk) with no gradient to
  compute run :func:`fastattn.attention_with_kvcache` over the K/V transformers passes (its whole cache,
  after its own update), when the mask is None (one query row, no padding) or exactly the causal one.
  A padded batch (left padding masks the first keys) keeps the general path.
- packed sequences (padding-free training, e.g. ``DataCollatorWithFlattening``): batch 1 whose
  ``position_ids`` restart within the row, or with the ``cu_seq_lens_q/k``, ``max_length_q/k`` kwargs,
  run :func:`fastattn.varlen_attention`, as the flash-attention implementations do. The mask transformers
  built for the packed row (causal within each sequence) is checked once per forward and not read; any
  other mask (padding, a sliding window, a model's own overlay) keeps the general path. With no mask at
  all (a forward that also fills a cache) the sequences stay separate, as with flash attention, where
  transformers' SDPA path would let them attend to each other.
"""
from __future__ import annotations

import weakref

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
    if kwargs.get("s_aux") is not None:
        raise ValueError("attn_implementation='fastattn' does not support attention sinks (`s_aux`); use 'eager'")
    softcap = float(kwargs.get("softcap") or 0.0)
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if position_bias is None and not dropout and not softcap:
        out = _decode(query, key, value, attention_mask, scaling)
        if out is None and is_causal:
            out = _packed(query, key, value, attention_mask, scaling, kwargs)
        if out is not None:
            return out, None
    # as transformers' SDPA path: the causal flag stands in for a mask that was skipped as purely causal
    # (top-left, as SDPA), never on single-token decoding
    causal = bool(query.shape[2] > 1 and attention_mask is None and is_causal)
    if position_bias is not None:  # additive bias (T5-style), combined with the mask or causality
        from transformers.integrations.sdpa_attention import create_position_bias_mask
        attention_mask = create_position_bias_mask(position_bias, attention_mask, causal, query, key)
        causal = False
    if attention_mask is not None and attention_mask.dim() == 2:
        attention_mask = attention_mask[None, None]
    window = kwargs.get("sliding_window")
    window_size = (-1, -1)
    if (isinstance(window, int) and window > 0 and attention_mask is not None and not torch.compiler.is_compiling()
            and _memo(_is_sliding_causal, attention_mask, window)):
        attention_mask, causal, window_size = None, "bottom_right", (window - 1, 0)
    out = functional.attention(query, key, value, attn_mask=attention_mask, causal=causal, scale=scaling,
                               dropout_p=float(dropout), window_size=window_size, softcap=softcap)
    return out.transpose(1, 2).contiguous(), None


def _decode(query, key, value, mask, scale):
    """attention_with_kvcache over transformers' cache when it computes what ``mask`` says, else None."""
    B, Hq, Lq, _ = query.shape
    Lk = key.shape[2]
    if not 0 < Lq < Lk or B == 0:
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        return None  # the op is forward-only
    if mask is None:
        # no mask: every key (transformers skips it on one query row without padding; several rows with no
        # mask are a prefill into a static cache, causal from the first key, which the op cannot express)
        if Lq > 1:
            return None
    elif torch.compiler.is_compiling() or not _memo(_is_bottom_right_causal, mask):
        return None
    lengths = torch.full((B,), Lk, dtype=torch.int32, device=query.device)
    out = functional.attention_with_kvcache(query, key, value, cache_seqlens=lengths, causal=True, scale=scale)
    return out.transpose(1, 2).contiguous()


def _is_bottom_right_causal(mask):
    """Whether a bool (B or 1, 1, Lq, Lk) mask lets query i see exactly keys j <= i + Lk - Lq: the last Lq
    positions of sequences that fill the cache (for Lq = 1: every key, i.e. no padding)."""
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1:
        return False
    Lq, Lk = mask.shape[2:]
    want = torch.ones(Lq, Lk, dtype=torch.bool, device=mask.device).tril_(Lk - Lq)
    return bool((mask == want).all())


def _is_sliding_causal(mask, window):
    """Whether a bool (B or 1, 1, Lq, Lk) mask lets query i see exactly keys i + Lk - Lq - window < j <= i + Lk - Lq:
    the causal sliding window transformers builds for the last Lq positions (no padding)."""
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1:
        return False
    Lq, Lk = mask.shape[2:]
    ones = torch.ones(Lq, Lk, dtype=torch.bool, device=mask.device)
    want = ones.tril(Lk - Lq) & ~ones.tril(Lk - Lq - window)
    return bool((mask == want).all())


def _packed(query, key, value, mask, scale, kwargs):
    """varlen_attention over the sequences packed in a batch-1 row, or None when the row is not packed or
    ``mask`` is not (exactly) the packed row's causal mask."""
    if query.shape[0] != 1 or query.shape[2] != key.shape[2] or query.shape[2] < 2 or torch.compiler.is_compiling():
        return None
    cu, max_len = _memo(_packed_extent, mask, kwargs.get("position_ids"), kwargs.get("cu_seq_lens_q"),
                        kwargs.get("cu_seq_lens_k"), kwargs.get("max_length_q"), query.shape[2], query.device)
    if cu is None:
        return None
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (L, H, D) views
    out = functional.varlen_attention(q, k, v, cu, cu, max_len, max_len, causal=True, scale=scale)
    return out[None]


def _packed_extent(mask, position_ids, cu_q, cu_k, max_length_q, L, device):
    """(cu_seqlens int32, max length) of the sequences packed in a row of L tokens, from the flash-attention
    kwargs or from where ``position_ids`` stop counting up by one (transformers' own packing rule); (None,
    None) when the row holds one sequence or the mask says something else."""
    none = None, None
    if cu_q is not None and cu_k is not None and max_length_q is not None:
        if cu_q is not cu_k and not torch.equal(cu_q, cu_k):
            return none
        cu = cu_q.to(device=device, dtype=torch.int32)
        if cu.dim() != 1 or cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != L:
            return none
        max_len = int(max_length_q)
    elif isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2 and position_ids.shape == (1, L):
        pos = position_ids[0]
        starts = torch.cat([pos.new_ones(1, dtype=torch.bool), pos[1:] - pos[:-1] != 1]).nonzero()[:, 0]
        if starts.numel() < 2:
            return none
        cu = torch.cat([starts, starts.new_tensor([L])]).to(device=device, dtype=torch.int32)
        max_len = int((cu[1:] - cu[:-1]).max())
    else:
        return none
    if mask is not None and not _is_packed_causal(mask, cu):
        return none
    return cu, max_len


def _is_packed_causal(mask, cu):
    """Whether a bool (1, 1, L, L) mask lets row i see exactly keys [start of i's sequence, i]. Compared in
    slabs of rows, so that no temporary is much larger than a few million entries."""
    L = mask.shape[-1]
    if mask.dtype != torch.bool or mask.shape != (1, 1, L, L):
        return False
    cols = torch.arange(L, device=mask.device)
    start = torch.repeat_interleave(cu[:-1].long(), (cu[1:] - cu[:-1]).long().to(cols.device), output_size=L)
    rows = max(1, (1 << 22) // max(L, 1))
    for r in range(0, L, rows):
        want = (cols >= start[r:r + rows, None]) & (cols <= cols[r:r + rows, None])
        if not torch.equal(mask[0, 0, r:r + rows], want):
            return False
    return True


# Every layer of one forward receives the same mask and position ids: what is read from them (a device
# sync each) is computed once and kept while those very tensors live unchanged.
_last = {}


def _memo(fn, *args):
    hit = _last.get(fn)
    if hit is not None and len(hit[0]) == len(args) and all(
            (ref is not None and ref() is a and seen == a._version) if isinstance(a, torch.Tensor)
            else (ref is None and seen == a) for (ref, seen), a in zip(hit[0], args)):
        return hit[1]
    result = fn(*args)
    _last[fn] = ([(weakref.ref(a), a._version) if isinstance(a, torch.Tensor) else (None, a) for a in args], result)
    return result


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
