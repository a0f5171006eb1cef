"""fastattn.scaled_dot_product_attention is a drop-in for torch.nn.functional.scaled_dot_product_attention."""
import pytest
import torch
import torch.nn.functional as F

import fastattn


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


def test_errors_like_torch():
    q, k, v = rand(2, 4, 5, 8, seed=1), rand(2, 2, 5, 8, seed=2), rand(2, 2, 5, 8, seed=3)
    with pytest.raises(RuntimeError, match="attn_mask"):
        fastattn.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(5, 5, dtype=torch.bool), is_causal=True)
    with pytest.raises(ValueError, match="enable_gqa"):
        fastattn.scaled_dot_product_attention(q, k, v)
    with pytest.raises(TypeError, match="attn_mask"):
        fastattn.scaled_dot_product_attention(q, q, q, attn_mask=torch.zeros(5, 5, dtype=torch.int32))
