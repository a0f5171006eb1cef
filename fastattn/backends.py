"""Backends and the choice among them (docs/CONTRACT.md §3).

A backend is an object with a name, a reason it is unavailable (or None), a reason it cannot run a
given problem (or None), and one method per op. ``fastattn.functional`` checks the inputs, builds a
:class:`Problem`, asks :func:`select` for a backend and calls it; a new backend (triton, cuda) plugs
in by adding an instance to ``_BACKENDS``. Callers never change.

"auto" order per device: the fused backends first, then the reference. "auto" never picks the
Triton interpreter on CPU (correct but slow; name ``backend="triton"`` to use it).
"""
from __future__ import annotations

import dataclasses
import os

import torch

from . import ops, reference
from .contract import LN2, ScoreMods, causal_arg, stat_dtype

MAX_FUSED_HEAD_DIM = 256  # docs/CONTRACT.md §2.1: D and Dv up to 256 on fused backends

# The kernels (torch.ops.fastattn.<backend prefix><name>) a fused backend needs for each op, and for its gradient.
KERNELS = {"attention": ("attention_fwd",), "varlen_attention": ("varlen_attention_fwd",),
           "attention_kvcache": ("attention_kvcache_fwd",), "softmax_gate": ("softmax_gate_fwd",),
           "score_softmax_gate": ("score_softmax_gate_fwd",), "attention_pool": ("attention_pool_fwd",)}
BACKWARD_KERNELS = {"attention": ("attention_bwd",), "varlen_attention": ("varlen_attention_bwd",),
                    "softmax_gate": ("softmax_gate_bwd",), "score_softmax_gate": ("score_softmax_gate_bwd",),
                    "attention_pool": ("attention_pool_bwd",)}


@dataclasses.dataclass(frozen=True)
class Problem:
    """What a backend needs to know to accept or refuse a call."""
    op: str                      # a key of KERNELS: "attention", "varlen_attention", "attention_kvcache", ...
    device_type: str
    dtype: torch.dtype
    D: int = 0                   # attention head dims (0 for the softmax gates)
    Dv: int = 0
    dropout: bool = False
    causal: bool = False         # attention: what "auto" weighs (a backend's speed depends on them)
    float_mask: bool = False
    grad: bool = False           # a gradient will be asked of the call (the backward kernels run too)
    score_mods: frozenset = frozenset()  # attention's score modifiers in use (contract.ScoreMods.names())
    gate_size: int = 0           # softmax gates: N·D, the elements of x one batch row holds

    @property
    def head_dim(self) -> int:
        return max(self.D, self.Dv)


class Backend:
    """Besides one method per op (``attention``, ``softmax_gate``, ...), a backend that runs attention has the
    two block methods that ``fastattn.distributed`` builds attention over a sharded sequence from:
    ``attention_block(q, k, v, scale, causal) -> (out, lse2)``, out unrounded (float32, float64 for float64)
    and lse2 in log2 units, no mask or gate; and ``attention_block_bwd(dout, q, k, v, out, lse2, dlse2, scale,
    causal, deterministic=False) -> (dq, dk, dv)``, the block's share of the gradient given the whole row's out
    and lse2 (FlashAttention's backward from the saved statistics, which needs nothing of the block's own
    forward)."""
    name = ""
    device_types: tuple = ()

    def unavailable(self) -> str | None:
        return None

    def unsupported(self, p: Problem) -> str | None:
        if p.device_type not in self.device_types:
            return f"runs on {' or '.join(self.device_types)} tensors, got {p.device_type} tensors"
        return None


