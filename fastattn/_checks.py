"""Input checks at the API boundary. Every message names the argument and what was expected.

Shape checks go through :func:`require` (``torch._check_with``): on concrete sizes it raises the
given error at once; on symbolic sizes (torch.compile, torch.export with a data-dependent batch) it
records a runtime assertion instead of guarding, so tracing never stops on a shape check.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch.fx.experimental import symbolic_shapes
from torch.fx.experimental.symbolic_shapes import statically_known_true

from . import contract

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def require(cond, error, message):
    """Raise ``error(message)`` unless ``cond``; never guards on symbolic sizes (see above)."""
    # Plain bools are decided here, symbolic ones go to torch._check under dynamo: torch 2.11's dynamo
    # cannot trace torch._check_with, nor torch._check with a message closure. A deferred runtime
    # assertion raises RuntimeError whatever the error type, so nothing is lost.
    if cond is True:
        return
    if cond is False:
        raise error(message)
    if torch.compiler.is_dynamo_compiling():
        torch._check(cond)
    else:
        torch._check_with(error, cond, lambda: message)


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
        # want first: the same symbol on both sides is known equal without a guard
        require(sym_or(_eq(got, want), _eq(got, 1)), ValueError,
                f"{name}: shape {tuple(t.shape)} is not broadcastable to {_fmt(shape, names)}")


def sym_or(a, b):
    """a or b without a guard: plain bools combine in Python (what dynamo traces), SymBools symbolically."""
    if a is True or b is True:
        return True
    return False if a is False and b is False else symbolic_shapes.sym_or(a, b)


def sym_and(a, b):
    """a and b without a guard (as sym_or)."""
    if a is False or b is False:
        return False
    return True if a is True and b is True else symbolic_shapes.sym_and(a, b)


def _eq(a, b):
    """a == b: True when known statically (the same symbol on both sides), else a SymBool that
    ``require`` defers, never a guard."""
    return True if statically_known_true(a == b) else a == b


def _fmt(shape, names):
    return "(" + ", ".join(f"{n}={s}" for n, s in zip(names, shape)) + ")"


def scale(value):
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"scale: expected a finite real number or None, got {value!r}")


def probability(name, p):
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= p <= 1.0:
        raise ValueError(f"{name}: expected a number in [0, 1], got {p!r}")


def deterministic(flag):
    """``deterministic``: True / False, or None for torch's setting (torch.use_deterministic_algorithms)."""
    if flag is None:
        return torch.are_deterministic_algorithms_enabled()
    if not isinstance(flag, bool):
        raise TypeError(f"deterministic: expected True, False or None (torch's setting), got {flag!r}")
    return flag


def score_mods(q, window_size, softcap, alibi_slopes):
    """Checks ``fastattn.attention``'s score modifiers; returns them as the kernels take them (contract.ScoreMods:
    the slopes in the statistics' dtype)."""
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or any(isinstance(w, bool) or not isinstance(w, numbers.Integral) or w < -1 for w in window_size)):
        raise ValueError(f"window_size: expected (left, right), two ints >= -1 (-1: unbounded), got {window_size!r}")
    # comparisons, not math.isfinite: dynamo traces a float argument as a symbolic float under dynamic shapes
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or not 0 <= softcap < math.inf:
        raise ValueError(f"softcap: expected a finite number >= 0 (0: no cap), got {softcap!r}")
    if alibi_slopes is not None:
        tensor("alibi_slopes", alibi_slopes)
        same([("q", q), ("alibi_slopes", alibi_slopes)], "device")
        if alibi_slopes.dim() not in (1, 2):
            raise ValueError(f"alibi_slopes: expected (Hq,) or (B, Hq), got shape {tuple(alibi_slopes.shape)}")
        if alibi_slopes.requires_grad and torch.is_grad_enabled():
            raise ValueError("alibi_slopes: ALiBi's slopes get no gradient here (constants, as in FlashAttention); "
                             "pass a tensor that does not require grad (e.g. .detach())")
        alibi_slopes = alibi_slopes.to(contract.stat_dtype(q.dtype))
    return contract.ScoreMods(int(window_size[0]), int(window_size[1]), float(softcap), alibi_slopes)


