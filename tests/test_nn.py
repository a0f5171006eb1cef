"""fastattn.nn: drop-in MultiheadAttention, GatedMultiheadAttention, AttentionGate, replace_attention.

The drop-in is checked against torch.nn.MultiheadAttention itself (float64, exact to ~1e-10; a few
float32 cases to 1e-5) on random configurations: outputs, weights, gradients of the inputs and of
every parameter. Model swaps assert with a spy that fastattn ran and that torch's fused paths did not.
"""
import copy
import itertools
import random
import warnings

import pytest
import torch
from torch import nn

import fastattn
import fastattn.functional
from fastattn.nn import AttentionGate, GatedMultiheadAttention, MultiheadAttention

pytestmark = [  # torch's own reference models warn about these; not what is tested here
    pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask"),
    pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors"),
]

F64 = dict(atol=1e-10, rtol=1e-10)
F32 = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture
def spy(monkeypatch):
    """Counts fastattn.attention calls (and their dropout_p) made by the modules; makes torch's fused
    MHA / encoder-layer kernels and the nested-tensor conversion raise if anything reaches them."""
    calls = []
    real = fastattn.functional.attention

    def counted(*args, **kwargs):
        calls.append(kwargs.get("dropout_p", 0.0))
        return real(*args, **kwargs)

    def forbidden(name):
        def f(*args, **kwargs):
            raise AssertionError(f"torch fused path {name} ran instead of fastattn")
        return f

    monkeypatch.setattr(fastattn.functional, "attention", counted)
    for name in ("_transformer_encoder_layer_fwd", "_native_multi_head_attention", "_nested_tensor_from_mask"):
        monkeypatch.setattr(torch, name, forbidden(name))
    return calls


# ------------------------------------------------------------------------ random configurations
def _config(seed):
    r = random.Random(seed)
    c = dict(
        E=r.choice([8, 12, 16]), H=None, batch_first=r.random() < 0.5, bias=r.random() < 0.8,
        add_bias_kv=r.random() < 0.25, add_zero_attn=r.random() < 0.25,
        cross=r.random() < 0.4, kvdim=r.random() < 0.25, batched=r.random() < 0.8,
        kpm=r.choice(["none", "bool", "float"]), mask=r.choice(["none", "bool2d", "float2d", "bool3d", "float3d"]),
        causal=r.random() < 0.2, need_weights=r.random() < 0.5, average=r.random() < 0.5,
        N=r.choice([1, 2, 3]), L=r.choice([1, 5, 7]), S=r.choice([3, 6]),
    )
    c["H"] = r.choice([h for h in (1, 2, 4) if c["E"] % h == 0])
    if c["kvdim"]:
        c["cross"] = True
    if not c["cross"]:
        c["S"] = c["L"]
    if c["causal"]:  # the hint needs a (causal) mask and a square problem
        c.update(cross=False, kvdim=False, S=c["L"], mask=r.choice(["bool2d", "float2d"]))
    return c


def _cid(seed):
    c = _config(seed)
    flags = [k for k in ("batch_first", "add_bias_kv", "add_zero_attn", "cross", "kvdim", "causal", "need_weights")
             if c[k]]
    return f"s{seed}-E{c['E']}-H{c['H']}-L{c['L']}-S{c['S']}-kpm_{c['kpm']}-mask_{c['mask']}-" + "-".join(flags)


