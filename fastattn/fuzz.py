"""Seeded property fuzzing of every op against the float64 reference (docs/CONTRACT.md §2 and §4).

Each case is drawn from one integer seed over the whole input space a torch user can reach: sizes
that are primes, 1 or 0, head dims 1-256, every dtype, GQA/MQA, every causal mode, bool and float
masks of random broadcast shapes with fully masked rows and -inf entries, output gates, every kind
of view (:data:`VIEW_KINDS`), NaN placed in any input, extreme scales. A case runs forward and
backward on the backend, on the reference in the same dtype and on the reference in float64 (on
the same inputs, i.e. rounded to the case's dtype, as FlashAttention's tests do: the error measured
is the arithmetic's, not the inputs' rounding, which near-ties of a saturated softmax would turn
into noise), and is judged by the rule of docs/CONTRACT.md §4 (``testing.compare``), where NaN must appear
exactly where the float64 reference has it. ``case.id`` (the seed and what it drew) reproduces a failure:
``fastattn check --fuzz N --fuzz-seed S`` or :func:`attention_case` / :func:`gate_case` / :func:`pool_case`.
"""
from __future__ import annotations

import dataclasses
import math
import random

import torch

from . import contract, functional, testing

# How an input tensor is laid out in memory (each is a view torch users make):
#   contiguous; transposed (all dims but the last reversed in memory, e.g. (B, L, H, D) seen as
#   (B, H, L, D)); expand (stride 0 along the length dim); unfold (rows overlapping: row stride 1 <
#   the row length); size1 (size-1 dims given odd strides, e.g. a (B, H, 1, D) decode query with
#   stride(2) == 1, which torch calls contiguous).
VIEW_KINDS = ("contiguous", "transposed", "expand", "unfold", "size1")


def view_of(shape, kind):
    """(master_shape, build): ``build(t)`` of a tensor ``t`` of ``master_shape`` is a view of
    ``shape`` laid out as ``kind``; gradients reach ``t`` through it."""
    shape = tuple(shape)
    n = len(shape)
    if kind == "transposed" and n >= 3:
        perm = list(reversed(range(n - 1))) + [n - 1]  # its own inverse
        return tuple(shape[i] for i in perm), lambda t: t.permute(perm)
    if kind == "expand" and n >= 2 and shape[-2] > 1:
        return shape[:-2] + (1, shape[-1]), lambda t: t.expand(shape)
    if kind == "unfold" and n >= 2 and shape[-2] > 1 and shape[-1] > 1:
        L, D = shape[-2], shape[-1]
        return shape[:-2] + (L - 1 + D,), lambda t: t.unfold(-1, D, 1)
    if kind == "size1" and 1 in shape:
        strides = list(torch.empty(shape).stride())
        odd = iter((1, 3, 7, 5, 11))
        strides = [next(odd) if s == 1 and i < n - 1 else st for i, (s, st) in enumerate(zip(shape, strides))]
        return shape, lambda t: t.as_strided(shape, strides)
    return shape, lambda t: t


@dataclasses.dataclass
class Input:
    """A float64 master tensor and how the op sees it; ``grad`` when its gradient is checked."""
    master: torch.Tensor
    build: object
    grad: bool = True

    def leaf(self, device, dtype, rounded_to=None):
        """A fresh leaf in ``dtype``; ``rounded_to``: the master's values rounded to that dtype first
        (the float64 truth of a low-precision run sees the inputs that run saw)."""
        master = self.master
        if rounded_to is not None and master.is_floating_point():
            master = master.to(rounded_to)
        dt = dtype if master.is_floating_point() else master.dtype
        return testing.fresh(master, device, dt).requires_grad_(self.grad)


def _sizes(rng, choices, zero_ok):
    return 0 if zero_ok and rng.random() < 0.04 else rng.choice(choices)



def _fill_row0(inp, value):
    """Row 0 (dim -2) of the view that ``inp`` builds gets ``value``. A view whose rows share memory
    (expand, unfold) cannot be written, so its master's first row-length elements are."""
    view = inp.build(inp.master)
    try:
        view[..., 0, :] = value
    except RuntimeError:
        inp.master.view(-1, inp.master.shape[-1])[:, :view.shape[-1]] = value


