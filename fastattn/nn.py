"""Drop-in modules on fastattn's kernels (SPEC.md §5).

    fastattn.nn.MultiheadAttention          # torch.nn.MultiheadAttention, same everything, fastattn inside
    fastattn.nn.GatedMultiheadAttention     # + the output gate of "Gated Attention for LLMs", fused
    fastattn.nn.AttentionGate               # α = softmax over positions of W x; y = x ⊙ α (or pooled)
    fastattn.replace_attention(model)       # swap every torch.nn.MultiheadAttention in place

Mask conventions are torch's here (bool True = masked OUT, float added), the opposite of
``fastattn.attention``'s bool masks (True = attend); they are converted once, as broadcast views.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import functional

__all__ = ["MultiheadAttention", "GatedMultiheadAttention", "AttentionGate", "replace_attention"]


def _keeps_python_path(module, args):
    """Forward pre-hook that does nothing. Its presence is the point: ``nn.TransformerEncoderLayer``
    skips its fused fast path (``torch._transformer_encoder_layer_fwd``, which would read our weights
    and bypass our forward) whenever any submodule has forward hooks, so the layer calls our forward."""
    return None


def _install_python_path_guard(module):
    if _keeps_python_path not in module._forward_pre_hooks.values():
        module.register_forward_pre_hook(_keeps_python_path)


class MultiheadAttention(nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` running on ``fastattn.attention``.

    A subclass of torch's module: constructor, parameters (names, shapes, initialisation and RNG
    draws), state_dict keys, attributes (``batch_first``, ``_qkv_same_embed_dim``, ...), forward
    signature and return values are torch's, so a state_dict loads either way and code that inspects
    the module keeps working. ``backend`` (keyword only) is passed to ``fastattn.attention``.

    forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
            average_attn_weights=True, is_causal=False) -> (attn_output, attn_weights or None)

    - query (L, N, E) or (N, L, E) with ``batch_first``, or unbatched (L, E); key (S, N, kdim),
      value (S, N, vdim) likewise. attn_output has query's layout.
    - key_padding_mask (N, S) or (S,): bool (True = ignore that key) or float (added).
    - attn_mask (L, S) or (N·num_heads, L, S): bool (True = NOT allowed) or float (added). Combined
      with key_padding_mask without expanding either beyond the shape they broadcast to.
    - is_causal: torch's hint that attn_mask is the causal mask (an attn_mask is then required, as
      in torch); fastattn then applies causal masking in the kernel and does not read attn_mask.
    - need_weights: also return the attention weights (N, L, S), averaged over heads, or
      (N, num_heads, L, S) with ``average_attn_weights=False``. The output still comes from the
      fused kernel; the weights are recomputed exactly as exp(scores - lse) from its lse (this
      materialises L × S, as torch does). In training with dropout, the dropped weights are returned
      and the output is computed from them (materialising path), as torch does.
    - dropout: applied to the attention weights in training only (``fastattn.attention``'s
      ``dropout_p``, which runs on the reference backend); the random draws differ from torch's.

    Rows whose keys are all masked give 0 (the output is then out_proj's bias) and zero weights,
    never NaN; torch gives 0 on its need_weights=False path and NaN on its need_weights=True path.
    Nested-tensor inputs (what ``nn.TransformerEncoder`` makes in eval with a padding mask) are
    unpadded to a key_padding_mask, computed, and returned nested.
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False,
                 add_zero_attn=False, kdim=None, vdim=None, batch_first=False, device=None,
                 dtype=None, *, backend="auto"):
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
                         add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first,
                         device=device, dtype=dtype)
        self.backend = backend
        _install_python_path_guard(self)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        return _mha_forward(self, query, key, value, key_padding_mask, need_weights, attn_mask,
                            average_attn_weights, is_causal)

    def _gate_logits(self, query):
        """Output-gate logits in query's layout, (..., num_heads, head_dim or 1), or None."""
        return None

    def extra_repr(self):
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}, " \
               f"backend={self.backend!r}"


