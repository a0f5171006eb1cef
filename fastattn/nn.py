"""Drop-in modules on fastattn's kernels (docs/CONTRACT.md §5).

    fastattn.nn.MultiheadAttention          # torch.nn.MultiheadAttention, same everything, fastattn inside
    fastattn.nn.GatedMultiheadAttention     # + the output gate of "Gated Attention for LLMs", fused
    fastattn.nn.AttentionGate               # α = softmax over positions of W x; y = x ⊙ α (or pooled)
    fastattn.nn.AttentionPooling            # gated ABMIL / CLAM attention pooling of bags, fused
    fastattn.replace_attention(model)       # swap every torch.nn.MultiheadAttention in place

Mask conventions are torch's here (bool True = masked OUT, float added), the opposite of
``fastattn.attention``'s bool masks (True = attend); they are converted once, as broadcast views.

The modules, and torch models holding them, can be compiled with ``torch.jit.script`` (and saved
with ``torch.jit.save``). TorchScript cannot call fastattn's Python dispatch, so scripted code calls
the registered ops directly: ``torch.ops.fastattn.attention_fwd`` and ``score_softmax_gate_fwd``,
fastattn._C's kernels for the tensors' device (so scripting needs fastattn._C), whatever ``backend``
says. Attention dropout, which those kernels do not fuse, is then applied to materialised weights
(as with ``need_weights``).
"""
import math
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import contract, functional, reference
from .ops import last_dim_contiguous

__all__ = ["MultiheadAttention", "GatedMultiheadAttention", "AttentionGate", "AttentionPooling", "replace_attention"]


def _keeps_python_path(module, args: Tuple[Tensor]) -> None:
    """Forward pre-hook that does nothing. Its presence is the point: ``nn.TransformerEncoderLayer``
    skips its fused fast path (``torch._transformer_encoder_layer_fwd``, which would read our weights
    and bypass our forward) whenever any submodule has forward hooks, so the layer calls our forward.
    It sits on ``out_proj``, which forward never calls: TorchScript compiles a module's hooks for its
    forward's full signature but calls them with the call's positional arguments only, so a hook on
    the attention module itself would make it unscriptable. Scripted layers do not see hooks at all;
    replace_attention guards those (see there)."""
    return None


def _install_python_path_guard(module):
    hooks = module.out_proj._forward_pre_hooks
    if _keeps_python_path not in hooks.values():
        module.out_proj.register_forward_pre_hook(_keeps_python_path)


