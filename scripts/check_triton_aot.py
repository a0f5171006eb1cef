#!/usr/bin/env python
"""Compiles every Triton kernel of fastattn ahead of time for sm_80 / sm_90, without a GPU or a driver,
and fails on a kept autotune config that could not launch (shared memory per block over the target's
limit) or that spills registers to local memory.

How: the project's own launchers (triton_kernels/attention.py, decode.py, softmax_gate.py, attention_pool.py) run on
meta tensors with ``wrap_triton`` replaced by a recorder, so each launch is captured with the arguments the op would
pass.
Each launch is specialised by triton's own binder (pointer and integer arguments divisible by 16 get
``tt.divisibility``, integers equal to 1 become constants: what the runtime does); an autotuned kernel
is expanded into the configs its ``early_config_prune`` keeps for those arguments and the target. Each
specialisation is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``:
shared memory comes from the compiled metadata, registers / spill stores / stack frame from the bundled
ptxas's ``-v`` log (``knobs.nvidia.dump_ptxas_log``; neither triton 3.6 nor 3.9 puts them in the
metadata without a driver).

    python scripts/check_triton_aot.py          # fp16 + bf16 and an fp32 subset, sm_80 + sm_90 (~10 min on 2
                                                #     cores); exit status 1 on any failing config
    python scripts/check_triton_aot.py --quick  # CI: every kept config once (head dims 16, 32, 64, 72, 256)
    python scripts/check_triton_aot.py --table bench/results/triton_aot.txt   # refresh the committed table
    python scripts/check_triton_aot.py --full   # slow job: also the plain and bool-mask variants, varlen
                                                #     inference launches, fp16 gates, varlen and decode,
                                                #     head dims
                                                #     24 / 96 / 111, fp32 at every head dim
    python scripts/check_triton_aot.py --arch 90 --dtypes fp16 --heads 72 --kernels _attn_fwd -v
    python scripts/check_triton_aot.py --full --variants varlen,varlen-infer   # one family at every head dim

Default variants: attention with every option on (float mask with its gradient, elementwise gate, GQA,
causal, lse gradient: the heaviest specialisation of each kernel), the same with every score modifier
(sliding window, softcap, ALiBi) and with broadcast masks for the dmask kernel,
varlen attention (packed sequences: gate, GQA, causal, lse gradient; bf16, fp16 with --full; the forward's
inference launches with --full), the gates plain and with mask + pooling + alpha gradient (bf16 and fp32; fp16 with --full); each at a
long and a 16-row query side, so that both the long-sequence and the decode configs are kept. The kv-cache decode
kernels over a paged cache, causal and gated, split over the keys (and merged) with the most rows a program takes,
and in one split with one row (bf16, fp16 with --full). attention_pool's forward, merge and backward kernels, gated
with a mask and every gradient (pool; fp16, bf16, fp32), and plain (pool-plain, --full), at D = Hd = 64 and 72.

Triton's cache goes to a private temporary directory, one per compile and removed after it: every
compile runs ptxas (whose log is the only source of register counts), and nothing accumulates.
Works with triton 3.6 and 3.9: the binder (``create_function_from_signature``), ``JITFunction._pack_args``,
``Autotuner.prune_configs`` and ``knobs.nvidia.dump_ptxas_log`` are in both.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import itertools
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field

# shared memory one block may opt in to (CUDA programming guide, compute capabilities table)
SMEM_LIMIT = {80: 166_912, 90: 232_448}
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
# head dims: each head block of the config tables (BLOCK_D <= 64, 128, 256), with a multiple of 16 and with
# one that is not (rows not 16-element aligned: the runtime's divisibility attribute is lost, the kernels'
# ALIGN hint takes over), and the small blocks 16 / 32. --full adds more, and 111 (rows not even 16-byte
# aligned: ALIGN = 1).
HEAD_DIMS = (16, 32, 40, 64, 72, 128, 200, 256)
FULL_HEAD_DIMS = (16, 24, 32, 40, 64, 72, 96, 111, 128, 200, 256)
# --quick (CI): the head dims at which every config the default sweep keeps is compiled at least once, for each arch,
# kernel, dtype, variant and head block (tests/test_triton_aot.py holds it to that): 16 and 32 keep configs of their own,
# 72 is the block of 128 not 16-element aligned. About 70% of the default sweep's compiles.
QUICK_HEAD_DIMS = (16, 32, 64, 72, 256)
# fp32 compiles: CI takes one head dim of each of the two larger blocks, --full all of them
FP32_SUBSET_HEAD_DIMS = (72, 256)
# the dropout variant in CI: the largest head dim of each block and one not 16-element aligned (at every head dim it
# added about 3 minutes to the default sweep on 2 cores: its kernels are ptxas's slowest); --full takes every one
DROPOUT_HEAD_DIMS = (64, 72, 128, 256)
# the varlen and decode variants in CI: bf16 alone. In the committed table fp16's decode kernels took at most 2
# registers more than bf16's, its varlen kernels more in 10 of 126 compiles but never past 220 (the full variant keeps
# fp16 in CI, where it went up to 44 past bf16); that halved their 4 minutes of compiles on 2 cores
FULL = False  # --full: every variant at every dtype and head dim
GATE_HEADS = 8


# ------------------------------------------------------------------------------------------ recording
@dataclass
class Launch:
    kernel: object          # triton Autotuner or JITFunction, as the launcher passed it to wrap_triton
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for ``torch.library.wrap_triton``: ``wrap_triton(k)[grid](*args, **kw)`` records."""

    def __init__(self):
        self.launches: list[Launch] = []

    def __call__(self, kernel):
        rec = self

        class _Grid:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: rec.launches.append(Launch(kernel, args, kwargs))

        return _Grid()