def _place_nan(rng, t, value=math.nan):
    if t.numel():
        t.view(-1)[rng.randrange(t.numel())] = value


# --------------------------------------------------------------------------------------- attention
@dataclasses.dataclass
class AttentionFuzz:
    seed: int
    dtype: torch.dtype
    desc: str
    inputs: dict            # name -> Input (q, k, v, mask?, gate?, dout, dlse?)
    causal: object
    scale: float | None
    lse_grad: bool
    window: tuple = (-1, -1)                # the score modifiers (fastattn.attention's window_size, softcap,
    softcap: float = 0.0
    alibi: torch.Tensor | None = None       # alibi_slopes: float64 holding float32 values, no gradient)
    dropout: float = 0.0                    # dropout_p, the seed drawn after torch.manual_seed(seed)

    @property
    def id(self):
        return f"attention-seed{self.seed}-{testing.DTYPE_NAMES[self.dtype]}-{self.desc}"


LENGTHS = (1, 2, 3, 5, 7, 13, 17, 31, 64, 97, 130)
HEAD_DIMS = (1, 2, 3, 8, 16, 31, 40, 59, 64, 96, 128, 200, 256)


def attention_case(seed, dtypes, max_len=130, max_dim=256, head_dims=None,
                   score_mods=contract.ScoreMods.NAMES, dropout=True, saturated=False) -> AttentionFuzz:
    """The attention case drawn from ``seed`` (dtype among ``dtypes``). ``head_dims``: draw only these,
    with D == Dv (a backend that covers no others: see :func:`limits`); ``score_mods``: the score modifiers
    that may be drawn (a backend's own), ``dropout``: whether dropout may be. Those come from a stream of their
    own: the rest of the case is the same whichever are allowed. ``saturated``: saturated rows as :func:`_scale`
    says (it changes the case: Lk, and the scales drawn from)."""
    rng = random.Random(seed)
    lengths = [x for x in LENGTHS if x <= max_len]
    dims = [x for x in (head_dims or HEAD_DIMS) if x <= max_dim]
    dtype = rng.choice(dtypes)
    Hkv, group = rng.choice((1, 1, 2, 3)), rng.choice((1, 1, 2, 3))
    B = 0 if rng.random() < 0.03 else rng.choice((1, 1, 2, 3))
    Lq, Lk, D = _sizes(rng, lengths, True), _sizes(rng, lengths, True), _sizes(rng, dims, not head_dims)
    if dtype == torch.float32 and Lk == 1 and not saturated:  # one key: every row saturated (see _scale)
        Lk = 2
    Dv = D if head_dims or rng.random() < 0.6 else _sizes(rng, dims, True)
    causal = rng.choice((False, False, True, "bottom_right"))
    mask = rng.choice(("none", "none", "bool", "float", "float_grad"))
    mask_shape = tuple(s if rng.random() < 0.6 else 1 for s in (B, Hkv * group, Lq, Lk))  # each dim kept or 1
    empty_rows = mask != "none" and rng.random() < 0.4 and mask_shape[2] > 0
    gate = rng.choice(("none", "none", "elementwise", "headwise"))
    views = {n: rng.choice(VIEW_KINDS) for n in ("q", "k", "v", "mask", "gate")}
    # NaN anywhere in a float mask. In q, k, v or the gate only where no causal or bool mask hides entries:
    # a NaN there meets 0 in the GEMMs (0 · NaN = NaN) of tiles that a kernel computes but may equally skip,
    # so whether it spreads is not promised (docs/CONTRACT.md §2.2 promises it for the entries that take part).
    unmasked = mask != "bool" and not causal
    targets = (["q", "k"] + (["gate"] if gate != "none" else []) + (["v"] if mask == "none" else [])) * unmasked
    targets += ["mask"] if mask.startswith("float") else []
    nan = rng.choice(targets) if targets and rng.random() < 0.15 else None
    scale, lse_grad = _scale(rng, dtype, max(D, Dv), Lk, saturated), rng.random() < 0.3
    mods = _score_mods(random.Random(f"score-mods-{seed}"), score_mods, Lk, dropout)
    if mods["window"] != (-1, -1) and nan not in (None, "mask"):  # a window hides entries too (see above)
        nan = None
    return make_attention_case(
        seed, dtype, B=B, Hq=Hkv * group, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D, Dv=Dv, causal=causal, mask=mask,
        mask_shape=mask_shape, empty_rows=empty_rows, gate=gate, views=views, nan=nan, scale=scale,
        lse_grad=lse_grad, **mods)


