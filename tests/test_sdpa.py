"""fastattn.scaled_dot_product_attention is a drop-in for torch.nn.functional.scaled_dot_product_attention."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastattn
import fastattn.reference


def rand(*shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


SHAPES = {  # name: (query, key, value) shapes
    "4d": ((2, 4, 13, 16), (2, 4, 11, 16), (2, 4, 11, 8)),
    "3d": ((3, 13, 16), (3, 11, 16), (3, 11, 16)),
    "2d": ((13, 16), (11, 16), (11, 16)),
    "5d": ((2, 3, 2, 9, 16), (2, 3, 2, 7, 16), (2, 3, 2, 7, 16)),
    "bcast-batch": ((2, 4, 13, 16), (1, 4, 11, 16), (1, 4, 11, 16)),
    "mqa-no-gqa-flag": ((2, 4, 13, 16), (2, 1, 11, 16), (2, 1, 11, 16)),
}


@pytest.mark.parametrize("shapes", SHAPES, ids=str)
@pytest.mark.parametrize("variant", ["plain", "causal", "bool", "float", "scale"])
def test_matches_torch(shapes, variant):
    qs, ks, vs = SHAPES[shapes]
    q, k, v = rand(*qs, seed=1), rand(*ks, seed=2), rand(*vs, seed=3)
    kw = {}
    if variant == "causal":
        kw["is_causal"] = True
    elif variant == "bool":
        kw["attn_mask"] = rand(qs[-2], ks[-2], seed=4) > -0.5
    elif variant == "float":
        kw["attn_mask"] = rand(qs[-2], ks[-2], seed=4)
    elif variant == "scale":
        kw["scale"] = 0.3
    want = F.scaled_dot_product_attention(q, k, v, **kw)
    got = fastattn.scaled_dot_product_attention(q, k, v, **kw)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_gqa_and_grads_match_torch():
    q, k, v = (rand(2, 8, 21, 32, seed=1), rand(2, 2, 19, 32, seed=2), rand(2, 2, 19, 32, seed=3))
    mask = rand(21, 19, seed=4) > -1.0
    mask[3] = False  # a fully masked row: SDPA and fastattn both give 0
    ours = [t.clone().requires_grad_() for t in (q, k, v)]
    theirs = [t.clone().requires_grad_() for t in (q, k, v)]
    a = fastattn.scaled_dot_product_attention(*ours, attn_mask=mask, enable_gqa=True)
    b = F.scaled_dot_product_attention(*theirs, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
    dout = torch.randn_like(a)
    a.backward(dout)
    b.backward(dout)
    for x, y in zip(ours, theirs):
        torch.testing.assert_close(x.grad, y.grad, atol=1e-4, rtol=1e-4)


def test_bf16_with_float32_mask():
    q, k, v = (rand(1, 2, 9, 16, seed=s, dtype=torch.bfloat16) for s in (1, 2, 3))
    mask = rand(9, 9, seed=4)
    got = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask.double())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, atol=3e-2, rtol=3e-2)


def test_dropout_is_random_and_unbiased_in_mean():
    q, k, v = (rand(1, 1, 4, 8, seed=s, dtype=torch.float64) for s in (1, 2, 3))
    torch.manual_seed(0)
    draws = torch.stack([fastattn.scaled_dot_product_attention(q, k, v, dropout_p=0.3) for _ in range(4000)])
    assert not torch.equal(draws[0], draws[1])
    torch.testing.assert_close(draws.mean(0), F.scaled_dot_product_attention(q, k, v), atol=0.05, rtol=0)


def test_dropout_of_one_drops_every_weight_as_torch():
    """dropout_p = 1 zeroes every weight (torch multiplies by 0: no 0 / 0), so the output and the
    gradients are 0, and a NaN still reaches its rows; the module with dropout=1.0 likewise."""
    q, k, v = (rand(1, 2, 5, 8, seed=s, dtype=torch.float64).requires_grad_() for s in (1, 2, 3))
    got = fastattn.scaled_dot_product_attention(q, k, v, dropout_p=1.0)
    want = F.scaled_dot_product_attention(q, k, v, dropout_p=1.0)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert torch.equal(got, torch.zeros_like(got))
    dout = torch.randn_like(got)
    grads = torch.autograd.grad(got, (q, k, v), dout)
    want_grads = torch.autograd.grad(want, (q, k, v), dout)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, atol=0, rtol=0)
    nan_q = q.detach().clone()
    nan_q[0, 1, 2, 0] = float("nan")
    got = fastattn.attention(nan_q, k.detach(), v.detach(), dropout_p=1.0)
    want = F.scaled_dot_product_attention(nan_q, k.detach(), v.detach(), dropout_p=1.0)
    torch.testing.assert_close(got, want, atol=0, rtol=0, equal_nan=True)
    assert got[0, 1, 2].isnan().all() and not got[0, 1, :2].isnan().any()

    from fastattn.nn import MultiheadAttention
    mha = MultiheadAttention(8, 2, dropout=1.0, batch_first=True, dtype=torch.float64).train()
    x = rand(2, 5, 8, seed=4, dtype=torch.float64)
    out, w = mha(x, x, x)
    torch.testing.assert_close(w, torch.zeros_like(w), atol=0, rtol=0)
    torch.testing.assert_close(out, mha.out_proj.bias.expand_as(out), atol=0, rtol=0)


_BAD_SDPA_INPUTS = {
    "mask_with_is_causal": lambda q, k, v: dict(query=q, key=q, value=q, attn_mask=torch.ones(5, 5, dtype=torch.bool),
                                                is_causal=True),
    "heads_without_gqa": lambda q, k, v: dict(query=q, key=k, value=v),
    "int_mask": lambda q, k, v: dict(query=q, key=q, value=q, attn_mask=torch.zeros(5, 5, dtype=torch.int32)),
    "one_dim_query": lambda q, k, v: dict(query=q[0, 0, 0], key=k, value=v),
    "dtype_mismatch": lambda q, k, v: dict(query=q.double(), key=q, value=q),
    "half_bf16_mismatch": lambda q, k, v: dict(query=q.half(), key=q.bfloat16(), value=q),
    "dropout_above_one": lambda q, k, v: dict(query=q, key=q, value=q, dropout_p=1.5),
    "mask_not_broadcastable": lambda q, k, v: dict(query=q, key=q, value=q, attn_mask=torch.zeros(3, 5)),
    "value_heads": lambda q, k, v: dict(query=k, key=k, value=q),
    "gqa_not_dividing": lambda q, k, v: dict(query=q[:, :3], key=k, value=v, enable_gqa=True),
}


@pytest.mark.parametrize("case", sorted(_BAD_SDPA_INPUTS))
def test_errors_like_torch(case):
    """The drop-in raises torch's exception type with torch's message (its math path: the one that
    checks everything), so code and tests written against torch see the same errors."""
    q, k, v = rand(2, 4, 5, 8, seed=1), rand(2, 2, 5, 8, seed=2), rand(2, 2, 5, 8, seed=3)
    kwargs = _BAD_SDPA_INPUTS[case](q, k, v)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH), pytest.raises(Exception) as theirs:
        F.scaled_dot_product_attention(**kwargs)
    with pytest.raises(Exception) as ours:
        fastattn.scaled_dot_product_attention(**kwargs)
    assert ours.type is theirs.type, (ours.value, theirs.value)
    assert str(theirs.value).strip() in str(ours.value), (str(ours.value), str(theirs.value))


# ------------------------------------------------------------------------------------ CausalBias
@pytest.mark.parametrize("variant", ["upper_left", "lower_right"])
@pytest.mark.parametrize("L,S,H", [(5, 5, 2), (4, 7, 2), (7, 4, 2), (5, 7, 16), (1, 9, 3)])
def test_causal_bias_as_torch(variant, L, S, H):
    """torch's CausalBias masks give torch's outputs and gradients (CPU: lower right with L > S gives
    0 on the rows that see no key, as fastattn's own empty rows)."""
    make = getattr(torch.nn.attention.bias, "causal_" + variant)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that lower right with L > S has empty rows
        bias = make(L, S)
    ours = [rand(2, H, n, 8, seed=s).requires_grad_() for s, n in ((1, L), (2, S), (3, S))]
    theirs = [t.detach().clone().requires_grad_() for t in ours]
    a = fastattn.scaled_dot_product_attention(*ours, attn_mask=bias)
    b = F.scaled_dot_product_attention(*theirs, attn_mask=bias)
    torch.testing.assert_close(a, b)
    dout = torch.randn_like(a)
    a.backward(dout)
    b.backward(dout)
    for x, y in zip(ours, theirs):
        torch.testing.assert_close(x.grad, y.grad)


def test_causal_bias_runs_as_a_causal_mode_without_a_mask(monkeypatch):
    seen, real = [], torch.ops.fastattn.attention_fwd

    def spy(q, k, v, mask, gate, scale, causal, need_acc, *mods):
        seen.append((mask, causal))
        return real(q, k, v, mask, gate, scale, causal, need_acc, *mods)

    monkeypatch.setattr(torch.ops.fastattn, "attention_fwd", spy)
    q, k = rand(1, 2, 4, 8, seed=1), rand(1, 2, 6, 8, seed=2)
    fastattn.scaled_dot_product_attention(q, k, k, attn_mask=torch.nn.attention.bias.causal_lower_right(4, 6))
    fastattn.scaled_dot_product_attention(q, k, k, attn_mask=torch.nn.attention.bias.causal_upper_left(4, 6))
    assert seen == [(None, 2), (None, 1)]


def test_causal_bias_with_is_causal_raises_as_torch():
    q = rand(1, 2, 4, 8, seed=1)
    bias = torch.nn.attention.bias.causal_upper_left(4, 4)
    with pytest.raises(ValueError) as theirs:
        F.scaled_dot_product_attention(q, q, q, attn_mask=bias, is_causal=True)
    with pytest.raises(ValueError) as ours:
        fastattn.scaled_dot_product_attention(q, q, q, attn_mask=bias, is_causal=True)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("variant", ["upper_left", "lower_right"])
def test_causal_bias_under_torch_compile(variant):
    make = getattr(torch.nn.attention.bias, "causal_" + variant)

    def f(q, k, v, bias):  # the bias is an input, as in torch's own compile test (dynamo cannot construct one)
        return fastattn.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    q, k, v = rand(1, 16, 5, 8, seed=1), rand(1, 16, 7, 8, seed=2), rand(1, 16, 7, 8, seed=3)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(q, k, v, make(5, 7)),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=make(5, 7)))


