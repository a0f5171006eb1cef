"""Benchmarks: fastattn's backends side by side with PyTorch's best paths, in the same run.

Timing: CUDA events on a GPU, perf_counter on CPU; warm-up, then the median and interquartile range
of repetitions, interleaved across providers (each round times every provider once).
Attention TFLOP/s use FlashAttention's count: fwd 4·B·H·Lq·Lk·D (halved for causal), bwd 2.5×,
fwd_bwd 3.5×. The softmax gates are memory-bound and report GB/s of the bytes they must move.
Op varlen packs B sequences whose lengths are drawn in [L/4, L] (``varlen_lengths``, a fixed seed: a
row's B and Lq = L give them back); its FLOPs count each sequence's own length (Σ 4·H·l²·D).
Decoding over a kv cache (op decode: Lq = 1 over a cache of Lk keys) is bound by reading the cache: it reports GB/s
of K and V bytes read, beside the machine's read bandwidth measured in the same run (the best of a few sums over a
1 GiB array) and the fraction of it reached.
Attention pooling (op attention_pool: one bag of N = Lq instances of D channels, the gated scorer with Hd = Dv hidden
units and K = Hq branches; op attention_pool_packed: B bags of lengths drawn in [500, 5000], packed) is bound by its
scorer's GEMMs: TFLOP/s count 2·N·D·2Hd for the forward, twice that for the backward (the model's FLOPs: a recompute
is not counted). Its rows carry the peak memory of one call beyond its inputs (on CPU the growth of the process's
resident memory, big allocations mapped one by one so that a free returns them).
"""
from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import os
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F

from . import contract, functional
from .backends import backends
from .testing import DTYPE_NAMES_INV
from .version import __version__


@dataclasses.dataclass(frozen=True)
class Config:
    op: str                  # attention, gated, bias (a float bias with its gradient), varlen (packed sequences),
    #                          softmax_gate, score_softmax_gate, decode (attention_with_kvcache: Lq queries over Lk keys),
    #                          window (causal attention in a sliding window of `window` keys back), dropout
    #                          (attention with dropout of the weights), deterministic (its deterministic backward),
    #                          attention_pool (one bag: N = Lq, K = Hq branches, Hd = Dv), attention_pool_packed
    mode: str                # fwd, bwd, fwd_bwd
    dtype: torch.dtype
    B: int
    Hq: int = 1
    Hkv: int = 1
    Lq: int = 0
    Lk: int = 0
    D: int = 0
    Dv: int = 0
    causal: bool = False
    mask: str = "none"
    gate: str = "none"
    window: int = -1         # op window: query i sees keys i - window .. i
    dropout: float = 0.0     # op dropout: dropout_p
    deterministic: bool = False  # op deterministic: fastattn's deterministic backward (torch's own paths as they are)

    # The softmax gates' shape (B, N, D) with H heads rides on the attention fields, so that every result row
    # has one schema (B, Hq, Lq, D): H is Hq, N is Lq.
    @property
    def H(self) -> int:
        return self.Hq

    @property
    def N(self) -> int:
        return self.Lq