class GatedMultiheadAttention(MultiheadAttention):
    """MultiheadAttention with the output gate of "Gated Attention for Large Language Models"
    (Qiu et al., 2025, arXiv 2505.06708): Y' = Y ⊙ sigmoid(X W_g + b_g), where Y is the attention
    output (heads concatenated, before ``out_proj``) and X the query input.

    gate="elementwise": one gate per channel, ``gate_proj`` is Linear(embed_dim, embed_dim);
    gate="headwise": one gate per head, ``gate_proj`` is Linear(embed_dim, num_heads). The logits
    go to ``fastattn.attention(gate=...)``, so the sigmoid and product are fused into the kernel.
    Everything else, state_dict keys included (plus ``gate_proj.weight``/``gate_proj.bias``), is
    :class:`MultiheadAttention`'s; a torch MultiheadAttention state_dict loads with strict=False
    (the gate keeps its initialisation: xavier-uniform weight, zero bias, like the in-projection).
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False,
                 add_zero_attn=False, kdim=None, vdim=None, batch_first=False, device=None,
                 dtype=None, *, gate="elementwise", backend="auto"):
        if gate not in ("elementwise", "headwise"):
            raise ValueError(f"gate: expected 'elementwise' or 'headwise', got {gate!r}")
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
                         add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first,
                         device=device, dtype=dtype, backend=backend)
        self.gate = gate
        out = embed_dim if gate == "elementwise" else num_heads
        self.gate_proj = nn.Linear(embed_dim, out, bias=bias, device=device, dtype=dtype)
        nn.init.xavier_uniform_(self.gate_proj.weight)
        if self.gate_proj.bias is not None:
            nn.init.zeros_(self.gate_proj.bias)

    def _gate_logits(self, query):
        g = self.gate_proj(query)
        return g.unflatten(-1, (self.num_heads, -1))  # (..., H, head_dim) or (..., H, 1)

    def extra_repr(self):
        return super().extra_repr() + f", gate={self.gate!r}"


# ---------------------------------------------------------------------------------- MHA forward
def _canonical(mask, name):
    """torch's mask convention -> ("allow", bool True = attend) or ("bias", float), or None."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return ("allow", ~mask)
    if not torch.is_floating_point(mask):
        raise AssertionError(f"only bool and floating types of {name} are supported")
    return ("bias", mask)


def _as_bias(m, dtype):
    kind, t = m
    if kind == "bias":
        return t.to(dtype)
    return torch.zeros(t.shape, dtype=dtype, device=t.device).masked_fill_(~t, float("-inf"))


def _pad_keys(m, n):
    """Append n always-allowed key columns (for bias_k/bias_v and add_zero_attn)."""
    if m is None or n == 0:
        return m
    kind, t = m
    return kind, F.pad(t, (0, n), value=True if kind == "allow" else 0.0)


def _combine(a, b, dtype):
    """Both masks must hold: bool & bool, or float + float (a bool converted to 0 / -inf)."""
    if a is None or b is None:
        return a if b is None else b
    if a[0] == b[0] == "allow":
        return "allow", a[1] & b[1]
    return "bias", _as_bias(a, dtype) + _as_bias(b, dtype)


def _project(module, query, key, value):
    """In-projection in the inputs' own layout (no transposes): returns q, k, v (..., E)."""
    E = module.embed_dim
    b = module.in_proj_bias
    bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
    if module._qkv_same_embed_dim:
        W = module.in_proj_weight
        if query is key and key is value:
            return F.linear(query, W, b).chunk(3, dim=-1)
        wq, wk, wv = W.chunk(3)
        q = F.linear(query, wq, bq)
        if key is value:
            k, v = F.linear(key, W[E:], None if b is None else b[E:]).chunk(2, dim=-1)
            return q, k, v
        return q, F.linear(key, wk, bk), F.linear(value, wv, bv)
    return (F.linear(query, module.q_proj_weight, bq), F.linear(key, module.k_proj_weight, bk),
            F.linear(value, module.v_proj_weight, bv))