# ------------------------------------------------------------------------------------ zero sizes
ZERO_SHAPES = [  # (query, key, value) shapes, keyword arguments
    ((1, 2, 5, 0), (1, 2, 5, 0), (1, 2, 5, 8), {}),        # D = 0: plain mean of the values
    ((1, 2, 5, 0), (1, 2, 5, 0), (1, 2, 5, 8), {"scale": 0.5}),
    ((1, 2, 5, 4), (1, 2, 5, 4), (1, 2, 5, 0), {}),        # Dv = 0
    ((1, 0, 5, 4), (1, 0, 5, 4), (1, 0, 5, 4), {}),        # no heads
    ((1, 0, 5, 4), (1, 0, 5, 4), (1, 0, 5, 4), {"enable_gqa": True}),
    ((1, 2, 5, 4), (1, 2, 0, 4), (1, 2, 0, 4), {}),        # no keys: out 0
    ((1, 2, 5, 4), (1, 2, 0, 4), (1, 2, 0, 4), {"is_causal": True}),
    ((1, 2, 5, 4), (1, 2, 0, 4), (1, 2, 0, 4), {"attn_mask": "float"}),
    ((1, 2, 0, 4), (1, 2, 5, 4), (1, 2, 5, 4), {}),        # no queries
    ((0, 2, 5, 4), (0, 2, 3, 4), (0, 2, 3, 4), {}),        # no batch
    ((3, 0, 2, 5, 4), (3, 0, 2, 3, 4), (3, 0, 2, 3, 4), {}),  # zero in a leading dim
]


