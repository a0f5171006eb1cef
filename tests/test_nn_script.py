"""TorchScript: fastattn.nn's modules, and torch models after replace_attention, script, save and load.

Scripted modules are checked against eager ones and against torch's own modules (outputs, weights,
gradients), and a profiler shows that the scripted code runs fastattn's op (monkeypatching cannot see
inside TorchScript) and none of torch's fused attention kernels.
"""
import copy
import io

import pytest
import torch
from torch import nn

import fastattn
from fastattn.nn import AttentionGate, GatedMultiheadAttention, MultiheadAttention
from test_nn import F64, _config, _decoder, _encoder, _inputs, _padding, _pair, _run, _run_model, _transformer

pytestmark = [
    pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask"),
    pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors"),
    pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning"),  # TorchScript is what is tested here
    pytest.mark.filterwarnings("ignore:'norm' was found in ScriptModule constants"),  # torch's nn.Transformer
    pytest.mark.skipif(fastattn.ops.extension_error() is not None,
                       reason="scripted modules call fastattn._C's ops, which did not load"),
]

TORCH_FUSED = ("aten::_transformer_encoder_layer_fwd", "aten::_native_multi_head_attention",
               "aten::_nested_tensor_from_mask", "aten::scaled_dot_product_attention")


def _ops(fn):
    """fn's result and how many times each op ran in it."""
    with torch.autograd.profiler.profile() as prof:
        result = fn()
    counts = {}
    for e in prof.function_events:
        counts[e.name] = counts.get(e.name, 0) + 1
    return result, counts


def _assert_fastattn_ran(counts, times):
    n = counts.get("fastattn::attention_fwd", 0)
    assert n == times, f"fastattn::attention_fwd ran {n} times, expected {times}"
    ran = [op for op in TORCH_FUSED if op in counts]
    assert not ran, f"torch's {ran} ran"


def _save_load(scripted):
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    return torch.jit.load(buf)