def attention_inputs(q, k, v, attn_mask, gate, scale_, dropout_p, mods=None):
    """Checks ``fastattn.attention``'s arguments; returns (B, Hq, Hkv, Lq, Lk, D, Dv)."""
    for n, t in (("q", q), ("k", k), ("v", v)):
        tensor(n, t, ndim=4)
    same([("q", q), ("k", k), ("v", v)], "dtype")
    same([("q", q), ("k", k), ("v", v)], "device")
    B, Hq, Lq, D = q.shape
    Bk, Hkv, Lk, Dk = k.shape
    Bv, Hv, Lv, Dv = v.shape
    require(sym_and(_eq(Bk, B), _eq(Bv, B)), ValueError, f"k, v: batch size must match q's ({B}), got k {Bk} and v {Bv}")
    require(_eq(Hv, Hkv), ValueError, f"v: expected {Hkv} heads like k, got {Hv}")
    # Hq == Hkv == 0 is an empty problem (as SDPA); otherwise the kv heads divide the query heads
    heads = f"k: number of kv heads ({Hkv}) must divide the query heads of q ({Hq})"
    if isinstance(Hkv, int) and Hkv == 0:
        require(_eq(Hq, 0), ValueError, heads)
    else:
        require(Hq % Hkv == 0, ValueError, heads)
    require(_eq(Dk, D), ValueError, f"k: head dim must equal q's ({D}), got {Dk}")
    require(_eq(Lv, Lk), ValueError, f"v: sequence length must equal k's ({Lk}), got {Lv}")
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
    slopes = mods.alibi_slopes if mods is not None else None
    if slopes is not None:
        want = (Hq,) if slopes.dim() == 1 else (B, Hq)
        require(sym_and(_eq(slopes.shape[0], want[0]), _eq(slopes.shape[-1], Hq)), ValueError,
                f"alibi_slopes: expected (Hq,) = {(Hq,)} or (B, Hq) = {(B, Hq)}, got shape {tuple(slopes.shape)}")
    return B, Hq, Hkv, Lq, Lk, D, Dv


def _heads_and_dims(q, k, v, q_dims, kv_dims):
    """The shared part of the varlen / kv-cache checks: dtypes, devices, heads (GQA), head dims."""
    same([("q", q), ("k", k), ("v", v)], "dtype")
    same([("q", q), ("k", k), ("v", v)], "device")
    Hq, D = q.shape[q_dims[0]], q.shape[q_dims[1]]
    Hkv, Dk, Hv = k.shape[kv_dims[0]], k.shape[kv_dims[1]], v.shape[kv_dims[0]]
    require(_eq(Hv, Hkv), ValueError, f"v: expected {Hkv} heads like k, got {Hv}")
    require(Hkv > 0 and Hq % Hkv == 0, ValueError,
            f"k: number of kv heads ({Hkv}) must be positive and divide the query heads of q ({Hq})")
    require(_eq(Dk, D), ValueError, f"k: head dim must equal q's ({D}), got {Dk}")
    return Hq, Hkv, D, v.shape[kv_dims[1]]


def _index(name, t, ndim):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected an int32 torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name}: expected dtype torch.int32, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")


def _check_values():
    """Index tensors' values are read (a device sync on a GPU) except while torch.compile traces or a CUDA graph
    is captured, where reading them is impossible: the kernels then trust them."""
    return not (torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()))


def varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, gate, scale_):
    """Checks ``fastattn.varlen_attention``'s arguments; returns (B, Hq, Hkv, D, Dv)."""
    for n, t in (("q", q), ("k", k), ("v", v)):
        tensor(n, t, ndim=3)
    Hq, Hkv, D, Dv = _heads_and_dims(q, k, v, (1, 2), (1, 2))
    require(_eq(v.shape[0], k.shape[0]), ValueError, f"v: expected total_k = {k.shape[0]} rows like k, got {v.shape[0]}")
    for n, cu, total, mx in (("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q),
                             ("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k)):
        _index(n, cu, 1)
        same([("q", q), (n, cu)], "device")
        if cu.numel() < 1:
            raise ValueError(f"{n}: expected B + 1 >= 1 offsets, got an empty tensor")
        mname = "max_seqlen" + n[-2:]
        if isinstance(mx, bool) or not isinstance(mx, int) or mx < 0:
            raise ValueError(f"{mname}: expected an int >= 0, got {mx!r}")
        if _check_values():
            lengths = cu.diff()
            if cu[0].item() != 0 or bool((lengths < 0).any()) or cu[-1].item() != total:
                raise ValueError(f"{n}: expected non-decreasing offsets from 0 to the packed length {total}, got "
                                 f"{cu.tolist() if cu.numel() <= 16 else 'other values'}")
            longest = int(lengths.max()) if lengths.numel() else 0
            if longest > mx:
                raise ValueError(f"{mname}: {mx} is shorter than the longest sequence in {n} ({longest})")
    if cu_seqlens_k.shape != cu_seqlens_q.shape:
        raise ValueError(f"cu_seqlens_k: expected {cu_seqlens_q.numel()} offsets like cu_seqlens_q, got "
                         f"{cu_seqlens_k.numel()}")
    if gate is not None:
        tensor("gate", gate, ndim=3)
        same([("q", q), ("gate", gate)], "device")
        require(sym_and(sym_and(_eq(gate.shape[0], q.shape[0]), _eq(gate.shape[1], Hq)),
                        sym_or(_eq(gate.shape[2], Dv), _eq(gate.shape[2], 1))), ValueError,
                f"gate: expected shape (total_q={q.shape[0]}, Hq={Hq}, Dv={Dv}) or (total_q, Hq, 1), got "
                f"{tuple(gate.shape)}")
    scale(scale_)
    return cu_seqlens_q.numel() - 1, Hq, Hkv, D, Dv


def kvcache_inputs(q, k_cache, v_cache, k, v, cache_seqlens, page_table, gate, scale_):
    """Checks ``fastattn.attention_with_kvcache``'s arguments; returns (B, Hq, Hkv, Lq, D, Dv, Lnew)."""
    tensor("q", q, ndim=4)
    tensor("k_cache", k_cache, ndim=4)
    tensor("v_cache", v_cache, ndim=4)
    Hq, Hkv, D, Dv = _heads_and_dims(q, k_cache, v_cache, (1, 3), (1, 3))
    B, Lq = q.shape[0], q.shape[2]
    paged = page_table is not None
    cache_len = k_cache.shape[2]
    require(_eq(v_cache.shape[0], k_cache.shape[0]) and _eq(v_cache.shape[2], cache_len), ValueError,
            f"v_cache: expected {'pages' if paged else 'batch'} and length like k_cache "
            f"({k_cache.shape[0]}, {cache_len}), got shape {tuple(v_cache.shape)}")
    if paged:
        _index("page_table", page_table, 2)
        same([("q", q), ("page_table", page_table)], "device")
        require(_eq(page_table.shape[0], B), ValueError,
                f"page_table: expected B={B} rows, got shape {tuple(page_table.shape)}")
        capacity = page_table.shape[1] * cache_len
    else:
        require(_eq(k_cache.shape[0], B), ValueError,
                f"k_cache: expected batch B={B} like q, got shape {tuple(k_cache.shape)}")
        capacity = cache_len
    _index("cache_seqlens", cache_seqlens, 1)
    same([("q", q), ("cache_seqlens", cache_seqlens)], "device")
    require(_eq(cache_seqlens.shape[0], B), ValueError,
            f"cache_seqlens: expected B={B} lengths, got shape {tuple(cache_seqlens.shape)}")
    Lnew = 0
    if (k is None) != (v is None):
        raise ValueError("k, v: pass both new keys and values, or neither")
    if k is not None:
        tensor("k", k, ndim=4)
        tensor("v", v, ndim=4)
        same([("q", q), ("k", k), ("v", v)], "dtype")
        same([("q", q), ("k", k), ("v", v)], "device")
        Lnew = k.shape[2]
        for n, t, d in (("k", k, D), ("v", v, Dv)):
            require(t.shape == (B, Hkv, Lnew, d), ValueError,
                    f"{n}: expected shape (B={B}, Hkv={Hkv}, Lnew={Lnew}, {d}), got {tuple(t.shape)}")
    if _check_values() and B:
        lo, hi = int(cache_seqlens.min()), int(cache_seqlens.max())
        if lo < 0 or hi + Lnew > capacity:
            raise ValueError(f"cache_seqlens: lengths (with the {Lnew} new keys) must lie in [0, {capacity}] (the "
                             f"cache's capacity), got {lo}..{hi}")
        if paged:
            used = (cache_seqlens.long() + Lnew + cache_len - 1) // cache_len  # pages each sequence reads
            cols = torch.arange(page_table.shape[1], device=page_table.device)
            ids = page_table[cols[None, :] < used[:, None]]
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= k_cache.shape[0]):
                raise ValueError(f"page_table: page ids must lie in [0, {k_cache.shape[0]}) (k_cache's pages), got "
                                 f"{int(ids.min())}..{int(ids.max())}")
    if gate is not None:
        tensor("gate", gate)
        same([("q", q), ("gate", gate)], "device")
        broadcastable("gate", gate, (B, Hq, Lq, Dv), ("B", "Hq", "Lq", "Dv"))
    scale(scale_)
    return B, Hq, Hkv, Lq, D, Dv, Lnew


def gate_inputs(x, scores=None, weight=None, mask=None):
    """Checks softmax_gate / score_softmax_gate arguments; returns (B, N, D, H)."""
    tensor("x", x, ndim=3)
    B, N, D = x.shape
    if scores is not None:
        tensor("scores", scores, ndim=3)
        same([("x", x), ("scores", scores)], "dtype")
        same([("x", x), ("scores", scores)], "device")
        require(sym_and(_eq(scores.shape[0], B), _eq(scores.shape[1], N)), ValueError,
                f"scores: expected shape (B={B}, N={N}, H), got {tuple(scores.shape)}")
        H, what = scores.shape[2], "scores"
    else:
        tensor("weight", weight, ndim=2)
        same([("x", x), ("weight", weight)], "dtype")
        same([("x", x), ("weight", weight)], "device")
        require(_eq(weight.shape[1], D), ValueError, f"weight: expected shape (H, D={D}), got {tuple(weight.shape)}")
        H, what = weight.shape[0], "weight"
    divides = f"{what}: the number of heads H={H} must divide x's channels D={D}"
    require(not (isinstance(H, int) and H == 0), ValueError, divides)
    require(D % H == 0, ValueError, divides)
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask: expected a bool tensor (True = position takes part), got "
                            f"{getattr(mask, 'dtype', type(mask).__name__)}")
        same([("x", x), ("mask", mask)], "device")
        require(mask.dim() == 2 and sym_and(_eq(mask.shape[0], B), _eq(mask.shape[1], N)), ValueError,
                f"mask: expected shape (B={B}, N={N}), got {tuple(mask.shape)}")
    return B, N, D, H


def pool_inputs(x, V, w, U, bV, bU, offsets, mask):
    """Checks ``fastattn.attention_pool``'s arguments; returns (B, N, D, Hd, K) (N: rows per bag for a 3-D x,
    all rows for a packed 2-D x)."""
    tensor("x", x)
    require(x.dim() in (2, 3), ValueError, f"x: expected (N, D) packed bags or a (B, N, D) batch, got shape "
                                           f"{tuple(x.shape)}")
    D = x.shape[-1]
    tensor("V", V, ndim=2)
    tensor("w", w, ndim=2)
    named = [("x", x), ("V", V), ("w", w)] + [(n, t) for n, t in (("U", U), ("bV", bV), ("bU", bU)) if t is not None]
    for n, t in named[3:]:
        tensor(n, t)
    same(named, "dtype")
    same(named, "device")
    Hd, K = V.shape[1], w.shape[1]
    require(_eq(V.shape[0], D), ValueError, f"V: expected shape (D={D}, Hd), got {tuple(V.shape)}")
    require(_eq(w.shape[0], Hd), ValueError, f"w: expected shape (Hd={Hd}, K), got {tuple(w.shape)}")
    if U is not None:
        require(U.dim() == 2 and sym_and(_eq(U.shape[0], D), _eq(U.shape[1], Hd)), ValueError,
                f"U: expected shape (D={D}, Hd={Hd}) like V, got {tuple(U.shape)}")
    elif bU is not None:
        raise ValueError("bU: a bias of the sigmoid branch needs its weight U (U is None)")
    for n, b in (("bV", bV), ("bU", bU)):
        if b is not None:
            require(b.dim() == 1 and _eq(b.shape[0], Hd), ValueError, f"{n}: expected shape (Hd={Hd},), got "
                                                                      f"{tuple(b.shape)}")
    if x.dim() == 3:
        B, N = x.shape[0], x.shape[1]
        if offsets is not None:
            raise ValueError("offsets: a (B, N, D) batch takes a mask for its padding, not offsets; pass packed "
                             "bags as x (N_total, D) with offsets")
        mask_shape, mask_names = (B, N), f"(B={B}, N={N})"
    else:
        N = x.shape[0]
        if offsets is None:
            B = 1
        else:
            if not isinstance(offsets, torch.Tensor):
                raise TypeError(f"offsets: expected an int32 or int64 torch.Tensor, got {type(offsets).__name__}")
            if offsets.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"offsets: expected dtype torch.int32 or torch.int64, got {offsets.dtype}")
            require(offsets.dim() == 1 and offsets.numel() >= 1, ValueError,
                    f"offsets: expected a 1-D tensor of B + 1 >= 1 offsets, got shape {tuple(offsets.shape)}")
            same([("x", x), ("offsets", offsets)], "device")
            if _check_values():
                if offsets[0].item() != 0 or bool((offsets.diff() < 0).any()) or offsets[-1].item() != N:
                    raise ValueError(f"offsets: expected non-decreasing offsets from 0 to the packed length {N}, "
                                     f"got {offsets.tolist() if offsets.numel() <= 16 else 'other values'}")
            B = offsets.numel() - 1
        mask_shape, mask_names = (N,), f"(N={N},)"
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask: expected a bool tensor (True = the instance takes part), got "
                            f"{getattr(mask, 'dtype', type(mask).__name__)}")
        same([("x", x), ("mask", mask)], "device")
        fits = mask.dim() == len(mask_shape) and _eq(mask.shape[0], mask_shape[0])
        if fits and len(mask_shape) == 2:
            fits = sym_and(fits, _eq(mask.shape[1], mask_shape[1]))
        require(fits, ValueError, f"mask: expected shape {mask_names}, got {tuple(mask.shape)}")
    return B, N, D, Hd, K