def _inputs(c, dtype, gen):
    N, L, S, E = c["N"], c["L"], c["S"], c["E"]
    kd = vd = E
    if c["kvdim"]:
        kd, vd = E + 3, E - 2

    def seq(length, d):
        shape = ((N, length, d) if c["batch_first"] else (length, N, d)) if c["batched"] else (length, d)
        return torch.randn(*shape, generator=gen, dtype=dtype)

    q = seq(L, E)
    if c["cross"]:
        k, v = seq(S, kd), seq(S, vd)
    else:
        k = v = q
    kpm = attn_mask = None
    # column 0 always allowed: no fully masked rows (those give 0 here, NaN in torch's weights path)
    if c["kpm"] != "none":
        kpm = torch.rand(N, S, generator=gen) < 0.3
        kpm[:, 0] = False
        if c["kpm"] == "float":
            kpm = torch.randn(N, S, generator=gen, dtype=dtype).masked_fill(kpm, float("-inf"))
        if not c["batched"]:
            kpm = kpm[0]
    if c["causal"]:
        attn_mask = nn.Transformer.generate_square_subsequent_mask(L, dtype=dtype)
        if c["mask"] == "bool2d":
            attn_mask = attn_mask.isinf()
    elif c["mask"] != "none":
        three = c["mask"].endswith("3d")
        shape = ((N if c["batched"] else 1) * c["H"], L, S) if three else (L, S)
        attn_mask = torch.rand(*shape, generator=gen) < 0.3
        attn_mask[..., 0] = False
        if c["mask"].startswith("float"):
            attn_mask = torch.randn(*shape, generator=gen, dtype=dtype).masked_fill(attn_mask, float("-inf"))
    return q, k, v, kpm, attn_mask, (kd, vd)


def _pair(c, dtype, kd, vd):
    kw = dict(bias=c["bias"], add_bias_kv=c["add_bias_kv"], add_zero_attn=c["add_zero_attn"],
              kdim=kd, vdim=vd, batch_first=c["batch_first"], dtype=dtype)
    ref = nn.MultiheadAttention(c["E"], c["H"], **kw)
    ours = MultiheadAttention(c["E"], c["H"], **kw)
    ours.load_state_dict(ref.state_dict())
    if c["bias"]:  # torch initialises biases to 0: make them count
        with torch.no_grad():
            for m in (ref, ours):
                m.in_proj_bias.copy_(torch.linspace(-1, 1, 3 * c["E"], dtype=dtype))
                m.out_proj.bias.copy_(torch.linspace(1, -1, c["E"], dtype=dtype))
    return ref, ours


def _run(m, c, q, k, v, kpm, attn_mask):
    q2 = q.clone().requires_grad_()
    k2 = q2 if not c["cross"] else k.clone().requires_grad_()
    v2 = q2 if not c["cross"] else v.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation warning for mismatched mask types
        out, w = m(q2, k2, v2, key_padding_mask=kpm, attn_mask=attn_mask, need_weights=c["need_weights"],
                   average_attn_weights=c["average"], is_causal=c["causal"])
    return out, w, (q2, k2, v2)


@pytest.mark.parametrize("seed", range(40), ids=_cid)
def test_mha_matches_torch_fp64(seed, spy):
    c = _config(seed)
    gen = torch.Generator().manual_seed(seed)
    q, k, v, kpm, attn_mask, (kd, vd) = _inputs(c, torch.float64, gen)
    ref, ours = _pair(c, torch.float64, kd, vd)
    out_r, w_r, ins_r = _run(ref, c, q, k, v, kpm, attn_mask)
    out_f, w_f, ins_f = _run(ours, c, q, k, v, kpm, attn_mask)
    assert spy, "fastattn.attention did not run"
    torch.testing.assert_close(out_f, out_r, **F64)
    assert (w_r is None) == (w_f is None)
    loss_grad = torch.randn(out_r.shape, generator=gen, dtype=torch.float64)
    loss_r, loss_f = (out_r * loss_grad).sum(), (out_f * loss_grad).sum()
    if w_r is not None:
        torch.testing.assert_close(w_f, w_r, **F64)
        wg = torch.randn(w_r.shape, generator=gen, dtype=torch.float64)
        loss_r, loss_f = loss_r + (w_r * wg).sum(), loss_f + (w_f * wg).sum()
    loss_r.backward()
    loss_f.backward()
    for name, a, b in zip("qkv", ins_r, ins_f):
        torch.testing.assert_close(b.grad, a.grad, **F64, msg=lambda m: f"grad of {name}: {m}")
    for (name, pr), (_, pf) in zip(ref.named_parameters(), ours.named_parameters()):
        torch.testing.assert_close(pf.grad, pr.grad, **F64, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("seed", [3, 7, 11, 19])
def test_mha_matches_torch_fp32(seed):
    c = _config(seed)
    gen = torch.Generator().manual_seed(seed)
    q, k, v, kpm, attn_mask, (kd, vd) = _inputs(c, torch.float32, gen)
    ref, ours = _pair(c, torch.float32, kd, vd)
    out_r, w_r, ins_r = _run(ref, c, q, k, v, kpm, attn_mask)
    out_f, w_f, ins_f = _run(ours, c, q, k, v, kpm, attn_mask)
    torch.testing.assert_close(out_f, out_r, **F32)
    if w_r is not None:
        torch.testing.assert_close(w_f, w_r, **F32)
    out_r.sum().backward()
    out_f.sum().backward()
    torch.testing.assert_close(ins_f[0].grad, ins_r[0].grad, **F32)
    for (name, pr), (_, pf) in zip(ref.named_parameters(), ours.named_parameters()):
        torch.testing.assert_close(pf.grad, pr.grad, **F32)


def test_fully_masked_rows_give_zero_not_nan():
    m = MultiheadAttention(8, 2, batch_first=True, dtype=torch.float64)
    ref = nn.MultiheadAttention(8, 2, batch_first=True, dtype=torch.float64)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 4, 8, dtype=torch.float64, requires_grad=True)
    kpm = torch.zeros(2, 4, dtype=torch.bool)
    kpm[1] = True  # every key of item 1 is padding
    out, w = m(x, x, x, key_padding_mask=kpm)
    assert torch.isfinite(out).all() and torch.isfinite(w).all()
    torch.testing.assert_close(out[1], m.out_proj.bias.expand(4, 8), **F64)  # attention output 0
    assert (w[1] == 0).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    out_r, _ = ref(x, x, x, key_padding_mask=kpm, need_weights=False)  # torch's SDPA path: also 0 there
    torch.testing.assert_close(out, out_r, **F64)