class MultiheadAttention(nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` running on ``fastattn.attention``.

    A subclass of torch's module: constructor, parameters (names, shapes, initialisation and RNG
    draws), state_dict keys, attributes (``batch_first``, ``_qkv_same_embed_dim``, ...), forward
    signature and return values are torch's, so a state_dict loads either way and code that inspects
    the module keeps working. ``backend`` (keyword only) is passed to ``fastattn.attention`` (not
    when scripted: see the module's docstring).

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

    Parameters of mixed dtypes are accepted or refused as torch does: an ``in_proj_bias`` in another
    dtype than the inputs is added in the inputs' dtype where torch's (L, N, E) view of the input is
    not contiguous (batch_first with N > 1, or a non-contiguous input), and raises RuntimeError
    elsewhere; keys or values that end up in another dtype than the queries raise RuntimeError.
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False,
                 add_zero_attn=False, kdim=None, vdim=None, batch_first=False, device=None,
                 dtype=None, *, backend="auto"):
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
                         add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first,
                         device=device, dtype=dtype)
        self.backend = backend
        _install_python_path_guard(self)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        if query.is_nested or key.is_nested or value.is_nested:
            return self._nested_forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                        average_attn_weights, is_causal)
        return self._padded_forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                    average_attn_weights, is_causal)

    def _gate_logits(self, query: Tensor) -> Optional[Tensor]:
        """Output-gate logits in query's layout, (..., num_heads, head_dim or 1), or None."""
        return None

    def _padded_forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor],
                        need_weights: bool, attn_mask: Optional[Tensor], average_attn_weights: bool,
                        is_causal: bool) -> Tuple[Tensor, Optional[Tensor]]:
        is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, self.num_heads)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                               "module method `generate_square_subsequent_mask` to create this mask.")
        kpm = _canonical(key_padding_mask, "key_padding_mask")
        am = _canonical(attn_mask, "attn_mask")
        if not self._qkv_same_embed_dim and key.shape[:-1] != value.shape[:-1]:
            raise AssertionError(f"key's sequence and batch dims {_fmt(key.shape[:-1])} do not match "
                                 f"value's {_fmt(value.shape[:-1])}")
        if self._qkv_same_embed_dim and key.shape != value.shape:
            raise AssertionError(f"key shape {_fmt(key.shape)} does not match value shape {_fmt(value.shape)}")
        if query.shape[-1] != self.embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {self.embed_dim}, but got {query.shape[-1]}")

        # -- one layout for the rest: seq_dim is where L/S live in the inputs (and the output)
        if not is_batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if kpm is not None:
                kpm = kpm.unsqueeze(0)
            seq_dim = 1
        else:
            seq_dim = 1 if self.batch_first else 0
        bdim = 1 - seq_dim
        N, L, S = query.shape[bdim], query.shape[seq_dim], key.shape[seq_dim]
        H, E = self.num_heads, self.embed_dim
        hd = E // H

        q, k, v = self._in_projection(query, key, value, seq_dim)
        bias_k, bias_v = self.bias_k, self.bias_v
        if bias_k is not None and bias_v is not None:  # one more key/value position, always allowed
            shape = [N, 1, E] if seq_dim == 1 else [1, N, E]
            k = torch.cat([k, bias_k.reshape(1, 1, E).expand(shape)], dim=seq_dim)
            v = torch.cat([v, bias_v.reshape(1, 1, E).expand(shape)], dim=seq_dim)
        if k.dtype != q.dtype or v.dtype != q.dtype:  # torch.cat promotes; torch's attention then raises
            raise RuntimeError(f"expected query, key and value of one dtype after the in-projection (and "
                               f"bias_k, bias_v), got query {q.dtype}, key {k.dtype} and value {v.dtype}")

        q, k, v = _heads(q, H, hd, seq_dim), _heads(k, H, hd, seq_dim), _heads(v, H, hd, seq_dim)
        gate = self._gate_logits(query)
        if gate is not None:
            gate = gate.permute(1, 2, 0, 3) if seq_dim == 0 else gate.transpose(1, 2)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros([N, H, 1, hd])], dim=2)
            v = torch.cat([v, v.new_zeros([N, H, 1, hd])], dim=2)
        extra = int(bias_k is not None) + int(self.add_zero_attn)
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
            am = am.view(1, 1, L, S_all) if am.dim() == 2 else am.reshape(N, H, L, S_all)
        if kpm is not None:
            kpm = _pad_keys(kpm, extra).view(N, 1, 1, S_all)
        mask = _combine(am, kpm, q.dtype)

        dropout_p = self.dropout if self.training else 0.0
        weights: Optional[Tensor] = None
        if not need_weights:
            out = _attention(q, k, v, mask, causal, gate, dropout_p, self.backend)
        else:
            out, w = _attention_with_weights(q, k, v, mask, causal, gate, dropout_p, self.backend)
            weights = w.mean(dim=1) if average_attn_weights else w

        # -- (N, H, L, hd) -> input layout (.., E), out_proj. A 2-D F.linear, as torch's: its bias must
        # have the input's dtype (addmm), where F.linear on a non-contiguous 3-D input would cast it.
        out = out.permute(2, 0, 1, 3) if seq_dim == 0 else out.transpose(1, 2)
        shape = [out.shape[0], out.shape[1], E]
        out = F.linear(out.reshape(-1, E), self.out_proj.weight, self.out_proj.bias).view(shape)
        if not is_batched:
            out = out.squeeze(0)
            if weights is not None:
                weights = weights.squeeze(0)
        return out, weights

    def _in_projection(self, query: Tensor, key: Tensor, value: Tensor, seq_dim: int) -> Tuple[Tensor, Tensor, Tensor]:
        """In-projection in the inputs' own layout (no transposes): returns q, k, v (..., E)."""
        E = self.embed_dim
        b = self.in_proj_bias
        bq = bk = bv = bkv = b
        if b is not None:
            bq, bk, bv, bkv = b[:E], b[E:2 * E], b[2 * E:], b[E:]
        W = self.in_proj_weight
        if W is not None:
            if query is key and key is value:
                qkv = F.linear(query, W, _bias_for(query, b, seq_dim)).chunk(3, dim=-1)
                return qkv[0], qkv[1], qkv[2]
            q = F.linear(query, W[:E], _bias_for(query, bq, seq_dim))
            if key is value:
                kv = F.linear(key, W[E:], _bias_for(key, bkv, seq_dim)).chunk(2, dim=-1)
                return q, kv[0], kv[1]
            return (q, F.linear(key, W[E:2 * E], _bias_for(key, bk, seq_dim)),
                    F.linear(value, W[2 * E:], _bias_for(value, bv, seq_dim)))
        wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        assert wq is not None and wk is not None and wv is not None  # separate weights when not packed
        return (F.linear(query, wq, _bias_for(query, bq, seq_dim)), F.linear(key, wk, _bias_for(key, bk, seq_dim)),
                F.linear(value, wv, _bias_for(value, bv, seq_dim)))

    def _nested_forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor],
                        need_weights: bool, attn_mask: Optional[Tensor], average_attn_weights: bool,
                        is_causal: bool) -> Tuple[Tensor, Optional[Tensor]]:
        """Self-attention on a nested (N, ragged L, E) batch, as nn.TransformerEncoder makes in eval:
        pad, attend with the padding as key_padding_mask, return nested again."""
        if not (query is key and key is value and self.batch_first) or key_padding_mask is not None:
            raise AssertionError("fastattn.nn.MultiheadAttention accepts a NestedTensor only for batch_first "
                                 "self-attention (query is key is value) without key_padding_mask")
        lengths = torch.tensor([t.shape[0] for t in query.unbind()], device=query.device)
        x = query.to_padded_tensor(0.0)
        pad = torch.arange(x.shape[1], device=x.device)[None, :] >= lengths[:, None]  # True = padding
        out, w = self._padded_forward(x, x, x, pad, need_weights, attn_mask, average_attn_weights, is_causal)
        return torch._nested_tensor_from_mask(out, ~pad, mask_check=False), w

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

    def _gate_logits(self, query: Tensor) -> Optional[Tensor]:
        g = self.gate_proj(query)
        return g.unflatten(-1, [self.num_heads, -1])  # (..., H, head_dim) or (..., H, 1)

    def extra_repr(self):
        return super().extra_repr() + f", gate={self.gate!r}"


# ---------------------------------------------------------------------------------- MHA forward
# Free functions on tensors and plain values (TorchScript compiles them; its functions cannot take
# modules or be nested).
def _fmt(shape: List[int]) -> str:
    return "(" + ", ".join([str(n) for n in shape]) + ")"


def _canonical(mask: Optional[Tensor], name: str) -> Optional[Tensor]:
    """torch's mask convention -> fastattn's: bool True = may attend, or float added."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return ~mask
    if not torch.is_floating_point(mask):
        raise AssertionError(f"only bool and floating types of {name} are supported")
    return mask


def _as_bias(m: Tensor, dtype: torch.dtype) -> Tensor:
    if m.dtype != torch.bool:
        return m.to(dtype)
    return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(~m, float("-inf"))


def _pad_keys(m: Tensor, n: int) -> Tensor:
    """Append n always-allowed key columns (for bias_k/bias_v and add_zero_attn)."""
    if n == 0:
        return m
    return F.pad(m, [0, n], value=1.0 if m.dtype == torch.bool else 0.0)


def _combine(a: Optional[Tensor], b: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """Both masks must hold: bool & bool, or float + float (a bool converted to 0 / -inf)."""
    if a is None:
        return b
    if b is None:
        return a
    if a.dtype == torch.bool and b.dtype == torch.bool:
        return a & b
    return _as_bias(a, dtype) + _as_bias(b, dtype)


def _bias_for(x: Tensor, b: Optional[Tensor], seq_dim: int) -> Optional[Tensor]:
    """The in-projection bias for input x, where its dtype differs, as torch treats it. torch projects
    the (L, N, E) view of x with F.linear, which adds the bias in place to the matmul's result (so in
    x's dtype) when that view is not contiguous, and otherwise calls addmm, which needs one dtype."""
    if b is None or b.dtype == x.dtype:
        return b
    if (x.transpose(0, 1) if seq_dim == 1 else x).is_contiguous():
        raise RuntimeError(f"in_proj_bias: expected the input's dtype {x.dtype}, got {b.dtype}")
    return b.to(x.dtype)


def _heads(t: Tensor, H: int, hd: int, seq_dim: int) -> Tensor:
    """(.., E) in the input layout -> (N, H, len, hd) view, last stride 1."""
    t = t.unflatten(-1, [H, hd])
    return t.permute(1, 2, 0, 3) if seq_dim == 0 else t.transpose(1, 2)


def _fused_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], causal: bool,
                     gate: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """fastattn's attention op with its argument conventions (what the fused backends pass it):
    mask and gate expanded to (B, H, Lq, Lk) / (B, H, Lq, Dv) in q's dtype (a bool mask stays bool)."""
    B, H, Lq, D = q.shape[0], q.shape[1], q.shape[2], q.shape[3]
    Lk, Dv = k.shape[2], v.shape[3]
    m: Optional[Tensor] = None
    if mask is not None:
        m = (mask if mask.dtype == torch.bool else mask.to(q.dtype)).expand([B, H, Lq, Lk])
    g: Optional[Tensor] = None
    if gate is not None:
        g = gate.to(q.dtype).expand([B, H, Lq, Dv])
    out, lse, _ = torch.ops.fastattn.attention_fwd(last_dim_contiguous(q), last_dim_contiguous(k),
                                                   last_dim_contiguous(v), m, g, 1.0 / math.sqrt(D),
                                                   1 if causal else 0)
    return out, lse


def _attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], causal: bool, gate: Optional[Tensor],
               dropout_p: float, backend: str) -> Tensor:
    if torch.jit.is_scripting():
        if dropout_p > 0.0:  # not fused: dropped materialised weights give the output
            return _attention_with_weights(q, k, v, mask, causal, gate, dropout_p, backend)[0]
        return _fused_attention(q, k, v, mask, causal, gate)[0]
    return functional.attention(q, k, v, attn_mask=mask, causal=causal, gate=gate, dropout_p=dropout_p,
                                backend=backend)


def _attention_lse(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], causal: bool, gate: Optional[Tensor],
                   backend: str) -> Tuple[Tensor, Tensor]:
    if torch.jit.is_scripting():
        out, lse2 = _fused_attention(q, k, v, mask, causal, gate)
        return out, lse2 * 0.6931471805599453  # the op's lse is in log2 units: times ln 2
    return functional.attention(q, k, v, attn_mask=mask, causal=causal, gate=gate, return_lse=True, backend=backend)


def _attention_with_weights(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], causal: bool,
                            gate: Optional[Tensor], dropout_p: float, backend: str) -> Tuple[Tensor, Tensor]:
    """Output from the kernel, weights recomputed exactly from its lse: p = exp(s - lse)."""
    out, lse = _attention_lse(q, k, v, mask, causal, gate, backend)
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = torch.matmul(q, k.transpose(-1, -2)).to(lse.dtype) * scale  # [N, H, L, S]
    allowed: Optional[Tensor] = None
    if mask is not None:
        if mask.dtype == torch.bool:
            allowed = mask
        else:
            s = s + mask.to(lse.dtype)
    if causal:
        tri = contract.causal_allowed(s.shape[-2], s.shape[-1], 0, s.device)  # top_left
        allowed = tri if allowed is None else allowed & tri
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    lse = lse.unsqueeze(-1)
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))  # fully masked rows: p = 0, no NaN
    p = torch.exp(s - lse)
    if dropout_p > 0.0:  # the output must use the same dropped weights that are returned
        p = contract.dropout_weights(p, torch.rand_like(p) >= dropout_p, dropout_p)
        out = torch.matmul(p.to(v.dtype), v)
        if gate is not None:
            out = out * torch.sigmoid(gate.to(out.dtype))
    return out, p.to(q.dtype)


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

    TorchScript has no return type that depends on an argument's value: scripted, forward returns
    ``Union[Tensor, Tuple[Tensor, Tensor]]``, which scripted callers refine, e.g. with
    ``assert isinstance(y, torch.Tensor)``.
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

    def forward(self, x: Tensor, mask: Optional[Tensor] = None,
                return_weights: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(0)
            if mask is not None:
                mask = mask.unsqueeze(0)
        if torch.jit.is_scripting():
            y, alpha = torch.ops.fastattn.score_softmax_gate_fwd(
                last_dim_contiguous(x), last_dim_contiguous(self.weight), mask, float(self.scale), self.pool)
            alpha = alpha.to(x.dtype)
        else:
            y, alpha = functional.score_softmax_gate(x, self.weight, mask=mask, scale=self.scale,
                                                     pool=self.pool, return_weights=True, backend=self.backend)
        if unbatched:
            y, alpha = y.squeeze(0), alpha.squeeze(0)
        if return_weights:
            return y, alpha
        return y

    def extra_repr(self):
        return f"dim={self.dim}, num_heads={self.num_heads}, pool={self.pool}, backend={self.backend!r}"


class AttentionPooling(nn.Module):
    """Attention pooling of bags of instances (ABMIL, Ilse et al. 2018; CLAM's gated attention network and its
    multi-branch variant) on ``fastattn.attention_pool``: y[b, k] = Σ_n α_nk x_n with α_nk = softmax over bag b's
    instances of wₖ · (tanh(V x_n + bV) ⊙ sigmoid(U x_n + bU)).

    Parameters, in CLAM's ``Attn_Net_Gated(L=dim, D=hidden, dropout, n_classes=branches)`` layout:

    - ``attention_a``: Linear(dim, hidden), the tanh branch (the op's V = attention_a.weight.T, bV = its bias);
    - ``attention_b``: Linear(dim, hidden), the sigmoid branch (U, bU); absent when ``gated=False`` (ABMIL's
      plain attention, tanh alone);
    - ``attention_c``: Linear(hidden, branches, bias=False), one scorer per branch (w = attention_c.weight.T).
      CLAM's attention_c has a bias; it adds the same number to every score of a branch and cancels in the
      softmax, so it is left out. :meth:`load_clam_state_dict` loads a CLAM attention network's weights.

    forward(x, offsets=None, mask=None, return_weights=False) takes bags as

    - a list of (N_b, dim) tensors (packed into one call): α comes back as a list of (N_b, branches);
    - packed rows (N_total, dim) with ``offsets`` (B + 1, as cu_seqlens; none: one bag) and optionally a (N_total,)
      bool ``mask``: α (N_total, branches);
    - a padded batch (B, N, dim) with a (B, N) bool ``mask`` (True = a real instance): α (B, N, branches).

    and returns y (B, branches, dim) (and α with ``return_weights``). ``dropout`` (CLAM: 0.25) drops the tanh
    and sigmoid activations in training as CLAM does; the fused op has no dropout, so such a forward runs the
    scorer in plain torch ops (the same math, unfused) and the pooling per bag. In eval, or with dropout 0,
    everything is fused.
    """

    def __init__(self, dim, hidden=256, gated=True, branches=1, dropout=0.0, *, device=None, dtype=None,
                 backend="auto"):
        super().__init__()
        if dim <= 0 or hidden <= 0 or branches <= 0:
            raise ValueError(f"dim, hidden, branches: expected positive sizes, got {dim}, {hidden}, {branches}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout}")
        kw = dict(device=device, dtype=dtype)
        self.dim, self.hidden, self.gated, self.branches, self.dropout = dim, hidden, gated, branches, dropout
        self.backend = backend
        self.attention_a = nn.Linear(dim, hidden, **kw)
        self.attention_b = nn.Linear(dim, hidden, **kw) if gated else None
        self.attention_c = nn.Linear(hidden, branches, bias=False, **kw)

    def forward(self, x, offsets: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                return_weights: bool = False):
        lengths = None
        if isinstance(x, (list, tuple)):
            if offsets is not None or mask is not None:
                raise ValueError("offsets, mask: a list of bags carries its own sizes; pass neither")
            lengths = [int(t.shape[0]) for t in x]
            offsets = torch.tensor([0] + lengths, device=x[0].device if x else None).cumsum(0)
            x = torch.cat(list(x)) if x else torch.empty(0, self.dim, device=self.attention_a.weight.device,
                                                         dtype=self.attention_a.weight.dtype)
        b = self.attention_b
        V, bV, w = self.attention_a.weight.t(), self.attention_a.bias, self.attention_c.weight.t()
        U, bU = (b.weight.t(), b.bias) if b is not None else (None, None)
        if self.training and self.dropout > 0:
            y, alpha = self._dropout_forward(x, offsets, mask)
        else:
            y, alpha = functional.attention_pool(x, V, w, U, bV=bV, bU=bU, offsets=offsets, mask=mask,
                                                 return_weights=True, backend=self.backend)
        if not return_weights:
            return y
        return y, (list(alpha.split(lengths)) if lengths is not None else alpha)

    def _dropout_forward(self, x, offsets, mask):
        """The scorer in torch ops with CLAM's dropout on both activations, then the reference's softmax and pooling
        per bag; masks as the fused op does."""
        padded = x.dim() == 3
        rows = x.reshape(-1, self.dim)
        if padded:
            B, N = x.shape[0], x.shape[1]
            offsets = torch.arange(B + 1, device=x.device) * N
            mask = None if mask is None else mask.reshape(-1)
        if mask is not None:
            rows = torch.where(mask[:, None], rows, 0)
        a = F.dropout(torch.tanh(self.attention_a(rows)), self.dropout, True)
        if self.attention_b is not None:
            a = a * F.dropout(torch.sigmoid(self.attention_b(rows)), self.dropout, True)
        s = self.attention_c(a).to(contract.stat_dtype(x.dtype))  # (N, K)
        if mask is not None:
            s = s.masked_fill(~mask[:, None], float("-inf"))
        y, _, alpha = reference.pool_bags(s, rows, offsets)
        y, alpha = y.to(x.dtype), alpha.to(x.dtype)
        return y, (alpha.reshape(x.shape[0], x.shape[1], -1) if padded else alpha)

    def load_clam_state_dict(self, state_dict, strict=True):
        """Loads the weights of a CLAM ``Attn_Net_Gated`` / ``Attn_Net`` (keys ``attention_a.0.weight``,
        ``attention_a.0.bias``, ``attention_b.0.*``, ``attention_c.weight``, ``attention_c.bias``, under no prefix:
        pass ``{k[len("attention_net."):]: v ...}`` for a whole CLAM model's). attention_c.bias is dropped (it cancels
        in the softmax)."""
        renamed = {}
        for k, v in state_dict.items():
            if k == "attention_c.bias":
                continue
            renamed[k.replace("attention_a.0.", "attention_a.").replace("attention_b.0.", "attention_b.")] = v
        return self.load_state_dict(renamed, strict=strict)

    def extra_repr(self):
        return (f"dim={self.dim}, hidden={self.hidden}, gated={self.gated}, branches={self.branches}, "
                f"dropout={self.dropout}, backend={self.backend!r}")


# ----------------------------------------------------------------------------- replace_attention
def replace_attention(model: nn.Module, backend: str = "auto") -> int:
    """Swap every ``torch.nn.MultiheadAttention`` in ``model`` for :class:`MultiheadAttention`, in place.

    The module object itself is converted (its class becomes fastattn's subclass), so parameters,
    buffers, device, dtype, training mode, hooks, and references held elsewhere (optimizers, shared
    submodules) all stay the same objects. Subclasses of torch's module with their own forward are
    left alone. ``nn.TransformerEncoder`` s holding swapped layers stop converting padded input to
    nested tensors, and ``nn.TransformerEncoderLayer`` s holding swapped modules get
    ``activation_relu_or_gelu = 0`` (a flag that only torch's fused paths read: the activation
    itself is unchanged), which keeps them off their fused fast path, eager and scripted. The model
    runs fastattn in training and in eval, with or without grad, eager or under ``torch.jit.script``.
    Outputs at padded query positions are then those of torch's python path (torch's nested fast
    path writes 0 there); an ``nn.TransformerEncoder`` built later around a swapped layer does not
    use nested tensors (torch warns so). ``model`` may itself be a MultiheadAttention: every
    fastattn MultiheadAttention carries a no-op hook that keeps the layer holding it off the fused
    path in eager (not when scripted). Returns how many modules were swapped.
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
        if isinstance(mod, nn.TransformerEncoderLayer) and isinstance(mod.self_attn, MultiheadAttention):
            # Scripted layers cannot see hooks; this flag, read only by torch's fused paths, can be
            # seen: 0 ("neither relu nor gelu") keeps them off, eager and scripted.
            mod.activation_relu_or_gelu = 0
    return count
