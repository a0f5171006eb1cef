"""Bad input raises an error that names the argument and what was expected."""
import dataclasses

import pytest
import torch

import fastattn


def t(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


q, k, v = t(2, 4, 8, 16), t(2, 2, 10, 16), t(2, 2, 10, 12)

ATTENTION_ERRORS = [
    ("q-rank", dict(q=t(4, 8, 16)), ValueError, "q: expected a 4-D tensor"),
    ("q-type", dict(q=[[1.0]]), TypeError, "q: expected a torch.Tensor"),
    ("q-int", dict(q=torch.ones(2, 4, 8, 16, dtype=torch.int64)), TypeError, "q: expected float16"),
    ("k-dtype", dict(k=t(2, 2, 10, 16, dtype=torch.float64)), TypeError, "k: expected the same dtype as q"),
    ("k-batch", dict(k=t(3, 2, 10, 16)), ValueError, "batch size must match"),
    ("k-heads", dict(k=t(2, 3, 10, 16), v=t(2, 3, 10, 12)), ValueError, "k: number of kv heads"),
    ("v-heads", dict(v=t(2, 1, 10, 12)), ValueError, "v: expected 2 heads"),
    ("k-headdim", dict(k=t(2, 2, 10, 8)), ValueError, "k: head dim must equal"),
    ("v-len", dict(v=t(2, 2, 9, 12)), ValueError, "v: sequence length"),
    ("mask-shape", dict(attn_mask=torch.ones(8, 9, dtype=torch.bool)), ValueError, "attn_mask: shape"),
    ("mask-rank", dict(attn_mask=torch.ones(1, 2, 4, 8, 10, dtype=torch.bool)), ValueError, "attn_mask: expected at most 4"),
    ("mask-int", dict(attn_mask=torch.ones(8, 10, dtype=torch.int32)), TypeError, "attn_mask: expected bool"),
    ("gate-shape", dict(gate=t(2, 4, 8, 5)), ValueError, "gate: shape"),
    ("gate-dtype", dict(gate=torch.ones(2, 4, 8, 1, dtype=torch.int64)), TypeError, "gate: expected float16"),
    ("causal", dict(causal="upper"), ValueError, "causal: expected"),
    ("scale", dict(scale=float("nan")), ValueError, "scale: expected a finite"),
    ("dropout", dict(dropout_p=1.5), ValueError, r"dropout_p: expected a number in \[0, 1\]"),
    ("backend-name", dict(backend="tpu"), ValueError, "backend: expected 'auto' or one of"),
    ("backend-dropout", dict(backend="cuda", dropout_p=0.1), RuntimeError, "backend='cuda' cannot run"),
    ("backend-headdim", dict(backend="cpu", q=t(1, 1, 4, 300), k=t(1, 1, 4, 300), v=t(1, 1, 4, 300)),
     RuntimeError, "head dims up to 256"),
    ("backend-device", dict(backend="cuda"), RuntimeError, "backend='cuda' cannot run"),
    ("window-type", dict(window_size=5), ValueError, "window_size: expected"),
    ("window-side", dict(window_size=(-2, 0)), ValueError, r"window_size: expected \(left, right\)"),
    ("window-float", dict(window_size=(1.5, 0)), ValueError, "window_size: expected"),
    ("softcap-neg", dict(softcap=-1.0), ValueError, "softcap: expected a finite number >= 0"),
    ("softcap-inf", dict(softcap=float("inf")), ValueError, "softcap: expected"),
    ("alibi-shape", dict(alibi_slopes=t(3)), ValueError, r"alibi_slopes: expected \(Hq,\)"),
    ("alibi-batch", dict(alibi_slopes=t(3, 4)), ValueError, r"alibi_slopes: expected \(Hq,\)"),
    ("alibi-rank", dict(alibi_slopes=t(2, 4, 1)), ValueError, "alibi_slopes: expected"),
    ("alibi-int", dict(alibi_slopes=torch.ones(4, dtype=torch.int64)), TypeError, "alibi_slopes: expected float16"),
    ("alibi-grad", dict(alibi_slopes=t(4).requires_grad_()), ValueError, "alibi_slopes: ALiBi's slopes get no"),
    ("alibi-device", dict(alibi_slopes=torch.empty(4, device="meta")), ValueError,
     "alibi_slopes: expected the same device as q"),
    ("deterministic", dict(deterministic=1), TypeError, r"deterministic: expected True, False or None"),
]


@pytest.mark.parametrize("name,kw,exc,msg", ATTENTION_ERRORS, ids=[e[0] for e in ATTENTION_ERRORS])
def test_attention_errors(name, kw, exc, msg):
    args = dict(q=q, k=k, v=v)
    args.update(kw)
    with pytest.raises(exc, match=msg):
        fastattn.attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def test_ops_name_a_bad_score_modifier():
    """The ops' own checks (a direct torch.ops.fastattn call) name the modifier."""
    op = torch.ops.fastattn.attention_fwd
    args = (q, k, v, None, None, 0.25, 0, True)
    for mods, msg in (((-2, -1, 0.0, None), "window_left and window_right must be >= -1"),
                      ((-1, -1, -1.0, None), "softcap must be finite and >= 0"),
                      ((-1, -1, 0.0, t(4, dtype=torch.float64)), "alibi_slopes must be Float"),
                      ((-1, -1, 0.0, t(2, 3)), r"alibi_slopes must be \(Hq\) = \(4\) or \(B, Hq\)")):
        with pytest.raises(RuntimeError, match=msg):
            op(*args, *mods)


def test_a_backend_without_a_score_modifier_refuses_it_by_name(monkeypatch):
    """A backend whose kernels lack a modifier (Backend.score_mods) refuses the call and says which; every fused
    backend has them all."""
    from fastattn.backends import _AVAILABILITY, _BACKENDS, CpuBackend, Problem
    from fastattn.contract import ScoreMods

    class NoWindow(CpuBackend):
        name = "no_window"
        score_mods = frozenset({"softcap"})

    monkeypatch.setitem(_BACKENDS, "no_window", NoWindow())
    monkeypatch.setitem(_AVAILABILITY, "no_window", None)
    p = Problem("attention", "cpu", torch.float32, D=16, Dv=16, score_mods=frozenset({"window", "alibi"}))
    assert NoWindow().unsupported(p) == "its kernels have no alibi or window yet"
    assert NoWindow().unsupported(dataclasses.replace(p, score_mods=frozenset({"softcap"}))) is None
    with pytest.raises(RuntimeError, match="backend='no_window' cannot run this attention call: its kernels have no "
                                           "window yet"):
        fastattn.attention(q, k, v, window_size=(2, -1), backend="no_window")
    for name in ("cpu", "triton", "cuda"):
        assert _BACKENDS[name].score_mods == frozenset(ScoreMods.NAMES)


def test_device_mismatch_is_named():
    meta = torch.empty(2, 2, 10, 16, device="meta")
    with pytest.raises(ValueError, match="k: expected the same device as q"):
        fastattn.attention(q, meta, v)


x, scores, w = t(2, 7, 12), t(2, 7, 4), t(4, 12)

GATE_ERRORS = [
    ("x-rank", "softmax_gate", dict(x=t(7, 12)), ValueError, "x: expected a 3-D tensor"),
    ("scores-shape", "softmax_gate", dict(scores=t(2, 6, 4)), ValueError, "scores: expected shape"),
    ("heads-divide", "softmax_gate", dict(scores=t(2, 7, 5)), ValueError, "H=5 must divide"),
    ("scores-dtype", "softmax_gate", dict(scores=t(2, 7, 4, dtype=torch.float16)), TypeError, "scores: expected the same dtype"),
    ("mask-dtype", "softmax_gate", dict(mask=torch.ones(2, 7)), TypeError, "mask: expected a bool"),
    ("mask-shape", "softmax_gate", dict(mask=torch.ones(2, 8, dtype=torch.bool)), ValueError, "mask: expected shape"),
    ("weight-shape", "score_softmax_gate", dict(weight=t(4, 11)), ValueError, "weight: expected shape"),
    ("weight-heads", "score_softmax_gate", dict(weight=t(5, 12)), ValueError, "weight: the number of heads"),
    ("scale", "score_softmax_gate", dict(scale="big"), ValueError, "scale: expected"),
    ("backend", "score_softmax_gate", dict(backend="triton"), RuntimeError, "backend='triton' cannot run"),
]


@pytest.mark.parametrize("name,op,kw,exc,msg", GATE_ERRORS, ids=[e[0] for e in GATE_ERRORS])
def test_gate_errors(name, op, kw, exc, msg):
    if op == "softmax_gate":
        args = dict(scores=scores, x=x)
        args.update(kw)
        with pytest.raises(exc, match=msg):
            fastattn.softmax_gate(args.pop("scores"), args.pop("x"), **args)
    else:
        args = dict(x=x, weight=w)
        args.update(kw)
        with pytest.raises(exc, match=msg):
            fastattn.score_softmax_gate(args.pop("x"), args.pop("weight"), **args)


def test_extension_error_messages_keep_their_numbers():
    """The C++ kernels' own checks print sizes through libstdc++. An extension linked with a second, static
    copy of it (a toolchain built that way; setup.py refuses one) drops every number from the message or
    crashes while formatting it."""
    with pytest.raises(RuntimeError, match=r"attention_fwd: v has 3 heads, k has 2$"):
        torch.ops.fastattn.attention_fwd(t(1, 2, 5, 8), t(1, 2, 6, 8), t(1, 3, 6, 8), None, None, 0.125, 0)