def test_dropout_in_training_only(spy):
    m = MultiheadAttention(8, 2, dropout=0.5, batch_first=True)
    x = torch.randn(2, 6, 8)
    m.train()
    a, _ = m(x, x, x, need_weights=False)
    b, wb = m(x, x, x, need_weights=True, average_attn_weights=False)
    assert spy == [0.5, 0.0]  # need_weights: lse from the kernel, dropout applied to the returned weights
    assert not torch.allclose(a, m.eval()(x, x, x)[0])
    assert ((wb == 0).float().mean() > 0.2) and torch.isfinite(b).all()
    m.eval()
    spy.clear()
    c, _ = m(x, x, x, need_weights=False)
    assert spy == [0.0]
    torch.testing.assert_close(c, m(x, x, x)[0])


# ------------------------------------------------------------------- state_dict, init, attributes
@pytest.mark.parametrize("kw", [{}, {"kdim": 5, "vdim": 7}, {"add_bias_kv": True, "bias": False}],
                         ids=["packed", "kvdim", "bias_kv-nobias"])
def test_state_dict_and_init_match_torch(kw):
    torch.manual_seed(123)
    ref = nn.MultiheadAttention(12, 3, **kw)
    torch.manual_seed(123)
    ours = MultiheadAttention(12, 3, **kw)
    sd_r, sd_f = ref.state_dict(), ours.state_dict()
    assert list(sd_r) == list(sd_f)
    for key in sd_r:  # same initialisation, same RNG draws
        torch.testing.assert_close(sd_f[key], sd_r[key], atol=0, rtol=0)
    assert [n for n, _ in ref.named_parameters()] == [n for n, _ in ours.named_parameters()]
    for attr in ("embed_dim", "num_heads", "head_dim", "kdim", "vdim", "batch_first", "dropout",
                 "_qkv_same_embed_dim", "add_zero_attn"):
        assert getattr(ours, attr) == getattr(ref, attr)
    assert isinstance(ours, nn.MultiheadAttention)
    # round trip: fresh torch module <- ours <- fresh torch module
    other = nn.MultiheadAttention(12, 3, **kw)
    ours.load_state_dict(ref.state_dict())
    other.load_state_dict(ours.state_dict())
    for key, val in other.state_dict().items():
        assert torch.equal(val, sd_r[key])


# ------------------------------------------------------------------------------ model swaps
def _encoder(dropout=0.0):
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=dropout, batch_first=True,
                                       dtype=torch.float64)
    return nn.TransformerEncoder(layer, 2)


