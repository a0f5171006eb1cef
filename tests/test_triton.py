"""The Triton backend against the reference (SPEC §4), forward and every gradient; opcheck of its ops;
torch.compile(fullgraph=True) through them.

On a GPU this runs the full sweeps on CUDA tensors. Without one, scripts/test.sh reruns this file
under TRITON_INTERPRET=1 (CPU tensors in Triton's interpreter): the quick attention sweep, the gate
sweep through both the one-pass and the two-pass kernels, and extra cases for head dims 96-256.
"""
import math
import os

import pytest
import torch

import fastattn
from fastattn.testing import (AttentionCase, GateCase, attention_cases, check_attention, check_gate,
                              gate_cases)
from conftest import assert_all_ok, dtype_id

pytest.importorskip("triton")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not (torch.cuda.is_available() or INTERPRET), reason="needs CUDA or TRITON_INTERPRET=1"),
]
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# Interpreted kernels are ~1000x slower: the quick sweep plus the cases that only the full one has
# (head dims past 64, non-powers of two, D != Dv with a gate, a float bias at D 256).
ATTN_CASES = attention_cases(quick=INTERPRET) + [
    AttentionCase(Hq=4, Hkv=2, Lq=17, Lk=33, D=111, Dv=96, causal=True, gate="headwise"),
    AttentionCase(Lq=9, Lk=21, D=256, mask="float_grad", lse_grad=True),
    AttentionCase(Lq=40, Lk=40, D=96, causal="bottom_right", mask="bool", layout="blhd"),
]
GATE_CASES = gate_cases()
TWO_PASS_CASES = gate_cases(quick=True) if INTERPRET else gate_cases()


@pytest.fixture(scope="module", autouse=True)
def _registered():
    avail = fastattn.backends()["triton"]
    assert avail["available"], avail["reason"]


