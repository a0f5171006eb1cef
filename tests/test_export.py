"""Tracing without data: meta tensors, and torch.export with a data-dependent (unbacked) batch size.
Shape checks must neither guard nor sync, as with torch's SDPA."""
import pytest
import torch
import torch.nn.functional as F

import fastattn


def _attention_calls(q, k, v, x, w, keep):
    bias = torch.zeros(q.shape[-2], k.shape[-2], dtype=q.dtype, device=q.device)
    return [
        fastattn.attention(q, k, v, causal=True, gate=q[..., :1]),
        fastattn.attention(q, k, v, attn_mask=bias, causal="bottom_right"),
        fastattn.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :k.shape[-2]]),
        fastattn.softmax_gate(x[..., :2], x, mask=keep),
        fastattn.score_softmax_gate(x, w, mask=keep, pool=True),
    ]


def _inputs(device, B=3, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(device).requires_grad_(requires_grad)
    keep = torch.ones(B, 6, dtype=torch.bool, device=device)
    return r(B, 2, 5, 8), r(B, 2, 6, 8), r(B, 2, 6, 8), r(B, 6, 8), r(2, 8), keep


def test_meta_tensors_forward_and_backward():
    cpu = _attention_calls(*_inputs("cpu"))
    inputs = _inputs("meta", requires_grad=True)
    meta = _attention_calls(*inputs)
    assert [m.shape for m in meta] == [c.shape for c in cpu]
    assert all(m.device.type == "meta" for m in meta)
    sum(m.sum() for m in meta).backward()
    for t in inputs[:5]:
        assert t.grad is not None and t.grad.shape == t.shape and t.grad.device.type == "meta"


class _Unbacked(torch.nn.Module):
    """The batch size comes from data (``n.item()``): an unbacked symbol that no check may guard on."""

    def forward(self, n, q, k, v, x, w):
        b = n.item()
        torch._check_is_size(b)
        torch._check(b <= q.shape[0])
        q, k, v, x = q[:b], k[:b], v[:b], x[:b]
        keep = torch.ones(b, 6, dtype=torch.bool, device=q.device)
        return tuple(_attention_calls(q, k, v, x, w, keep))


def test_export_with_a_data_dependent_batch():
    q, k, v, x, w, _ = _inputs("cpu", B=4)
    ep = torch.export.export(_Unbacked(), (torch.tensor(3), q, k, v, x, w))
    for n in (3, 1):
        got = ep.module()(torch.tensor(n), q, k, v, x, w)
        want = _Unbacked()(torch.tensor(n), q, k, v, x, w)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)


def test_export_with_a_dynamic_batch():
    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return fastattn.scaled_dot_product_attention(q, k, v, is_causal=True)

    q, k, v, *_ = _inputs("cpu", B=3)
    B = torch.export.Dim("B")
    ep = torch.export.export(M(), (q, k, v), dynamic_shapes=({0: B}, {0: B}, {0: B}))
    q2, k2, v2, *_ = _inputs("cpu", B=5)
    torch.testing.assert_close(ep.module()(q2, k2, v2), F.scaled_dot_product_attention(q2, k2, v2, is_causal=True))