def _decoder():
    layer = nn.TransformerDecoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True,
                                       dtype=torch.float64)
    return nn.TransformerDecoder(layer, 2)


def _transformer():
    return nn.Transformer(16, 2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32,
                          dropout=0.0, batch_first=True, dtype=torch.float64)


def _padding(N, L, gen):
    lengths = torch.randint(2, L + 1, (N,), generator=gen)
    lengths[0] = L
    return torch.arange(L)[None, :] >= lengths[:, None]  # True = padding, left-aligned


def _run_model(kind, model, x, y, kpm_x, kpm_y):
    if kind == "encoder":
        return model(x, src_key_padding_mask=kpm_x)
    causal = nn.Transformer.generate_square_subsequent_mask(y.shape[1], dtype=torch.float64)
    if kind == "decoder":
        return model(y, x, tgt_mask=causal, tgt_key_padding_mask=kpm_y, memory_key_padding_mask=kpm_x)
    return model(x, y, tgt_mask=causal, src_key_padding_mask=kpm_x, tgt_key_padding_mask=kpm_y,
                 memory_key_padding_mask=kpm_x)


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("kind", ["encoder", "decoder", "transformer"])
def test_replace_attention_in_torch_models(kind, mode, grad, monkeypatch):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    ref = {"encoder": _encoder, "decoder": _decoder, "transformer": _transformer}[kind]()
    getattr(ref, mode)()
    model = copy.deepcopy(ref)
    n_mha = sum(type(m) is nn.MultiheadAttention for m in ref.modules())
    assert fastattn.replace_attention(model) == n_mha > 0
    assert model.training == ref.training
    assert all(isinstance(m, MultiheadAttention) for m in model.modules() if isinstance(m, nn.MultiheadAttention))
    x = torch.randn(3, 7, 16, generator=gen, dtype=torch.float64)
    y = torch.randn(3, 5, 16, generator=gen, dtype=torch.float64)
    kpm_x, kpm_y = _padding(3, 7, gen), _padding(3, 5, gen)
    with torch.set_grad_enabled(grad):
        want = _run_model(kind, ref, x, y, kpm_x, kpm_y)  # torch, fast paths allowed
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            want_python = _run_model(kind, ref, x, y, kpm_x, kpm_y)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
        calls = []
        real = fastattn.functional.attention
        monkeypatch.setattr(fastattn.functional, "attention", lambda *a, **k: calls.append(1) or real(*a, **k))
        for name in ("_transformer_encoder_layer_fwd", "_native_multi_head_attention", "_nested_tensor_from_mask"):
            monkeypatch.setattr(torch, name, lambda *a, _n=name, **k: pytest.fail(f"torch's {_n} ran"))
        got = _run_model(kind, model, x, y, kpm_x, kpm_y)
    per_layer = {"encoder": 2, "decoder": 4, "transformer": 3}[kind]
    assert len(calls) == per_layer, "fastattn did not run in every attention module"
    torch.testing.assert_close(got, want_python, **F64)
    keep = ~(kpm_y if kind != "encoder" else kpm_x)  # torch's nested fast path writes 0 at padding
    torch.testing.assert_close(got[keep], want[keep], **F64)
    if grad:
        got.sum().backward()
        want_python.sum().backward()
        for (name, pr), (_, pf) in zip(ref.named_parameters(), model.named_parameters()):
            torch.testing.assert_close(pf.grad, pr.grad, **F64, msg=lambda m: f"grad of {name}: {m}")


def test_encoder_built_around_fastattn_module_takes_nested_input(monkeypatch):
    """An encoder constructed around fastattn's module (not via replace_attention on the encoder or
    layer) still converts padded input to a nested tensor in eval + no_grad; the module handles it."""
    torch.manual_seed(0)
    ref_layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True,
                                           dtype=torch.float64)
    layer = copy.deepcopy(ref_layer)
    fastattn.replace_attention(layer.self_attn)
    enc = nn.TransformerEncoder(layer, 2).eval()
    ref = nn.TransformerEncoder(ref_layer, 2).eval()
    assert enc.use_nested_tensor  # torch's init checks pass: the conversion will happen
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 16, generator=gen, dtype=torch.float64)
    kpm = _padding(3, 7, gen)
    calls = []
    real = fastattn.functional.attention
    with torch.no_grad():
        want = ref(x, src_key_padding_mask=kpm)
        monkeypatch.setattr(fastattn.functional, "attention", lambda *a, **k: calls.append(1) or real(*a, **k))
        monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", lambda *a, **k: pytest.fail("fused layer ran"))
        got = enc(x, src_key_padding_mask=kpm)
    assert len(calls) == 2
    torch.testing.assert_close(got, want, **F64)  # both nested: 0 at padded positions