def _score_mods(rng, allowed, Lk, dropout):
    """window (each side unbounded, 0, 1, 2 or up to Lk), softcap and ALiBi slopes, each in some cases; and
    dropout's p when ``dropout``."""
    side = lambda: rng.choice((-1, 0, 1, 2, rng.randrange(Lk + 1)))
    window = (side(), side()) if "window" in allowed and rng.random() < 0.3 else (-1, -1)
    softcap = rng.choice((1.0, 5.0, 30.0)) if "softcap" in allowed and rng.random() < 0.2 else 0.0
    alibi = rng.choice(("heads", "batch")) if "alibi" in allowed and rng.random() < 0.2 else "none"
    p = rng.choice((0.1, 0.3, 0.5, 0.5, 0.9, 1.0)) if rng.random() < 0.2 else 0.0
    return dict(window=window, softcap=softcap, alibi=alibi, dropout=p if dropout else 0.0)


def _scale(rng, dtype, D, Lk, saturated=False):
    """None (1/sqrt(D)) mostly, or an extreme scale. Saturating scales stay where the rule of
    docs/CONTRACT.md §4 can hold: a recomputed backward (FlashAttention's, and torch's own CPU flash
    kernel) misses exact zeros of dq and dk (a row with one key that counts) by the float32 rounding
    of scale · |dP| · |k|, because delta = rowsum(dO ⊙ O) and dP = dO Vᵀ are rounded apart, while the
    reference differentiates its own softmax and hits them. Against float32's absolute floor that shows
    at scale 2, against half precision's at scale 20 with a head dim (D or Dv) > 64 or a single key, and
    in float32 with a single key at any scale (README, Numerics). ``saturated``: the backend's backward takes
    a row's dominant key exactly (the cpu kernels), so half precision draws scale 20 at any head dim, and
    float32 rows of a single key (:func:`attention_case`); float32 keeps to small scales there too (its
    saturated rows still miss by the rounding of the recomputed scores: README, Numerics)."""
    if dtype == torch.float32:
        extreme = (0.05,)
    elif dtype == torch.float64 or saturated or (D <= 64 and Lk > 1):
        extreme = (0.05, 2.0, 20.0)
    else:
        extreme = (0.05, 2.0)
    return rng.choice((None, None, None) + extreme)


