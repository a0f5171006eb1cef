"""fastattn.attention_pool on the cpu backend (and the reference's own properties) against the rule of
docs/CONTRACT.md §4."""
import pytest
import torch

import fastattn
from fastattn.testing import check_pool, pool_cases
from conftest import DTYPES, assert_all_ok, dtype_id

CASES = pool_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_cpu_matches_reference(case, dtype):
    assert_all_ok(check_pool(case, dtype, backend="cpu"), case.id)


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def pool_inputs(N=13, D=6, Hd=5, K=2, seed=0):
    x, V, U, w = rand(N, D, seed=seed), rand(D, Hd, seed=seed + 1), rand(D, Hd, seed=seed + 2), rand(Hd, K, seed=seed + 3)
    bV, bU = rand(Hd, seed=seed + 4), rand(Hd, seed=seed + 5)
    return x, V, U, w, bV, bU


@pytest.mark.parametrize("gated", [True, False])
def test_cpu_gradcheck_float64(gated):
    x, V, U, w, bV, bU = (t.requires_grad_() for t in pool_inputs())
    offsets = torch.tensor([0, 4, 4, 13])
    mask = torch.ones(13, dtype=torch.bool)
    mask[[1, 6, 7]] = False

    def f(x, V, w, bV, U, bU):
        y, a = fastattn.attention_pool(x, V, w, U if gated else None, bV=bV, bU=bU if gated else None,
                                       offsets=offsets, mask=mask, return_weights=True, backend="cpu")
        return y, a
    assert torch.autograd.gradcheck(f, (x, V, w, bV, U, bU))


def test_nan_reaches_its_bag_only_and_left_out_rows_reach_nothing():
    x, V, U, w, bV, bU = pool_inputs(N=12)
    x[2, 3] = float("nan")  # bag 0 (rows 0-4): NaN
    x[7, 1] = float("nan")  # bag 1 (rows 5-11), but left out by the mask
    mask = torch.ones(12, dtype=torch.bool)
    mask[7] = False
    offsets = torch.tensor([0, 5, 12])
    for backend in ("cpu", "reference"):
        xg = x.clone().requires_grad_()
        y = fastattn.attention_pool(xg, V, w, U, bV=bV, bU=bU, offsets=offsets, mask=mask, backend=backend)
        assert y[0].isnan().all(), backend
        assert y[1].isfinite().all(), backend
        y[1].sum().backward()
        assert xg.grad[5:].isfinite().all() and (xg.grad[7] == 0).all(), backend


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_empty_and_left_out_bags_give_zero_and_zero_gradients(backend):
    x, V, U, w, bV, bU = pool_inputs(N=9)
    x.requires_grad_()
    mask = torch.ones(9, dtype=torch.bool)
    mask[4:9] = False  # bag 2 left out entirely
    y, a = fastattn.attention_pool(x, V, w, U, bV=bV, bU=bU, offsets=torch.tensor([0, 4, 4, 9]), mask=mask,
                                   return_weights=True, backend=backend)
    assert (y[1] == 0).all() and (y[2] == 0).all() and (a[4:] == 0).all()
    (y.sum() + a.sum()).backward()
    assert x.grad.isfinite().all() and (x.grad[4:] == 0).all()


def test_padded_batch_is_the_packed_bags():
    x, V, U, w, bV, bU = pool_inputs(N=10)
    xp = torch.full((2, 7, 6), float("nan"), dtype=torch.float64)
    xp[0, :3], xp[1, :7] = x[:3], x[3:]
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[0, :3] = mask[1, :] = True
    y, a = fastattn.attention_pool(x, V, w, U, bV=bV, bU=bU, offsets=torch.tensor([0, 3, 10]), return_weights=True,
                                   backend="cpu")
    yp, ap = fastattn.attention_pool(xp, V, w, U, bV=bV, bU=bU, mask=mask, return_weights=True, backend="cpu")
    torch.testing.assert_close(yp, y)
    torch.testing.assert_close(ap[mask], a)
    assert ap.shape == (2, 7, 2) and (ap[~mask] == 0).all()