class ReferenceBackend(Backend):
    """Plain PyTorch (fastattn/reference.py): any device, any float dtype, materialises scores."""
    name = "reference"
    device_types = ("any",)
    dropout = True
    saturated_rows = True  # differentiates its own softmax: a row's dominant key is exact

    def unsupported(self, p):
        return None

    def attention(self, q, k, v, mask, gate, scale, causal, dropout_p, grad, mods=ScoreMods(), deterministic=False,
                  dropout_seed=None):
        # deterministic: torch's own ops, which follow torch.use_deterministic_algorithms
        return reference.attention(q, k, v, attn_mask=mask, causal=causal_arg(causal), scale=scale, gate=gate,
                                   dropout_p=dropout_p, return_lse=True, window_size=mods[:2],
                                   softcap=mods.softcap, alibi_slopes=mods.alibi_slopes, dropout_seed=dropout_seed)

    def varlen_attention(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, gate, scale, causal,
                         grad):
        return reference.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                          causal=causal_arg(causal), scale=scale, gate=gate, return_lse=True)

    def attention_kvcache(self, q, k_cache, v_cache, seqlens_k, page_table, gate, scale, causal):
        return reference.attention_with_kvcache(q, k_cache, v_cache, seqlens_k, page_table, causal=bool(causal),
                                                scale=scale, gate=gate, return_lse=True)

    def attention_block(self, q, k, v, scale, causal):
        acc = stat_dtype(q.dtype)
        out, lse = reference.attention(q.to(acc), k.to(acc), v.to(acc), causal=causal_arg(causal), scale=scale,
                                       return_lse=True)
        return out, lse / LN2

    def attention_block_bwd(self, dout, q, k, v, out, lse2, dlse2, scale, causal, deterministic=False):
        # The gradient of the block's inputs through the whole row: the block's own (out_b, lse_b) enter the
        # row's (out, lse) with weight w = exp(lse_b - lse), so their cotangents are w·dout and
        # w·(dlse + rowsum(dout·(out_b - out))); autograd of the block's reference does the rest.
        acc = stat_dtype(q.dtype)
        with torch.enable_grad():
            qa, ka, va = (t.detach().to(acc).requires_grad_() for t in (q, k, v))
            out_b, lse_b = reference.attention(qa, ka, va, causal=causal_arg(causal), scale=scale, return_lse=True)
            lse = lse2.to(acc) * LN2
            w = torch.where(lse_b == float("-inf"), 0.0, torch.exp(lse_b - lse))
            dout, out = dout.to(acc), out.to(acc)
            dlse = (dlse2.to(acc) / LN2) if dlse2 is not None else torch.zeros_like(lse)
            g_lse = w * (dlse + (dout * (out_b.detach() - out)).sum(-1))
            dq, dk, dv = torch.autograd.grad((out_b, lse_b), (qa, ka, va), (w.unsqueeze(-1) * dout, g_lse))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)

    def softmax_gate(self, scores, x, mask, pool):
        return reference.softmax_gate(scores, x, mask=mask, pool=pool, return_weights=True)

    def score_softmax_gate(self, x, weight, mask, scale, pool):
        return reference.score_softmax_gate(x, weight, mask=mask, scale=scale, pool=pool,
                                            return_weights=True)

    def attention_pool(self, x, offsets, mask, V, U, w, bV, bU, return_scores):
        return reference.attention_pool(x, V, w, U, bV, bU, offsets, mask, return_scores=True)


def _gate_for_kernels(gate, q):
    """The output gate as the kernels take it: q's dtype, (B, Hq, Lq, Dv) or, headwise, (B, Hq, Lq, 1) (the
    kernels broadcast a headwise gate over Dv themselves and sum its gradient there in float32)."""
    if gate is None:
        return None
    gate = gate.to(q.dtype)
    gate = gate.reshape((1,) * (4 - gate.dim()) + tuple(gate.shape))
    B, Hq, Lq, _ = q.shape
    return gate.expand(B, Hq, Lq, gate.shape[-1])