def make_attention_case(seed, dtype, *, B=2, Hq=2, Hkv=2, Lq=17, Lk=17, D=16, Dv=None, causal=False, mask="none",
                        mask_shape=None, empty_rows=False, gate="none", views=None, nan=None, scale=None,
                        lse_grad=False, window=(-1, -1), softcap=0.0, alibi="none", dropout=0.0) -> AttentionFuzz:
    """An attention case with the given parameters; values drawn from ``seed``. ``views`` maps
    q/k/v/mask/gate to a :data:`VIEW_KINDS` entry; ``nan`` names the input that gets one NaN. ``window``,
    ``softcap``: as ``fastattn.attention``'s window_size and softcap; ``alibi``: "none", or slopes of shape
    (Hq,) ("heads") or (B, Hq) ("batch"); ``dropout``: dropout_p."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    Dv = D if Dv is None else Dv
    views = views or {}
    desc = [f"B{B}-H{Hq}-{Hkv}-L{Lq}-{Lk}-D{D}-{Dv}", f"causal{causal}", f"mask-{mask}", f"gate-{gate}"]
    if scale is not None:
        desc.append(f"scale{scale}")

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    def tensor(name, shape, grad=True, values=randn):
        kind = views.get(name, "contiguous")
        master_shape, build = view_of(shape, kind)
        if kind != "contiguous":
            desc.append(f"{name}:{kind}")
        return Input(values(*master_shape), build, grad)

    inputs = {"q": tensor("q", (B, Hq, Lq, D)), "k": tensor("k", (B, Hkv, Lk, D)), "v": tensor("v", (B, Hkv, Lk, Dv))}
    if mask != "none":
        mask_shape = tuple(mask_shape or (B, Hq, Lq, Lk))

        def mask_values(*ms):
            if mask == "bool":
                return torch.rand(*ms, generator=g) < 0.75
            return randn(*ms).masked_fill(torch.rand(*ms, generator=g) < 0.15, -math.inf)
        # bool masks are not differentiable; float ones are checked when float_grad
        inputs["mask"] = tensor("mask", mask_shape, grad=mask == "float_grad", values=mask_values)
        if empty_rows:  # query row 0 sees no key (written through the view, into the master)
            _fill_row0(inputs["mask"], False if mask == "bool" else -math.inf)
        desc.append(f"mask{list(mask_shape)}" + ("-emptyrows" if empty_rows else ""))
    if gate != "none":
        inputs["gate"] = tensor("gate", (B, Hq, Lq, Dv if gate == "elementwise" else 1))
    inputs["dout"] = Input(randn(B, Hq, Lq, Dv), lambda t: t, grad=False)
    if lse_grad:
        inputs["dlse"] = Input(randn(B, Hq, Lq), lambda t: t, grad=False)
    if nan is not None:
        _place_nan(rng, inputs[nan].master)
        desc.append(f"nan-{nan}")
    if window != (-1, -1):
        desc.append("window{}_{}".format(*window))
    if softcap:
        desc.append(f"softcap{softcap}")
    slopes = None
    if alibi != "none":  # float32 values: every run (whatever its dtype) sees the same slopes
        slopes = torch.rand(*((Hq,) if alibi == "heads" else (B, Hq)), generator=g).double()
        desc.append(f"alibi-{alibi}")
    if dropout:
        desc.append(f"dropout{dropout}")
    return AttentionFuzz(seed, dtype, "-".join(desc), inputs, causal, scale, lse_grad, window, softcap, slopes,
                         dropout)


def _run_attention(case: AttentionFuzz, dtype, device, backend, rounded_to=None):
    leaves = {n: i.leaf(device, dtype, rounded_to) for n, i in case.inputs.items()}
    view = {n: case.inputs[n].build(t) for n, t in leaves.items()}
    with testing.seeded(case.seed, device):  # the backend and the references drop the same weights
        out, lse = functional.attention(view["q"], view["k"], view["v"], attn_mask=view.get("mask"),
                                        causal=case.causal, gate=view.get("gate"), scale=case.scale,
                                        return_lse=True, backend=backend, window_size=case.window,
                                        softcap=case.softcap,
                                        alibi_slopes=None if case.alibi is None else case.alibi.to(device),
                                        dropout_p=case.dropout)
    outputs, grads = [out], [view["dout"]]
    if case.lse_grad:
        outputs.append(lse)
        grads.append(view["dlse"].to(lse.dtype))
    return {"out": out.detach(), "lse": lse.detach()}, _backward(outputs, grads, case.inputs, leaves, view)


def _backward(outputs, grads, inputs, leaves, view):
    """Backpropagate; ({"d<name>": gradient of the leaf} of every input whose gradient is checked, zeros where
    none arrived, {"d<name>": gradient at the view the op saw, or None}: the per-position gradients the op
    returned, which torch's autograd summed into the leaf's)."""
    checked = [n for n, i in inputs.items() if i.grad]
    for n in checked:
        if view[n].requires_grad and not view[n].is_leaf:
            view[n].retain_grad()
    pairs = [(o, d) for o, d in zip(outputs, grads) if o.requires_grad]
    if pairs:
        torch.autograd.backward([o for o, _ in pairs], [d for _, d in pairs])
    leaf_grads = {"d" + n: leaves[n].grad if leaves[n].grad is not None else torch.zeros_like(leaves[n])
                  for n in checked}
    return leaf_grads, {"d" + n: view[n].grad for n in checked}


def _summed_size(inp, leaf_grad, g):
    """The largest sum of |g| (a gradient at the view) over the positions that see one element of the leaf:
    the size of the terms torch's autograd summed into that element (see ``testing.compare``)."""
    if g is None:
        return 0.0
    summed = _onto_leaf(inp, leaf_grad, torch.nan_to_num(g.detach(), nan=0.0, posinf=0.0, neginf=0.0).abs())
    return float(summed.max()) if summed.numel() else 0.0


