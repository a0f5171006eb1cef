"""Triton's interpreter with bounds checks and a GPU's tiles: the CPU's stand-in for compute-sanitizer's memcheck.

Inside :func:`checked`, every lane a Triton kernel loads, stores or updates atomically with its mask true
must lie inside the storage of a tensor that launch was given (else :class:`OutOfBounds`, which the
interpreter re-raises as its InterpreterError), and fastattn's attention and softmax-gate kernels run the
config lists and pruning of a GPU of compute capability ``cc`` (the first config that fits, as with FASTATTN_TRITON_AUTOTUNE=0)
instead of the interpreter's one small tile: the tile shapes, masks and ragged edges the GPU compiles.
Where it runs: TRITON_INTERPRET=1 (the interpreter's InterpreterBuilder and GridExecutor are patched,
and restored on exit).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os

import numpy as np
import torch
import triton
import triton.language as tl


class OutOfBounds(AssertionError):
    pass


class _Launch:
    """The storages of the tensors the current launch was given, and its kernel's name."""
    ranges: list = []
    kernel = ""


def _check(ptrs, mask, what):
    addr = np.asarray(ptrs.data)
    lanes = addr.reshape(-1).astype(np.uint64)
    if mask is not None:
        lanes = lanes[np.broadcast_to(np.asarray(mask.data), addr.shape).reshape(-1)]
    if lanes.size == 0:
        return
    elem = ptrs.get_element_ty()
    size = np.uint64(max(1, getattr(elem, "primitive_bitwidth", 8) // 8))
    inside = np.zeros(lanes.shape, bool)
    for lo, hi in _Launch.ranges:
        inside |= (lanes >= np.uint64(lo)) & (lanes + size <= np.uint64(hi))
    if not inside.all():
        first = int(lanes[~inside][0])
        lo, hi = min(_Launch.ranges, key=lambda r: min(abs(first - r[0]), abs(first - r[1])))
        raise OutOfBounds(f"{_Launch.kernel}: {what} of {int((~inside).sum())} lane(s) outside every tensor of the "
                          f"launch (the first at byte {first - lo:+d} of the nearest, a storage of {hi - lo} B)")


def gpu_configs():
    """fastattn.triton_kernels.configs as a GPU process has it (its INTERPRET false). Its pruning targets the
    capability FASTATTN_TRITON_AOT_ARCH names for tensors on no GPU: :func:`checked` sets it to ``cc``."""
    from fastattn.triton_kernels import configs
    spec = importlib.util.spec_from_file_location("fastattn_gpu_configs", configs.__file__)
    mod = importlib.util.module_from_spec(spec)
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        spec.loader.exec_module(mod)
    finally:
        os.environ["TRITON_INTERPRET"] = "1"
    return mod


# each autotuned kernel of attention.py: its config list and pruning function in configs
_AUTOTUNED = {"_attn_fwd": ("FWD_CONFIGS", "prune_fwd"), "_attn_bwd_dkdv": ("BWD_DKDV_CONFIGS", "prune_dkdv"),
              "_attn_bwd_dq": ("BWD_DQ_CONFIGS", "prune_dq"), "_attn_bwd_dmask": ("BWD_DMASK_CONFIGS", "prune_dmask")}


_ABSENT = object()   # an attribute checked() set where there was none (a method of the class): deleted after


def _untimed(*args, config, **kwargs):
    """The autotuner's timing of its one pruned config (triton 3.6 times even one; the interpreter cannot)."""
    return [0.0, 0.0, 0.0]


@contextlib.contextmanager
def checked(cc: int = 90):
    import triton.runtime.interpreter as interp
    from fastattn.triton_kernels import attention, softmax_gate
    assert os.environ.get("TRITON_INTERPRET") == "1", "bounds checks patch Triton's interpreter"
    gpu = gpu_configs()
    builder, executor = interp.InterpreterBuilder, interp.GridExecutor
    patched = {(builder, "create_masked_load"), (builder, "create_masked_store"), (builder, "create_atomic_rmw"),
               (builder, "create_atomic_cas"), (executor, "_init_args_hst"), (attention, "C"), (softmax_gate, "C")}
    tuners = [getattr(attention, name) for name in _AUTOTUNED]
    patched |= {(t, a) for t in tuners for a in ("configs", "early_config_prune", "cache", "_bench")}
    saved = [(obj, name, obj.__dict__.get(name, _ABSENT)) for obj, name in patched]
    env = {k: os.environ.get(k) for k in ("FASTATTN_TRITON_AOT_ARCH", "FASTATTN_TRITON_AUTOTUNE")}
    load, store = builder.create_masked_load, builder.create_masked_store
    rmw, cas, init = builder.create_atomic_rmw, builder.create_atomic_cas, executor._init_args_hst

    def init_args(self, args_dev, kwargs):
        args, kw = init(self, args_dev, kwargs)
        storages = [t.untyped_storage() for t in (*args, *kw.values()) if isinstance(t, torch.Tensor)]
        _Launch.ranges = [(s.data_ptr(), s.data_ptr() + s.nbytes()) for s in storages if s.nbytes()]
        _Launch.kernel = self.fn.__name__
        return args, kw

    def masked_load(self, ptrs, mask, other, *a):
        _check(ptrs, mask, "load")
        return load(self, ptrs, mask, other, *a)

    def masked_store(self, ptrs, value, mask, *a):
        _check(ptrs, mask, "store")
        return store(self, ptrs, value, mask, *a)

    def atomic_rmw(self, op, ptr, val, mask, *a):
        _check(ptr, mask, "atomic update")
        return rmw(self, op, ptr, val, mask, *a)

    def atomic_cas(self, ptr, cmp, val, *a):
        _check(ptr, None, "atomic compare-and-swap")
        return cas(self, ptr, cmp, val, *a)

    builder.create_masked_load, builder.create_masked_store = masked_load, masked_store
    builder.create_atomic_rmw, builder.create_atomic_cas = atomic_rmw, atomic_cas
    executor._init_args_hst = init_args
    attention.C = softmax_gate.C = gpu
    for tuner, (cfgs, prune) in zip(tuners, _AUTOTUNED.values()):
        tuner.configs, tuner.early_config_prune = getattr(gpu, cfgs), getattr(gpu, prune)
        tuner.cache, tuner._bench = {}, _untimed
    os.environ["FASTATTN_TRITON_AOT_ARCH"], os.environ["FASTATTN_TRITON_AUTOTUNE"] = str(cc), "0"
    try:
        yield gpu
    finally:
        for obj, name, value in saved:
            if value is _ABSENT:
                delattr(obj, name)
            else:
                setattr(obj, name, value)
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v



@triton.jit
def copy_prefix(X, Y, n_read, n_write, BLOCK: tl.constexpr):
    """Y[:n_write] = X[:n_write], reading X[:n_read]: the checker's own test plants n_read past X's end."""
    offs = tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < n_read, other=0.0), mask=offs < n_write)