class FusedBackend(Backend):
    """A backend of fused kernels behind ``torch.ops.fastattn.<op_prefix><op>_fwd`` ops, which share
    the schemas of csrc/fastattn.cpp and the autograd of ops.py. Subclasses say where they run and which
    kernels they have (``kernels``: names of KERNELS / BACKWARD_KERNELS; the tests check each is registered)."""
    op_prefix = ""
    kernels = frozenset(n for names in (*KERNELS.values(), *BACKWARD_KERNELS.values()) for n in names)
    score_mods = frozenset(ScoreMods.NAMES)  # the score modifiers its kernels apply
    dropout = False  # whether its kernels drop attention weights (the contract's Philox dropout)
    # whether its backward takes a row's dominant key exactly (README, Numerics; fastattn.fuzz draws saturated rows)
    saturated_rows = False

    def unsupported(self, p):
        why = super().unsupported(p)
        if why:
            return why
        missing = [n for n in KERNELS[p.op] + (BACKWARD_KERNELS.get(p.op, ()) if p.grad else ()) if n not in self.kernels]
        if missing:
            return f"has no kernel {' or '.join(missing)}" + (" (a backward)" if p.grad else "")
        if p.head_dim > MAX_FUSED_HEAD_DIM:
            return f"head dims up to {MAX_FUSED_HEAD_DIM} (got {p.head_dim}); use backend='reference'"
        if p.dropout and not self.dropout:
            return "dropout is not fused in this backend yet; use backend='cpu' or 'reference' (auto does)"
        if p.score_mods - self.score_mods:
            return f"its kernels have no {' or '.join(sorted(p.score_mods - self.score_mods))} yet"
        return None

    def _op(self, name):
        return getattr(torch.ops.fastattn, self.op_prefix + name)


    def attention(self, q, k, v, mask, gate, scale, causal, dropout_p, grad, mods=ScoreMods(), deterministic=False,
                  dropout_seed=None):
        if mask is not None:
            if mask.dtype != torch.bool:
                mask = mask.to(q.dtype)  # kernels read a float mask in q's dtype
            # 4-D but not expanded: the kernels broadcast size-1 dims themselves and return the gradient
            # of a float mask in this shape, summed in float32, never as a (B, Hq, Lq, Lk) tensor
            mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
        gate = _gate_for_kernels(gate, q)
        # without a gradient to follow, the kernels skip out_acc and the precise P V kept for the backward
        out, lse2, _ = self._op("attention_fwd")(
            ops.last_dim_contiguous(q), ops.last_dim_contiguous(k), ops.last_dim_contiguous(v),
            mask, gate, scale, causal, grad, *mods, deterministic, dropout_p, dropout_seed)
        return out, lse2 * LN2  # the kernels keep lse in log2 units, the base they compute in

    def attention_block(self, q, k, v, scale, causal):
        out, lse2, out_acc = self._op("attention_fwd")(
            ops.last_dim_contiguous(q), ops.last_dim_contiguous(k), ops.last_dim_contiguous(v), None, None, scale,
            causal, True)
        return (out_acc if out_acc.numel() else out.to(lse2.dtype)), lse2

    def attention_block_bwd(self, dout, q, k, v, out, lse2, dlse2, scale, causal, deterministic=False):
        dq, dk, dv, _, _ = self._op("attention_bwd")(
            ops.last_dim_contiguous(dout), ops.last_dim_contiguous(q), ops.last_dim_contiguous(k),
            ops.last_dim_contiguous(v), ops.last_dim_contiguous(out), lse2.contiguous(), None, None,
            None if dlse2 is None else dlse2.contiguous(), scale, causal, False, -1, -1, 0.0, None, deterministic)
        return dq, dk, dv

    def varlen_attention(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, gate, scale, causal,
                         grad):
        if gate is not None:
            gate = ops.last_dim_contiguous(gate.to(q.dtype))
        out, lse2, _ = self._op("varlen_attention_fwd")(
            ops.last_dim_contiguous(q), ops.last_dim_contiguous(k), ops.last_dim_contiguous(v),
            cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, gate, scale, causal, grad)
        return out, lse2 * LN2

    def attention_kvcache(self, q, k_cache, v_cache, seqlens_k, page_table, gate, scale, causal):
        gate = _gate_for_kernels(gate, q)
        out, lse2 = self._op("attention_kvcache_fwd")(
            ops.last_dim_contiguous(q), ops.last_dim_contiguous(k_cache), ops.last_dim_contiguous(v_cache),
            seqlens_k, page_table, gate, scale, causal)
        return out, lse2 * LN2

    def softmax_gate(self, scores, x, mask, pool):
        return self._op("softmax_gate_fwd")(ops.last_dim_contiguous(scores), ops.last_dim_contiguous(x), mask, pool)

    def score_softmax_gate(self, x, weight, mask, scale, pool):
        return self._op("score_softmax_gate_fwd")(
            ops.last_dim_contiguous(x), ops.last_dim_contiguous(weight), mask, scale, pool)

    def attention_pool(self, x, offsets, mask, V, U, w, bV, bU, return_scores):
        # returns (y, lse, scores) in the statistics' dtype; scores empty unless asked
        return self._op("attention_pool_fwd")(ops.last_dim_contiguous(x), offsets, mask, V, U, w, bV, bU,
                                              return_scores)


# What csrc/cuda covers, on a GPU and under the CPU emulation of the tests (csrc/cuda/emu/); "auto"
# sends everything else to triton / reference.
CUDA_DTYPES = (torch.float16, torch.bfloat16)
CUDA_HEAD_DIMS = (64, 128)