@contextlib.contextmanager
def _recording():
    from fastattn.triton_kernels import attention, attention_pool, decode, softmax_gate
    rec = _Recorder()
    saved = attention.wrap_triton, attention_pool.wrap_triton, decode.wrap_triton, softmax_gate.wrap_triton
    attention.wrap_triton = attention_pool.wrap_triton = decode.wrap_triton = softmax_gate.wrap_triton = rec
    try:
        yield rec
    finally:
        attention.wrap_triton, attention_pool.wrap_triton, decode.wrap_triton, softmax_gate.wrap_triton = saved


def _attention_scenarios(dtype, D):
    """(variant, kernels, thunk): thunk calls the attention launchers on meta tensors; kernels names the
    kernels whose launches count (None: all). full: float mask with its gradient (full shape: dS written by
    the dQ kernel), elementwise gate, GQA, causal bottom-right, lse gradient: the heaviest specialisation
    of every kernel. bcast: the same with broadcast masks, (1, 1, Lq, Lk) and key padding (B, 1, 1, Lk),
    for the dmask kernel. plain: no mask, gate or causal, one kv head per query head, and its forward
    without a backward to follow (need_acc=False); light: the forward's ``light_only`` configs at the launches
    that keep them (causal with GQA, no mask: for training and inference without a gate, for inference
    with one); bool: key-padding
    bool mask, headwise gate, causal top-left; dq-split: full with q from expand (the dQ kernel's dS in two parts);
    mods: full with every score modifier (a two-sided window, softcap, ALiBi slopes (B, Hq)), at the long query
    side, bf16 and fp32; mods-bcast: bcast so (--full); dropout, dropout-bcast: full and bcast with dropout, likewise
    (dropout at the head dims DROPOUT_HEAD_DIMS without --full); mods-dropout: mods with dropout too (--full). Long sequences keep every config with BLOCK_M > 16; a
    16-row query side keeps the decode configs."""
    import torch
    from fastattn.contract import ScoreMods
    from fastattn.triton_kernels import attention as A
    mk = lambda *s, dt=dtype: torch.empty(*s, dtype=dt, device="meta")
    all_mods = ScoreMods(100, 7, 30.0, mk(2, 4, dt=torch.float32))
    dropout = (0.1, mk((), dt=torch.int64))

    def run(Lq, Lk, Hkv, mask_shapes, gate, causal, bool_mask=False, inference=False, train=True, q_rows=None,
            mods=ScoreMods(), drop=(0.0, None)):
        B, Hq = 2, 4
        q, k, v = mk(B, Hq, Lq, D), mk(B, Hkv, Lk, D), mk(B, Hkv, Lk, D)
        if q_rows:  # q from expand: its gradient sums rows
            q = mk(B, Hq, q_rows, D).expand(B, Hq, Lq, D)
        g = mk(*gate) if gate else None
        mdt = torch.bool if bool_mask else dtype
        m0 = mk(*mask_shapes[0], dt=mdt) if mask_shapes else None
        if inference:  # the forward no backward follows: no out_acc, one P V GEMM
            A.attention_fwd(q, k, v, m0, g, 0.125, causal, need_acc=False, mods=mods, dropout=drop)
        if not train:
            return
        out, lse, out_acc = A.attention_fwd(q, k, v, m0, g, 0.125, causal, mods=mods, dropout=drop)
        o = out_acc if out_acc.numel() else out
        dlse = mk(B, Hq, Lq, dt=torch.float32) if mask_shapes else None
        for shape in mask_shapes or [None]:
            m = mk(*shape, dt=mdt) if shape else None
            A.attention_bwd(mk(B, Hq, Lq, D), q, k, v, o, lse, m, g, dlse, 0.125, causal,
                            m is not None and not bool_mask, mods, drop)

    for Lq, Lk in ((1024, 1024), (16, 1024)):
        yield "full", None, lambda Lq=Lq, Lk=Lk: run(Lq, Lk, 2, [(2, 4, Lq, Lk)], (2, 4, Lq, D), 2)
        yield "bcast", {"_attn_bwd_dmask"}, lambda Lq=Lq, Lk=Lk: run(Lq, Lk, 2, [(1, 1, Lq, Lk), (2, 1, 1, Lk)],
                                                                    (2, 4, Lq, D), 2)
        yield "plain", None, lambda Lq=Lq, Lk=Lk: run(Lq, Lk, 4, None, None, 0, inference=True)
        if Lq == Lk:
            yield "light", {"_attn_fwd"}, lambda Lq=Lq: run(Lq, Lq, 2, None, None, 2, inference=True)
            yield "light", {"_attn_fwd"}, lambda Lq=Lq: run(Lq, Lq, 2, None, (2, 4, Lq, D), 2, inference=True,
                                                            train=False)
        yield "bool", None, lambda Lq=Lq, Lk=Lk: run(Lq, Lk, 4, [(2, 1, 1, Lk)], (2, 4, Lq, 1), 1, bool_mask=True)
        yield "dq-split", {"_attn_bwd_dq"}, lambda Lq=Lq, Lk=Lk: run(Lq, Lk, 2, [(2, 4, Lq, Lk)], (2, 4, Lq, D), 2,
                                                                   q_rows=1)
        if Lq == Lk and dtype != torch.float16:  # bf16's registers and shared memory are fp16's
            yield "mods", None, lambda Lq=Lq: run(Lq, Lq, 2, [(2, 4, Lq, Lq)], (2, 4, Lq, D), 2, mods=all_mods)
            yield "mods-bcast", {"_attn_bwd_dmask"}, lambda Lq=Lq: run(Lq, Lq, 2, [(1, 1, Lq, Lq), (2, 1, 1, Lq)],
                                                                       (2, 4, Lq, D), 2, mods=all_mods)
            if D in DROPOUT_HEAD_DIMS or FULL:
                yield "dropout", None, lambda Lq=Lq: run(Lq, Lq, 2, [(2, 4, Lq, Lq)], (2, 4, Lq, D), 2, drop=dropout)
            yield "dropout-bcast", {"_attn_bwd_dmask"}, lambda Lq=Lq: run(
                Lq, Lq, 2, [(1, 1, Lq, Lq), (2, 1, 1, Lq)], (2, 4, Lq, D), 2, drop=dropout)
            yield "mods-dropout", None, lambda Lq=Lq: run(Lq, Lq, 2, [(2, 4, Lq, Lq)], (2, 4, Lq, D), 2, mods=all_mods,
                                                          drop=dropout)