@pytest.mark.parametrize("sizes", [dict(N=0), dict(D=0), dict(Hd=0), dict(K=0)], ids=lambda s: str(s))
def test_zero_sizes_give_what_the_definition_gives(sizes):
    shape = dict(N=6, D=4, Hd=3, K=2) | sizes
    x, V, U, w, bV, bU = (t.requires_grad_() for t in pool_inputs(**shape))
    offsets = torch.tensor([0, shape["N"] // 2, shape["N"]])
    y, a = fastattn.attention_pool(x, V, w, U, bV=bV, bU=bU, offsets=offsets, return_weights=True, backend="cpu")
    assert y.shape == (2, shape["K"], shape["D"]) and a.shape == (shape["N"], shape["K"])
    if shape["N"] and shape["K"]:  # Hd = 0: every score is 0, α uniform; D = 0: y is empty
        torch.testing.assert_close(a[:3], torch.full((3, shape["K"]), 1 / 3, dtype=torch.float64))
    (y.sum() + a.sum()).backward()
    assert all(t.grad is not None and t.grad.shape == t.shape for t in (x, V, U, w, bV, bU))


def test_opcheck():
    x, V, U, w, bV, bU = (t.float() for t in pool_inputs())
    offsets, mask = torch.tensor([0, 4, 4, 13]), torch.rand(13) < 0.8
    op = torch.ops.fastattn.attention_pool_fwd.default
    for args in [(x, offsets, mask, V, U, w, bV, bU, True), (x, offsets, None, V, None, w, None, None, False)]:
        args = tuple(t.requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in args)
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_id)
def test_backward_without_the_forwards_scores_and_outputs_of_their_own(dtype):
    """The backward op called without the forward's scores makes them again: the same gradients. Every gradient is a
    tensor of its own (the schema declares no aliasing), also where no dtype conversion copies it."""
    x, V, U, w, bV, bU = (t.to(dtype) for t in pool_inputs(N=13, D=6, Hd=5, K=2))
    offsets, mask = torch.tensor([0, 4, 4, 13]), torch.rand(13, generator=torch.Generator().manual_seed(0)) < 0.8
    y, lse, s = torch.ops.fastattn.attention_pool_fwd(x, offsets, mask, V, U, w, bV, None, True)
    dy = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(1))
    bwd = torch.ops.fastattn.attention_pool_bwd
    with_scores = bwd(dy, x, offsets, mask, V, U, w, bV, None, y, lse, s, None, None)
    without = bwd(dy, x, offsets, mask, V, U, w, bV, None, y, lse, None, None, None)
    for a, b in zip(with_scores, without):
        assert torch.equal(a, b)
    storages = [t.untyped_storage().data_ptr() for t in with_scores]
    assert len(set(storages)) == len(storages)


def test_bad_offsets_reach_no_kernel():
    """The kernels check what they index by: offsets past N, a shape that does not fit (what torch.compile and direct
    calls skip the Python checks for) raise instead of reading out of bounds."""
    x, V, U, w, bV, bU = (t.float() for t in pool_inputs(N=13))
    op = torch.ops.fastattn.attention_pool_fwd
    for offsets in (torch.tensor([0, 4, 14]), torch.tensor([0, 9, 4, 13]), torch.tensor([1, 13])):
        with pytest.raises(RuntimeError, match="offsets"):
            op(x, offsets, None, V, U, w, bV, bU, False)
    with pytest.raises(RuntimeError, match="w must be"):
        op(x, torch.tensor([0, 13]), None, V, U, w[:3], bV, bU, False)


def test_compiles_fullgraph():
    x, V, U, w, bV, bU = (t.float() for t in pool_inputs())
    offsets = torch.tensor([0, 4, 4, 13])
    f = lambda x: fastattn.attention_pool(x, V, w, U, bV=bV, bU=bU, offsets=offsets, return_weights=True, backend="cpu")
    torch._dynamo.reset()
    xs = [x.clone().requires_grad_() for _ in range(2)]
    got, want = torch.compile(f, fullgraph=True)(xs[0]), f(xs[1])
    torch.testing.assert_close(got, want)
    for (y, a), t in zip((got, want), xs):
        (y.sum() + a.square().sum()).backward()
    torch.testing.assert_close(xs[0].grad, xs[1].grad)


@pytest.mark.parametrize("bad, error, names", [
    (dict(x=torch.zeros(3, 4, 5, 6)), ValueError, "x:"),
    (dict(V=torch.zeros(5, 3)), ValueError, "V:"),
    (dict(w=torch.zeros(4, 2)), ValueError, "w:"),
    (dict(U=torch.zeros(6, 4)), ValueError, "U:"),
    (dict(bV=torch.zeros(4)), ValueError, "bV:"),
    (dict(U=None), ValueError, "bU:"),
    (dict(w=torch.zeros(3, 2, dtype=torch.float64)), TypeError, "dtype"),
    (dict(offsets=torch.tensor([0, 5, 3])), ValueError, "offsets:"),
    (dict(offsets=torch.tensor([0., 5.])), TypeError, "offsets:"),
    (dict(mask=torch.ones(5)), TypeError, "mask:"),
    (dict(mask=torch.ones(4, dtype=torch.bool)), ValueError, "mask:"),
], ids=lambda v: str(v) if isinstance(v, str) else "")
def test_bad_arguments_are_named(bad, error, names):
    args = dict(x=torch.zeros(5, 6), V=torch.zeros(6, 3), w=torch.zeros(3, 2), U=torch.zeros(6, 3),
                bV=torch.zeros(3), bU=torch.zeros(3), offsets=torch.tensor([0, 2, 5]), mask=None) | bad
    with pytest.raises(error, match=names):
        fastattn.attention_pool(args.pop("x"), args.pop("V"), args.pop("w"), args.pop("U"), **args)