ATTENTION_OPS = ("attention", "gated", "bias", "window", "dropout", "deterministic")
# attention with one thing changed, timed beside the same attention without it (only when asked for)
VARIANT_OPS = ("window", "dropout", "deterministic")
POOL_OPS = ("attention_pool", "attention_pool_packed")
FLOP_OPS = ATTENTION_OPS + ("varlen",) + POOL_OPS  # rated in TFLOP/s; the others in GB/s


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_once(fn, device):
    """Milliseconds of one call of ``fn``: CUDA events on a GPU, a synchronised clock elsewhere."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _sdpa_backends(device):
    """PyTorch SDPA backends to compare with on this device: {provider: SDPBackend}."""
    from torch.nn.attention import SDPBackend
    names = {"torch-sdpa-flash": SDPBackend.FLASH_ATTENTION, "torch-sdpa-math": SDPBackend.MATH}
    if device.type == "cuda":
        names["torch-sdpa-efficient"] = SDPBackend.EFFICIENT_ATTENTION
        names["torch-sdpa-cudnn"] = SDPBackend.CUDNN_ATTENTION
    return names


def _attention_providers(cfg, device):
    """{provider: callable(q, k, v, extra) -> out} for an attention config; ``extra`` is the gate for
    op "gated", the float bias for op "bias", else None."""
    from torch.nn.attention import sdpa_kernel
    providers = {}
    bias = cfg.op == "bias"
    window = (cfg.window, 0) if cfg.op == "window" else (-1, -1)
    for name in _fastattn_backends(device):
        providers[f"fastattn-{name}"] = (lambda n: lambda q, k, v, e: functional.attention(
            q, k, v, causal=cfg.causal, attn_mask=e if bias else None, gate=None if bias else e, backend=n,
            window_size=window, dropout_p=cfg.dropout, deterministic=cfg.deterministic or None))(name)

    # SDPA takes a mask or is_causal, not both: a causal bias is masked above the diagonal on every call,
    # as a model whose bias trains has to; a sliding window is its bool band (what transformers passes SDPA)
    above = torch.ones(cfg.Lq, cfg.Lk, dtype=torch.bool, device=device).triu_(1) if bias and cfg.causal else None
    band = (contract.band_allowed(cfg.Lq, cfg.Lk, contract.CAUSAL_TOP_LEFT, cfg.window, -1, device)
            if cfg.op == "window" else None)

    def sdpa(backend):
        def run(q, k, v, e):
            mask = (e if above is None else e.masked_fill(above, float("-inf"))) if bias else band
            with sdpa_kernel([backend]):
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=cfg.dropout,
                                                   is_causal=cfg.causal and mask is None,
                                                   enable_gqa=cfg.Hq != cfg.Hkv)
            return o * torch.sigmoid(e) if e is not None and not bias else o
        return run

    for provider, backend in _sdpa_backends(device).items():
        if provider == "torch-sdpa-math" and device.type == "cuda" and cfg.Lq * cfg.Lk > 4096 * 4096:
            continue  # materialises B·H·L² fp32 scores: gigabytes, and no contender at these lengths
        providers[provider] = sdpa(backend)
    # FlexAttention needs torch.compile to be fast (on CPU it would time the compiler); one compile per
    # causal mode (dynamic shapes), on the headline configs only, keeps the GPU round inside its budget.
    if device.type == "cuda" and cfg.mode == "fwd" and cfg.dtype == torch.bfloat16 and cfg.D == 128 and not cfg.dropout:
        providers["torch-flex"] = _flex(cfg)  # (it has no dropout)
    return providers


_FLEX = {}


def _flex(cfg):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    compiled = _FLEX.setdefault("fn", torch.compile(flex_attention, dynamic=True))
    block_mask = None
    if cfg.op == "window":
        block_mask = create_block_mask(lambda b, h, q, k: (q >= k) & (q - k <= cfg.window), None, None, cfg.Lq,
                                       cfg.Lk, device="cuda")
    elif cfg.causal:
        block_mask = create_block_mask(lambda b, h, q, k: q >= k, None, None, cfg.Lq, cfg.Lk, device="cuda")

    def run(q, k, v, g):
        o = compiled(q, k, v, block_mask=block_mask, enable_gqa=cfg.Hq != cfg.Hkv)
        return o * torch.sigmoid(g) if g is not None else o
    return run


def varlen_lengths(cfg):
    """The B sequence lengths of a varlen config: drawn uniformly in [L/4, L] with a fixed seed."""
    gen = torch.Generator().manual_seed(0)
    return torch.randint(max(1, cfg.Lq // 4), cfg.Lq + 1, (cfg.B,), generator=gen).tolist()


def _varlen_providers(cfg, device, mk):
    """{provider: (callable(q, k, v) -> out, [q, k, v])}: fastattn's varlen_attention on the packed sequences;
    PyTorch's SDPA backends on them padded to the longest, (B, H, L, D) with a key-padding mask (holding the
    causal rule too: SDPA takes a mask or is_causal, not both); and PyTorch's SDPA on them as jagged nested
    tensors (its own varlen path)."""
    from torch.nn.attention import sdpa_kernel
    lens = torch.tensor(varlen_lengths(cfg), device=device)
    cu = torch.cat([lens.new_zeros(1), lens.cumsum(0)])
    total, L = int(cu[-1]), int(lens.max())
    packed = [mk(total, cfg.Hq, cfg.D), mk(total, cfg.Hkv, cfg.D), mk(total, cfg.Hkv, cfg.Dv)]
    keep = torch.arange(L, device=device) < lens[:, None]  # (B, L): the real tokens

    def pad(t):
        out = t.new_zeros(cfg.B, L, *t.shape[1:])
        out[keep] = t
        return out.transpose(1, 2).contiguous()

    padded = [pad(t) for t in packed]
    mask = keep[:, None, None, :]
    if cfg.causal:
        mask = mask & torch.ones(L, L, dtype=torch.bool, device=device).tril()
    gqa = cfg.Hq != cfg.Hkv
    providers = {}
    cu32 = cu.to(torch.int32)
    for name in _fastattn_backends(device):
        providers[f"fastattn-{name}"] = ((lambda n: lambda q, k, v: functional.varlen_attention(
            q, k, v, cu32, cu32, L, L, causal=cfg.causal, backend=n))(name), packed)

    def sdpa(backend):
        def run(q, k, v):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return run

    for provider, backend in _sdpa_backends(device).items():
        if provider == "torch-sdpa-math" and device.type == "cuda" and cfg.B * L * L > 4096 * 4096:
            continue  # materialises B·H·L² fp32 scores
        providers[provider] = (sdpa(backend), padded)

    def nested(q, k, v):
        q, k, v = (torch.nested.nested_tensor_from_jagged(t, cu, max_seqlen=L).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v, is_causal=cfg.causal, enable_gqa=gqa).transpose(1, 2).values()

    providers["torch-sdpa-nested"] = (nested, packed)
    return providers


def _fastattn_backends(device):
    avail = backends()
    return [n for n in ("cuda", "triton", "cpu") if avail[n]["available"] and device.type in avail[n]["devices"]]


def _gate_providers(cfg, device):
    """fastattn's backends and the same math in eager PyTorch (the reference, which is exactly that)."""
    from . import reference
    providers = {}
    for name in _fastattn_backends(device):
        if cfg.op == "softmax_gate":
            providers[f"fastattn-{name}"] = (lambda n: lambda s, x: functional.softmax_gate(s, x, backend=n))(name)
        else:
            providers[f"fastattn-{name}"] = (lambda n: lambda w, x: functional.score_softmax_gate(x, w, backend=n))(name)
    if cfg.op == "softmax_gate":
        providers["torch-eager"] = lambda s, x: reference.softmax_gate(s, x)
    else:
        providers["torch-eager"] = lambda w, x: reference.score_softmax_gate(x, w)
    if cfg.mode == "fwd":
        # the yardstick of a memory-bound forward: a copy of x moves the bytes it must (read x, write y).
        # Not "torch-": it is no way to compute the op, so it is never the best PyTorch row
        providers["copy"] = lambda _, x: x.clone()
    return providers