def test_replace_attention_keeps_objects_and_is_idempotent():
    model = nn.Sequential(nn.Linear(8, 8), nn.MultiheadAttention(8, 2, dtype=torch.float64))
    shared = model[1]
    params = list(model.parameters())
    assert fastattn.replace_attention(model, backend="reference") == 1
    assert model[1] is shared and type(shared) is MultiheadAttention and shared.backend == "reference"
    assert all(a is b for a, b in zip(params, model.parameters()))
    assert fastattn.replace_attention(model) == 0
    lone = nn.MultiheadAttention(8, 2)
    assert fastattn.replace_attention(lone) == 1 and isinstance(lone, MultiheadAttention)


def test_training_steps_identical_losses():
    torch.manual_seed(0)

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 16, dtype=torch.float64)
            layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, dtype=torch.float64)
            self.body = nn.TransformerEncoder(layer, 2)
            self.head = nn.Linear(16, 20, dtype=torch.float64)

        def forward(self, t):
            mask = nn.Transformer.generate_square_subsequent_mask(t.shape[1], dtype=torch.float64)
            return self.head(self.body(self.emb(t), mask=mask, is_causal=True))

    ref = LM()
    model = copy.deepcopy(ref)
    assert fastattn.replace_attention(model) == 2
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (ref, model)]
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        t = torch.randint(0, 20, (4, 9), generator=gen)
        losses = []
        for m, opt in zip((ref, model), opts):
            loss = nn.functional.cross_entropy(m(t[:, :-1]).flatten(0, 1), t[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) < 1e-10, losses


# ------------------------------------------------------------------------ GatedMultiheadAttention
def _gated_reference(m, x, mem, kpm):
    """out_proj((softmax(q kᵀ/√d + mask) v) ⊙ sigmoid(x W_g + b_g)), written out with torch ops."""
    E, H = m.embed_dim, m.num_heads
    hd = E // H
    wq, wk, wv = m.in_proj_weight.chunk(3)
    bq, bk, bv = m.in_proj_bias.chunk(3)
    N, L, _ = x.shape
    q = nn.functional.linear(x, wq, bq).view(N, L, H, hd).transpose(1, 2)
    k = nn.functional.linear(mem, wk, bk).view(N, -1, H, hd).transpose(1, 2)
    v = nn.functional.linear(mem, wv, bv).view(N, -1, H, hd).transpose(1, 2)
    s = q @ k.transpose(-1, -2) / hd ** 0.5
    s = s.masked_fill(kpm[:, None, None, :], float("-inf"))
    p = s.softmax(-1)
    o = p @ v  # [N, H, L, hd]
    g = torch.sigmoid(m.gate_proj(x)).view(N, L, H, -1).transpose(1, 2)
    o = (o * g).transpose(1, 2).reshape(N, L, E)
    return m.out_proj(o), p.mean(1)


@pytest.mark.parametrize("gate", ["elementwise", "headwise"])
def test_gated_mha_matches_reference_math(gate, spy):
    torch.manual_seed(0)
    m = GatedMultiheadAttention(16, 4, batch_first=True, gate=gate, dtype=torch.float64)
    assert m.gate_proj.out_features == (16 if gate == "elementwise" else 4)
    with torch.no_grad():
        m.in_proj_bias.normal_()
        m.gate_proj.bias.normal_()
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    mem = torch.randn(2, 6, 16, dtype=torch.float64, requires_grad=True)
    kpm = torch.zeros(2, 6, dtype=torch.bool)
    kpm[1, 4:] = True
    out, w = m(x, mem, mem, key_padding_mask=kpm)
    want, want_w = _gated_reference(m, x, mem, kpm)
    torch.testing.assert_close(out, want, **F64)
    torch.testing.assert_close(w, want_w, **F64)
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), [x, mem, *m.parameters()])
    grads_ref = torch.autograd.grad((want * g).sum(), [x, mem, *m.parameters()])
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, **F64)
    out2, _ = m(x, mem, mem, key_padding_mask=kpm, need_weights=False)  # fused gate path
    torch.testing.assert_close(out2, want, **F64)
    assert spy == [0.0, 0.0]


