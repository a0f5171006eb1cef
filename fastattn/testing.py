"""The correctness rule of docs/CONTRACT.md §4 and the case sweeps, shared by tests/ and ``fastattn check``.

Rule, for each output and gradient: err(backend) <= factor · err(reference in the same dtype) + atol,
where err is the max absolute difference from the reference run in float64, factor = 2 for
outputs (3 for gradients of attention), and atol = ATOL_FLOOR[dtype] · max(1, max |truth|).
Inputs are drawn at random (never zeros) from a seed derived from the case's id, so a failure
reproduces; set FASTATTN_TEST_SEED to draw other values.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import weakref
import zlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from . import contract, functional, reference

ATOL_FLOOR = {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 2e-3, torch.float16: 5e-4}
DTYPE_NAMES = {torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
DTYPE_NAMES_INV = {v: k for k, v in DTYPE_NAMES.items()}


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float64, where equal infinities count as no difference and NaN as infinite
    (unless both are NaN at the same place: torch's NaN in -> NaN out). A missing tensor (a gradient
    that never arrived) differs infinitely from a present one."""
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    if a.shape != b.shape:
        return float("inf")
    a, b = a.detach().double(), b.detach().double()
    same_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    d = (a - b).abs().masked_fill(same_inf | (torch.isnan(a) & torch.isnan(b)), 0.0)
    if d.numel() == 0:
        return 0.0
    return float("inf") if torch.isnan(d).any() else float(d.max())


@dataclasses.dataclass
class Comparison:
    name: str        # "out", "lse", "dq", ...
    err: float       # backend vs float64 truth
    ref_err: float   # reference in the same dtype vs float64 truth
    allowed: float   # factor · ref_err + atol

    @property
    def ok(self) -> bool:
        return self.err <= self.allowed

    @property
    def ratio(self) -> float:
        """err / allowed: <= 1 passes."""
        return self.err / self.allowed if self.allowed > 0 else (0.0 if self.err == 0 else float("inf"))


def compare(name, got, ref_lowp, truth, dtype, factor, magnitude=0.0) -> Comparison:
    """docs/CONTRACT.md §4: err(got) <= factor * err(ref_lowp) + floor, errors against ``truth``; the
    floor is one rounding in ``dtype`` at the size of the values rounded: max |truth|, or ``magnitude``
    where that is larger. The gradient of a tensor seen through an expanding or overlapping view is a
    sum, taken by torch's autograd, of the op's per-position gradients, each rounded to ``dtype`` by the
    op: ``magnitude`` is then the largest sum of their sizes, |terms| that may cancel to a sum near 0
    while each carries its own rounding."""
    finite = truth.detach()[torch.isfinite(truth.detach())] if truth is not None else torch.zeros(0)
    scale = max(1.0, float(finite.abs().max()) if finite.numel() else 0.0, magnitude)
    ref_err = max_abs_diff(ref_lowp, truth)
    return Comparison(name, max_abs_diff(got, truth), ref_err, factor * ref_err + ATOL_FLOOR[dtype] * scale)


class TensorMemory(TorchDispatchMode):
    """What the tensors torch's ops make inside the context hold: ``peak``, the most bytes of storage they
    allocate alive at once (a storage counts while a tensor made inside refers to it; in-place results and
    views of earlier storages hold nothing new; kernels' scratch memory is not seen), and ``longest``, the
    longest dim 2 of the 4-D ones (a sequence dim in (B, H, L, D)). For device-independent memory checks and
    reports: on a GPU, torch.cuda.max_memory_allocated says it for the whole process."""

    def __init__(self):
        super().__init__()
        self.longest, self.live, self.peak, self.holders = 0, 0, 0, {}

    def _release(self, key):
        held = self.holders[key]
        held[1] -= 1
        if held[1] == 0:
            self.live -= held[0]
            del self.holders[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if not isinstance(t, torch.Tensor) or not t.untyped_storage().nbytes():
                continue
            if t.dim() == 4:
                self.longest = max(self.longest, t.shape[2])
            key = t.untyped_storage().data_ptr()
            if key in self.holders:
                self.holders[key][1] += 1
            elif key in inputs:
                continue
            else:
                self.holders[key] = [t.untyped_storage().nbytes(), 1]
                self.live += self.holders[key][0]
                self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._release, key)
        return out