@pytest.mark.parametrize("qs,ks,vs,kwargs", ZERO_SHAPES, ids=[f"{a}-{b}-{c}-{sorted(d)}" for a, b, c, d in ZERO_SHAPES])
def test_zero_size_dims_as_torch(qs, ks, vs, kwargs):
    if qs[-3] == 0 and tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) < (2, 13):
        pytest.skip("torch's own SDPA dies of SIGFPE on zero heads before 2.13 (seen with 2.11 on a CPU)")
    kwargs = dict(kwargs)
    if kwargs.get("attn_mask") == "float":
        kwargs["attn_mask"] = torch.zeros(qs[-2], ks[-2])
    ours = [rand(*s, seed=i).requires_grad_() for i, s in enumerate((qs, ks, vs))]
    theirs = [t.detach().clone().requires_grad_() for t in ours]
    a = fastattn.scaled_dot_product_attention(*ours, **kwargs)
    b = F.scaled_dot_product_attention(*theirs, **kwargs)
    assert a.shape == b.shape
    torch.testing.assert_close(a, b)
    a.backward(torch.ones_like(a))
    b.backward(torch.ones_like(b))
    for x, y in zip(ours, theirs):
        assert x.grad is not None and x.grad.shape == x.shape
        torch.testing.assert_close(x.grad, y.grad if y.grad is not None else torch.zeros_like(y))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_zero_keys_give_zero_rows_and_minus_inf_lse(backend):
    q = rand(2, 2, 5, 4, seed=1).requires_grad_()
    k = rand(2, 2, 0, 4, seed=2).requires_grad_()
    out, lse = fastattn.attention(q, k, k, return_lse=True, backend=backend)
    assert out.shape == (2, 2, 5, 4) and (out == 0).all() and (lse == -math.inf).all()
    out.sum().backward()
    assert (q.grad == 0).all() and k.grad.shape == k.shape