def test_gated_mha_loads_torch_state_dict():
    ref = nn.MultiheadAttention(8, 2)
    m = GatedMultiheadAttention(8, 2, gate="headwise")
    missing, unexpected = m.load_state_dict(ref.state_dict(), strict=False)
    assert sorted(missing) == ["gate_proj.bias", "gate_proj.weight"] and not unexpected
    with pytest.raises(ValueError, match="gate"):
        GatedMultiheadAttention(8, 2, gate="channel")


# --------------------------------------------------------------------------------- AttentionGate
GATE_TOL = {"reference": F64, "auto": F64}


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("pool", [False, True], ids=["gate", "pool"])
@pytest.mark.parametrize("heads", [1, 4])
def test_attention_gate_matches_reference_math(pool, heads, backend):
    torch.manual_seed(0)
    tol = GATE_TOL[backend]
    m = AttentionGate(16, num_heads=heads, pool=pool, dtype=torch.float64, backend=backend)
    x = torch.randn(3, 9, 16, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 5:] = False
    y, alpha = m(x, mask=mask, return_weights=True)
    scores = (x @ m.weight.t()).masked_fill(~mask[:, :, None], float("-inf"))
    want_alpha = scores.softmax(dim=1)  # [B, N, H]
    a = want_alpha.repeat_interleave(16 // heads, dim=-1)
    want = (a * x).sum(1) if pool else a * x
    torch.testing.assert_close(y, want, **tol)
    torch.testing.assert_close(alpha, want_alpha, **tol)
    assert y.shape == ((3, 16) if pool else (3, 9, 16)) and alpha.shape == (3, 9, heads)
    g = torch.randn_like(y)
    got = torch.autograd.grad((y * g).sum(), [x, m.weight])
    ref = torch.autograd.grad((want * g).sum(), [x, m.weight])
    for u, w in zip(got, ref):
        torch.testing.assert_close(u, w, **tol)
    y1 = m(x[0])  # unbatched
    torch.testing.assert_close(y1, m(x[:1])[0], **tol)


def test_attention_gate_rejects_bad_heads():
    with pytest.raises(ValueError, match="num_heads"):
        AttentionGate(10, num_heads=3)


# ------------------------------------------------------------------------------- mixed dtypes
# Whether torch accepts an in_proj_bias of another dtype depends on its (L, N, E) view of the input
# being non-contiguous (fastattn.nn._bias_for says why); these layouts cover both outcomes.
IN_PROJ_LAYOUTS = {  # name: (batch_first, the module's input from an (N, L, E) tensor, torch runs)
    "batch_first": (True, lambda x: x, True),
    "batch_first-N1": (True, lambda x: x[:1], False),
    "batch_first-transposed_input": (True, lambda x: x.transpose(0, 1).contiguous().transpose(0, 1), False),
    "seq_first": (False, lambda x: x.transpose(0, 1).contiguous(), False),
    "seq_first-noncontiguous_input": (False, lambda x: x.transpose(0, 1), True),
    "unbatched": (True, lambda x: x[0], False),
}


def _outcome(m, q, k, v, **kw):
    """("ok", out, weights, grads of the inputs and parameters) or ("raise", exception type)."""
    q2 = q.detach().clone().requires_grad_()
    k2 = q2 if k is q else k.detach().clone().requires_grad_()
    v2 = k2 if v is k else v.detach().clone().requires_grad_()
    leaves = list({id(t): t for t in (q2, k2, v2)}.values())
    try:
        out, w = m(q2, k2, v2, **kw)
        loss = out.sum() if w is None else out.sum() + w.sum()
        grads = torch.autograd.grad(loss, leaves + list(m.parameters()))
    except Exception as e:  # noqa: BLE001  (the type is compared with torch's)
        return "raise", type(e)
    return "ok", out, w, grads


def _assert_same_outcome(got, want, tol, what):
    kind = lambda o: "ran" if o[0] == "ok" else f"raised {o[1].__name__}"  # noqa: E731
    assert kind(got) == kind(want), f"{what}: torch {kind(want)}, fastattn {kind(got)}"
    if want[0] == "ok":
        torch.testing.assert_close(got[1], want[1], **tol)
        assert (got[2] is None) == (want[2] is None)
        if want[2] is not None:
            torch.testing.assert_close(got[2], want[2], **tol)
        for a, b in zip(got[3], want[3]):
            torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("dtype,bias_dtype", [(torch.float64, torch.float16), (torch.float64, torch.float32),
                                              (torch.float32, torch.float64)], ids=["f64-f16", "f64-f32", "f32-f64"])
def test_in_proj_bias_of_another_dtype_matches_torch(dtype, bias_dtype):
    tol = F64 if dtype == torch.float64 else F32
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(8, 2, dtype=dtype)
    with torch.no_grad():
        ref.in_proj_bias.copy_(torch.linspace(-1, 1, 24))
    ref.in_proj_bias.data = ref.in_proj_bias.data.to(bias_dtype)
    x = torch.randn(3, 5, 8, generator=gen, dtype=dtype)
    mem = torch.randn(3, 6, 8, generator=gen, dtype=dtype)
    runs = []
    for layout, (batch_first, make, torch_runs) in IN_PROJ_LAYOUTS.items():
        ref.batch_first = batch_first
        ours = copy.deepcopy(ref)
        fastattn.replace_attention(ours)
        q, kv = make(x), make(mem)
        for (k, v), mode, need_weights in itertools.product([(q, q), (kv, kv), (kv, kv.clone())], ["train", "eval"],
                                                            [False, True]):
            what = f"{layout} {mode} need_weights={need_weights}"
            want = _outcome(getattr(ref, mode)(), q, k, v, need_weights=need_weights)
            assert (want[0] == "ok") == torch_runs, f"{what}: torch's behaviour changed"
            _assert_same_outcome(_outcome(getattr(ours, mode)(), q, k, v, need_weights=need_weights), want, tol, what)
            runs.append(want[0])
    assert "ok" in runs and "raise" in runs
    # out_proj is a 2-D F.linear in torch (addmm): its bias must have the module's dtype
    ref.out_proj.bias.data = ref.out_proj.bias.data.to(bias_dtype)
    ours = copy.deepcopy(ref)
    fastattn.replace_attention(ours)
    ref.batch_first = ours.batch_first = True
    _assert_same_outcome(_outcome(ours, x, x, x), _outcome(ref, x, x, x), tol, "out_proj.bias")


@pytest.mark.parametrize("what", ["bias_k", "bias_v", "kdim_key"])
def test_keys_of_another_dtype_raise_like_torch(what):
    """A float64 bias_k/bias_v in a float32 module promotes the keys/values (torch.cat); keys in
    another dtype can also come from kdim/vdim projections. torch then raises RuntimeError."""
    torch.manual_seed(0)
    kw = dict(add_bias_kv=True) if what != "kdim_key" else dict(kdim=6, vdim=6, bias=False)
    ref = nn.MultiheadAttention(8, 2, batch_first=True, dtype=torch.float32, **kw)
    x = torch.randn(2, 5, 8)
    k = v = x
    if what == "kdim_key":
        ref.k_proj_weight.data = ref.k_proj_weight.data.double()
        k, v = torch.randn(2, 4, 6, dtype=torch.float64), torch.randn(2, 4, 6)
    else:
        setattr(ref, what, nn.Parameter(getattr(ref, what).data.double()))
    ours = copy.deepcopy(ref)
    fastattn.replace_attention(ours)
    for need_weights in (False, True):
        want = _outcome(ref, x, k, v, need_weights=need_weights)
        assert want == ("raise", RuntimeError)
        _assert_same_outcome(_outcome(ours, x, k, v, need_weights=need_weights), want, F32, what)
