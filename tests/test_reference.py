"""The reference is the definition: check it against torch's SDPA and against independent formulas."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastattn import contract, reference

f64 = dict(dtype=torch.float64)


def rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, **f64)


def loop_attention(q, k, v, allowed, bias, scale, gate):
    """Row by row, with Python loops over (b, h, i): no broadcasting tricks shared with the reference."""
    B, Hq, Lq, D = q.shape
    Hkv = k.shape[1]
    out = torch.zeros(B, Hq, Lq, v.shape[-1], **f64)
    lse = torch.full((B, Hq, Lq), -math.inf, **f64)
    for b in range(B):
        for h in range(Hq):
            kh = h // (Hq // Hkv)
            for i in range(Lq):
                keys = [j for j in range(k.shape[2]) if allowed[b, h, i, j]]
                if not keys:
                    continue
                s = torch.stack([scale * q[b, h, i] @ k[b, kh, j] + bias[b, h, i, j] for j in keys])
                lse[b, h, i] = torch.logsumexp(s, 0)
                p = torch.exp(s - lse[b, h, i])
                out[b, h, i] = sum(p[n] * v[b, kh, j] for n, j in enumerate(keys))
                if gate is not None:
                    out[b, h, i] = out[b, h, i] * torch.sigmoid(gate[b, h, i])
    return out, lse


@pytest.mark.parametrize("causal", [False, True, "bottom_right"])
@pytest.mark.parametrize("Lq,Lk", [(5, 5), (4, 7), (7, 4)])
def test_attention_matches_loops(causal, Lq, Lk):
    B, Hq, Hkv, D, Dv = 2, 4, 2, 6, 5
    q, k, v = rand(B, Hq, Lq, D, seed=1), rand(B, Hkv, Lk, D, seed=2), rand(B, Hkv, Lk, Dv, seed=3)
    bias = rand(B, 1, Lq, Lk, seed=4)
    keep = torch.rand(B, Hq, Lq, Lk, generator=torch.Generator().manual_seed(5)) < 0.8
    keep[0, 0, 1] = False  # a fully masked row
    gate = rand(B, Hq, Lq, 1, seed=6)
    allowed = keep.clone()
    for i in range(Lq):
        for j in range(Lk):
            if (causal is True and j > i) or (causal == "bottom_right" and j > i + Lk - Lq):
                allowed[:, :, i, j] = False
    want, want_lse = loop_attention(q, k, v, allowed, bias.expand(B, Hq, Lq, Lk), 0.3, gate)
    # the same bias and keep-mask given as one float mask, and as a bool mask plus gate
    float_mask = bias.masked_fill(~keep, -math.inf)
    got, lse = reference.attention(q, k, v, attn_mask=float_mask, causal=causal, scale=0.3, gate=gate,
                                   return_lse=True)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(lse, want_lse)
    assert (got[0, 0, 1] == 0).all() and lse[0, 0, 1] == -math.inf


# SDPA does not combine attn_mask with is_causal, so neither does this comparison
@pytest.mark.parametrize("mask,causal", [("none", False), ("none", True), ("bool", False), ("float", False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_attention_matches_sdpa(mask, causal, dtype):
    q, k, v = rand(2, 8, 13, 16, seed=1).to(dtype), rand(2, 2, 11, 16, seed=2).to(dtype), rand(2, 2, 11, 16, seed=3).to(dtype)
    m = None
    if mask == "bool":
        m = torch.rand(2, 1, 13, 11, generator=torch.Generator().manual_seed(4)) < 0.7
        m[..., 0] = True  # SDPA's math path and ours agree on empty rows too, but keep this about the math
    elif mask == "float":
        m = rand(13, 11, seed=4).to(dtype)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal, enable_gqa=True)
    got = reference.attention(q, k, v, attn_mask=m, causal=causal)
    torch.testing.assert_close(got, want)


def test_fully_masked_rows_match_sdpa_and_have_zero_grads():
    q, k, v = (rand(1, 2, 6, 8, seed=s).requires_grad_() for s in (1, 2, 3))
    m = torch.ones(1, 2, 6, 6, dtype=torch.bool)
    m[:, :, 2] = False
    out = reference.attention(q, k, v, attn_mask=m)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=m))
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[:, :, 2] == 0).all()


def test_lse_gradient_is_softmax():
    q, k, v = rand(1, 1, 4, 3, seed=1).requires_grad_(), rand(1, 1, 5, 3, seed=2), rand(1, 1, 5, 3, seed=3)
    _, lse = reference.attention(q, k, v, scale=1.0, return_lse=True)
    lse.sum().backward()
    p = torch.softmax(q.detach() @ k[0, 0].T, -1)
    torch.testing.assert_close(q.grad, p @ k[0, 0])


def test_dropout_with_given_mask():
    q, k, v = rand(1, 1, 4, 3, seed=1), rand(1, 1, 5, 3, seed=2), rand(1, 1, 5, 2, seed=3)
    keep = torch.rand(1, 1, 4, 5, generator=torch.Generator().manual_seed(7)) > 0.3
    got = reference.attention(q, k, v, dropout_p=0.3, dropout_mask=keep)
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(3), -1) * keep / 0.7
    torch.testing.assert_close(got, p @ v)
    torch.manual_seed(0)
    assert not torch.equal(reference.attention(q, k, v, dropout_p=0.5), reference.attention(q, k, v))


# Random123's known-answer vectors of Philox4x32-10 (kat_vectors): counter, key, the four output words
PHILOX_KAT = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
              ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
              ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
               (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]


@pytest.mark.parametrize("counter, key, words", PHILOX_KAT)
def test_philox_known_answers(counter, key, words):
    got = contract.philox4x32_10([torch.tensor([c]) for c in counter], key)
    assert tuple(int(w) for w in got) == words


def test_dropout_keep_layout():
    """Weight (b, h, i, j) takes word j % 4 of the counter (j // 4, i, h, b) under the seed's two halves; kept
    when the word is at least floor(p * 2^32); p = 0 keeps all, p = 1 none."""
    seed, p = -0x123456789ABCDEF, 0.4  # negative: its two's complement bits, as the kernels read the int64
    keep = contract.dropout_keep(seed, p, 2, 3, 5, 11)
    u = seed & (2**64 - 1)
    for b, h, i, j in [(0, 0, 0, 0), (1, 2, 4, 10), (1, 0, 3, 7), (0, 2, 1, 5)]:
        words = contract.philox4x32_10([torch.tensor([x]) for x in (j // 4, i, h, b)], (u & 0xFFFFFFFF, u >> 32))
        assert bool(keep[b, h, i, j]) == (int(words[j % 4]) >= int(p * 2**32)), (b, h, i, j)
    big = contract.dropout_keep(7, 0.3, 4, 4, 64, 64)
    assert abs(big.float().mean().item() - 0.7) < 0.02
    assert contract.dropout_keep(7, 0.0, 1, 2, 3, 5).all() and not contract.dropout_keep(7, 1.0, 1, 2, 3, 5).any()
    assert not torch.equal(big, contract.dropout_keep(8, 0.3, 4, 4, 64, 64))


def test_dropout_from_a_seed_is_the_contract_mask():
    q, k, v = rand(2, 2, 6, 3, seed=1), rand(2, 2, 9, 3, seed=2), rand(2, 2, 9, 2, seed=3)
    seed = torch.tensor(1234)
    keep = contract.dropout_keep(1234, 0.3, 2, 2, 6, 9)
    torch.testing.assert_close(reference.attention(q, k, v, dropout_p=0.3, dropout_seed=seed),
                               reference.attention(q, k, v, dropout_p=0.3, dropout_mask=keep))


def test_reference_gradcheck():
    q, k, v = rand(1, 2, 3, 4, seed=1), rand(1, 1, 5, 4, seed=2), rand(1, 1, 5, 3, seed=3)
    bias, gate = rand(1, 2, 3, 5, seed=4), rand(1, 2, 3, 3, seed=5)
    args = [t.requires_grad_() for t in (q, k, v, bias, gate)]
    f = lambda q, k, v, b, g: reference.attention(q, k, v, attn_mask=b, gate=g, causal="bottom_right",
                                                  return_lse=True)
    assert torch.autograd.gradcheck(f, args)


def loop_softmax_gate(scores, x, mask, pool):
    B, N, D = x.shape
    H = scores.shape[-1]
    alpha = torch.zeros(B, N, H, **f64)
    for b in range(B):
        for h in range(H):
            keep = [n for n in range(N) if mask is None or mask[b, n]]
            if keep:
                alpha[b, keep, h] = torch.softmax(scores[b, keep, h], 0)
    y = torch.zeros(B, N, D, **f64)
    for c in range(D):
        y[:, :, c] = alpha[:, :, c // (D // H)] * x[:, :, c]
    return (y.sum(1) if pool else y), alpha


@pytest.mark.parametrize("pool", [False, True])
def test_softmax_gate_matches_loops(pool):
    x, scores, w = rand(3, 7, 12, seed=1), rand(3, 7, 4, seed=2), rand(4, 12, seed=3)
    mask = torch.rand(3, 7, generator=torch.Generator().manual_seed(4)) < 0.7
    mask[1] = False  # a batch item with no position
    want_y, want_a = loop_softmax_gate(scores, x, mask, pool)
    y, a = reference.softmax_gate(scores, x, mask=mask, pool=pool, return_weights=True)
    torch.testing.assert_close(y, want_y)
    torch.testing.assert_close(a, want_a)
    assert (y[1] == 0).all()
    want_y, _ = loop_softmax_gate(0.5 * x @ w.T, x, None, pool)
    torch.testing.assert_close(reference.score_softmax_gate(x, w, scale=0.5, pool=pool), want_y)


def test_softmax_gate_gradcheck():
    x, scores, w = rand(2, 5, 6, seed=1), rand(2, 5, 3, seed=2), rand(3, 6, seed=3)
    mask = torch.tensor([[1, 1, 0, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    for t in (x, scores, w):
        t.requires_grad_()
    assert torch.autograd.gradcheck(lambda s, x: reference.softmax_gate(s, x, mask=mask, return_weights=True), (scores, x))
    assert torch.autograd.gradcheck(lambda x, w: reference.score_softmax_gate(x, w, mask=mask, pool=True), (x, w))