def pool_lengths(cfg):
    """The bag sizes of a pooling config: one bag of Lq instances, or (packed) B bags drawn in [500, 5000] with a fixed
    seed."""
    if cfg.op == "attention_pool":
        return [cfg.Lq]
    return torch.randint(500, 5001, (cfg.B,), generator=torch.Generator().manual_seed(0)).tolist()


def eager_abmil(x, V, U, w, bV, bU):
    """Gated ABMIL's attention pooling of one bag as its modules compute it (CLAM's Attn_Net_Gated, then the softmax
    over instances and the pooled sum): (K, D)."""
    h = torch.tanh(F.linear(x, V.t(), bV)) * torch.sigmoid(F.linear(x, U.t(), bU))
    A = torch.softmax(F.linear(h, w.t()).t().float(), dim=1).to(x.dtype)
    return A @ x


def _pool_providers(cfg, device):
    """{provider: callable(x, V, U, w, bV, bU) -> y}: fastattn's backends on the packed bags, and eager PyTorch: one
    call on a single bag, or a loop over the bags of a packed batch (what training code does with bags of their own
    sizes)."""
    lengths = pool_lengths(cfg)
    offsets = torch.tensor([0] + lengths, device=device).cumsum(0)
    providers = {}
    for name in _fastattn_backends(device):
        providers[f"fastattn-{name}"] = (lambda n: lambda x, V, U, w, bV, bU: functional.attention_pool(
            x, V, w, U, bV=bV, bU=bU, offsets=offsets, backend=n))(name)
    if cfg.op == "attention_pool":
        providers["torch-eager"] = eager_abmil
    else:
        providers["torch-eager-loop"] = lambda x, V, U, w, bV, bU: torch.stack(
            [eager_abmil(bag, V, U, w, bV, bU) for bag in x.split(lengths)])
    return providers


def _vm_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(field)