@pytest.mark.parametrize("op", ["softmax_gate", "score_softmax_gate"])
@pytest.mark.parametrize("pool", [False, True])
@pytest.mark.parametrize("B,N,D", [(0, 5, 8), (3, 0, 8), (3, 5, 0)])
def test_zero_size_softmax_gates(op, pool, B, N, D):
    H = 2
    x = rand(B, N, D, seed=1).requires_grad_()
    other = (rand(B, N, H, seed=2) if op == "softmax_gate" else rand(H, D, seed=2)).requires_grad_()
    args = (other, x) if op == "softmax_gate" else (x, other)
    y, alpha = getattr(fastattn, op)(*args, pool=pool, return_weights=True)
    ref_y, ref_alpha = getattr(fastattn.reference, op)(*args, pool=pool, return_weights=True)
    assert y.shape == ((B, D) if pool else (B, N, D)) and alpha.shape == (B, N, H)
    if N == 0:
        assert (y == 0).all()
    torch.testing.assert_close(y, ref_y)
    torch.testing.assert_close(alpha, ref_alpha)
    (y.sum() + alpha.sum()).backward()
    assert x.grad.shape == x.shape and other.grad.shape == other.shape


# ------------------------------------------------------------------------------------ jagged nested tensors
def jagged(lens, heads, dim, seed, dtype=torch.float64):
    """A jagged nested tensor (B, heads, j, dim) that requires grad, as torch's SDPA docs build one: sequences
    (n, heads, dim), nested, .transpose(1, 2). Returns (the leaf nested tensor, the transposed one)."""
    gen = torch.Generator().manual_seed(seed)
    leaf = torch.nested.nested_tensor([torch.randn(n, heads, dim, generator=gen, dtype=dtype) for n in lens],
                                      layout=torch.jagged, requires_grad=True)
    return leaf, leaf.transpose(1, 2)


def _grads(out, leaves, seed):
    """Gradients of the leaves for a fixed random cotangent on out's values."""
    vals = out.transpose(1, 2).values()
    dout = torch.randn(vals.shape, generator=torch.Generator().manual_seed(seed), dtype=vals.dtype)
    return [g.values() for g in torch.autograd.grad(vals, leaves, dout)]


@pytest.fixture
def varlen_calls(monkeypatch):
    seen, real = [], fastattn.functional.varlen_attention
    monkeypatch.setattr(fastattn.functional, "varlen_attention", lambda *a, **k: seen.append(k) or real(*a, **k))
    return seen