def _decode_scenarios(dtype, D):
    """attention_kvcache_fwd: decode: a paged cache, causal, an elementwise gate (the heaviest launch), once split
    over the keys (one sequence, one kv head: the split kernel writes the workspace, then the merge) with the most
    query rows a program takes (GQA group 16 x Lq 4), once in one split (a large batch: the split kernel writes
    the gated output) with one query row (Lq 1, no GQA: a 16-row tile). decode-contig: a contiguous cache, both
    ways, not causal, no gate, GQA group 4 x Lq 1."""
    import torch
    from fastattn.triton_kernels import decode as Dk
    mk = lambda *s, dt=dtype: torch.empty(*s, dtype=dt, device="meta")

    def run(B, Hq, Hkv, Lq, paged, causal, gate):
        P, pages = 16, 2048                                    # 32k keys a sequence
        q = mk(B, Hq, Lq, D)
        if paged:
            k, v = mk(B * pages, Hkv, P, D), mk(B * pages, Hkv, P, D)
            table = mk(B, pages, dt=torch.int32)
        else:
            k, v, table = mk(B, Hkv, P * pages, D), mk(B, Hkv, P * pages, D), None
        g = mk(B, Hq, Lq, D) if gate else None
        Dk.attention_kvcache_fwd(q, k, v, mk(B, dt=torch.int32), table, g, 0.125, 2 if causal else 0)

    if dtype == torch.float16 and not FULL:
        return
    yield "decode", None, lambda: run(1, 16, 1, 4, True, True, True)
    yield "decode", None, lambda: run(256, 8, 8, 1, True, True, True)
    yield "decode-contig", None, lambda: run(1, 8, 2, 1, False, False, False)
    yield "decode-contig", None, lambda: run(256, 8, 2, 1, False, False, False)