def _onto_leaf(inp, leaf, g):
    """g, a gradient at the view ``inp`` builds, summed onto the leaf's elements in g's dtype (as the view's backward
    sums it)."""
    t = torch.zeros(leaf.shape, dtype=g.dtype, device=g.device, requires_grad=True)
    (summed,) = torch.autograd.grad(inp.build(t), t, g)
    return summed


def _check(run, case, backend, device, factor):
    """The backend, the reference in the case's dtype and in float64 (on the same inputs), by docs/CONTRACT.md §4."""
    got = _summed_exactly(case, run(case, case.dtype, device, backend))
    lowp = _summed_exactly(case, run(case, case.dtype, device, "reference"))
    truth_out, (truth_grads, view_grads) = run(case, torch.float64, device, "reference", rounded_to=case.dtype)
    truth = {**truth_out, **truth_grads}
    size = lambda n: _summed_size(case.inputs[n[1:]], truth_grads[n], view_grads[n]) if n in view_grads else 0.0
    return [testing.compare(n, got[n], lowp[n], truth[n], case.dtype, factor(n), size(n)) for n in truth]


def _summed_exactly(case, result):
    """The outputs, and each leaf's gradient as the float64 sum of the per-position gradients the op returned at its
    view. torch's autograd sums them in the input's dtype, one more rounding per term at the partial sum's size, which
    no kernel controls: through an overlapping bfloat16 view of 52 positions per element that sum added 0.09 to a
    per-position error of 0.013, past the rule where the reference's sum happened to round better."""
    outs, (grads, view_grads) = result
    summed = {n: grads[n] if g is None else _onto_leaf(case.inputs[n[1:]], grads[n], g.double())
              for n, g in view_grads.items()}
    return {**outs, **grads, **summed}


def check_attention(case: AttentionFuzz, backend, device="cpu"):
    return _check(_run_attention, case, backend, device, lambda n: 2 if n in ("out", "lse") else 3)


# ---------------------------------------------------------------------------------- softmax gates
@dataclasses.dataclass
class GateFuzz:
    seed: int
    dtype: torch.dtype
    desc: str
    op: str
    inputs: dict
    pool: bool
    scale: float
    weights_grad: bool

    @property
    def id(self):
        return f"{self.op}-seed{self.seed}-{testing.DTYPE_NAMES[self.dtype]}-{self.desc}"


def gate_case(seed, dtypes, max_len=130, max_dim=256) -> GateFuzz:
    """The softmax-gate case drawn from ``seed`` (op and dtype among ``dtypes`` drawn too)."""
    rng = random.Random(seed)
    dtype = rng.choice(dtypes)
    op = rng.choice(("softmax_gate", "score_softmax_gate"))
    B = 0 if rng.random() < 0.03 else rng.choice((1, 2, 3, 5))
    N = _sizes(rng, [x for x in LENGTHS if x <= max_len], True)
    H = rng.choice((1, 1, 2, 3, 4, 8))
    D = 0 if rng.random() < 0.03 else H * rng.choice([x for x in (1, 2, 3, 8, 16, 24) if H * x <= max_dim] or [1])
    views = {n: rng.choice(VIEW_KINDS) for n in ("x", "scores", "weight")}
    nan = rng.choice(("x", "scores" if op == "softmax_gate" else "weight")) if rng.random() < 0.15 else None
    return make_gate_case(seed, dtype, op=op, B=B, N=N, D=D, H=H, pool=rng.random() < 0.5,
                          scale=rng.choice((1.0, 1.0, 0.125, 10.0, 100.0)) if op == "score_softmax_gate" else 1.0,
                          mask=rng.choice(("none", "none", "random", "empty")), weights_grad=rng.random() < 0.3,
                          views=views, nan=nan)