# --------------------------------------------------------------------------------------- SDPA drop-in
# The drop-in raises what torch.nn.functional.scaled_dot_product_attention raises: RuntimeError with
# torch's messages (dtype names as c10 prints them), so code and tests written against torch see the
# same exceptions.
_C10_NAMES = {torch.float32: "float", torch.float64: "double", torch.float16: "c10::Half",
              torch.bfloat16: "c10::BFloat16", torch.int64: "long int", torch.int32: "int", torch.int16: "short int",
              torch.int8: "signed char", torch.uint8: "unsigned char", torch.bool: "bool"}


def _c10(dtype):
    return _C10_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def sdpa_inputs(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa):
    for n, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"scaled_dot_product_attention(): argument '{n}' must be Tensor, not {type(t).__name__}")
    if query.dim() < 2 or key.dim() < 2 or value.dim() < 2:
        raise RuntimeError(f"Expected query, key, and value to all be  at least 2 dimensional, but got query.dim: "
                           f"{query.dim()} key.dim: {key.dim()} and value.dim: {value.dim()} instead.")
    if not (query.dtype == key.dtype == value.dtype):
        raise RuntimeError(f"Expected query, key, and value to have the same dtype, but got query.dtype: "
                           f"{_c10(query.dtype)} key.dtype: {_c10(key.dtype)} and value.dtype: {_c10(value.dtype)} "
                           f"instead.")
    if not (query.device == key.device == value.device):
        raise RuntimeError(f"Expected query, key, and value to have the same device type, but got query.device: "
                           f"{query.device} key.device: {key.device} and value.device: {value.device} instead.")
    if not query.is_floating_point():
        raise RuntimeError(f"expected scalar type Float but found {_c10(query.dtype).capitalize()}")
    if attn_mask is not None:
        if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
            raise RuntimeError(f"Expected attn_mask dtype to be bool or float or to match query dtype, but got "
                               f"attn_mask.dtype: {_c10(attn_mask.dtype)} and  query.dtype: {_c10(query.dtype)} "
                               f"instead.")
        if attn_mask.device != query.device:
            raise RuntimeError(f"Expected attn_mask to be on the same device as query, got {attn_mask.device} "
                               f"and {query.device}")
        if is_causal:
            raise RuntimeError("_scaled_dot_product_attention: Explicit attn_mask should not be set when "
                               "is_causal=True")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0.0 <= dropout_p <= 1.0:
        raise RuntimeError(f"dropout probability has to be between 0 and 1, but got {dropout_p}")
    E, Ek = query.shape[-1], key.shape[-1]
    require(_eq(E, Ek), RuntimeError, f"Expected query and key to have the same head dim (last dim), got "
                                      f"query {tuple(query.shape)} and key {tuple(key.shape)}")
    require(_eq(key.shape[-2], value.shape[-2]), RuntimeError,
            f"Expected key and value to have the same sequence length, got key {tuple(key.shape)} and value "
            f"{tuple(value.shape)}")
    heads = [t.shape[-3] if t.dim() >= 3 else 1 for t in (query, key, value)]
    Hq, Hk, Hv = heads
    if enable_gqa and not (isinstance(Hk, int) and Hk == 0):
        require(Hq % Hk == 0 and Hq % Hv == 0 if Hk and Hv else False, RuntimeError,
                "Number of heads in key and value must divide the number of heads in query")
    else:  # heads broadcast as any other dim
        for h, name in ((Hk, "key"), (Hv, "value")):
            require(sym_or(_eq(h, Hq), sym_or(_eq(h, 1), _eq(Hq, 1))), RuntimeError,
                    f"The size of tensor a ({Hq}) must match the size of tensor b ({h}) at non-singleton dimension "
                    f"{query.dim() - 3} ({name} has {h} heads, query {Hq}; pass enable_gqa=True for grouped-query "
                    f"attention)")
    lead = query.shape[:-3], key.shape[:-3], value.shape[:-3]
    try:
        torch.broadcast_shapes(*lead)
    except RuntimeError as e:
        raise RuntimeError(f"query, key and value batch dims do not broadcast: {e}") from None
    if attn_mask is not None:
        scores = (*torch.broadcast_shapes(*lead), Hq, query.shape[-2], key.shape[-2])
        if attn_mask.dim() > len(scores):
            raise RuntimeError(f"attn_mask: expected at most {len(scores)} dims broadcastable to the scores "
                               f"{tuple(scores)}, got shape {tuple(attn_mask.shape)}")
        for i, (want, got) in enumerate(zip(reversed(scores), reversed(attn_mask.shape))):
            require(sym_or(_eq(got, want), _eq(got, 1)), RuntimeError,
                    f"The size of tensor a ({want}) must match the size of tensor b ({got}) at non-singleton "
                    f"dimension {len(scores) - 1 - i} (attn_mask {tuple(attn_mask.shape)} against the scores "
                    f"{tuple(scores)})")