def _varlen_scenarios(dtype, D):
    """The same kernels over packed sequences (VARLEN: offsets from cu_seqlens, the packed out / lse strides): an
    elementwise gate, GQA, causal bottom-right, an lse gradient (every kernel); and the forward alone, every kept
    config, without a gate (training and inference) and with one for inference: a launch with less to do was not
    always lighter for ptxas (without a gate, one spilled where the gated one did not). Lengths are the launch's
    max_seqlen: long, and a 16-row query side."""
    import torch
    from fastattn.triton_kernels import attention as A
    mk = lambda *s, dt=dtype: torch.empty(*s, dtype=dt, device="meta")

    def run(Lq, Lk, gate, inference=False, train=True):
        B, Hq, Hkv = 2, 4, 2
        q, k, v = mk(B * Lq, Hq, D), mk(B * Lk, Hkv, D), mk(B * Lk, Hkv, D)
        seqs = (mk(B + 1, dt=torch.int32), mk(B + 1, dt=torch.int32), Lq, Lk)
        g = mk(B * Lq, Hq, D) if gate else None
        if inference:
            A.varlen_attention_fwd(q, k, v, *seqs, g, 0.125, 2, need_acc=False)
        if not train:
            return
        out, lse, out_acc = A.varlen_attention_fwd(q, k, v, *seqs, g, 0.125, 2)
        A.varlen_attention_bwd(mk(B * Lq, Hq, D), q, k, v, out_acc if out_acc.numel() else out, lse, *seqs, g,
                               mk(Hq, B * Lq, dt=torch.float32), 0.125, 2)

    if dtype == torch.float16 and not FULL:
        return
    for Lq, Lk in ((1024, 1024), (16, 1024)):
        yield "varlen", None, lambda Lq=Lq, Lk=Lk: run(Lq, Lk, True)
        if Lq == Lk:
            yield "varlen-infer", {"_attn_fwd"}, lambda Lq=Lq: run(Lq, Lq, False, inference=True)
            yield "varlen-infer", {"_attn_fwd"}, lambda Lq=Lq: run(Lq, Lq, True, inference=True, train=False)


def _gate_scenarios(dtype, D):
    """softmax_gate / score_softmax_gate forward and backward: the one-pass kernel (the largest item it
    takes) and the two-pass kernels (long N); plain, and full: mask, pooling, an alpha gradient."""
    import torch
    from fastattn.triton_kernels import configs as C, softmax_gate as G
    mk = lambda *s, dt=dtype: torch.empty(*s, dtype=dt, device="meta")
    H = next(h for h in (GATE_HEADS, 4, 3, 2, 1) if D % h == 0)   # heads must divide D

    def run(N, full):
        x, scores, w = mk(2, N, D), mk(2, N, H), mk(H, D)
        mask = mk(2, N, dt=torch.bool) if full else None
        y, alpha = G.softmax_gate_fwd(scores, x, mask, full)
        dy = mk(*y.shape)
        dalpha = mk(2, N, H, dt=torch.float32) if full else None
        G.softmax_gate_bwd(dy, x, alpha, dalpha, full)
        y, alpha = G.score_softmax_gate_fwd(x, w, mask, 0.5, full)
        G.score_softmax_gate_bwd(dy, x, w, alpha, dalpha, 0.5, full)

    # fp16 and bf16 differ only in the conversions at loads and stores: the same registers within a few, far below
    # the limit (bench/results/triton_aot.txt); fp16 is compiled with --full
    half = "-fp16" if dtype == torch.float16 else ""
    fused_n = C.FUSED_MAX_ELEMS // C.dot_block(D)
    for N in (fused_n, 4096):
        yield "gate-plain" + half, None, lambda N=N: run(N, False)
        yield "gate-full" + half, None, lambda N=N: run(N, True)


