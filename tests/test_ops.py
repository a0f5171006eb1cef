"""torch.library registration: opcheck (schemas, fake impls, autograd) and torch.compile(fullgraph)."""
import pytest
import torch

import fastattn


def rand(*shape, seed, requires_grad=True, dtype=torch.float32):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return t.requires_grad_(requires_grad)


def attention_samples():
    B, H, Hkv, Lq, Lk, D, Dv = 2, 4, 2, 9, 13, 16, 8
    q, k, v = rand(B, H, Lq, D, seed=1), rand(B, Hkv, Lk, D, seed=2), rand(B, Hkv, Lk, Dv, seed=3)
    bias = rand(1, 1, Lq, Lk, seed=4).expand(B, H, Lq, Lk)
    keep = torch.rand(B, H, Lq, Lk, generator=torch.Generator().manual_seed(5)) < 0.8
    gate = rand(B, H, Lq, 1, seed=6).expand(B, H, Lq, Dv)
    return [
        (q, k, v, None, None, 0.25, 0),
        (q, k, v, keep, gate, 0.25, 1),
        (q, k, v, bias, None, 0.25, 2),
        (q.transpose(1, 2).contiguous().transpose(1, 2), k, v, bias, gate, 0.5, 0),
    ]


@pytest.mark.parametrize("i", range(4))
def test_opcheck_attention(i):
    torch.library.opcheck(torch.ops.fastattn.attention_fwd.default, attention_samples()[i])


def test_opcheck_attention_bwd():
    q, k, v, mask, gate, scale, causal = attention_samples()[1]
    out, lse = torch.ops.fastattn.attention_fwd(q, k, v, mask, gate, scale, causal)
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), mask,
            gate.detach(), torch.randn_like(lse), scale, causal, False)
    torch.library.opcheck(torch.ops.fastattn.attention_bwd.default, args)


@pytest.mark.parametrize("pool", [False, True])
def test_opcheck_softmax_gates(pool):
    x, scores, w = rand(3, 11, 16, seed=1), rand(3, 11, 4, seed=2), rand(4, 16, seed=3)
    mask = torch.rand(3, 11, generator=torch.Generator().manual_seed(4)) < 0.7
    torch.library.opcheck(torch.ops.fastattn.softmax_gate_fwd.default, (scores, x, mask, pool))
    torch.library.opcheck(torch.ops.fastattn.softmax_gate_fwd.default, (scores, x, None, pool))
    torch.library.opcheck(torch.ops.fastattn.score_softmax_gate_fwd.default, (x, w, mask, 0.5, pool))
    y, alpha = torch.ops.fastattn.score_softmax_gate_fwd(x, w, mask, 0.5, pool)
    torch.library.opcheck(torch.ops.fastattn.score_softmax_gate_bwd.default,
                          (torch.randn_like(y), x.detach(), w.detach(), alpha.detach(), None, 0.5, pool))
    torch.library.opcheck(torch.ops.fastattn.softmax_gate_bwd.default,
                          (torch.randn_like(y), x.detach(), alpha.detach(), torch.randn_like(alpha), pool))


class TinyGatedModel(torch.nn.Module):
    """Attention with a fused output gate, then attention pooling: every fastattn op in one graph."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkvg = torch.nn.Linear(dim, 4 * dim)
        self.pool_score = torch.nn.Parameter(torch.randn(2, dim) / dim ** 0.5)

    def forward(self, x, keep):
        B, L, C = x.shape
        q, k, v, g = self.qkvg(x).view(B, L, 4, self.heads, C // self.heads).transpose(1, 3).unbind(1)
        o = fastattn.attention(q, k, v, causal=True, gate=g, attn_mask=keep[:, None, None, :])
        o = o.transpose(1, 2).reshape(B, L, C)
        scores = o[..., :2]
        y1 = fastattn.softmax_gate(scores, o, mask=keep)
        return fastattn.score_softmax_gate(y1, self.pool_score, mask=keep, pool=True)


def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    model = TinyGatedModel()
    x = torch.randn(3, 10, 32)
    keep = torch.rand(3, 10) < 0.8
    keep[:, 0] = True
    eager = model(x, keep)
    eager_grads = torch.autograd.grad(eager.square().sum(), list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x, keep)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    torch.testing.assert_close(out, eager)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)