def _grads(out, w, inputs, params, gen):
    loss = (out * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum()
    if w is not None:
        loss = loss + (w * torch.randn(w.shape, generator=gen, dtype=w.dtype)).sum()
    return torch.autograd.grad(loss, [*inputs, *params])


# ------------------------------------------------------------------------------ MultiheadAttention
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("seed", [0, 1, 2, 4, 7, 8, 11, 13, 18, 19, 23, 33])
def test_scripted_mha_matches_torch(seed, mode):
    c = _config(seed)
    gen = torch.Generator().manual_seed(seed)
    q, k, v, kpm, attn_mask, (kd, vd) = _inputs(c, torch.float64, gen)
    ref, ours = _pair(c, torch.float64, kd, vd)
    getattr(ref, mode)()
    getattr(ours, mode)()
    scripted = torch.jit.script(ours)
    assert "fastattn::attention_fwd" in str(scripted.inlined_graph)
    out_r, w_r, ins_r = _run(ref, c, q, k, v, kpm, attn_mask)
    (out_s, w_s, ins_s), counts = _ops(lambda: _run(scripted, c, q, k, v, kpm, attn_mask))
    _assert_fastattn_ran(counts, 1)
    out_e, w_e, _ = _run(ours, c, q, k, v, kpm, attn_mask)
    torch.testing.assert_close(out_s, out_r, **F64)
    torch.testing.assert_close(out_s, out_e, **F64)
    assert (w_s is None) == (w_r is None)
    if w_r is not None:
        torch.testing.assert_close(w_s, w_r, **F64)
    inputs_r = list({id(t): t for t in ins_r}.values())
    inputs_s = list({id(t): t for t in ins_s}.values())
    grads_r = _grads(out_r, w_r, inputs_r, list(ref.parameters()), torch.Generator().manual_seed(1))
    grads_s = _grads(out_s, w_s, inputs_s, list(ours.parameters()), torch.Generator().manual_seed(1))
    for a, b in zip(grads_s, grads_r):
        torch.testing.assert_close(a, b, **F64)


def test_scripted_mha_default_construction_and_save_load():
    torch.manual_seed(0)
    m = MultiheadAttention(64, 4)
    scripted = torch.jit.script(m)
    loaded = _save_load(scripted)
    x = torch.randn(7, 2, 64)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[1, 5:] = True
    want = m(x, x, x, key_padding_mask=kpm)
    for s in (scripted, loaded):
        got, counts = _ops(lambda: s(x, x, x, key_padding_mask=kpm))
        _assert_fastattn_ran(counts, 1)
        torch.testing.assert_close(got[0], want[0])
        torch.testing.assert_close(got[1], want[1])
    got = loaded(x, x, x, need_weights=False)
    assert got[1] is None
    torch.testing.assert_close(got[0], m(x, x, x, need_weights=False)[0])


def test_scripted_mha_dropout_in_training_only():
    torch.manual_seed(0)
    m = MultiheadAttention(8, 2, dropout=0.5, batch_first=True, dtype=torch.float64)
    scripted = torch.jit.script(m)
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    (a, _), counts = _ops(lambda: scripted(x, x, x, need_weights=False))
    _assert_fastattn_ran(counts, 1)
    b, wb = scripted(x, x, x, average_attn_weights=False)
    assert (wb == 0).double().mean() > 0.2 and torch.isfinite(a).all() and torch.isfinite(b).all()
    scripted.eval()
    m.eval()
    c, wc = scripted(x, x, x)
    assert not torch.allclose(a, c)
    want, want_w = m(x, x, x)
    torch.testing.assert_close(c, want, **F64)
    torch.testing.assert_close(wc, want_w, **F64)


def test_scripted_mha_in_proj_bias_of_another_dtype_as_torch():
    """torch adds a float16 in_proj_bias to a float64 batch_first input with N > 1 and refuses it
    for a contiguous (L, N, E) input (test_nn.py has the cases); the scripted module does the same."""
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(8, 2, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        ref.in_proj_bias.copy_(torch.linspace(-1, 1, 24))
    ref.in_proj_bias.data = ref.in_proj_bias.data.half()
    m = copy.deepcopy(ref)
    fastattn.replace_attention(m)
    scripted = torch.jit.script(m)
    scripted_ref = torch.jit.script(ref)
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(scripted(x, x, x)[0], ref(x, x, x)[0], **F64)
    torch.testing.assert_close(scripted(x, x, x)[0], scripted_ref(x, x, x)[0], **F64)
    x1 = x[:1]
    # an op's error surfaces from TorchScript as RuntimeError, a raise statement's as torch.jit.Error
    with pytest.raises(RuntimeError, match="same dtype"):
        scripted_ref(x1, x1, x1)
    with pytest.raises(torch.jit.Error, match="in_proj_bias"):
        scripted(x1, x1, x1)


@pytest.mark.parametrize("gate", ["elementwise", "headwise"])
def test_scripted_gated_mha_matches_eager(gate):
    torch.manual_seed(0)
    m = GatedMultiheadAttention(16, 4, batch_first=True, gate=gate, dtype=torch.float64)
    with torch.no_grad():
        m.in_proj_bias.normal_()
        m.gate_proj.bias.normal_()
    scripted = torch.jit.script(m)
    loaded = _save_load(scripted)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    mem = torch.randn(2, 6, 16, dtype=torch.float64)
    kpm = torch.zeros(2, 6, dtype=torch.bool)
    kpm[1, 4:] = True
    for need_weights in (False, True):
        want = m(x, mem, mem, key_padding_mask=kpm, need_weights=need_weights)
        gw = _grads(want[0], want[1], [], list(m.parameters()), torch.Generator().manual_seed(0))
        for s in (scripted, loaded):
            got, counts = _ops(lambda: s(x, mem, mem, key_padding_mask=kpm, need_weights=need_weights))
            _assert_fastattn_ran(counts, 1)
            torch.testing.assert_close(got[0], want[0], **F64)
            assert (got[1] is None) == (not need_weights)
            if need_weights:
                torch.testing.assert_close(got[1], want[1], **F64)
        gs = _grads(*scripted(x, mem, mem, key_padding_mask=kpm, need_weights=need_weights), [],
                    list(m.parameters()), torch.Generator().manual_seed(0))
        for a, b in zip(gs, gw):
            torch.testing.assert_close(a, b, **F64)


# --------------------------------------------------------------------------------- AttentionGate
@pytest.mark.parametrize("pool", [False, True], ids=["gate", "pool"])
def test_scripted_attention_gate_matches_eager(pool):
    torch.manual_seed(0)
    m = AttentionGate(16, num_heads=4, pool=pool, dtype=torch.float64)
    scripted = torch.jit.script(m)
    loaded = _save_load(scripted)
    assert "fastattn::score_softmax_gate_fwd" in str(scripted.inlined_graph)
    x = torch.randn(3, 9, 16, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 5:] = False
    want_y, want_a = m(x, mask=mask, return_weights=True)
    want_g = torch.autograd.grad((want_y ** 2).sum() + want_a.sum(), [x, m.weight])
    for s in (scripted, loaded):
        (y, a), counts = _ops(lambda: s(x, mask=mask, return_weights=True))
        assert counts.get("fastattn::score_softmax_gate_fwd") == 1
        torch.testing.assert_close(y, want_y, **F64)
        torch.testing.assert_close(a, want_a, **F64)
        torch.testing.assert_close(s(x, mask), m(x, mask), **F64)
        torch.testing.assert_close(s(x[0]), m(x[0]), **F64)  # unbatched
    y, a = scripted(x, mask=mask, return_weights=True)  # shares m's parameters (the loaded copy does not)
    g = torch.autograd.grad((y ** 2).sum() + a.sum(), [x, m.weight])
    for u, w in zip(g, want_g):
        torch.testing.assert_close(u, w, **F64)


# ----------------------------------------------------------------------------------- model swaps
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("kind", ["encoder", "decoder", "transformer"])
def test_scripted_replaced_models(kind, mode, grad):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    ref = {"encoder": _encoder, "decoder": _decoder, "transformer": _transformer}[kind]()
    getattr(ref, mode)()
    model = copy.deepcopy(ref)
    fastattn.replace_attention(model)
    scripted = torch.jit.script(model)
    x = torch.randn(3, 7, 16, generator=gen, dtype=torch.float64)
    y = torch.randn(3, 5, 16, generator=gen, dtype=torch.float64)
    kpm_x, kpm_y = _padding(3, 7, gen), _padding(3, 5, gen)
    with torch.set_grad_enabled(grad):
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            want = _run_model(kind, ref, x, y, kpm_x, kpm_y)  # torch's python path
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
        eager = _run_model(kind, model, x, y, kpm_x, kpm_y)
        got, counts = _ops(lambda: _run_model(kind, scripted, x, y, kpm_x, kpm_y))
    _assert_fastattn_ran(counts, {"encoder": 2, "decoder": 4, "transformer": 3}[kind])
    torch.testing.assert_close(got, want, **F64)
    torch.testing.assert_close(got, eager, **F64)
    if grad:
        got.sum().backward()
        want.sum().backward()
        for (name, pr), (_, pf) in zip(ref.named_parameters(), model.named_parameters()):
            torch.testing.assert_close(pf.grad, pr.grad, **F64, msg=lambda m: f"grad of {name}: {m}")


def test_scripted_replaced_encoder_save_load():
    torch.manual_seed(0)
    ref = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, batch_first=True), 2).eval()
    model = copy.deepcopy(ref)
    fastattn.replace_attention(model)
    loaded = _save_load(torch.jit.script(model))
    x = torch.randn(2, 9, 64)
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[1, 6:] = True
    with torch.no_grad():
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            want = ref(x, src_key_padding_mask=kpm)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
        got, counts = _ops(lambda: loaded(x, src_key_padding_mask=kpm))
    _assert_fastattn_ran(counts, 2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