# attention_pool's kernels loop over the features (D) and hidden units (Hd) in fixed tiles: two sizes, one a multiple
# of 16 (the runtime's divisibility on sizes and row strides) and one not
POOL_DIMS = (64, 72)


def _pool_scenarios(dtype, D):
    """attention_pool forward and backward over packed bags, D features and Hd = D hidden units: pool: gated, both
    biases, a mask, 4 branches, the scores returned and the gradients of lse and the scores (the heaviest
    specialisation of every kernel); pool-plain: ungated, no bias or mask, one branch (--full)."""
    import torch
    from fastattn.triton_kernels import attention_pool as P
    mk = lambda *s, dt=dtype: torch.empty(*s, dtype=dt, device="meta")
    if D not in POOL_DIMS:
        return

    def run(full):
        N, B, K = 4096, 4, 4 if full else 1
        x, offsets, V, w = mk(N, D), mk(B + 1, dt=torch.int64), mk(D, D), mk(D, K)
        U, bV, bU = (mk(D, D), mk(D), mk(D)) if full else (None, None, None)
        mask = mk(N, dt=torch.bool) if full else None
        y, lse, _ = P.attention_pool_fwd(x, offsets, mask, V, U, w, bV, bU, full)
        stat = lambda *s: mk(*s, dt=torch.float32)
        P.attention_pool_bwd(stat(B, K, D), x, offsets, mask, V, U, w, bV, bU, y, lse,
                             stat(B, K) if full else None, stat(N, K) if full else None)

    yield "pool", None, lambda: run(True)
    yield "pool-plain", None, lambda: run(False)


# variants compiled by default; --full adds the others (their specialisations are lighter than full's)
CI_VARIANTS = {"full", "bcast", "light", "varlen", "gate-plain", "gate-full", "decode", "mods", "dropout", "pool"}
ALL_VARIANTS = CI_VARIANTS | {"plain", "bool", "decode-contig", "varlen-infer", "gate-plain-fp16", "gate-full-fp16",
                             "dq-split", "mods-bcast", "dropout-bcast", "mods-dropout", "pool-plain"}


# --------------------------------------------------------------------------------------- specialising
@dataclass
class Job:
    arch: int
    module: str
    name: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    config: str
    flags: str                                     # the kernel's own constexpr switches, as launched
    contexts: list = field(default_factory=list)   # (dtype, D, variant) that launch this compile

    def key(self):
        return (self.arch, self.module, self.name, repr(sorted(self.signature.items())),
                repr(sorted(self.constexprs.items())), repr(sorted(self.attrs.items())),
                repr(sorted(self.options.items())))


def _kernel_name(kernel):
    return getattr(kernel, "fn", kernel).__name__


def _flags(fn, kwargs):
    """Declared constexprs other than tiles and derived ones: True flags by name, other values as K=V."""
    out = []
    for p in fn.params:
        if not p.is_constexpr or p.name.startswith("BLOCK_") or p.name in ("DOT_PREC", "ALIGN") \
                or p.name not in kwargs:
            continue
        v = kwargs[p.name]
        if v is True:
            out.append(p.name)
        elif v is not False:
            out.append(f"{p.name}={v}")
    return " ".join(out) or "-"


def _config_label(kw, num_warps, num_stages):
    if "BLOCK_M" in kw and "BLOCK_N" in kw:
        tiles = f"{kw['BLOCK_M']}x{kw['BLOCK_N']}"
    else:   # fixed-tile kernels: every tile, m64 dv128 / n64 d128 h16
        tiles = " ".join(f"{k[6:].lower()}{v}" for k, v in sorted(kw.items()) if k.startswith("BLOCK_"))
    return f"{tiles} w{num_warps} s{num_stages}"