CUDA_KERNELS = FusedBackend.kernels - {"varlen_attention_bwd"}


def cuda_kernels_unsupported(p: Problem) -> str | None:
    """Why csrc/cuda's kernels cannot run ``p`` (None when they can)."""
    if p.dtype not in CUDA_DTYPES:
        return f"the cuda kernels cover float16 and bfloat16, got {p.dtype}"
    if p.op in KERNELS and p.D and not (p.D == p.Dv and p.D in CUDA_HEAD_DIMS):
        return f"the cuda attention kernels cover D == Dv in {CUDA_HEAD_DIMS}, got D={p.D}, Dv={p.Dv}"
    return None


class CpuBackend(FusedBackend):
    """C++ kernels compiled into fastattn._C (csrc/cpu/), registered for CPU tensors."""
    name = "cpu"
    device_types = ("cpu",)
    dropout = True
    saturated_rows = True  # csrc/cpu/attention_bwd.cpp, dominant_key_grad

    def unavailable(self):
        return ops.extension_error()


class CudaBackend(FusedBackend):
    """Hand-written CUDA kernels compiled into fastattn._C (csrc/cuda/), registered for CUDA tensors."""
    name = "cuda"
    device_types = ("cuda",)
    kernels = CUDA_KERNELS
    dropout = True

    def unavailable(self):
        if ops.extension_error() is not None:
            return ops.extension_error()
        if not ops._C.build_info()["cuda"]:
            return "fastattn._C was built without CUDA kernels (no CUDA torch/nvcc at build time, " \
                   "or FASTATTN_CUDA=0)"
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        if torch.cuda.get_device_capability() < (8, 0):
            return "the CUDA kernels need compute capability 8.0 or newer (mma.sync, cp.async), " \
                   f"got {torch.cuda.get_device_capability()}"
        return None

    def unsupported(self, p):
        return super().unsupported(p) or cuda_kernels_unsupported(p)


class TritonBackend(FusedBackend):
    """Triton kernels (triton_kernels/, installed as fastattn.triton_kernels) through
    torch.ops.fastattn.triton_*: CUDA tensors, or CPU tensors in Triton's interpreter when
    TRITON_INTERPRET=1 (how CI tests them; correct but slow, so "auto" never picks it on CPU)."""
    name = "triton"
    op_prefix = "triton_"
    dropout = True

    @staticmethod
    def _interpreting():
        return os.environ.get("TRITON_INTERPRET", "0") == "1"

    @property
    def device_types(self):
        return ("cuda", "cpu") if self._interpreting() else ("cuda",)

    def unavailable(self):
        try:
            import triton  # noqa: F401  (imported lazily: fastattn imports without triton)
        except ImportError as e:
            return f"triton is not installed ({e}); `pip install triton`"
        if not torch.cuda.is_available() and not self._interpreting():
            return "no CUDA device is available (TRITON_INTERPRET=1 runs the Triton kernels on CPU tensors " \
                   "in Triton's interpreter, slowly)"
        try:
            from . import triton_kernels  # noqa: F401
            from .triton_kernels import ops as _triton_ops  # noqa: F401  (registers torch.ops.fastattn.triton_*)
        except Exception as e:  # noqa: BLE001  (any failure to compile/register is reported, not raised)
            return f"fastattn.triton_kernels failed to load: {type(e).__name__}: {e}"
        return None

    def unsupported(self, p):
        if p.device_type == "cpu" and not self._interpreting():
            return "runs CPU tensors only in Triton's interpreter (set TRITON_INTERPRET=1 before importing triton)"
        why = super().unsupported(p)
        if why:
            return why
        if p.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return f"dtypes float16, bfloat16, float32 (got {p.dtype}: tl.dot has no float64); " \
                   "use backend='cpu' or 'reference'"
        return None


_BACKENDS = {
    b.name: b
    for b in (
        CudaBackend(),
        TritonBackend(),
        CpuBackend(),
        ReferenceBackend(),
    )
}