class ClamAttnNetGated(torch.nn.Module):
    """CLAM's Attn_Net_Gated (L=dim, D=hidden): the eager layout fastattn.nn.AttentionPooling maps onto."""

    def __init__(self, L, D, dropout, n_classes, gated=True):
        super().__init__()
        nn = torch.nn
        self.attention_a = nn.Sequential(nn.Linear(L, D), nn.Tanh(), nn.Dropout(dropout))
        self.attention_b = nn.Sequential(nn.Linear(L, D), nn.Sigmoid(), nn.Dropout(dropout)) if gated else None
        self.attention_c = nn.Linear(D, n_classes)

    def forward(self, x):  # one bag (N, L) -> pooled (n_classes, L), A (n_classes, N)
        a = self.attention_a(x)
        if self.attention_b is not None:
            a = a.mul(self.attention_b(x))
        A = torch.softmax(self.attention_c(a).t(), dim=1)
        return A @ x, A


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("layout", ["list", "packed", "padded"])
def test_module_is_clam_pooling(gated, layout):
    torch.manual_seed(0)
    dim, hidden, K = 20, 12, 3
    clam = ClamAttnNetGated(dim, hidden, 0.25, K, gated=gated).double().eval()
    pool = fastattn.nn.AttentionPooling(dim, hidden, gated=gated, branches=K, dropout=0.25, dtype=torch.float64,
                                        backend="cpu").eval()
    pool.load_clam_state_dict(clam.state_dict())
    bags = [torch.randn(n, dim, dtype=torch.float64) for n in (5, 1, 17)]
    want = [clam(b) for b in bags]
    if layout == "list":
        y, alpha = pool(bags, return_weights=True)
    elif layout == "packed":
        y, alpha = pool(torch.cat(bags), offsets=torch.tensor([0, 5, 6, 23]), return_weights=True)
        alpha = alpha.split([5, 1, 17])
    else:
        x = torch.zeros(3, 17, dim, dtype=torch.float64)
        mask = torch.zeros(3, 17, dtype=torch.bool)
        for i, b in enumerate(bags):
            x[i, :len(b)], mask[i, :len(b)] = b, True
        y, alpha = pool(x, mask=mask, return_weights=True)
        alpha = [alpha[i, :len(b)] for i, b in enumerate(bags)]
    for i, (m, A) in enumerate(want):
        torch.testing.assert_close(y[i], m)
        torch.testing.assert_close(alpha[i], A.t())
    # the parameters' gradients are the eager model's (attention_c.bias cancels in the softmax: no gradient there)
    dy = torch.randn(3, K, dim, dtype=torch.float64)
    (y * dy).sum().backward()
    sum(((m * dy[i]).sum() for i, (m, _) in enumerate(want))).backward()
    for name, p in pool.named_parameters():
        theirs = dict(clam.named_parameters())[name.replace("attention_a.", "attention_a.0.")
                                                   .replace("attention_b.", "attention_b.0.")]
        torch.testing.assert_close(p.grad, theirs.grad, msg=name)


def test_module_dropout_draws_as_clam_in_training():
    torch.manual_seed(0)
    clam = ClamAttnNetGated(16, 8, 0.25, 2).double().train()
    pool = fastattn.nn.AttentionPooling(16, 8, branches=2, dropout=0.25, dtype=torch.float64).train()
    pool.load_clam_state_dict(clam.state_dict())
    bag = torch.randn(30, 16, dtype=torch.float64)
    torch.manual_seed(1)
    m, A = clam(bag)
    torch.manual_seed(1)
    y, alpha = pool([bag], return_weights=True)
    torch.testing.assert_close(y[0], m)
    torch.testing.assert_close(alpha[0], A.t())
    torch.manual_seed(1)
    assert not torch.allclose(pool.eval()([bag])[0], m)  # eval: no dropout


def test_example_trains_on_packed_bags_as_the_eager_model(tmp_path, capsys):
    """examples/attention_pool_mil.py at small sizes: the packed model's losses are the eager loop's, and it learns."""
    import importlib.util
    import pathlib
    import re
    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "attention_pool_mil.py"
    spec = importlib.util.spec_from_file_location("attention_pool_mil", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    plot = tmp_path / "alpha.png"
    assert example.main(["--steps", "60", "--bags", "8", "--dim", "32", "--hidden", "32", "--max-instances", "100",
                         "--out", str(plot)]) == 0
    out = capsys.readouterr().out
    assert float(re.search(r"largest loss difference, fused vs eager: (\S+)", out).group(1)) < 1e-5, out
    assert float(re.search(r"test accuracy \(fused\) (\S+)", out).group(1)) >= 0.75, out
    pytest.importorskip("matplotlib")
    assert plot.stat().st_size > 0
