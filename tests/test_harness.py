"""The checks of fastattn.testing can fail: run them on deliberately broken backends and expect each
bug to be reported, in every dtype (float64 included, where a shared leaf once hid every gradient)."""
import importlib

import pytest
import torch

from fastattn.contract import ScoreMods
from fastattn.testing import AttentionCase, GateCase, check_attention, check_gate
from conftest import DTYPES, dtype_id

B = importlib.import_module("fastattn.backends")  # the module: fastattn.backends is also a function


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``factor``."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


class _Broken(B.Backend):
    """The cpu backend with one planted bug."""
    device_types = ("cpu",)

    def __init__(self, bug):
        self.name, self.bug, self.real = "broken_" + bug, bug, B._BACKENDS["cpu"]

    def attention(self, q, k, v, mask, gate, scale, causal, dropout_p, grad, mods=ScoreMods(), deterministic=False,
                  dropout_seed=None):
        if self.bug == "window" and mods.window_left >= 0:  # one key further back than asked
            mods = mods._replace(window_left=mods.window_left + 1)
        elif self.bug == "softcap_grad" and mods.softcap:  # the capped forward, the gradient of the uncapped one
            capped = self.real.attention(q, k, v, mask, gate, scale, causal, dropout_p, grad, mods, deterministic,
                                         dropout_seed)
            plain = self.real.attention(q, k, v, mask, gate, scale, causal, dropout_p, grad, mods._replace(softcap=0.0),
                                        deterministic, dropout_seed)
            return tuple(c.detach() + p - p.detach() for c, p in zip(capped, plain))
        elif self.bug == "dropout_seed" and dropout_seed is not None:  # the backward draws another mask
            fwd_seed, bwd_seed = dropout_seed, dropout_seed + 1
            out, lse = self.real.attention(q, k, v, mask, gate, scale, causal, dropout_p, grad, mods, deterministic,
                                           fwd_seed)
            other, _ = self.real.attention(q, k, v, mask, gate, scale, causal, dropout_p, grad, mods, deterministic,
                                           bwd_seed)
            return out.detach() + other - other.detach(), lse
        elif self.bug == "dq":
            q = _ScaleGrad.apply(q, 1.05)
        elif self.bug == "dgate" and gate is not None:
            gate = gate.detach()
        elif self.bug == "dmask" and mask is not None and mask.is_floating_point():
            mask = _ScaleGrad.apply(mask, 0.95)
        elif self.bug == "dv":
            v = _ScaleGrad.apply(v, 0.95)
        elif self.bug == "diagonal" and causal == 1:  # key j <= i + 1 instead of j <= i
            Lq, Lk = q.shape[2], k.shape[2]
            shifted = torch.ones(Lq, Lk, dtype=torch.bool).tril(1)
            mask = shifted if mask is None else (mask & shifted if mask.dtype == torch.bool
                                                 else mask.masked_fill(~shifted, float("-inf")))
            causal = 0
        return self.real.attention(q, k, v, mask, gate, scale, causal, dropout_p, grad, mods, deterministic,
                                   dropout_seed)

    def softmax_gate(self, scores, x, mask, pool):
        if self.bug == "dscores":
            scores = _ScaleGrad.apply(scores, 1.05)
        return self.real.softmax_gate(scores, x, mask, pool)

    def score_softmax_gate(self, x, weight, mask, scale, pool):
        if self.bug == "dweight":
            weight = _ScaleGrad.apply(weight, 1.05)
        return self.real.score_softmax_gate(x, weight, mask, scale, pool)


@pytest.fixture
def broken(monkeypatch):
    def make(bug):
        b = _Broken(bug)
        monkeypatch.setitem(B._BACKENDS, b.name, b)
        monkeypatch.setitem(B._AVAILABILITY, b.name, None)
        return b.name
    return make


ATTENTION_BUGS = {
    "dq": (AttentionCase(Lq=13, Lk=17, D=16), "dq"),
    "dv": (AttentionCase(Lq=13, Lk=17, D=16), "dv"),
    "dgate": (AttentionCase(Lq=13, Lk=17, D=16, gate="elementwise"), "dgate"),
    "dmask": (AttentionCase(Lq=13, Lk=17, D=16, mask="float_grad"), "dmask"),
    "diagonal": (AttentionCase(Lq=13, Lk=13, D=16, causal=True), "out"),
    "window": (AttentionCase(Lq=13, Lk=13, D=16, causal=True, window=(3, -1)), "out"),
    "softcap_grad": (AttentionCase(Lq=13, Lk=17, D=16, softcap=1.0, scale=2.0), "dk"),
    "dropout_seed": (AttentionCase(Lq=13, Lk=17, D=16, dropout=0.4), "dv"),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("bug", sorted(ATTENTION_BUGS))
def test_attention_check_reports_a_planted_bug(broken, bug, dtype):
    case, name = ATTENTION_BUGS[bug]
    healthy = {c.name: c for c in check_attention(case, dtype, "cpu")}
    assert all(c.ok for c in healthy.values()), healthy
    got = {c.name: c for c in check_attention(case, dtype, broken(bug))}
    assert not got[name].ok, f"a planted {bug} bug went unreported: {got[name]}"


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("bug,case,name", [
    ("dscores", GateCase(op="softmax_gate", N=13, D=16, H=2), "dscores"),
    ("dweight", GateCase(op="score_softmax_gate", N=13, D=16, H=2), "dweight"),
])
def test_gate_check_reports_a_planted_bug(broken, bug, case, name, dtype):
    assert all(c.ok for c in check_gate(case, dtype, "cpu"))
    got = {c.name: c for c in check_gate(case, dtype, broken(bug))}
    assert not got[name].ok, f"a planted {bug} bug went unreported: {got[name]}"


def test_sanitizer_passes_only_same_instruction_write_pairs(tmp_path):
    """scripts/cuda_sanitize.sh lets Triton's replicated reduction stores (write-write at one
    instruction) pass racecheck and counts every other hazard pair against it."""
    import pathlib
    import subprocess
    script = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "cuda_sanitize.sh"
    same = ("========= Error: Race reported between Write access at _gate_pool+0x3290 in softmax_gate.py:200\n"
            "=========     and Write access at _gate_pool+0x3290 in softmax_gate.py:200 [29 hazards]\n")
    counts = {}
    for name, other in [("benign", ""),
                        ("read", "========= Error: Race reported between Write access at k+0x10 in a.py:1\n"
                                 "=========     and Read access at k+0x20 in a.py:2 [3 hazards]\n"),
                        ("two_pcs", "========= Error: Race reported between Write access at k+0x10 in a.py:1\n"
                                    "=========     and Write access at k+0x30 in a.py:1 [1 hazards]\n")]:
        log = tmp_path / f"{name}.log"
        log.write_text(".." + same + other + same + "11 passed\n")
        out = subprocess.run(["bash", str(script), "--classify", str(log)], capture_output=True, text=True).stdout
        counts[name] = out.split()
    assert counts == {"benign": ["same", "2", "other", "0"], "read": ["same", "2", "other", "1"],
                      "two_pcs": ["same", "2", "other", "1"]}