def _specialise(launch, arch, backend, binders, light_only=False):
    """Jobs for one recorded launch: one per kept config of an autotuned kernel (``light_only``: of those
    marked so alone; the other variants compile the rest), else one."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import create_function_from_signature
    kernel = launch.kernel
    if isinstance(kernel, Autotuner):
        # what Autotuner.run does before benchmarking: prune with the launch's own arguments
        kernel.nargs = dict(zip(kernel.arg_names, launch.args))
        try:
            configs = [c.all_kwargs() for c in kernel.prune_configs(dict(launch.kwargs))
                       if getattr(c, "light_only", False) or not light_only]
        finally:
            kernel.nargs = None
        fn = kernel.fn
    else:
        configs, fn = [{}], kernel
    if fn not in binders:
        binders[fn] = create_function_from_signature(fn.signature, fn.params, backend)
    jobs = []
    for cfg in configs:
        kwargs = {**launch.kwargs, **cfg}
        bound, spec, options = binders[fn](*launch.args, **kwargs)
        opts, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
        opts = dict(opts.__dict__)
        tiles = {k: v for k, v in kwargs.items() if k.startswith("BLOCK_")}
        jobs.append(Job(arch, fn.fn.__module__, fn.__name__, signature, constexprs, attrs, opts,
                        _config_label(tiles, opts["num_warps"], opts["num_stages"]), _flags(fn, kwargs)))
    return jobs


def collect_jobs(arches, dtypes, head_dims, fp32_head_dims, variants):
    import torch
    from fastattn.triton_kernels import configs as C
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    jobs = {}
    for arch in arches:
        # the prune functions size configs for this target's shared memory (meta tensors have no device)
        os.environ["FASTATTN_TRITON_AOT_ARCH"] = str(arch)
        backend = make_backend(GPUTarget("cuda", arch, 32))
        binders = {}
        for dname in dtypes:
            dtype = getattr(torch, DTYPES[dname])
            dims = fp32_head_dims if dname == "fp32" else head_dims
            scenarios = [(D, (_attention_scenarios, _varlen_scenarios, _decode_scenarios, _gate_scenarios,
                              _pool_scenarios)) for D in dims]
            # and the gates at the largest head dim whose float32 scores (float64 dots) the one-pass kernel makes
            if dname == "fp32" and C.FUSED_FP32_SCORES_MAX_D not in dims:
                scenarios.append((C.FUSED_FP32_SCORES_MAX_D, (_gate_scenarios,)))
            for D, makers in scenarios:
                for variant, kernels, thunk in itertools.chain(*(make(dtype, D) for make in makers)):
                    if variant not in variants:
                        continue
                    with _recording() as rec:
                        thunk()
                    for launch in rec.launches:
                        if kernels is not None and _kernel_name(launch.kernel) not in kernels:
                            continue
                        for job in _specialise(launch, arch, backend, binders, light_only=variant == "light"):
                            job = jobs.setdefault(job.key(), job)
                            if (dname, D, variant) not in job.contexts:
                                job.contexts.append((dname, D, variant))
    return list(jobs.values())


# ------------------------------------------------------------------------------------------- compiling
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def _quiet():
    # triton 3.9 warns once per process that its fp-fusion default will change; the check compiles with
    # the default the runtime uses
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")


def _worker_init(cache_root):
    os.environ["TRITON_CACHE_DIR"] = cache_root
    _quiet()


def compile_job(job: Job, cache_root: str) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.autotuner import Autotuner
    fn = getattr(importlib.import_module(job.module), job.name)
    if isinstance(fn, Autotuner):
        fn = fn.fn
    cache = tempfile.mkdtemp(dir=cache_root)
    triton.knobs.cache.dir = cache           # a fresh cache: ptxas runs, and its log is printed
    triton.knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    t0 = time.perf_counter()
    res = {"error": None}
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(ASTSource(fn, job.signature, job.constexprs, job.attrs),
                               target=GPUTarget("cuda", job.arch, 32), options=job.options)
        res["shared"] = int(k.metadata.shared)
        text = log.getvalue()
        frame, regs = _PTXAS_FRAME.search(text), _PTXAS_REGS.search(text)
        if frame is None or regs is None:
            raise RuntimeError(f"no ptxas usage in the log: {text[-500:]!r}")
        res.update(regs=int(regs.group(1)), stack=int(frame.group(1)), spill_stores=int(frame.group(2)),
                   spill_loads=int(frame.group(3)))
    except Exception as e:                   # reported as a failing row, the sweep goes on
        res["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    res["seconds"] = time.perf_counter() - t0
    return res


def _cost(job):
    """Rough compile-time order: longest first keeps every process busy to the end."""
    fp32 = any(c[0] == "fp32" for c in job.contexts)
    return fp32, job.name.startswith("_attn"), max(c[1] for c in job.contexts)


# ------------------------------------------------------------------------------------------- reporting
def _status(job, res):
    if res["error"]:
        return "ERROR"
    if res["shared"] > SMEM_LIMIT[job.arch]:
        return "OVER-SMEM"
    if res["spill_stores"] or res["stack"]:
        return "SPILL"
    return "ok"


def _row_context(job):
    dname, D, variant = job.contexts[0]
    Ds = sorted({c[1] for c in job.contexts if c[0] == dname})
    return dname, ",".join(map(str, Ds)), "+".join(sorted({c[2] for c in job.contexts}))


def format_table(results):
    header = ("arch", "kernel", "dtype", "D", "variant", "config", "flags", "shared_B", "regs", "spill_st", "stack",
              "status")
    rows = []
    for job, res in results:
        dname, Ds, variants = _row_context(job)
        err = res["error"] is not None
        rows.append((f"sm_{job.arch}", job.name, dname, Ds, variants, job.config, job.flags,
                     "-" if err else str(res["shared"]), "-" if err else str(res["regs"]),
                     "-" if err else str(res["spill_stores"]), "-" if err else str(res["stack"]),
                     _status(job, res)))
    order = {"fp16": 0, "bf16": 1, "fp32": 2}
    rows.sort(key=lambda r: (r[0], r[1], order.get(r[2], 9), int(r[3].split(",")[0]), r[4], r[5], r[6]))
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def toolchain(arches):
    """triton's version and the ptxas release it runs per arch (3.9 runs a newer ptxas for sm_90)."""
    import triton
    from triton.backends.nvidia.compiler import get_ptxas_version
    parts = [f"triton {triton.__version__}"]
    for arch in arches:
        m = re.search(r"release (\S+),", get_ptxas_version(arch))
        parts.append(f"ptxas {m.group(1) if m else '?'} for sm_{arch}")
    return ", ".join(parts)