def _mha_forward(m, query, key, value, key_padding_mask, need_weights, attn_mask,
                 average_attn_weights, is_causal):
    if query.is_nested or key.is_nested or value.is_nested:
        return _nested_forward(m, query, key, value, key_padding_mask, need_weights, attn_mask,
                               average_attn_weights, is_causal)
    is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, m.num_heads)
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                           "module method `generate_square_subsequent_mask` to create this mask.")
    kpm = _canonical(key_padding_mask, "key_padding_mask")
    am = _canonical(attn_mask, "attn_mask")
    if not m._qkv_same_embed_dim and key.shape[:-1] != value.shape[:-1]:
        raise AssertionError(f"key's sequence and batch dims {tuple(key.shape[:-1])} do not match "
                             f"value's {tuple(value.shape[:-1])}")
    if m._qkv_same_embed_dim and key.shape != value.shape:
        raise AssertionError(f"key shape {tuple(key.shape)} does not match value shape {tuple(value.shape)}")
    if query.shape[-1] != m.embed_dim:
        raise AssertionError(f"was expecting embedding dimension of {m.embed_dim}, but got {query.shape[-1]}")

    # -- one layout for the rest: seq_dim is where L/S live in the inputs (and the output)
    if not is_batched:
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        if kpm is not None:
            kpm = kpm[0], kpm[1].unsqueeze(0)
        seq_dim = 1
    else:
        seq_dim = 1 if m.batch_first else 0
    bdim = 1 - seq_dim
    N, L, S = query.shape[bdim], query.shape[seq_dim], key.shape[seq_dim]
    H, E = m.num_heads, m.embed_dim
    hd = E // H

    q, k, v = _project(m, query, key, value)
    if m.bias_k is not None:  # one more key/value position, always allowed
        shape = (N, 1, E) if seq_dim == 1 else (1, N, E)
        k = torch.cat([k, m.bias_k.reshape(1, 1, E).expand(shape)], dim=seq_dim)
        v = torch.cat([v, m.bias_v.reshape(1, 1, E).expand(shape)], dim=seq_dim)

    def heads(t):  # (.., E) in the input layout -> (N, H, len, hd) view, last stride 1
        t = t.unflatten(-1, (H, hd))
        return t.permute(1, 2, 0, 3) if seq_dim == 0 else t.transpose(1, 2)

    q, k, v = heads(q), heads(k), heads(v)
    gate = m._gate_logits(query)
    if gate is not None:
        gate = gate.permute(1, 2, 0, 3) if seq_dim == 0 else gate.transpose(1, 2)
    if m.add_zero_attn:
        k = torch.cat([k, k.new_zeros(N, H, 1, hd)], dim=2)
        v = torch.cat([v, v.new_zeros(N, H, 1, hd)], dim=2)
    extra = int(m.bias_k is not None) + int(m.add_zero_attn)
    S_all = S + extra

    # -- masks: torch's convention -> fastattn's, as views broadcastable to (N, H, L, S)
    # The hint says attn_mask is the causal mask: the kernel masks instead of reading it. With
    # bias_k/add_zero_attn keys appended, torch itself uses the hint (top-left causal over all keys,
    # hiding the appended ones from early queries) only without key_padding_mask and need_weights,
    # and the padded mask otherwise; so do we.
    causal = bool(is_causal) and (extra == 0 or (kpm is None and not need_weights))
    if causal:
        am = None
    if am is not None:
        am = _pad_keys(am, extra)
        t = am[1]
        am = am[0], (t.view(1, 1, L, S_all) if t.dim() == 2 else t.reshape(N, H, L, S_all))
    if kpm is not None:
        kpm = _pad_keys(kpm, extra)
        kpm = kpm[0], kpm[1].view(N, 1, 1, S_all)
    mask = _combine(am, kpm, q.dtype)
    mask = None if mask is None else mask[1]

    dropout_p = m.dropout if m.training else 0.0
    if not need_weights:
        out = functional.attention(q, k, v, attn_mask=mask, causal=causal, gate=gate,
                                   dropout_p=dropout_p, backend=m.backend)
        weights = None
    else:
        out, weights = _attention_with_weights(q, k, v, mask, causal, gate, dropout_p, m.backend)
        if average_attn_weights:
            weights = weights.mean(dim=1)

    # -- (N, H, L, hd) -> input layout (.., E), out_proj
    out = out.permute(2, 0, 1, 3) if seq_dim == 0 else out.transpose(1, 2)
    out = F.linear(out.reshape(*out.shape[:2], E), m.out_proj.weight, m.out_proj.bias)
    if not is_batched:
        out = out.squeeze(0)
        weights = None if weights is None else weights.squeeze(0)
    return out, weights


def _attention_with_weights(q, k, v, mask, causal, gate, dropout_p, backend):
    """Output from the kernel, weights recomputed exactly from its lse: p = exp(s - lse)."""
    out, lse = functional.attention(q, k, v, attn_mask=mask, causal=causal, gate=gate,
                                    return_lse=True, backend=backend)
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = torch.matmul(q, k.transpose(-1, -2)).to(lse.dtype) * scale  # [N, H, L, S]
    if mask is not None and mask.dtype != torch.bool:
        s = s + mask.to(lse.dtype)
    allowed = mask if mask is not None and mask.dtype == torch.bool else None
    if causal:
        L, S = s.shape[-2:]
        tri = torch.ones(L, S, dtype=torch.bool, device=s.device).tril()
        allowed = tri if allowed is None else allowed & tri
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    lse = lse.unsqueeze(-1)
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))  # fully masked rows: p = 0, no NaN
    p = torch.exp(s - lse)
    if dropout_p > 0.0:  # the output must use the same dropped weights that are returned
        p = p * (torch.rand_like(p) >= dropout_p) / (1.0 - dropout_p)
        out = torch.matmul(p.to(v.dtype), v)
        if gate is not None:
            out = out * torch.sigmoid(gate.to(out.dtype))
    return out, p.to(q.dtype)


