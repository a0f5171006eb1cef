"""Input checks at the API boundary. Every message names the argument and what was expected."""
from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(name, t, ndim=None, allow_bool=False):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES and not (allow_bool and t.dtype == torch.bool):
        kinds = "bool or a floating dtype" if allow_bool else "float16, bfloat16, float32 or float64"
        raise TypeError(f"{name}: expected {kinds}, got {t.dtype}")


def same(names_tensors, what="dtype"):
    (n0, t0), *rest = names_tensors
    for n, t in rest:
        if getattr(t, what) != getattr(t0, what):
            raise (TypeError if what == "dtype" else ValueError)(
                f"{n}: expected the same {what} as {n0} ({getattr(t0, what)}), got {getattr(t, what)}")


def broadcastable(name, t, shape, names):
    """t must broadcast to ``shape`` (dims named by ``names``) without changing it."""
    if t.dim() > len(shape):
        raise ValueError(f"{name}: expected at most {len(shape)} dims broadcastable to "
                         f"{_fmt(shape, names)}, got shape {tuple(t.shape)}")
    for got, want in zip(reversed(t.shape), reversed(shape)):
        if got not in (1, want):
            raise ValueError(f"{name}: shape {tuple(t.shape)} is not broadcastable to {_fmt(shape, names)}")


def _fmt(shape, names):
    return "(" + ", ".join(f"{n}={s}" for n, s in zip(names, shape)) + ")"


def scale(value):
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"scale: expected a finite real number or None, got {value!r}")


def probability(name, p):
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= p < 1.0:
        raise ValueError(f"{name}: expected a number in [0, 1), got {p!r}")


def attention_inputs(q, k, v, attn_mask, gate, scale_, dropout_p):
    """Checks ``fastattn.attention``'s arguments; returns (B, Hq, Hkv, Lq, Lk, D, Dv)."""
    for n, t in (("q", q), ("k", k), ("v", v)):
        tensor(n, t, ndim=4)
    same([("q", q), ("k", k), ("v", v)], "dtype")
    same([("q", q), ("k", k), ("v", v)], "device")
    B, Hq, Lq, D = q.shape
    Bk, Hkv, Lk, Dk = k.shape
    Bv, Hv, Lv, Dv = v.shape
    if Bk != B or Bv != B:
        raise ValueError(f"k, v: batch size must match q's ({B}), got k {Bk} and v {Bv}")
    if Hv != Hkv:
        raise ValueError(f"v: expected {Hkv} heads like k, got {Hv}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"k: number of kv heads ({Hkv}) must divide the query heads of q ({Hq})")
    if Dk != D:
        raise ValueError(f"k: head dim must equal q's ({D}), got {Dk}")
    if Lv != Lk:
        raise ValueError(f"v: sequence length must equal k's ({Lk}), got {Lv}")
    if attn_mask is not None:
        tensor("attn_mask", attn_mask, allow_bool=True)
        same([("q", q), ("attn_mask", attn_mask)], "device")
        broadcastable("attn_mask", attn_mask, (B, Hq, Lq, Lk), ("B", "Hq", "Lq", "Lk"))
    if gate is not None:
        tensor("gate", gate)
        same([("q", q), ("gate", gate)], "device")
        broadcastable("gate", gate, (B, Hq, Lq, Dv), ("B", "Hq", "Lq", "Dv"))
    scale(scale_)
    probability("dropout_p", dropout_p)
    return B, Hq, Hkv, Lq, Lk, D, Dv


def gate_inputs(x, scores=None, weight=None, mask=None):
    """Checks softmax_gate / score_softmax_gate arguments; returns (B, N, D, H)."""
    tensor("x", x, ndim=3)
    B, N, D = x.shape
    if scores is not None:
        tensor("scores", scores, ndim=3)
        same([("x", x), ("scores", scores)], "dtype")
        same([("x", x), ("scores", scores)], "device")
        if tuple(scores.shape[:2]) != (B, N):
            raise ValueError(f"scores: expected shape (B={B}, N={N}, H), got {tuple(scores.shape)}")
        H, what = scores.shape[2], "scores"
    else:
        tensor("weight", weight, ndim=2)
        same([("x", x), ("weight", weight)], "dtype")
        same([("x", x), ("weight", weight)], "device")
        if weight.shape[1] != D:
            raise ValueError(f"weight: expected shape (H, D={D}), got {tuple(weight.shape)}")
        H, what = weight.shape[0], "weight"
    if H == 0 or D % H != 0:
        raise ValueError(f"{what}: the number of heads H={H} must divide x's channels D={D}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask: expected a bool tensor (True = position takes part), got "
                            f"{getattr(mask, 'dtype', type(mask).__name__)}")
        same([("x", x), ("mask", mask)], "device")
        if tuple(mask.shape) != (B, N):
            raise ValueError(f"mask: expected shape (B={B}, N={N}), got {tuple(mask.shape)}")
    return B, N, D, H