def summary(results, arches):
    lines = []
    for arch in arches:
        rs = [(j, r) for j, r in results if j.arch == arch]
        st = [_status(j, r) for j, r in rs]
        lines.append(f"sm_{arch}: {len(rs)} compiles, {st.count('OVER-SMEM')} over the shared-memory limit "
                     f"({SMEM_LIMIT[arch]} B), {st.count('SPILL')} spilling (not over the limit), "
                     f"{st.count('ERROR')} failed to compile")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="80,90", help="compute capabilities, comma-separated (80, 90)")
    ap.add_argument("--dtypes", default="fp16,bf16,fp32",
                    help="fp16, bf16, fp32 (fp32 over the head dims of --fp32-heads)")
    ap.add_argument("--heads", help=f"head dims (default {','.join(map(str, HEAD_DIMS))})")
    ap.add_argument("--fp32-heads", help=f"fp32 head dims (default {','.join(map(str, FP32_SUBSET_HEAD_DIMS))}; "
                                         "--full: those of --heads)")
    ap.add_argument("--full", action="store_true", help="every variant (plain, bool mask too), more head dims, fp32 at each")
    ap.add_argument("--quick", action="store_true", help=f"head dims {','.join(map(str, QUICK_HEAD_DIMS))} only")
    ap.add_argument("--kernels", help="only kernels whose name contains one of these (comma-separated)")
    ap.add_argument("--variants", help=f"only these variants (comma-separated, of {','.join(sorted(ALL_VARIANTS))})")
    ap.add_argument("-j", "--jobs", type=int, default=len(os.sched_getaffinity(0)), help="compile processes")
    ap.add_argument("--table", help="also write the table (and the summary) to this file")
    ap.add_argument("--list", action="store_true", help="list the compiles, do not run them")
    ap.add_argument("-v", "--verbose", action="store_true", help="a line per compile, with its time")
    args = ap.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("check_triton_aot: unset TRITON_INTERPRET (the configs under test are the GPU ones)")
    arches = [int(a) for a in args.arch.split(",")]
    for a in arches:
        if a not in SMEM_LIMIT:
            sys.exit(f"check_triton_aot: unknown arch {a} (known: {sorted(SMEM_LIMIT)})")
    dtypes = [d for d in args.dtypes.split(",") if d]
    heads = (tuple(int(d) for d in args.heads.split(",")) if args.heads
             else QUICK_HEAD_DIMS if args.quick else FULL_HEAD_DIMS if args.full else HEAD_DIMS)
    fp32_heads = (tuple(int(d) for d in args.fp32_heads.split(",")) if args.fp32_heads
                  else heads if args.full else FP32_SUBSET_HEAD_DIMS)

    _quiet()
    cache_root = tempfile.mkdtemp(prefix="fastattn-triton-aot-")
    os.environ["TRITON_CACHE_DIR"] = cache_root   # before triton is imported: nothing lands in ~/.triton
    try:
        t0 = time.perf_counter()
        variants = ALL_VARIANTS if args.full else CI_VARIANTS
        global FULL
        FULL = args.full
        if args.variants:
            variants = set(args.variants.split(","))
            if not variants <= ALL_VARIANTS:
                sys.exit(f"check_triton_aot: unknown variants {sorted(variants - ALL_VARIANTS)}")
        jobs = collect_jobs(arches, dtypes, heads, fp32_heads, variants)
        if args.kernels:
            pats = args.kernels.split(",")
            jobs = [j for j in jobs if any(p in j.name for p in pats)]
        jobs.sort(key=_cost, reverse=True)
        print(f"check_triton_aot: {len(jobs)} compiles (arch {args.arch}, dtypes {','.join(dtypes)}, head dims "
              f"{','.join(map(str, heads))}; fp32 {','.join(map(str, fp32_heads))}), {args.jobs} processes",
              flush=True)
        if args.list:
            for j in jobs:
                print(f"sm_{j.arch} {j.name} {j.config} {j.contexts}")
            return 0
        results = []
        import multiprocessing as mp
        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                 initargs=(cache_root,)) as pool:
            futs = {pool.submit(compile_job, j, cache_root): j for j in jobs}
            for n, f in enumerate(as_completed(futs), 1):
                job = futs[f]
                res = f.result()
                results.append((job, res))
                st = _status(job, res)
                if st != "ok" or n % 25 == 0 or args.verbose:
                    dname, Ds, variants = _row_context(job)
                    print(f"  [{n}/{len(jobs)}] sm_{job.arch} {job.name} {dname} D={Ds} {job.config}: {st}"
                          + (f" ({res['error']})" if res["error"] else "") + f" [{res['seconds']:.1f} s]", flush=True)
        elapsed = time.perf_counter() - t0
    finally:
        shutil.rmtree(cache_root, ignore_errors=True)

    table = format_table(results)
    summ = summary(results, arches)
    bad = [(j, r) for j, r in results if _status(j, r) != "ok"]
    if bad:
        print(f"\nFAILED: {len(bad)} kept configs cannot launch, spill or do not compile:")
        for j, r in sorted(bad, key=lambda x: (x[0].arch, x[0].name, x[0].config)):
            dname, Ds, variants = _row_context(j)
            print(f"  sm_{j.arch} {j.name} {dname} D={Ds} {variants} {j.config} [{j.flags}]: {_status(j, r)} "
                  + (r["error"] if r["error"] else
                     f"shared {r['shared']} B (limit {SMEM_LIMIT[j.arch]}), {r['regs']} regs, "
                     f"{r['spill_stores']} B spill stores, {r['stack']} B stack"))
    if args.table:
        with open(args.table, "w") as f:
            f.write(f"# python scripts/check_triton_aot.py {' '.join(argv if argv is not None else sys.argv[1:])}\n"
                    f"# {toolchain(arches)}\n{table}\n\n{summ}\n")
    print("\n" + table + "\n\n" + summ + f"\n{toolchain(arches)}; {len(results)} compiles in {elapsed:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