def _nested_forward(m, query, key, value, key_padding_mask, need_weights, attn_mask,
                    average_attn_weights, is_causal):
    """Self-attention on a nested (N, ragged L, E) batch, as nn.TransformerEncoder makes in eval:
    pad, attend with the padding as key_padding_mask, return nested again."""
    if not (query is key and key is value and m.batch_first) or key_padding_mask is not None:
        raise AssertionError("fastattn.nn.MultiheadAttention accepts a NestedTensor only for batch_first "
                             "self-attention (query is key is value) without key_padding_mask")
    lengths = torch.tensor([t.shape[0] for t in query.unbind()], device=query.device)
    x = query.to_padded_tensor(0.0)
    pad = torch.arange(x.shape[1], device=x.device)[None, :] >= lengths[:, None]  # True = padding
    out, w = _mha_forward(m, x, x, x, pad, need_weights, attn_mask, average_attn_weights, is_causal)
    return torch._nested_tensor_from_mask(out, ~pad, mask_check=False), w


# --------------------------------------------------------------------------------- AttentionGate
class AttentionGate(nn.Module):
    """Attention allocation over positions on ``fastattn.score_softmax_gate``.

    α[b, :, h] = softmax over positions n of (x[b, n] · weight[h]); channel c belongs to head
    c // (dim // num_heads). ``pool=False``: y = x ⊙ α, (B, N, dim). ``pool=True``: y = Σₙ α ⊙ x,
    (B, dim) (attention pooling, e.g. multiple-instance learning). Unbatched (N, dim) input gives
    (N, dim) or (dim,). The score bias is omitted: it is constant over positions and cancels in
    the softmax. ``weight`` (num_heads, dim) is initialised as nn.Linear's weight.

    forward(x, mask=None, return_weights=False): mask (B, N) bool, True = position takes part
    (fastattn's convention); masked positions get α = 0, an all-masked item gives y = 0.
    ``return_weights`` also returns α, (B, N, num_heads), for inspection and plots.
    """

    def __init__(self, dim, num_heads=1, pool=False, *, scale=1.0, device=None, dtype=None,
                 backend="auto"):
        super().__init__()
        if num_heads <= 0 or dim % num_heads != 0:
            raise ValueError(f"num_heads: must be positive and divide dim={dim}, got {num_heads}")
        self.dim, self.num_heads, self.pool, self.scale, self.backend = dim, num_heads, pool, scale, backend
        self.weight = nn.Parameter(torch.empty(num_heads, dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x, mask=None, return_weights=False):
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(0)
            mask = None if mask is None else mask.unsqueeze(0)
        y, alpha = functional.score_softmax_gate(x, self.weight, mask=mask, scale=self.scale,
                                                 pool=self.pool, return_weights=True, backend=self.backend)
        if unbatched:
            y, alpha = y.squeeze(0), alpha.squeeze(0)
        return (y, alpha) if return_weights else y

    def extra_repr(self):
        return f"dim={self.dim}, num_heads={self.num_heads}, pool={self.pool}, backend={self.backend!r}"


# ----------------------------------------------------------------------------- replace_attention
def replace_attention(model: nn.Module, backend: str = "auto") -> int:
    """Swap every ``torch.nn.MultiheadAttention`` in ``model`` for :class:`MultiheadAttention`, in place.

    The module object itself is converted (its class becomes fastattn's subclass), so parameters,
    buffers, device, dtype, training mode, hooks, and references held elsewhere (optimizers, shared
    submodules) all stay the same objects. Subclasses of torch's module with their own forward are
    left alone. ``nn.TransformerEncoder`` s holding swapped layers stop converting padded input to
    nested tensors, and swapped modules carry a no-op forward pre-hook that keeps
    ``nn.TransformerEncoderLayer`` off its fused fast path: the model runs fastattn in training and
    in eval, with or without grad. Outputs at padded query positions are then those of torch's
    python path (torch's nested fast path writes 0 there). ``model`` may itself be a
    MultiheadAttention. Returns how many modules were swapped.
    """
    count = 0
    for mod in model.modules():
        if type(mod) is nn.MultiheadAttention:
            mod.__class__ = MultiheadAttention
            mod.backend = backend
            _install_python_path_guard(mod)
            count += 1
    for mod in model.modules():
        if isinstance(mod, nn.TransformerEncoder) and any(
                isinstance(getattr(layer, "self_attn", None), MultiheadAttention) for layer in mod.layers):
            mod.use_nested_tensor = False
    return count
