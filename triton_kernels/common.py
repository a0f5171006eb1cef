"""Helpers shared by fastattn's Triton kernels (attention.py, softmax_gate.py): the dot and the rounding
they compute with, the alignment hint of their loads, and the launch arguments that go with them."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs as C

_INTERPRET: tl.constexpr = tl.constexpr(C.INTERPRET)


@triton.jit
def dot_acc(a, b, acc, DOT_PREC: tl.constexpr):
    """acc + a @ b with fp32 accumulation. Triton 3.9's interpreter multiplies bfloat16 tiles as their
    raw 16-bit patterns, so there (only) bfloat16 operands are widened first: exact products summed in
    fp32, which is what the tensor cores compute. The branch is compiled out on a GPU."""
    if _INTERPRET:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
        if b.dtype == tl.bfloat16:
            b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def cast_rne(x, dtype: tl.constexpr):
    """fp32 x in ``dtype``, rounded to nearest even as on a GPU. Triton 3.9's interpreter truncates
    float32 -> bfloat16 (and its "rtne" mode neither carries nor ties to even): a bias that sums up over a
    GEMM (P rounded for P V and P^T dO) and a one-ulp error in stored outputs, so under the interpreter
    the rounding is done on the bits, as torch does. The branch is compiled out on a GPU."""
    if _INTERPRET:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            r = tl.where(x != x, 0x7FC0, r)  # NaN stays a (quiet) NaN
            return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


@triton.jit
def online_softmax_step(s, m_i, l_i):
    """One online-softmax step over a score tile s [M, N] (log2 units, -inf where hidden) for rows with running max
    m_i and sum l_i: returns P = exp2(s - m_new), the factor corr that rescales the earlier output, l and m. A row
    with no visible key so far keeps m = -inf and gets P = 0 (exp2 never sees inf - inf)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    corr = tl.math.exp2(m_i - m_safe)
    return p, corr, l_i * corr + tl.sum(p, 1), m_new


@triton.jit
def assume_aligned(x, ALIGN: tl.constexpr):
    """x, which the launcher checked is a multiple of ALIGN, in a form the compiler can see is one. The
    runtime marks only multiples of 16 elements; ALIGN = 16 bytes of elements (8 half, 4 float) extends
    that to head dims such as 40, 72 or 200, so their rows still load as 16-byte vectors, and K / V / Q
    tiles are staged in shared memory by cp.async instead of in registers (which spills). The // and *
    by a power of two are two shifts; tl.multiple_of on a kernel argument does not reach triton 3.9's
    alignment analysis."""
    return x // ALIGN * ALIGN



@triton.jit
def assume_aligned3(a, b, c, ALIGN: tl.constexpr):
    return assume_aligned(a, ALIGN), assume_aligned(b, ALIGN), assume_aligned(c, ALIGN)


@triton.jit
def grid_tile(n_tiles, REVERSE: tl.constexpr):
    """(tile, slice) of this program in a grid whose first axis has n_tiles x slices programs, tiles fastest: the
    order of an (n_tiles, slices) grid without the 65535 bound of a grid's second and third axes (slices count
    B * H, or the batch items; tiles the rows). REVERSE: tiles last to first (causal attention: the heaviest
    query tiles, with the most keys, first, for tail balance)."""
    pid = tl.program_id(0)
    tile = pid % n_tiles
    if REVERSE:
        tile = n_tiles - 1 - tile
    return tile, pid // n_tiles


# ---------------------------------------------------------------------------------------- launchers
def repeats_elements(t) -> bool:
    """Whether view t may reach one element from several indices (expand's stride 0, unfold's overlapping rows),
    so that autograd sums its gradient over them. Conservative: dims sorted by stride, each must step past all
    the smaller ones (as torch's non-overlapping test); a view that fails it may still be free of repeats."""
    reach = 0   # the largest offset the dims taken so far reach
    for stride, size in sorted((abs(st), sz) for st, sz in zip(t.stride(), t.shape) if sz > 1):
        if stride <= reach:
            return True
        reach += stride * (size - 1)
    return False


def dot_precision(dtype):
    """Exact fp32 dots for float32 unless torch itself allows TF32 matmuls (documented above)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # float16 / bfloat16 operands: tensor cores, fp32 accumulation (the flag is moot)


def align_elems(dtype, dims, *tensors):
    """ALIGN of the kernels (see assume_aligned): 16 bytes of ``dtype`` elements when the head dims and every
    stride but the last of ``tensors`` are multiples of it (a size-1 dim's stride is never used), else 1."""
    a = 16 // dtype.itemsize
    vals = list(dims) + [st for t in tensors for n, st in zip(t.shape[:-1], t.stride()[:-1]) if n != 1]
    return a if all(v % a == 0 for v in vals) else 1