def make_gate_case(seed, dtype, *, op="softmax_gate", B=3, N=17, D=16, H=2, pool=False, scale=1.0, mask="none",
                   weights_grad=False, views=None, nan=None) -> GateFuzz:
    """A softmax-gate case with the given parameters (as :func:`make_attention_case`)."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    views = views or {}
    desc = [f"B{B}-N{N}-D{D}-H{H}", "pool" if pool else "gated", f"mask-{mask}"]
    if scale != 1.0:
        desc.append(f"scale{scale}")

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    def tensor(name, shape, grad=True):
        kind = views.get(name, "contiguous")
        master_shape, build = view_of(shape, kind)
        if kind != "contiguous":
            desc.append(f"{name}:{kind}")
        return Input(randn(*master_shape), build, grad)

    inputs = {"x": tensor("x", (B, N, D))}
    if op == "softmax_gate":
        inputs["scores"] = tensor("scores", (B, N, H))
    else:
        inputs["weight"] = tensor("weight", (H, D))
        inputs["weight"].master /= max(1, D) ** 0.5
    if mask != "none":
        m = torch.rand(B, N, generator=g) < 0.7
        if mask == "empty" and B:
            m[rng.randrange(B)] = False
        inputs["mask"] = Input(m, lambda t: t, grad=False)
    inputs["dy"] = Input(randn(B, D) if pool else randn(B, N, D), lambda t: t, grad=False)
    if weights_grad:
        inputs["dalpha"] = Input(randn(B, N, H), lambda t: t, grad=False)
    if nan is not None:
        _place_nan(rng, inputs[nan].master)
        desc.append(f"nan-{nan}")
    return GateFuzz(seed, dtype, "-".join(desc), op, inputs, pool, scale, weights_grad)


def _run_gate(case: GateFuzz, dtype, device, backend, rounded_to=None):
    leaves = {n: i.leaf(device, dtype, rounded_to) for n, i in case.inputs.items()}
    view = {n: case.inputs[n].build(t) for n, t in leaves.items()}
    if case.op == "softmax_gate":
        y, alpha = functional.softmax_gate(view["scores"], view["x"], mask=view.get("mask"), pool=case.pool,
                                           return_weights=True, backend=backend)
    else:
        y, alpha = functional.score_softmax_gate(view["x"], view["weight"], mask=view.get("mask"), scale=case.scale,
                                                 pool=case.pool, return_weights=True, backend=backend)
    outputs, grads = [y], [view["dy"]]
    if case.weights_grad:
        outputs.append(alpha)
        grads.append(view["dalpha"].to(alpha.dtype))
    return {"y": y.detach(), "alpha": alpha.detach()}, _backward(outputs, grads, case.inputs, leaves, view)


def check_gate(case: GateFuzz, backend, device="cpu"):
    return _check(_run_gate, case, backend, device, lambda n: 2)


# ------------------------------------------------------------------------------------------- attention pooling
@dataclasses.dataclass
class PoolFuzz:
    seed: int
    dtype: torch.dtype
    desc: str
    inputs: dict            # name -> Input (x, V, w, U?, bV?, bU?, mask?, dy, dalpha?)
    offsets: list | None    # packed bags' offsets; None: x is a padded (B, N, D) batch
    weights_grad: bool

    @property
    def id(self):
        return f"attention_pool-seed{self.seed}-{testing.DTYPE_NAMES[self.dtype]}-{self.desc}"


def pool_case(seed, dtypes, max_len=130, max_dim=256) -> PoolFuzz:
    """The attention-pooling case drawn from ``seed``: bags of sizes among LENGTHS (empty ones too), packed or
    padded, gated or not, with or without biases, 1-5 branches, masks that leave rows or whole bags out, every view
    kind of x and the weights, NaN in x or a weight, small to saturating scores (``logits`` scales w)."""
    rng = random.Random(seed)
    dtype = rng.choice(dtypes)
    B = 0 if rng.random() < 0.03 else rng.choice((1, 1, 2, 3, 5))
    bags = [0 if rng.random() < 0.1 else rng.choice([n for n in LENGTHS if n <= max_len]) for _ in range(B)]
    D = 0 if rng.random() < 0.03 else rng.choice([d for d in HEAD_DIMS if d <= max_dim])
    Hd = 0 if rng.random() < 0.02 else rng.choice([d for d in (1, 2, 3, 8, 16, 31, 64, 128) if d <= max_dim])
    views = {n: rng.choice(VIEW_KINDS) for n in ("x", "V", "U", "w")}
    gated = rng.random() < 0.7
    nan = rng.choice(("x", "x", "x", "V", "w") + (("U",) if gated else ())) if rng.random() < 0.15 else None
    return make_pool_case(seed, dtype, bags=bags, D=D, Hd=Hd, K=rng.choice((1, 1, 2, 3, 5)), gated=gated,
                          bias=rng.random() < 0.7, padded=rng.random() < 0.3,
                          mask=rng.choice(("none", "none", "random", "bag")), weights_grad=rng.random() < 0.3,
                          logits=rng.choice((1.0, 1.0, 0.1, 8.0)), views=views, nan=nan)


def make_pool_case(seed, dtype, *, bags=(5, 0, 9), D=16, Hd=8, K=1, gated=True, bias=True, padded=False, mask="none",
                   weights_grad=False, logits=1.0, views=None, nan=None) -> PoolFuzz:
    """An attention-pooling case with the given parameters (as :func:`make_attention_case`); ``mask`` "bag" leaves
    one bag out entirely."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    views = views or {}
    B, N = len(bags), sum(bags)
    desc = [f"bags{'_'.join(map(str, bags))}-D{D}-Hd{Hd}-K{K}", "gated" if gated else "tanh", f"mask-{mask}"]
    desc += [flag for flag, on in (("nobias", not bias), ("padded", padded), (f"logits{logits}", logits != 1.0)) if on]

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    def tensor(name, shape, scale=1.0):
        kind = views.get(name, "contiguous")
        master_shape, build = view_of(shape, kind)
        if kind != "contiguous":
            desc.append(f"{name}:{kind}")
        return Input(randn(*master_shape) * scale, build)

    Nx = max(bags, default=0) if padded else N
    x_shape = (B, Nx, D) if padded else (N, D)
    inputs = {"x": tensor("x", x_shape), "V": tensor("V", (D, Hd), max(1, D) ** -0.5),
              "w": tensor("w", (Hd, K), logits)}
    if gated:
        inputs["U"] = tensor("U", (D, Hd), max(1, D) ** -0.5)
    if bias:
        inputs["bV"] = Input(randn(Hd), lambda t: t)
        if gated:
            inputs["bU"] = Input(randn(Hd), lambda t: t)
    keep = torch.ones(B, Nx, dtype=torch.bool) if padded else torch.ones(N, dtype=torch.bool)
    if padded:
        for b, n in enumerate(bags):
            keep[b, n:] = False
    if mask != "none":
        keep &= torch.rand(keep.shape, generator=g) < 0.7
        if mask == "bag" and B:
            b = rng.randrange(B)
            if padded:
                keep[b] = False
            else:
                keep[sum(bags[:b]):sum(bags[:b + 1])] = False
    if padded or mask != "none":
        inputs["mask"] = Input(keep, lambda t: t, grad=False)
    inputs["dy"] = Input(randn(B, K, D), lambda t: t, grad=False)
    if weights_grad:
        inputs["dalpha"] = Input(randn(*x_shape[:-1], K), lambda t: t, grad=False)
    if nan is not None:
        _place_nan(rng, inputs[nan].master)
        desc.append(f"nan-{nan}")
    offsets = None if padded else [0] + [sum(bags[:i + 1]) for i in range(B)]
    return PoolFuzz(seed, dtype, "-".join(desc), inputs, offsets, weights_grad)