def cpu_peak_mb(fn):
    """MiB of resident memory one call of ``fn`` adds at its peak (Linux: VmHWM after clearing it), or None where
    the process cannot measure it. glibc's malloc is told to map every block of 128 KiB or more on its own, so that
    a freed tensor leaves the resident set and a later one is counted again."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 17)  # M_MMAP_THRESHOLD (fixed: no dynamic raise)
        before = _vm_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        fn()
        return (_vm_kib("VmHWM") - before) / 1024
    except (OSError, AttributeError):
        return None


def _decode_providers(cfg, device, caches):
    """{provider: callable(q, cache_seqlens) -> out}: fastattn's backends on (q, k_cache, v_cache, cache_seqlens), and
    SDPA on (B, H, L, D) views of the valid prefix (the whole cache here) with enable_gqa. Every call, whoever makes
    it, takes the next of ``caches`` [(k_cache, v_cache)]: with enough of them it finds none in a CPU's L3 or a GPU's
    L2 from an earlier call, as a decoding step over many layers would not."""
    from torch.nn.attention import sdpa_kernel
    turn = itertools.cycle(caches)
    providers = {}
    for name in _fastattn_backends(device):
        providers[f"fastattn-{name}"] = (lambda n: lambda q, lens: functional.attention_with_kvcache(
            q, *next(turn), cache_seqlens=lens, backend=n))(name)

    def sdpa(backend):
        def run(q, lens):
            k, v = next(turn)
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k[:, :, :cfg.Lk], v[:, :, :cfg.Lk], enable_gqa=True)
        return run

    repeated = cfg.B * cfg.Hq * cfg.Lk * (cfg.D + cfg.Dv) * torch.finfo(cfg.dtype).bits // 8
    for provider, backend in _sdpa_backends(device).items():
        if provider == "torch-sdpa-math" and repeated > 2**31:
            continue  # repeats K and V per query head: gigabytes, on a machine other work shares
        providers[provider] = sdpa(backend)
    return providers


def _decode_bytes(cfg):
    """K and V bytes a decoding step reads: the whole valid cache, once."""
    return cfg.B * cfg.Hkv * cfg.Lk * (cfg.D + cfg.Dv) * torch.finfo(cfg.dtype).bits // 8


READ_BW_BYTES = 2**30
COLD_BYTES = 2**28  # decode: copies of the cache, used in turn, of at least this many bytes together


def read_bandwidth(device, reps=5):
    """The machine's read bandwidth in GB/s: the best of ``reps`` sums over a READ_BW_BYTES float32 array."""
    x = torch.ones(READ_BW_BYTES // 4, device=device)
    best = min(time_once(lambda: x.sum(), device) for _ in range(reps))
    return READ_BW_BYTES / best / 1e6


def _flops(cfg):
    """FlashAttention's count: 4 D per (query, key) pair seen (half of them under causal), times 2.5 for the backward.
    A sliding window counts the pairs in its band."""
    if cfg.op in POOL_OPS:
        return 4.0 * sum(pool_lengths(cfg)) * cfg.D * cfg.Dv * {"fwd": 1.0, "bwd": 2.0, "fwd_bwd": 3.0}[cfg.mode]
    pairs = sum(n * n for n in varlen_lengths(cfg)) if cfg.op == "varlen" else cfg.B * cfg.Lq * cfg.Lk
    f = 4.0 * cfg.Hq * pairs * cfg.D / (2 if cfg.causal else 1)
    if cfg.op == "window":  # row i sees min(i, window) + 1 keys
        w = min(cfg.window, cfg.Lq - 1)
        f = 4.0 * cfg.Hq * cfg.B * cfg.D * ((w + 1) * cfg.Lq - w * (w + 1) // 2)
    return f * {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}[cfg.mode]


def _gate_bytes(cfg):
    e = torch.finfo(cfg.dtype).bits // 8
    x = cfg.B * cfg.N * cfg.D * e
    fwd, bwd = 2 * x, 3 * x  # fwd: read x, write y; bwd: read x, dy, write dx (scores/α are H/D of that)
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}[cfg.mode]


def _repetition(fn_fwd, inputs, mode, device):
    """A function that runs one timed repetition of ``fn_fwd(*inputs)`` in ``mode`` and returns its ms:
    fwd (no autograd), bwd (the backward alone, of a fresh untimed forward) or fwd_bwd."""
    grad_inputs = [t for t in inputs if t is not None and t.is_floating_point()]
    for t in grad_inputs:
        t.requires_grad_(mode != "fwd")
    if mode == "fwd":
        def rep():
            with torch.no_grad():
                return time_once(lambda: fn_fwd(*inputs), device)
        return rep
    with torch.no_grad():
        dout = torch.randn_like(fn_fwd(*inputs))
    if mode == "fwd_bwd":
        return lambda: time_once(lambda: torch.autograd.grad(fn_fwd(*inputs), grad_inputs, dout), device)

    def rep():
        out = fn_fwd(*inputs)
        _sync(device)
        return time_once(lambda: torch.autograd.grad(out, grad_inputs, dout), device)
    return rep


def run_config(cfg, device, reps=7, warmup=2):
    """One row per provider for ``cfg``. Repetitions are interleaved (each round times every provider
    once), so a change in machine load falls on all providers alike; the median is reported."""
    g = torch.Generator(device=device).manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g, device=device, dtype=cfg.dtype)
    if cfg.op == "varlen":
        inputs, providers = None, _varlen_providers(cfg, device, mk)
    elif cfg.op in ATTENTION_OPS:
        # the bias is one (1, H, Lq, Lk) table shared by the batch, as a learned relative-position bias
        extra = (mk(1, cfg.Hq, cfg.Lq, cfg.Lk) if cfg.mask == "float_grad" else
                 mk(cfg.B, cfg.Hq, cfg.Lq, cfg.Dv) if cfg.gate != "none" else None)
        inputs = [mk(cfg.B, cfg.Hq, cfg.Lq, cfg.D), mk(cfg.B, cfg.Hkv, cfg.Lk, cfg.D), mk(cfg.B, cfg.Hkv, cfg.Lk, cfg.Dv),
                  extra]
        providers = _attention_providers(cfg, device)
    elif cfg.op == "decode":
        caches = [(mk(cfg.B, cfg.Hkv, cfg.Lk, cfg.D), mk(cfg.B, cfg.Hkv, cfg.Lk, cfg.Dv))
                  for _ in range(max(1, -(-COLD_BYTES // _decode_bytes(cfg))))]
        inputs = [mk(cfg.B, cfg.Hq, cfg.Lq, cfg.D), torch.full((cfg.B,), cfg.Lk, dtype=torch.int32, device=device)]
        providers = _decode_providers(cfg, device, caches)
    elif cfg.op in POOL_OPS:
        N, D, Hd, K = sum(pool_lengths(cfg)), cfg.D, cfg.Dv, cfg.Hq
        inputs = [mk(N, D), mk(D, Hd) / D ** 0.5, mk(D, Hd) / D ** 0.5, mk(Hd, K) / Hd ** 0.5, mk(Hd), mk(Hd)]
        providers = _pool_providers(cfg, device)
    else:
        other = mk(cfg.B, cfg.N, cfg.H) if cfg.op == "softmax_gate" else mk(cfg.H, cfg.D) / cfg.D ** 0.5
        inputs = [other, mk(cfg.B, cfg.N, cfg.D)]
        providers = _gate_providers(cfg, device)
    reps_of, peak_of = {}, {}
    for provider, fn in providers.items():
        fn, own = fn if isinstance(fn, tuple) else (fn, inputs)  # a provider may bring its own inputs
        try:  # set up and warm up; a PyTorch backend that refuses these inputs is skipped, said once
            rep = _repetition(fn, own, cfg.mode, device)
            for _ in range(warmup):
                rep()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                rep()
                peak_of[provider] = (torch.cuda.max_memory_allocated() - (base if cfg.op in POOL_OPS else 0)) / 2**20
            elif cfg.op in POOL_OPS:
                peak_of[provider] = cpu_peak_mb(rep)
            reps_of[provider] = rep
        except RuntimeError as e:
            print(f"  {provider}: not run ({str(e).splitlines()[0][:100]})")
    times = {p: [] for p in reps_of}
    for _ in range(reps):
        for provider, rep in reps_of.items():
            times[provider].append(rep())
    rows = [make_row(cfg, provider, ts, peak_of.get(provider)) for provider, ts in times.items()]
    if cfg.op == "decode":  # measured after the timings, under the same load
        del inputs, caches, providers, reps_of
        bw = read_bandwidth(device)
        for r in rows:
            r["read_gbps"], r["read_frac"] = bw, r["gbps"] / bw
    return rows


def make_row(cfg, provider, times, peak_mem_mb=None):
    """The result row of ``provider`` on ``cfg`` from its repetition times (ms): median, quartiles, all times."""
    ms = statistics.median(times)
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else (ms, ms, ms)
    row = {"op": cfg.op, "provider": provider, "mode": cfg.mode, "dtype": str(cfg.dtype).replace("torch.", ""),
           "B": cfg.B, "Hq": cfg.Hq, "Hkv": cfg.Hkv, "Lq": cfg.Lq, "Lk": cfg.Lk, "D": cfg.D, "Dv": cfg.Dv,
           "causal": cfg.causal, "mask": cfg.mask, "gate": cfg.gate, "window": cfg.window, "dropout": cfg.dropout,
           "deterministic": cfg.deterministic, "ms": ms, "tflops": None,
           "gbps": None,
           "peak_mem_mb": peak_mem_mb, "q1_ms": q1, "q3_ms": q3, "times_ms": list(times)}
    if cfg.op in FLOP_OPS:
        row["tflops"] = _flops(cfg) / ms / 1e9
    elif cfg.op == "decode":
        row["gbps"] = _decode_bytes(cfg) / ms / 1e6
    else:
        row["gbps"] = _gate_bytes(cfg) / ms / 1e6
    return row


def default_configs(device, quick=False, ops=None, modes=None, dtypes=None, head_dims=None):
    """GPU: the field's standard sweep (batch·seqlen = 16k tokens, seqlen 512..16k, hidden 2048, D 64
    and 128, bf16 and fp16, causal and not). CPU: one length per op in fp32 and bf16, about a minute on 2 cores.
    decode (only when asked for): Hq 32, Hkv 8, D 128, B 1 and 8, Lk 4k, 16k, 64k (on a CPU not B 8 at 64k: a 4 GiB
    fp32 cache) in fp32 and bf16, and the prefill of such a cache (attention, B 1, L 2048, causal).
    window, dropout, deterministic (only when asked for): causal attention in a sliding window of 1024 keys (256 on
    a CPU), with dropout 0.1, or with the deterministic backward (no forward row: it is the same), at several
    lengths, each beside the same causal attention without it (the window's cost grows as L · window).
    attention_pool (only when asked for): one bag of N in 8k, 40k, 100k instances, D 1024 and 1536, Hd 256, one
    branch, fp32 and bf16, fwd and fwd_bwd; attention_pool_packed: 64 bags of 500-5000 instances, D 1024.
    ``dtypes`` / ``head_dims`` replace the sweep's own (the hidden size stays: H = 2048 // D on a GPU)."""
    configs = []
    if device.type == "cuda":
        seqlens = (1024, 4096) if quick else (512, 1024, 2048, 4096, 8192, 16384)
        dtypes_default = (torch.bfloat16,) if quick else (torch.bfloat16, torch.float16)
        heads_dims = [(2048 // D, D) for D in ((128,) if quick else (128, 64))]
        # the last is large enough (512 MiB of x in bf16) for the kernels to run at full bandwidth
        gate_sizes = [(32, 1024, 512), (32, 8192, 1024)] if quick else [(32, 1024, 512), (8, 4096, 1024),
                                                                         (32, 8192, 1024)]
    else:
        seqlens = (256,) if quick else (1024,)
        dtypes_default = (torch.float32,) if quick else (torch.float32, torch.bfloat16)
        heads_dims = [(8, 64)]
        gate_sizes = [(8, 256, 512)] if quick else [(32, 1024, 512)]
    decode_shapes = [(B, L) for B in (1, 8) for L in (4096, 16384, 65536)]
    if device.type == "cpu":
        decode_shapes = [(1, 4096)] if quick else [bl for bl in decode_shapes if bl != (8, 65536)]
    elif quick:
        decode_shapes = [(1, 16384), (8, 16384)]
    decode_dtypes = dtypes or ((torch.float32,) if quick else (torch.float32, torch.bfloat16))
    pool_dtypes = dtypes or (torch.float32, torch.bfloat16)
    dtypes = dtypes or dtypes_default
    if head_dims:
        heads_dims = [(max(1, 2048 // D) if device.type == "cuda" else heads_dims[0][0], D) for D in head_dims]
    asked_modes = modes
    modes = modes or (("fwd",) if quick else ("fwd", "fwd_bwd") if device.type == "cpu" else ("fwd", "bwd", "fwd_bwd"))
    ops = ops or (("attention", "gated", "bias", "softmax_gate", "score_softmax_gate") if device.type == "cuda"
                  else ("attention", "softmax_gate", "score_softmax_gate"))
    for op in ops:
        for dtype in decode_dtypes if op == "decode" else pool_dtypes if op in POOL_OPS else dtypes:
            if op == "decode":
                if asked_modes and "fwd" not in asked_modes:
                    continue  # forward only
                for D, (B, L) in itertools.product(head_dims or (128,), decode_shapes):
                    configs.append(Config(op, "fwd", dtype, B=B, Hq=32, Hkv=8, Lq=1, Lk=L, D=D, Dv=D))
                if not quick:  # the prefill that fills such a cache: attention rows, causal
                    for D in head_dims or (128,):
                        configs.append(Config("attention", "fwd", dtype, B=1, Hq=32, Hkv=8, Lq=2048, Lk=2048, D=D,
                                              Dv=D, causal=True))
            elif op in POOL_OPS:  # MIL's sizes: CLAM's hidden 256, patch encoders' D 1024 / 1536, slides of 8k-100k
                sizes = [(8192, 1024)] if quick else [(N, D) for D in (1024, 1536) for N in (8192, 40000, 100000)]
                if op == "attention_pool_packed":
                    sizes = [(0, 1024)]
                for (N, D), mode in itertools.product(sizes, asked_modes or ("fwd", "fwd_bwd")):
                    B = 64 if op == "attention_pool_packed" else 1
                    configs.append(Config(op, mode, dtype, B=B, Hq=1, Lq=N, Lk=N, D=D, Dv=256))
            elif op in VARIANT_OPS:
                lengths = (2048, 8192, 16384) if device.type == "cuda" else (1024, 4096)
                variant = {"window": dict(window=1024 if device.type == "cuda" else 256), "dropout": dict(dropout=0.1),
                           "deterministic": dict(deterministic=True)}[op]
                for (H, D), mode, L in itertools.product(heads_dims[:1], modes, lengths[:1] if quick else lengths):
                    if op == "deterministic" and mode == "fwd":
                        continue
                    B = max(1, 16384 // L) if device.type == "cuda" else 1
                    for op_, kw in ((op, variant), ("attention", {})):
                        configs.append(Config(op_, mode, dtype, B=B, Hq=H, Hkv=H, Lq=L, Lk=L, D=D, Dv=D, causal=True,
                                              **kw))
            elif op in ATTENTION_OPS:
                for (H, D), causal, mode, L in itertools.product(heads_dims, (False, True), modes, seqlens):
                    if op != "attention" and len(heads_dims) > 1 and D != 128:
                        continue  # the gated and bias comparisons at one head dim keep the GPU sweep short
                    if op == "bias" and ((mode == "fwd" and not asked_modes) or L > 8192):
                        continue  # what it is for is the gradient; a 16k² bias per head is 8 GiB before its gradient
                    B = max(1, 16384 // L) if device.type == "cuda" else 2
                    configs.append(Config(op, mode, dtype, B=B, Hq=H, Hkv=H, Lq=L, Lk=L, D=D, Dv=D, causal=causal,
                                          gate="elementwise" if op == "gated" else "none",
                                          mask="float_grad" if op == "bias" else "none"))
            elif op == "varlen":  # the same sizes, B sequences of lengths in [L/4, L] packed; fwd and fwd_bwd
                for (H, D), causal, mode, L in itertools.product(heads_dims, (False, True), modes, seqlens):
                    if mode == "bwd" and not asked_modes:
                        continue
                    B = max(2, 16384 // L) if device.type == "cuda" else 4
                    configs.append(Config(op, mode, dtype, B=B, Hq=H, Hkv=H, Lq=L, Lk=L, D=D, Dv=D, causal=causal))
            else:
                for (B, N, D), mode in itertools.product(gate_sizes, ("fwd_bwd",) if device.type == "cpu" else modes):
                    configs.append(Config(op, mode, dtype, B=B, Hq=8, Lq=N, D=D))
    return list(dict.fromkeys(configs))  # once each: variants asked together share their plain attention


def environment():
    # FASTATTN_COMMIT first: a copied tree (the GPU machine's) may carry a .git that is not its commit
    commit = os.environ.get("FASTATTN_COMMIT")
    try:
        commit = commit or subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                          cwd=__file__.rsplit("/", 2)[0], timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    dev = {"type": "cuda" if cuda else "cpu",
           "name": torch.cuda.get_device_name() if cuda else _cpu_name(),
           "capability": ".".join(map(str, torch.cuda.get_device_capability())) if cuda else None,
           "threads": torch.get_num_threads()}
    return {"fastattn": __version__, "commit": commit,
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": dev, "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda}


def triton_autotune_choices():
    """{kernel: {autotune key: the config it chose}} of the Triton kernels run in this process: the
    evidence the config tables are tuned from (empty without triton, or when no kernel had a choice)."""
    try:
        from triton.runtime.autotuner import Autotuner
        from .triton_kernels import attention, softmax_gate
    except Exception:  # noqa: BLE001  (no triton, or its kernels failed to load: nothing was tuned)
        return {}
    return {name: {", ".join(map(str, key)): str(cfg) for key, cfg in obj.cache.items()}
            for mod in (attention, softmax_gate) for name, obj in sorted(vars(mod).items())
            if isinstance(obj, Autotuner) and obj.cache}


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "cpu"


# An interquartile range wider than this share of the median means the machine's load moved during
# the run: a speed-up built on such a row may not repeat.
WIDE_SPREAD = 0.10


def _iqr(r):
    """Interquartile range in ms (0 for a row that carries no quartiles)."""
    return r.get("q3_ms", r["ms"]) - r.get("q1_ms", r["ms"])


def _wide(r):
    return _iqr(r) > WIDE_SPREAD * r["ms"]


def speedup_table(rows):
    """Text table: each fastattn row's median and interquartile range, and its speed-up over the fastest
    PyTorch provider of the same config; rows whose spread is wide are marked and explained below."""
    key = lambda r: (r["op"], r["mode"], r["dtype"], r["B"], r["Hq"], r["Lq"], r["Lk"], r["D"], r["causal"], r["gate"])
    groups = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    lines = [f"{'op':<18} {'mode':<8} {'dtype':<9} {'shape':<22} {'causal':<6} {'provider':<16} {'ms':>9} "
             f"{'IQR':>7} {'TFLOP/s|GB/s':>12} {'best torch (ms, IQR)':<34} {'speed-up':>9}"]
    wide = 0
    for k, rs in groups.items():
        torch_rows = [r for r in rs if r["provider"].startswith("torch-")]
        best = min(torch_rows, key=lambda r: r["ms"]) if torch_rows else None
        for r in rs:
            if not r["provider"].startswith("fastattn-"):
                continue
            rate = r["tflops"] if r["tflops"] is not None else r["gbps"]
            shape = (f"B{r['B']} H{r['Hq']}/{r['Hkv']} Lk{r['Lk']} D{r['D']}" if r["op"] == "decode" else
                     f"B{r['B']} H{r['Hq']} L{r['Lq']} D{r['D']}")
            noisy = _wide(r) or (best is not None and _wide(best))
            wide += noisy
            up = (f"{best['ms'] / r['ms']:.2f}x" if best else "-") + ("*" if noisy else " ")
            bname = f"{best['provider']} {best['ms']:.2f} {_iqr(best):.2f}" if best else "-"
            lines.append(f"{r['op']:<18} {r['mode']:<8} {r['dtype']:<9} {shape:<22} {str(r['causal']):<6} "
                         f"{r['provider']:<16} {r['ms']:>9.2f} {_iqr(r):>7.2f} {rate:>12.3f} {bname:<34} {up:>9}"
                         + (f"  {r['read_frac']:.0%} of the {r['read_gbps']:.1f} GB/s read bandwidth" if "read_gbps" in r
                            else ""))
    if wide:
        lines.append(f"\n* {wide} speed-up(s) rest on a row whose interquartile range exceeds {WIDE_SPREAD:.0%} of its "
                     f"median: the machine is noisy and these may not repeat; rerun on an idle machine or with "
                     f"more repetitions (e.g. --reps 21).")
    return "\n".join(lines)


def _rate(r, ms):
    """TFLOP/s or GB/s of row ``r`` had it taken ``ms``."""
    value = r["tflops"] if r["tflops"] is not None else r["gbps"]
    return value * r["ms"] / ms


def _title(env):
    if not env:
        return None
    dev = env["device"]
    threads = f", {dev['threads']} threads" if dev["type"] == "cpu" and dev.get("threads") else ""
    commit = f" at {env['commit'][:10]}" if env.get("commit") else ""
    return f"fastattn {env.get('fastattn', '')}{commit} on {dev['name']} ({dev['type']}{threads}), torch {env['torch']}"


def figure(rows, env=None):
    """A matplotlib figure of ``rows`` titled with ``env`` (device, torch, commit; see ``environment``).
    Several sequence lengths: TFLOP/s (or GB/s) against length, a line per provider, a panel per (op,
    mode, D, causal, dtype). One length: grouped bars, a panel per op, a group per configuration, a bar
    per provider with its interquartile range. The y axis starts at 0 so that heights compare."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    unit = lambda op: "TFLOP/s" if op in FLOP_OPS else "GB/s"
    # one colour per provider across all panels, so that a colour means the same thing everywhere
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {p: palette[i % len(palette)] for i, p in enumerate(sorted({r["provider"] for r in rows}))}
    if len({r["Lq"] for r in rows}) > 1:
        panels = {}
        for r in rows:
            key = (r["op"], r["mode"], r["D"], r["causal"], r["dtype"])
            panels.setdefault(key, {}).setdefault(r["provider"], []).append(r)
        n = len(panels)
        cols = min(4, n)
        nrows = (n + cols - 1) // cols
        fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.3 * nrows + 0.4), squeeze=False)
        for ax, ((op, mode, D, causal, dtype), provs) in zip(axes.flat, panels.items()):
            for provider, rs in sorted(provs.items()):
                rs = sorted(rs, key=lambda r: r["Lq"])
                style = dict(lw=2.2, marker="o") if provider.startswith("fastattn") else dict(lw=1.2, marker=".", ls="--")
                ax.plot([r["Lq"] for r in rs], [_rate(r, r["ms"]) for r in rs], label=provider, color=color[provider],
                        **style)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{op} {mode} {dtype} D{D}{' causal' if causal else ''}", fontsize=9)
            ax.set_xlabel("sequence length")
            ax.set_ylabel(unit(op))
    else:
        panels = {}
        for r in rows:
            label = f"{r['mode']} {r['dtype']}\nD{r['D']}{' causal' if r['causal'] else ''}"
            if r["op"] == "decode":
                label += f"\nB{r['B']} Lk{r['Lk']}"
            panels.setdefault(r["op"], {}).setdefault(label, {})[r["provider"]] = r
        n = len(panels)
        fig, axes = plt.subplots(1, n, figsize=(max(4.5, 1.6 * max(len(g) for g in panels.values())) * n, 4.2),
                                 squeeze=False)
        for ax, (op, groups) in zip(axes.flat, panels.items()):
            providers = sorted({p for g in groups.values() for p in g})
            width = 0.8 / len(providers)
            for i, provider in enumerate(providers):
                xs, ys, lo, hi = [], [], [], []
                for x, g in enumerate(groups.values()):
                    if provider in g:
                        r = g[provider]
                        y = _rate(r, r["ms"])
                        xs.append(x - 0.4 + width * (i + 0.5))
                        ys.append(y)
                        # the faster quartile (q1) is the higher rate
                        lo.append(y - _rate(r, r.get("q3_ms", r["ms"])))
                        hi.append(_rate(r, r.get("q1_ms", r["ms"])) - y)
                ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=provider, color=color[provider],
                       edgecolor="black" if provider.startswith("fastattn") else None)
            ax.set_xticks(range(len(groups)), list(groups), fontsize=7)
            L = rows[0]["Lq"]
            ax.set_title(f"{op}, sequence length {L}", fontsize=9)
            ax.set_ylabel(f"{unit(op)} (median, whiskers: IQR)")
    for ax in list(axes.flat)[:n]:
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if title := _title(env):
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot(rows, path, env=None):
    """Saves ``figure(rows, env)`` to ``path``. Returns False (and says why) when matplotlib is missing."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot: matplotlib is not installed (pip install matplotlib); wrote no plot")
        return False
    fig = figure(rows, env)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(args):
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    configs = default_configs(device, quick=args.quick, ops=args.op, modes=args.mode,
                              dtypes=[DTYPE_NAMES_INV[d] for d in args.dtype or ()], head_dims=args.head_dim)
    rows = []
    env = environment()
    for i, cfg in enumerate(configs):
        length = f"Lk{cfg.Lk}" if cfg.op == "decode" else f"L{cfg.Lq}"
        print(f"[{i + 1}/{len(configs)}] {cfg.op} {cfg.mode} {str(cfg.dtype)[6:]} B{cfg.B} H{cfg.Hq} {length} "
              f"D{cfg.D}{' causal' if cfg.causal else ''}", flush=True)
        rows += run_config(cfg, device, reps=args.reps or (3 if args.quick else 7))
        if args.out:  # after every config, so an interrupted run keeps what it measured
            with open(args.out, "w") as f:
                json.dump(dict(env, results=rows, triton_autotune=triton_autotune_choices()), f, indent=1)
    print()
    print(speedup_table(rows))
    print()
    if args.out:
        print(f"results written to {os.path.abspath(args.out)}")
    else:
        print("results not saved (--out FILE.json keeps them, with every repetition's time)")
    if args.plot and plot(rows, args.plot, env):
        print(f"plot written to {os.path.abspath(args.plot)}")
    return 0