@pytest.mark.parametrize("case", ATTN_CASES, ids=[c.id for c in ATTN_CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_triton_attention_matches_reference(case, dtype):
    assert_all_ok(check_attention(case, dtype, backend="triton", device=DEVICE), case.id)


@pytest.mark.parametrize("case", GATE_CASES, ids=[c.id for c in GATE_CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_triton_gates_match_reference(case, dtype):
    assert_all_ok(check_gate(case, dtype, backend="triton", device=DEVICE), case.id)


@pytest.mark.parametrize("case", TWO_PASS_CASES, ids=[c.id for c in TWO_PASS_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_triton_gates_two_pass(case, dtype, monkeypatch):
    """The long-N path (scores / stats, then apply), forced by treating every item as too large."""
    from fastattn.triton_kernels import configs
    monkeypatch.setattr(configs, "FUSED_MAX_ELEMS", 0)
    assert_all_ok(check_gate(case, dtype, backend="triton", device=DEVICE), case.id)


def rand(*shape, seed, dtype=torch.float32, requires_grad=False):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(DEVICE)
    return t.requires_grad_(requires_grad)


def test_fully_masked_rows_are_zero_without_nan():
    q, k, v = (rand(2, 2, 9, 16, seed=s, requires_grad=True) for s in (1, 2, 3))
    mask = torch.ones(2, 2, 9, 9, dtype=torch.bool, device=DEVICE)
    mask[:, :, 3] = False
    out, lse = fastattn.attention(q, k, v, attn_mask=mask, return_lse=True, backend="triton")
    assert (out[:, :, 3] == 0).all() and (lse[:, :, 3] == -math.inf).all()
    (out.sum() + lse[:, :, :3].sum()).backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[:, :, 3] == 0).all()


def test_transposed_inputs_are_not_copied(monkeypatch):
    """A (B, L, H, D) tensor seen as (B, H, L, D) reaches the kernel as it is."""
    base = rand(2, 33, 4, 64, seed=1)
    q = base.transpose(1, 2)
    seen, real = [], torch.ops.fastattn.triton_attention_fwd

    def spy(q, *args):
        seen.append((q.data_ptr(), q.stride()))
        return real(q, *args)

    monkeypatch.setattr(torch.ops.fastattn, "triton_attention_fwd", spy)
    out = fastattn.attention(q, q, q, backend="triton")
    assert seen == [(base.data_ptr(), q.stride())]
    qc = q.contiguous()
    torch.testing.assert_close(out, fastattn.attention(qc, qc, qc, backend="triton"))


def test_backend_reports():
    from fastattn.backends import Problem, select
    info = fastattn.backends()["triton"]
    assert info["available"] and "cuda" in info["devices"]
    with pytest.raises(RuntimeError, match="float64"):
        select("triton", Problem("attention", DEVICE, torch.float64, D=64, Dv=64))
    with pytest.raises(RuntimeError, match="head dims up to 256"):
        select("triton", Problem("attention", DEVICE, torch.float32, D=257, Dv=257))
    assert select("auto", Problem("attention", "cpu", torch.float32, D=64, Dv=64)).name != "triton"


# ------------------------------------------------------------------------------------ registration
def _attention_samples():
    B, H, Hkv, Lq, Lk, D, Dv = 2, 4, 2, 9, 13, 16, 8
    q = rand(B, H, Lq, D, seed=1, requires_grad=True)
    k, v = rand(B, Hkv, Lk, D, seed=2, requires_grad=True), rand(B, Hkv, Lk, Dv, seed=3, requires_grad=True)
    bias = rand(1, 1, Lq, Lk, seed=4, requires_grad=True).expand(B, H, Lq, Lk)
    keep = (torch.rand(B, H, Lq, Lk, generator=torch.Generator().manual_seed(5)) < 0.8).to(DEVICE)
    gate = rand(B, H, Lq, 1, seed=6, requires_grad=True).expand(B, H, Lq, Dv)
    return [
        (q, k, v, None, None, 0.25, 0),
        (q, k, v, keep, gate, 0.25, 1),
        (q, k, v, bias, None, 0.25, 2),
        (q.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(), k, v, bias, gate, 0.5, 0),
    ]


@pytest.mark.parametrize("i", range(4))
def test_opcheck_attention(i):
    torch.library.opcheck(torch.ops.fastattn.triton_attention_fwd.default, _attention_samples()[i])


def test_opcheck_attention_bwd():
    q, k, v, mask, gate, scale, causal = _attention_samples()[1]
    out, lse = torch.ops.fastattn.triton_attention_fwd(q, k, v, mask, gate, scale, causal)
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), mask,
            gate.detach(), torch.randn_like(lse), scale, causal, False)
    torch.library.opcheck(torch.ops.fastattn.triton_attention_bwd.default, args)


@pytest.mark.parametrize("pool", [False, True])
def test_opcheck_softmax_gates(pool):
    x, scores, w = (rand(*s, seed=i, requires_grad=True) for i, s in enumerate([(3, 11, 16), (3, 11, 4), (4, 16)]))
    mask = (torch.rand(3, 11, generator=torch.Generator().manual_seed(4)) < 0.7).to(DEVICE)
    ops = torch.ops.fastattn
    torch.library.opcheck(ops.triton_softmax_gate_fwd.default, (scores, x, mask, pool))
    torch.library.opcheck(ops.triton_score_softmax_gate_fwd.default, (x, w, mask, 0.5, pool))
    y, alpha = ops.triton_score_softmax_gate_fwd(x, w, mask, 0.5, pool)
    torch.library.opcheck(ops.triton_score_softmax_gate_bwd.default,
                          (torch.randn_like(y), x.detach(), w.detach(), alpha.detach(), None, 0.5, pool))
    torch.library.opcheck(ops.triton_softmax_gate_bwd.default,
                          (torch.randn_like(y), x.detach(), alpha.detach(), torch.randn_like(alpha), pool))


class TinyGatedModel(torch.nn.Module):
    """Gated attention, then attention pooling, all on the Triton backend: every op in one graph."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkvg = torch.nn.Linear(dim, 4 * dim)
        self.pool_score = torch.nn.Parameter(torch.randn(2, dim) / dim ** 0.5)

    def forward(self, x, keep):
        B, L, C = x.shape
        q, k, v, g = self.qkvg(x).view(B, L, 4, self.heads, C // self.heads).transpose(1, 3).unbind(1)
        o = fastattn.attention(q, k, v, causal=True, gate=g, attn_mask=keep[:, None, None, :], backend="triton")
        o = o.transpose(1, 2).reshape(B, L, C)
        y1 = fastattn.softmax_gate(o[..., :2], o, mask=keep, backend="triton")
        return fastattn.score_softmax_gate(y1, self.pool_score, mask=keep, pool=True, backend="triton")


def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    model = TinyGatedModel().to(DEVICE)
    x = torch.randn(3, 10, 32, device=DEVICE)
    keep = torch.rand(3, 10, device=DEVICE) < 0.8
    keep[:, 0] = True
    eager = model(x, keep)
    eager_grads = torch.autograd.grad(eager.square().sum(), list(model.parameters()))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x, keep)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    torch.testing.assert_close(out, eager)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)