def _run_pool(case: PoolFuzz, dtype, device, backend, rounded_to=None):
    leaves = {n: i.leaf(device, dtype, rounded_to) for n, i in case.inputs.items()}
    view = {n: case.inputs[n].build(t) for n, t in leaves.items()}
    offsets = None if case.offsets is None else torch.tensor(case.offsets, device=device)
    y, alpha = functional.attention_pool(view["x"], view["V"], view["w"], view.get("U"), bV=view.get("bV"),
                                         bU=view.get("bU"), offsets=offsets, mask=view.get("mask"),
                                         return_weights=True, backend=backend)
    outputs, grads = [y], [view["dy"]]
    if case.weights_grad:
        outputs.append(alpha)
        grads.append(view["dalpha"].to(alpha.dtype))
    return {"y": y.detach(), "alpha": alpha.detach()}, _backward(outputs, grads, case.inputs, leaves, view)


def check_pool(case: PoolFuzz, backend, device="cpu"):
    return _check(_run_pool, case, backend, device, lambda n: 2)


def limits(backend, device_type) -> dict:
    """What of the input space ``backend`` is fuzzed over on ``device_type`` (keywords of :func:`run`): the
    Triton interpreter on the CPU, ~1000x slower than a GPU, gets smaller problems; the cuda kernels cover
    attention at D == Dv in ``backends.CUDA_HEAD_DIMS`` alone (other head dims are refused by name,
    tests/test_cuda.py), so their attention cases draw only those. Attention's score modifiers and dropout: those
    the backend's kernels apply; ``saturated`` (:func:`_scale`): whether its backward takes saturated rows exactly."""
    from .backends import _BACKENDS, CUDA_HEAD_DIMS
    impl = _BACKENDS.get(backend)
    out = {"score_mods": frozenset(getattr(impl, "score_mods", contract.ScoreMods.NAMES)),
           "dropout": getattr(impl, "dropout", True), "saturated": getattr(impl, "saturated_rows", False)}
    if backend == "triton" and device_type == "cpu":
        out.update(max_len=64, max_dim=128)
    if backend == "cuda":
        out.update(head_dims=CUDA_HEAD_DIMS)
    return out