def auto_order(p: Problem) -> tuple:
    """The backends "auto" tries for ``p``, fastest first (the first available one that supports ``p``
    runs it). On CUDA tensors, from bench/results/2026-11-26-nvidia-h200*.json (H200, bf16, D 64 and
    128, L 512-16k, 16k tokens; torch 2.11, triton 3.6; fp16 assumed alike), where csrc/cuda's kernels
    passed the GPU test sweep and compute-sanitizer first:
    - softmax gates: cuda (B32 N1024 D512: fwd 0.09 ms vs triton 0.20, fwd+bwd 0.41 vs 1.05), but
      score_softmax_gate from N·D = 2^22 on: triton (B32 N8192 D1024 fwd+bwd 3.16-3.41 ms vs 6.20 on the H200,
      3.30-3.68 vs 4.84-4.89 on the H100 of 2026-11-26-nvidia-h100-*.json; cuda leads at N1024 D512,
      0.77-0.90 vs 1.25-1.46 on both; between the two the crossing is not measured);
    - attention with a float mask: triton (bias fwd+bwd 6.58 vs 8.02 ms at L1024, 23.3 vs 29.3 at L4096;
      fwd 1.32 vs 2.24 and 4.00 vs 8.36), but causal with a gradient at D 128: cuda, whose backward leads
      there (fwd+bwd 4.77 vs 5.18 ms at L1024, 15.94 vs 16.95 at L4096 on the H200 (-bb42c89.json); 4.81 vs
      5.27 and 15.95 vs 16.80 on the H100);
    - attention with a gradient: triton (fwd+bwd D128 L4096 9.06 vs 15.41 ms, causal 5.42 vs 8.30,
      gated 12.43 vs 15.66; D64 8.74 vs 13.01);
    - attention without one at D > 64: triton, whose 128x64 Hopper tile runs there (fwd D128 L4096 1.80
      vs 2.48 ms, causal 1.32 vs 1.49, gated 2.12 vs 2.70; L1024 0.73 vs 0.78; cuda leads causal at
      L1024 alone, 0.62 vs 0.82, gated 0.81 vs 1.00); at D 64: cuda (1.01-1.5x);
    - attention with dropout: cuda, whose keep bits cost less than Triton's Philox per key (H200, bf16, D 128,
      L2048 causal, p 0.1, -f4063b2-variants.json: fwd 1.38 vs 2.04 ms, bwd 4.67 vs 7.65, fwd+bwd 5.79 vs 9.17).
    The deterministic backward keeps the rule of its call: triton leads there too (bwd 3.09 vs 5.18 ms)."""
    if p.device_type == "cpu":
        return "cpu", "reference"
    if p.device_type != "cuda":
        return ("reference",)
    if p.op == "attention" and (p.dropout or p.float_mask and p.grad and p.causal and p.head_dim == 128):
        return "cuda", "triton", "reference"
    if p.op == "attention" and (p.float_mask or p.grad or p.head_dim > 64):
        return "triton", "cuda", "reference"
    if p.op == "score_softmax_gate" and p.gate_size >= 1 << 22:
        return "triton", "cuda", "reference"
    return "cuda", "triton", "reference"


_AVAILABILITY: dict = {}


def _unavailable(name):
    if name not in _AVAILABILITY:  # probed once per process
        _AVAILABILITY[name] = _BACKENDS[name].unavailable()
    return _AVAILABILITY[name]


def backends() -> dict:
    """{name: {"available": bool, "reason": str | None, "devices": tuple}} for every backend."""
    return {n: {"available": _unavailable(n) is None, "reason": _unavailable(n), "devices": b.device_types}
            for n, b in _BACKENDS.items()}


def register(backend: Backend) -> None:
    """Adds a backend that lives outside this module (the tests' CUDA emulation, "cuda_emu"): it is
    then named like any other; "auto" never picks it."""
    _BACKENDS[backend.name] = backend
    _AVAILABILITY.pop(backend.name, None)


def select(backend: str, problem: Problem) -> Backend:
    """The backend that runs ``problem``: the named one (or an error saying why it cannot), or,
    for "auto", the first in the device's order that is available and supports it."""
    if backend == "auto":
        for name in auto_order(problem):
            if _unavailable(name) is None and _BACKENDS[name].unsupported(problem) is None:
                return _BACKENDS[name]
        return _BACKENDS["reference"]
    if backend not in _BACKENDS:
        raise ValueError(f"backend: expected 'auto' or one of {sorted(_BACKENDS)}, got {backend!r}")
    why = _unavailable(backend) or _BACKENDS[backend].unsupported(problem)
    if why:
        raise RuntimeError(f"backend={backend!r} cannot run this {problem.op} call: {why}")
    return _BACKENDS[backend]