JAGGED = {  # name: query lengths, key lengths, (Hq, Hkv), E, Ev
    "self": ([3, 7, 1, 5], [3, 7, 1, 5], (4, 4), 16, 16),
    "cross": ([3, 7, 1, 5], [6, 2, 4, 9], (2, 2), 8, 12),
    "empty-query": ([4, 0, 3], [2, 5, 3], (2, 2), 8, 8),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", JAGGED)
def test_jagged_matches_torch(case, dtype, varlen_calls):
    """Forward and every gradient against torch's own SDPA on the same nested tensors (its CPU math path)."""
    lq, lk, (hq, hk), e, ev = JAGGED[case]
    (q0, q), (k0, k), (v0, v) = jagged(lq, hq, e, 1, dtype), jagged(lk, hk, e, 2, dtype), jagged(lk, hk, ev, 3, dtype)
    got = fastattn.scaled_dot_product_attention(q, k, v)
    want = F.scaled_dot_product_attention(q, k, v)
    assert varlen_calls and got.is_nested and got.layout == torch.jagged
    assert got.shape == want.shape  # (B, Hq, j, Ev) with the query's own ragged length
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got.transpose(1, 2).values(), want.transpose(1, 2).values(), **tol)
    for a, b in zip(_grads(got, (q0, k0, v0), 4), _grads(want, (q0, k0, v0), 4)):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_jagged_against_each_sequence_alone(causal, heads, varlen_calls):
    """Causality and GQA, which torch's CPU path refuses on nested tensors: each sequence through dense SDPA.
    The key sequences come from a narrowed tensor (holes between sequences, as torch.nested.narrow makes)."""
    lens, (hq, hk) = [5, 1, 8, 3], heads
    q0, q = jagged(lens, hq, 8, 1)
    dense = torch.randn(4, 9, hk, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64,
                        requires_grad=True)
    k = torch.nested.narrow(dense, 1, torch.tensor([1, 0, 1, 2]), torch.tensor(lens), layout=torch.jagged)
    k = k.transpose(1, 2)
    v0, v = jagged(lens, hk, 8, 3)
    got = fastattn.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=hq != hk)
    assert varlen_calls == [dict(causal=causal, scale=None)]
    outs = []
    for b, n in enumerate(lens):
        kb = dense[b, [1, 0, 1, 2][b]:][:n].transpose(0, 1)[None]
        outs.append(F.scaled_dot_product_attention(q0[b].transpose(0, 1)[None], kb, v0[b].transpose(0, 1)[None],
                                                   is_causal=causal, enable_gqa=hq != hk)[0].transpose(0, 1))
    want = torch.cat(outs)
    torch.testing.assert_close(got.transpose(1, 2).values(), want, atol=1e-12, rtol=1e-12)
    dout = torch.randn(want.shape, generator=torch.Generator().manual_seed(4), dtype=want.dtype)
    ours = torch.autograd.grad(got.transpose(1, 2).values(), (q0, dense, v0), dout)
    theirs = torch.autograd.grad(want, (q0, dense, v0), dout)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.values() if a.is_nested else a, b.values() if b.is_nested else b,
                                   atol=1e-12, rtol=1e-12)


_BAD_JAGGED = {  # name: (kwargs from q, k, v, exception type); those torch's CPU path also refuses say torch's words
    "mask": (lambda q, k, v: dict(query=q, key=q, value=q, attn_mask=torch.ones(1, dtype=torch.bool)), ValueError),
    "dense_key": (lambda q, k, v: dict(query=q, key=torch.randn(3, 2, 4, 8), value=v), ValueError),
    "dtype_mismatch": (lambda q, k, v: dict(query=q, key=k.float(), value=v), ValueError),
    "causal_cross_lengths": (lambda q, k, v: dict(query=q, key=k, value=v, is_causal=True), RuntimeError),
    "heads_without_gqa": (lambda q, k, v: dict(query=q, key=jagged([2, 5, 4], 1, 8, 4)[1],
                                               value=jagged([2, 5, 4], 1, 8, 5)[1]), RuntimeError),
    "dropout": (lambda q, k, v: dict(query=q, key=q, value=q, dropout_p=0.1), NotImplementedError),
    "untransposed": (lambda q, k, v: dict(query=q.transpose(1, 2), key=k.transpose(1, 2), value=v.transpose(1, 2)),
                     ValueError),
}


@pytest.mark.parametrize("case", sorted(_BAD_JAGGED))
def test_jagged_errors(case):
    (_, q), (_, k), (_, v) = jagged([3, 5, 1], 2, 8, 1), jagged([2, 5, 4], 2, 8, 2), jagged([2, 5, 4], 2, 8, 3)
    make, kind = _BAD_JAGGED[case]
    with pytest.raises(kind) as ours:
        fastattn.scaled_dot_product_attention(**make(q, k, v))
    if case in ("mask", "dense_key", "dtype_mismatch"):
        with pytest.raises(ValueError) as theirs:
            F.scaled_dot_product_attention(**make(q, k, v))
        assert str(ours.value) == str(theirs.value)