def forward_only(case):
    """``case`` as inference: no input requires a gradient, so no backward runs and the kernels may skip what
    only a backward needs (attention's out_acc and its precise P V); the outputs are checked alone."""
    inputs = {n: dataclasses.replace(i, grad=False) for n, i in case.inputs.items()}
    flags = {f: False for f in ("lse_grad", "weights_grad") if hasattr(case, f)}
    return dataclasses.replace(case, inputs=inputs, desc=case.desc + "-forward", **flags)


def run(op, seed, backend, dtypes, device="cpu", max_len=130, max_dim=256, head_dims=None, inference=False,
        score_mods=contract.ScoreMods.NAMES, dropout=True, saturated=False):
    """(case id, comparisons) of the fuzz case ``seed`` of ``op`` ("attention", "gates" or "pool"); the keywords
    bound the case drawn (:func:`limits`); ``inference``: its forward alone (:func:`forward_only`)."""
    only = forward_only if inference else (lambda c: c)
    if op == "attention":
        case = only(attention_case(seed, dtypes, max_len, max_dim, head_dims, score_mods, dropout, saturated))
        return case.id, check_attention(case, backend, device)
    if op == "pool":
        case = only(pool_case(seed, dtypes, max_len, max_dim))
        return case.id, check_pool(case, backend, device)
    case = only(gate_case(seed, dtypes, max_len, max_dim))
    return case.id, check_gate(case, backend, device)