def _generator(case_id: str) -> torch.Generator:
    seed = zlib.crc32(case_id.encode()) ^ int(os.environ.get("FASTATTN_TEST_SEED", "0"))
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------- attention
@dataclasses.dataclass(frozen=True)
class AttentionCase:
    B: int = 2
    Hq: int = 2
    Hkv: int = 2
    Lq: int = 17
    Lk: int = 17
    D: int = 64
    Dv: int | None = None
    causal: object = False               # False, True, "bottom_right"
    mask: str = "none"                   # none, bool, float, float_grad, bool_bcast, float_bcast
    gate: str = "none"                   # none, elementwise, headwise
    masked_rows: bool = False            # make some rows attend to nothing
    layout: str = "bhld"                 # bhld, or blhd: (B, L, H, D) tensors passed as .transpose(1, 2)
    lse_grad: bool = False               # return lse and backpropagate through it too
    scale: float | None = None
    window: tuple = (-1, -1)             # score modifiers (fastattn.attention): window_size,
    softcap: float = 0.0                 # softcap,
    alibi: str = "none"                  # and alibi_slopes: none, heads (Hq,), batch (B, Hq)
    dropout: float = 0.0                 # dropout_p, the seed drawn after torch.manual_seed(DROPOUT_SEED)

    @property
    def score_mods(self) -> frozenset:
        return contract.ScoreMods(*self.window, self.softcap).names() | ({"alibi"} if self.alibi != "none" else set())

    @property
    def id(self) -> str:
        Dv = self.Dv or self.D
        parts = [f"B{self.B}", f"H{self.Hq}" + (f"-{self.Hkv}" if self.Hkv != self.Hq else ""),
                 f"L{self.Lq}" + (f"-{self.Lk}" if self.Lk != self.Lq else ""),
                 f"D{self.D}" + (f"-{Dv}" if Dv != self.D else "")]
        if self.causal:
            parts.append("causal" if self.causal is True else "causalBR")
        for flag, name in ((self.mask != "none", self.mask), (self.gate != "none", "gate-" + self.gate),
                           (self.masked_rows, "emptyrows"), (self.layout != "bhld", self.layout),
                           (self.lse_grad, "dlse"), (self.scale is not None, f"scale{self.scale}"),
                           (self.window != (-1, -1), "window{}_{}".format(*self.window)),
                           (self.softcap != 0, f"softcap{self.softcap}"), (self.alibi != "none", "alibi-" + self.alibi),
                           (self.dropout != 0, f"dropout{self.dropout}")):
            if flag:
                parts.append(name)
        return "-".join(parts)

    def inputs(self, dtype, device="cpu"):
        """Float64 master tensors (then cast by :func:`check_attention`), drawn for this case."""
        g = _generator(self.id)
        Dv = self.Dv or self.D
        B, Hq, Hkv, Lq, Lk = self.B, self.Hq, self.Hkv, self.Lq, self.Lk
        randn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
        t = {"q": randn(B, Hq, Lq, self.D), "k": randn(B, Hkv, Lk, self.D), "v": randn(B, Hkv, Lk, Dv),
             "dout": randn(B, Hq, Lq, Dv)}
        if self.lse_grad:
            t["dlse"] = randn(B, Hq, Lq)
        empty_rows = [0, Lq // 2] if self.masked_rows else []
        if self.mask.startswith("bool"):
            shape = (B, 1, 1, Lk) if self.mask == "bool_bcast" else (B, Hq, Lq, Lk)
            m = torch.rand(*shape, generator=g) < 0.7
            if self.mask != "bool_bcast":
                m[..., 0, :] |= True
                for r in empty_rows:
                    m[..., r, :] = False
            t["mask"] = m
        elif self.mask.startswith("float"):
            shape = (Lq, Lk) if self.mask == "float_bcast" else (B, Hq, Lq, Lk)
            m = randn(*shape)
            m = m.masked_fill(torch.rand(*shape, generator=g) < 0.1, float("-inf"))
            for r in empty_rows:
                m[..., r, :] = float("-inf")
            t["mask"] = m
        elif empty_rows:  # no mask asked for: empty rows come from a bool mask
            m = torch.ones(B, Hq, Lq, Lk, dtype=torch.bool)
            for r in empty_rows:
                m[..., r, :] = False
            t["mask"] = m
        if self.gate == "elementwise":
            t["gate"] = randn(B, Hq, Lq, Dv)
        elif self.gate == "headwise":
            t["gate"] = randn(B, Hq, Lq, 1)
        if self.alibi == "heads":  # ALiBi's own slopes, 2^(-8 h / Hq)
            t["alibi"] = torch.exp2(-8.0 * torch.arange(1, Hq + 1, dtype=torch.float64) / Hq)
        elif self.alibi == "batch":  # values a float32 holds exactly: every run sees the same slopes
            t["alibi"] = torch.rand(B, Hq, generator=g, dtype=torch.float64).to(torch.float32).double()
        return t


def fresh(t, device, dtype=None):
    """A new leaf copy of ``t``: ``.to()`` returns ``t`` itself when nothing changes (a float64 master
    in a float64 run), and a shared leaf would make every run accumulate into one ``.grad``."""
    return t.detach().to(device=device, dtype=dtype or t.dtype, copy=True)


def _as_layout(x, layout):
    if layout == "blhd":  # memory (B, L, H, D), seen as (B, H, L, D): strides but no copy
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    return x.contiguous()


DROPOUT_SEED = 20240917  # torch.manual_seed of every attention run: dropout's Philox seed follows from it


@contextlib.contextmanager
def seeded(seed, device):
    """torch.manual_seed(seed) inside the block, the generators of the CPU and ``device`` restored after it: every
    run of a case (backend, references) draws the same dropout seed."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _run_attention(case, t, dtype, device, backend):
    """Runs forward and backward in ``dtype``; returns {name: tensor} of outputs and gradients."""
    leaf = {}
    for n in ("q", "k", "v"):
        leaf[n] = _as_layout(fresh(t[n], device, dtype), case.layout).requires_grad_()
    mask = t.get("mask")
    if mask is not None:
        mask = fresh(mask, device)
        if mask.is_floating_point():
            mask = fresh(mask, device, dtype).requires_grad_(case.mask in ("float_grad", "float_bcast"))
            if mask.requires_grad:
                leaf["mask"] = mask
    gate = t.get("gate")
    if gate is not None:
        gate = leaf["gate"] = fresh(gate, device, dtype).requires_grad_()
    alibi = t.get("alibi")
    with seeded(DROPOUT_SEED, device):
        out, lse = functional.attention(leaf["q"], leaf["k"], leaf["v"], attn_mask=mask, causal=case.causal,
                                        gate=gate, scale=case.scale, return_lse=True, backend=backend,
                                        window_size=case.window, softcap=case.softcap,
                                        alibi_slopes=None if alibi is None else alibi.to(device),
                                        dropout_p=case.dropout)
    outputs = [out]
    grads = [t["dout"].to(device, dtype)]
    if case.lse_grad:
        outputs.append(lse)
        grads.append(t["dlse"].to(device, lse.dtype))
    torch.autograd.backward(outputs, grads)
    res = {"out": out.detach(), "lse": lse.detach()}
    for n, x in leaf.items():
        res["d" + n] = x.grad
    return res


def check_attention(case: AttentionCase, dtype, backend, device="cpu") -> list[Comparison]:
    """Runs ``backend`` in ``dtype``, the reference in ``dtype`` and in float64; compares (docs/CONTRACT.md §4)."""
    t = case.inputs(dtype)
    got = _run_attention(case, t, dtype, device, backend)
    lowp = _run_attention(case, t, dtype, device, "reference")
    truth = _run_attention(case, t, torch.float64, device, "reference")
    return [compare(n, got[n], lowp[n], truth[n], dtype, 2 if n in ("out", "lse") else 3) for n in truth]


# The score modifiers, alone and together, with causal modes, masks, gates and GQA: full sweep, quick sweep.
_SCORE_MOD_CASES = [
    AttentionCase(Lq=131, Lk=131, D=59, causal=True, window=(17, -1)),                 # causal + left (Mistral)
    AttentionCase(Lq=97, Lk=131, D=40, causal="bottom_right", window=(50, -1), lse_grad=True),
    AttentionCase(Lq=300, Lk=300, D=64, window=(20, 20), mask="float_grad", gate="elementwise"),  # skipped tiles
    AttentionCase(B=1, Lq=300, Lk=300, D=32, causal=True, window=(1, -1)),  # one key links tiles 128 rows apart
    AttentionCase(Lq=203, Lk=113, D=32, causal="bottom_right", window=(4, 0), masked_rows=True),
    AttentionCase(Lq=29, Lk=45, D=48, softcap=2.0, mask="float_grad", lse_grad=True, scale=3.0),
    AttentionCase(Hq=4, Hkv=2, Lq=33, Lk=47, D=64, causal=True, alibi="heads"),
    AttentionCase(Lq=41, Lk=41, D=64, causal=True, window=(8, -1), softcap=5.0, alibi="batch", gate="headwise",
                  mask="bool"),                                                       # all three (Gemma 2 + ALiBi)
]
_SCORE_MOD_CASES_QUICK = [
    AttentionCase(Lq=37, Lk=53, D=32, causal="bottom_right", window=(17, -1)),  # lo_off -1: one key links tiles
    AttentionCase(Lq=61, Lk=47, D=48, window=(5, 11), mask="float_grad", gate="elementwise"),
    AttentionCase(Lq=29, Lk=45, D=48, softcap=2.0, mask="float_grad", lse_grad=True, scale=3.0),
    AttentionCase(Hq=4, Hkv=2, Lq=33, Lk=47, D=64, causal="bottom_right", window=(6, 0), softcap=5.0, alibi="batch",
                  gate="headwise", mask="bool"),
]
# Dropout: with masks, gates, GQA, lse's gradient, empty rows, several tiles, the score modifiers; p = 1 drops all
_DROPOUT_CASES = [
    AttentionCase(Lq=97, Lk=131, D=59, causal="bottom_right", mask="float_grad", gate="elementwise", dropout=0.3),
    AttentionCase(B=1, Hq=4, Hkv=2, Lq=260, Lk=260, D=32, causal=True, lse_grad=True, dropout=0.1),  # tiles
    AttentionCase(Lq=37, Lk=37, D=40, mask="bool", masked_rows=True, gate="headwise", dropout=0.5),
    AttentionCase(Lq=29, Lk=45, D=48, mask="float_bcast", window=(9, 3), softcap=2.0, alibi="heads", dropout=0.2),
    AttentionCase(Lq=19, Lk=23, D=16, dropout=1.0),
]
_DROPOUT_CASES_QUICK = [
    AttentionCase(Lq=29, Lk=45, D=48, causal="bottom_right", mask="float_grad", gate="elementwise", lse_grad=True,
                  dropout=0.3),
    AttentionCase(Hq=4, Hkv=2, Lq=33, Lk=47, D=64, mask="float_bcast", window=(6, 0), dropout=0.5),
    AttentionCase(Lq=19, Lk=23, D=16, dropout=1.0),
]


def attention_cases(quick=False, score_mods=contract.ScoreMods.NAMES, dropout=True):
    """The attention sweep of docs/CONTRACT.md §4: odd sizes x causal modes x masks x gates x GQA x layouts x score
    modifiers x dropout; only the cases whose modifiers are among ``score_mods`` and, unless ``dropout``, without
    dropout (what a backend has)."""
    shapes = [(1, 1, 64), (17, 17, 40), (97, 97, 59), (113, 203, 64), (203, 113, 128)]
    if quick:
        shapes = [(1, 1, 64), (17, 17, 40), (113, 203, 64)]
    cases = []
    for (Lq, Lk, D), causal in itertools.product(shapes, (False, True, "bottom_right")):
        cases.append(AttentionCase(Lq=Lq, Lk=Lk, D=D, causal=causal))
    big = (113, 203, 64) if quick else (97, 131, 59)
    for mask, gate in itertools.product(("none", "bool", "float_grad", "float_bcast"), ("none", "elementwise", "headwise")):
        cases.append(AttentionCase(Lq=big[0], Lk=big[1], D=big[2], mask=mask, gate=gate, causal="bottom_right"))
    cases += [
        AttentionCase(Hq=4, Hkv=2, Lq=33, Lk=47, D=64, causal=True),                     # GQA
        AttentionCase(Hq=4, Hkv=1, Lq=33, Lk=47, D=40, Dv=24, gate="headwise"),          # MQA, Dv != D
        AttentionCase(Lq=37, Lk=37, D=64, mask="bool", masked_rows=True, gate="elementwise"),
        AttentionCase(Lq=37, Lk=37, D=64, mask="float_grad", masked_rows=True),
        AttentionCase(Lq=37, Lk=21, D=32, causal="bottom_right"),                       # Lq > Lk: empty rows
        AttentionCase(Lq=29, Lk=29, D=64, layout="blhd", mask="bool_bcast", causal=True),
        AttentionCase(Lq=29, Lk=45, D=48, lse_grad=True, mask="float_grad", masked_rows=True),
        AttentionCase(Lq=19, Lk=23, D=16, scale=0.7, gate="elementwise"),
    ]
    if quick:  # every feature once, at small sizes: what the Triton interpreter and `check --quick` run
        cases = [
            AttentionCase(Lq=1, Lk=1, D=64),
            AttentionCase(Lq=17, Lk=17, D=40, causal=True),
            AttentionCase(Lq=37, Lk=21, D=32, causal="bottom_right"),                   # Lq > Lk: empty rows
            AttentionCase(Lq=23, Lk=41, D=59, causal="bottom_right", mask="bool", gate="headwise"),
            AttentionCase(Lq=29, Lk=45, D=48, mask="float_grad", gate="elementwise", masked_rows=True),
            AttentionCase(Lq=19, Lk=33, D=64, causal="bottom_right", mask="float_bcast", gate="elementwise"),
            AttentionCase(Hq=4, Hkv=2, Lq=33, Lk=47, D=64, causal=True, mask="bool", masked_rows=True),  # GQA
            AttentionCase(Hq=4, Hkv=1, Lq=33, Lk=47, D=40, Dv=24, gate="headwise"),       # MQA, Dv != D
            AttentionCase(Lq=29, Lk=29, D=64, layout="blhd", mask="bool_bcast", causal=True),
            AttentionCase(Lq=29, Lk=45, D=48, lse_grad=True, mask="float_grad", masked_rows=True),
            AttentionCase(Lq=19, Lk=23, D=16, scale=0.7, gate="elementwise"),
            AttentionCase(Lq=113, Lk=203, D=128, causal="bottom_right"),               # several tiles
        ]
    cases += _SCORE_MOD_CASES_QUICK if quick else _SCORE_MOD_CASES
    cases += _DROPOUT_CASES_QUICK if quick else _DROPOUT_CASES
    return [c for c in cases if c.score_mods <= frozenset(score_mods) and (dropout or not c.dropout)]


HEAD_DIMS = (16, 32, 64, 128, 256)


def cases_covered(cases, refuses):
    """``cases`` moved onto what a backend covers: a case whose head dims ``refuses(D, Dv)`` (a reason, or
    None) is run at the smallest head dim D == Dv that is accepted and holds both, else the largest
    accepted (the cuda kernels' 64 / 128); ids repeated by the move are kept once."""
    ok = [d for d in HEAD_DIMS if refuses(d, d) is None]
    out, seen = [], set()
    for c in cases:
        if refuses(c.D, c.Dv or c.D) is not None:
            if not ok:
                continue
            c = dataclasses.replace(c, D=next((d for d in ok if d >= max(c.D, c.Dv or c.D)), ok[-1]), Dv=None)
        if c.id not in seen:
            seen.add(c.id)
            out.append(c)
    return out


# ------------------------------------------------------------------------------- varlen attention
@dataclasses.dataclass(frozen=True)
class VarlenCase:
    lens_q: tuple = (5, 0, 17, 1)         # query lengths of the packed sequences (0 allowed)
    lens_k: tuple | None = None           # key lengths (None: lens_q)
    Hq: int = 2
    Hkv: int = 2
    D: int = 64
    Dv: int | None = None
    causal: object = False                # False, True, "bottom_right"
    gate: str = "none"                    # none, elementwise, headwise
    lse_grad: bool = False
    layout: str = "packed"                # or "strided": each tensor a view of a wider (total, H, 2D) buffer
    scale: float | None = None

    @property
    def id(self) -> str:
        lk = self.lens_k or self.lens_q
        parts = ["varlen", "q" + "_".join(map(str, self.lens_q))]
        if lk != self.lens_q:
            parts.append("k" + "_".join(map(str, lk)))
        parts += [f"H{self.Hq}" + (f"-{self.Hkv}" if self.Hkv != self.Hq else ""),
                  f"D{self.D}" + (f"-{self.Dv}" if self.Dv and self.Dv != self.D else "")]
        for flag, name in ((self.causal, "causal" if self.causal is True else "causalBR"),
                           (self.gate != "none", "gate-" + self.gate), (self.lse_grad, "dlse"),
                           (self.layout != "packed", self.layout), (self.scale is not None, f"scale{self.scale}")):
            if flag:
                parts.append(name)
        return "-".join(parts)

    def inputs(self):
        g = _generator(self.id)
        Dv = self.Dv or self.D
        lk = self.lens_k or self.lens_q
        tq, tk = sum(self.lens_q), sum(lk)
        randn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
        cu = lambda lens: torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)
        t = {"q": randn(tq, self.Hq, self.D), "k": randn(tk, self.Hkv, self.D), "v": randn(tk, self.Hkv, Dv),
             "dout": randn(tq, self.Hq, Dv), "dlse": randn(self.Hq, tq),
             "cu_seqlens_q": cu(self.lens_q), "cu_seqlens_k": cu(lk)}
        if self.gate != "none":
            t["gate"] = randn(tq, self.Hq, Dv if self.gate == "elementwise" else 1)
        return t


def _strided(x, layout):
    if layout == "strided":  # rows twice as far apart as they need to be, heads too: a view, no copy
        wide = x.new_zeros(x.shape[0], x.shape[1], 2 * x.shape[2])
        wide[..., : x.shape[2]] = x
        return wide[..., : x.shape[2]]
    return x


def _run_varlen(case, t, dtype, device, backend, backward=True):
    leaf = {n: _strided(fresh(t[n], device, dtype), case.layout).requires_grad_(backward) for n in ("q", "k", "v")}
    if "gate" in t:
        leaf["gate"] = fresh(t["gate"], device, dtype).requires_grad_(backward)
    lk = case.lens_k or case.lens_q
    out, lse = functional.varlen_attention(
        leaf["q"], leaf["k"], leaf["v"], t["cu_seqlens_q"].to(device), t["cu_seqlens_k"].to(device),
        max(case.lens_q, default=0), max(lk, default=0), causal=case.causal, scale=case.scale, gate=leaf.get("gate"),
        return_lse=True, backend=backend)
    res = {"out": out.detach(), "lse": lse.detach()}
    if not backward:
        return res
    outputs, grads = [out], [t["dout"].to(device, dtype)]
    if case.lse_grad:
        outputs.append(lse)
        grads.append(t["dlse"].to(device, lse.dtype))
    torch.autograd.backward(outputs, grads)
    for n, x in leaf.items():
        res["d" + n] = x.grad
    return res


def check_varlen(case: VarlenCase, dtype, backend, device="cpu", backward=True) -> list[Comparison]:
    """As :func:`check_attention`, for ``fastattn.varlen_attention``; ``backward=False``: the forward alone, with
    no input requiring a gradient."""
    t = case.inputs()
    got = _run_varlen(case, t, dtype, device, backend, backward)
    lowp = _run_varlen(case, t, dtype, device, "reference", backward)
    truth = _run_varlen(case, t, torch.float64, device, "reference", backward)
    return [compare(n, got[n], lowp[n], truth[n], dtype, 2 if n in ("out", "lse") else 3) for n in truth]


def varlen_cases(quick=False):
    """Ragged batches: empty and single-row sequences, Lq != Lk per sequence, both causal modes, GQA, gates, strides,
    sequences longer than one tile of every backend."""
    cases = [
        VarlenCase(),
        VarlenCase(lens_q=(5, 0, 17, 1), causal=True, gate="elementwise"),
        VarlenCase(lens_q=(7, 19, 1, 3), lens_k=(11, 4, 0, 30), causal="bottom_right", Hq=4, Hkv=2, lse_grad=True),
        VarlenCase(lens_q=(33, 9), lens_k=(20, 41), causal=True, Hq=4, Hkv=1, D=40, Dv=24, gate="headwise"),
        VarlenCase(lens_q=(130, 3, 77), causal="bottom_right", layout="strided", D=128),
        VarlenCase(lens_q=(1,), lens_k=(300,), D=32, scale=0.3),
    ]
    if not quick:
        cases += [
            VarlenCase(lens_q=(200, 1, 67), lens_k=(259, 64, 1), causal="bottom_right", gate="elementwise", Hq=4,
                       Hkv=2, lse_grad=True),
            VarlenCase(lens_q=tuple(range(1, 14)), causal=True, D=16),
            VarlenCase(lens_q=(0, 0), lens_k=(3, 0)),
        ]
    return cases


# ------------------------------------------------------------------------------------------ kv cache
@dataclasses.dataclass(frozen=True)
class KvcacheCase:
    cache_seqlens: tuple = (0, 37, 130)   # keys held before the new ones, per sequence
    Lq: int = 1
    Lnew: int = 1                         # keys appended (0: none; the queries' own keys are then in the cache)
    Hq: int = 4
    Hkv: int = 2
    D: int = 64
    Dv: int | None = None
    capacity: int = 160                   # contiguous cache length, or pages x page_size
    page_size: int = 0                    # 0: contiguous cache (B, Hkv, capacity, D); else paged
    causal: bool = True
    gate: str = "none"
    scale: float | None = None

    @property
    def id(self) -> str:
        parts = ["kvcache", "n" + "_".join(map(str, self.cache_seqlens)), f"Lq{self.Lq}", f"new{self.Lnew}",
                 f"H{self.Hq}" + (f"-{self.Hkv}" if self.Hkv != self.Hq else ""),
                 f"D{self.D}" + (f"-{self.Dv}" if self.Dv and self.Dv != self.D else ""), f"cap{self.capacity}"]
        for flag, name in ((self.page_size, f"page{self.page_size}"), (self.causal, "causal"),
                           (self.gate != "none", "gate-" + self.gate), (self.scale is not None, f"scale{self.scale}")):
            if flag:
                parts.append(name)
        return "-".join(parts)

    def inputs(self):
        g = _generator(self.id)
        B, Dv = len(self.cache_seqlens), self.Dv or self.D
        randn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
        t = {"q": randn(B, self.Hq, self.Lq, self.D), "cache_seqlens": torch.tensor(self.cache_seqlens, dtype=torch.int32)}
        if self.page_size:
            per_seq = self.capacity // self.page_size
            n_pages = B * per_seq + 3  # spare pages, never read
            t["page_table"] = torch.randperm(n_pages, generator=g)[: B * per_seq].view(B, per_seq).to(torch.int32)
            rows, length = n_pages, self.page_size
        else:
            rows, length = B, self.capacity
        # filled everywhere, also past each sequence's length: a kernel reading beyond it is caught
        t["k_cache"], t["v_cache"] = randn(rows, self.Hkv, length, self.D), randn(rows, self.Hkv, length, Dv)
        if self.Lnew:
            t["k"], t["v"] = randn(B, self.Hkv, self.Lnew, self.D), randn(B, self.Hkv, self.Lnew, Dv)
        if self.gate != "none":
            t["gate"] = randn(B, self.Hq, self.Lq, Dv if self.gate == "elementwise" else 1)
        return t


def _run_kvcache(case, t, dtype, device, backend):
    cast = lambda n: fresh(t[n], device, dtype) if n in t else None
    k_cache, v_cache = cast("k_cache"), cast("v_cache")
    page_table = t["page_table"].to(device) if "page_table" in t else None
    with torch.no_grad():
        out, lse = functional.attention_with_kvcache(
            cast("q"), k_cache, v_cache, k=cast("k"), v=cast("v"), cache_seqlens=t["cache_seqlens"].to(device),
            page_table=page_table, causal=case.causal, scale=case.scale, gate=cast("gate"), return_lse=True,
            backend=backend)
    return {"out": out, "lse": lse, "k_cache": k_cache, "v_cache": v_cache}


def check_kvcache(case: KvcacheCase, dtype, backend, device="cpu") -> list[Comparison]:
    """As :func:`check_attention`, forward only, for ``fastattn.attention_with_kvcache``; the caches after the
    append must equal the reference's exactly."""
    t = case.inputs()
    got = _run_kvcache(case, t, dtype, device, backend)
    lowp = _run_kvcache(case, t, dtype, device, "reference")
    truth = _run_kvcache(case, t, torch.float64, device, "reference")
    comps = [compare(n, got[n], lowp[n], truth[n], dtype, 2) for n in ("out", "lse")]
    for n in ("k_cache", "v_cache"):
        comps.append(Comparison(n, max_abs_diff(got[n], lowp[n]), 0.0, 0.0))
    return comps


def kvcache_cases(quick=False):
    """Decoding (Lq = 1), speculative decoding (Lq > 1), caches with and without pages, GQA / MQA, gates, empty
    sequences, keys split across many tiles."""
    cases = [
        KvcacheCase(),
        KvcacheCase(page_size=16, gate="headwise"),
        KvcacheCase(cache_seqlens=(3, 60), Lq=4, Lnew=4, Hq=8, Hkv=1, page_size=8, capacity=64, gate="elementwise"),
        KvcacheCase(cache_seqlens=(10, 0, 1), Lq=5, Lnew=2, causal=True, D=40, Dv=24),  # rows with no key
        KvcacheCase(cache_seqlens=(31, 7), Lq=3, Lnew=0, causal=False, scale=0.5, D=128),
        KvcacheCase(cache_seqlens=(1000, 517), Lq=1, Lnew=1, Hq=8, Hkv=2, capacity=1024, page_size=64),
    ]
    if not quick:
        cases += [
            KvcacheCase(cache_seqlens=(2047, 1500, 64, 0), Lq=2, Lnew=1, Hq=4, Hkv=4, capacity=2048, causal=True),
            KvcacheCase(cache_seqlens=(250,), Lq=6, Lnew=6, Hq=6, Hkv=3, page_size=32, capacity=256, D=32),
        ]
    return cases


# ---------------------------------------------------------------------------------- softmax gates
@dataclasses.dataclass(frozen=True)
class GateCase:
    op: str = "softmax_gate"   # or "score_softmax_gate"
    B: int = 3
    N: int = 17
    D: int = 64
    H: int = 4
    pool: bool = False
    mask: str = "none"          # none, random, empty (one batch item entirely masked)
    weights_grad: bool = False  # return α and backpropagate through it too
    layout: str = "contiguous"  # or "strided": x is a (N, B, D) tensor seen as (B, N, D)
    scale: float = 1.0

    @property
    def id(self) -> str:
        parts = [self.op, f"B{self.B}", f"N{self.N}", f"D{self.D}", f"H{self.H}"]
        for flag, name in ((self.pool, "pool"), (self.mask != "none", "mask-" + self.mask),
                           (self.weights_grad, "dalpha"), (self.layout != "contiguous", self.layout),
                           (self.scale != 1.0, f"scale{self.scale}")):
            if flag:
                parts.append(name)
        return "-".join(parts)

    def inputs(self):
        g = _generator(self.id)
        B, N, D, H = self.B, self.N, self.D, self.H
        randn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
        t = {"x": randn(B, N, D), "scores": randn(B, N, H), "weight": randn(H, D) / D ** 0.5,
             "dy": randn(B, D) if self.pool else randn(B, N, D), "dalpha": randn(B, N, H)}
        if self.mask != "none":
            m = torch.rand(B, N, generator=g) < 0.7
            m[:, 0] = True
            if self.mask == "empty":
                m[B // 2] = False
            t["mask"] = m
        return t


def _run_gate(case, t, dtype, device, backend):
    x = fresh(t["x"], device, dtype)
    if case.layout == "strided":
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    x.requires_grad_()
    mask = t["mask"].to(device) if "mask" in t else None
    if case.op == "softmax_gate":
        other = fresh(t["scores"], device, dtype).requires_grad_()
        y, alpha = functional.softmax_gate(other, x, mask=mask, pool=case.pool, return_weights=True,
                                           backend=backend)
    else:
        other = fresh(t["weight"], device, dtype).requires_grad_()
        y, alpha = functional.score_softmax_gate(x, other, mask=mask, scale=case.scale, pool=case.pool,
                                                 return_weights=True, backend=backend)
    outputs, grads = [y], [t["dy"].to(device, dtype)]
    if case.weights_grad:
        outputs.append(alpha)
        grads.append(t["dalpha"].to(device, alpha.dtype))
    torch.autograd.backward(outputs, grads)
    other_name = "dscores" if case.op == "softmax_gate" else "dweight"
    return {"y": y.detach(), "alpha": alpha.detach(), "dx": x.grad, other_name: other.grad}


def check_gate(case: GateCase, dtype, backend, device="cpu") -> list[Comparison]:
    t = case.inputs()
    got = _run_gate(case, t, dtype, device, backend)
    lowp = _run_gate(case, t, dtype, device, "reference")
    truth = _run_gate(case, t, torch.float64, device, "reference")
    return [compare(n, got[n], lowp[n], truth[n], dtype, 2) for n in truth]


def gate_cases(quick=False):
    cases = []
    for op, pool, (N, D, H) in itertools.product(
            ("softmax_gate", "score_softmax_gate"), (False, True),
            [(1, 64, 1), (17, 40, 4), (97, 59, 1), (113, 64, 8)]):
        cases.append(GateCase(op=op, N=N, D=D, H=H, pool=pool))
    for op, pool in itertools.product(("softmax_gate", "score_softmax_gate"), (False, True)):
        cases += [GateCase(op=op, pool=pool, N=37, D=48, H=4, mask="empty", weights_grad=True),
                  GateCase(op=op, pool=pool, N=29, D=32, H=2, mask="random", layout="strided")]
    cases.append(GateCase(op="score_softmax_gate", N=41, D=96, H=3, scale=0.125, weights_grad=True))
    # more heads than a kernel scores at once (the cuda scores kernel takes them 8 at a time)
    cases.append(GateCase(op="score_softmax_gate", N=23, D=160, H=10, weights_grad=True))
    if quick:
        cases = cases[::3]
    return cases


# ---------------------------------------------------------------------------------------- attention pooling
@dataclasses.dataclass(frozen=True)
class PoolCase:
    bags: tuple = (5, 0, 23, 9)  # instances per bag (0: an empty bag)
    D: int = 24
    Hd: int = 16
    K: int = 1                   # branches
    gated: bool = True
    bias: bool = True
    mask: str = "none"           # none, random, bag (one bag entirely left out)
    layout: str = "packed"       # packed (N, D) with offsets; padded: (B, N, D) with a mask; strided: packed rows
                                 # 2 D apart; expand: the first row seen by every row (stride 0);
                                 # overlap: rows D // 3 apart (unfold)
    weights_grad: bool = False   # return α and backpropagate through it too
    logits: float = 1.0          # multiplies w: large values saturate the softmax

    @property
    def id(self) -> str:
        parts = ["pool", "bags" + "_".join(map(str, self.bags)), f"D{self.D}", f"Hd{self.Hd}", f"K{self.K}"]
        for flag, name in ((not self.gated, "ungated"), (not self.bias, "nobias"), (self.mask != "none", "mask-" + self.mask),
                           (self.layout != "packed", self.layout), (self.weights_grad, "dalpha"),
                           (self.logits != 1.0, f"logits{self.logits}")):
            if flag:
                parts.append(name)
        return "-".join(parts)

    def inputs(self):
        g = _generator(self.id)
        N, D, Hd, K = sum(self.bags), self.D, self.Hd, self.K
        randn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
        t = {"x": randn(N, D), "V": randn(D, Hd) / D ** 0.5, "w": randn(Hd, K) * self.logits,
             "dy": randn(len(self.bags), K, D), "dalpha": randn(N, K)}
        if self.gated:
            t["U"] = randn(D, Hd) / D ** 0.5
        if self.bias:
            t["bV"] = randn(Hd)
            if self.gated:
                t["bU"] = randn(Hd)
        if self.mask != "none":
            m = torch.rand(N, generator=g) < 0.7
            if self.mask == "bag":
                lo = max(range(len(self.bags)), key=lambda b: self.bags[b])  # the largest bag
                start = sum(self.bags[:lo])
                m[start:start + self.bags[lo]] = False
            t["mask"] = m
        return t


POOL_PARAMS = ("V", "U", "w", "bV", "bU")


def _run_pool(case, t, dtype, device, backend):
    bags = case.bags
    x = fresh(t["x"], device, dtype)
    if case.layout == "strided":  # every other row of a taller tensor: row stride 2 D
        x = torch.stack([x, torch.zeros_like(x)], 1).reshape(-1, x.shape[1])[::2]
    elif case.layout == "overlap":  # rows D // 3 apart, each sharing most of its channels with the next (unfold)
        x = x.reshape(-1)[:x.shape[0] * (x.shape[1] // 3) + x.shape[1]].unfold(0, x.shape[1], x.shape[1] // 3)
        x = x[:sum(bags)].detach()
    x.requires_grad_()
    params = {n: fresh(t[n], device, dtype).requires_grad_() for n in POOL_PARAMS if n in t}
    mask = t["mask"].to(device) if "mask" in t else None
    offsets = torch.tensor([0] + list(itertools.accumulate(bags)), device=device)
    rows = x
    if case.layout == "expand":  # the first row seen by every row, through stride 0
        rows = x[:1].expand(x.shape[0], -1)
    kw = dict(bV=params.get("bV"), bU=params.get("bU"), return_weights=True, backend=backend)
    if case.layout == "padded":
        B, Nmax = len(bags), max(bags)
        xp = rows.new_zeros(B, Nmax, rows.shape[1]) + float("nan")  # padding is never read
        pmask = torch.zeros(B, Nmax, dtype=torch.bool, device=device)
        idx = [(b, i) for b, n in enumerate(bags) for i in range(n)]
        bi, ni = (torch.tensor([p[j] for p in idx], dtype=torch.long, device=device) for j in (0, 1))
        xp = xp.index_put((bi, ni), rows)
        pmask[bi, ni] = True if mask is None else mask
        y, alpha = functional.attention_pool(xp, params["V"], params["w"], params.get("U"), mask=pmask, **kw)
        alpha = alpha[bi, ni]
    else:
        y, alpha = functional.attention_pool(rows, params["V"], params["w"], params.get("U"), offsets=offsets,
                                             mask=mask, **kw)
    outputs, grads = [y], [t["dy"].to(device, dtype)]
    if case.weights_grad:
        outputs.append(alpha)
        grads.append(t["dalpha"].to(device, alpha.dtype))
    torch.autograd.backward(outputs, grads)
    got = {"y": y.detach(), "alpha": alpha.detach(), "dx": x.grad}
    got.update({"d" + n: p.grad for n, p in params.items()})
    return got


def check_pool(case: PoolCase, dtype, backend, device="cpu") -> list[Comparison]:
    t = case.inputs()
    got = _run_pool(case, t, dtype, device, backend)
    lowp = _run_pool(case, t, dtype, device, "reference")
    truth = _run_pool(case, t, torch.float64, device, "reference")
    return [compare(n, got[n], lowp[n], truth[n], dtype, 2) for n in truth]


def pool_cases(quick=False):
    cases = [PoolCase(),
             PoolCase(bags=(1,), D=8, Hd=4),                                 # a single instance
             PoolCase(bags=(3000,), D=40, Hd=8, K=2),                        # more rows than a CPU block
             PoolCase(bags=(17, 1, 64), D=300, Hd=24, K=3, mask="random"),   # channels over a pooling chunk
             PoolCase(gated=False, mask="bag", weights_grad=True),
             PoolCase(bias=False, K=4, weights_grad=True, layout="strided"),
             PoolCase(bags=(7, 12), layout="padded", mask="random", weights_grad=True),
             PoolCase(bags=(6, 3, 11), layout="expand", K=2),
             PoolCase(bags=(9, 14), D=30, layout="overlap", mask="random"),
             PoolCase(bags=(1,), D=40, Hd=8, layout="strided", weights_grad=True),  # one row, its stride arbitrary
             PoolCase(bags=(50, 31), K=2, logits=8.0, weights_grad=True)]
    if quick:
        cases = cases[::2]
    return cases
