"""The CUDA emulation (csrc/cuda/emu/emu.h) as a backend of the tests: csrc/cuda's binding and kernels,
built for the CPU and run on CPU tensors as ``backend="cuda_emu"``.

``load()`` builds (cached under build/cuda_emu, or $FASTATTN_EMU_BUILD) and loads the module, defines
``torch.ops.fastattn.cuda_emu_*`` with the schemas of csrc/fastattn.cpp, registers their autograd as
the other backends do (fastattn.ops) and the backend itself. ``kernels(mutations)`` builds another
copy of the kernels (a mutated one, for the mutation tests) and ``use(path)`` runs it.
"""
from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os

import torch

import fastattn  # noqa: F401  (loads fastattn._C: the schemas the emulated ops copy)
from fastattn import ops
from fastattn.backends import (CUDA_KERNELS, CudaBackend, FusedBackend, cuda_kernels_unsupported,
                               register as register_backend)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("fastattn_emu_build", os.path.join(REPO, "csrc", "cuda", "emu", "build.py"))
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)

PREFIX = "cuda_emu_"
# varlen_attention_bwd is defined without a kernel, as on a GPU (csrc/fastattn.cpp has its schema, csrc/cuda no
# kernel): the fakes and autograd of register_varlen_attention need the op, and the backend then refuses a gradient
OPS = ("attention_fwd", "attention_bwd", "varlen_attention_fwd", "varlen_attention_bwd", "attention_kvcache_fwd",
       "softmax_gate_fwd", "softmax_gate_bwd", "score_softmax_gate_fwd", "score_softmax_gate_bwd",
       "attention_pool_fwd", "attention_pool_bwd")
_STATE: dict = {}


def build_dir() -> str:
    return os.environ.get("FASTATTN_EMU_BUILD", os.path.join(REPO, "build", "cuda_emu"))


def jobs() -> int:
    return int(os.environ.get("MAX_JOBS", os.cpu_count() or 1))


class EmulatedCudaBackend(FusedBackend):
    """csrc/cuda under the CPU emulation: what the "cuda" backend runs, with CPU tensors."""
    name = "cuda_emu"
    op_prefix = PREFIX
    kernels = CUDA_KERNELS
    device_types = ("cpu",)
    dropout = CudaBackend.dropout

    def unsupported(self, p):
        return super().unsupported(p) or cuda_kernels_unsupported(p)


def load():
    """Builds and loads the emulation once per process; returns its ctypes handle."""
    if "lib" in _STATE:
        return _STATE["lib"]
    why = build.requirements()
    if why:
        raise RuntimeError(why)
    out = build_dir()
    os.makedirs(out, exist_ok=True)
    module = build.build_module(out, jobs())
    clean = build.build_kernels(out, (), jobs())
    lib_def = torch.library.Library("fastattn", "FRAGMENT")
    for name in OPS:
        schema = str(getattr(torch.ops.fastattn, name).default._schema).split("::", 1)[1]
        lib_def.define(PREFIX + schema)
    lib = ctypes.CDLL(module, mode=ctypes.RTLD_GLOBAL)  # the kernels' builds link against its runtime
    lib.fastattn_emu_last_error.restype = ctypes.c_char_p
    lib.fastattn_emu_use_kernels.argtypes = [ctypes.c_char_p]
    torch.ops.load_library(module)
    ops.register_attention(PREFIX, acc_devices=("cpu",))
    ops.register_varlen_attention(PREFIX, acc_devices=("cpu",))
    ops.register_kvcache(PREFIX)
    ops.register_softmax_gates(PREFIX)
    ops.register_attention_pool(PREFIX)
    register_backend(EmulatedCudaBackend())
    _STATE.update(lib=lib, lib_def=lib_def, clean=clean)
    use(clean)
    return lib


def kernels(mutations=()) -> str:
    """The shared object of csrc/cuda's kernels with ``mutations`` [(file, old, new)] applied."""
    return build.build_kernels(build_dir(), tuple(mutations), jobs())


def use(path: str) -> None:
    lib = load()
    if lib.fastattn_emu_use_kernels(path.encode()) != 0:
        raise RuntimeError(lib.fastattn_emu_last_error().decode())


@contextlib.contextmanager
def using(path: str):
    """Runs the kernels of ``path`` inside the block, the clean build after it."""
    use(path)
    try:
        yield
    finally:
        use(_STATE["clean"])


@contextlib.contextmanager
def settings(arch: int | None = None, schedule: int | None = None, block_ends: int | None = None,
             mma: tuple | None = None):
    """Emulates another architecture's limits (80, 90) or thread order (0 in order, 1 reversed,
    2 + seed random) inside the block; block_ends = n runs only the first and last n blocks of each launch;
    mma = (block, bits): mma.sync sums as the tensor cores do, in groups of ``block`` products cut ``bits`` bits
    below their largest term (csrc/cuda/emu/runtime.cpp: truncating_sum), (0, 0) exactly."""
    lib = load()
    lib.fastattn_emu_set_block_ends.restype = ctypes.c_int64
    lib.fastattn_emu_set_block_ends.argtypes = [ctypes.c_int64]
    old_arch = lib.fastattn_emu_set_arch(arch) if arch is not None else None
    old_schedule = lib.fastattn_emu_set_schedule(schedule) if schedule is not None else None
    old_ends = lib.fastattn_emu_set_block_ends(block_ends) if block_ends is not None else None
    old_mma = None
    if mma is not None:
        old = lib.fastattn_emu_set_mma(*mma)
        if old < 0:
            raise ValueError(f"mma: expected (block, bits), block 0 or a divisor of 16, bits in [0, 52]; got {mma}")
        old_mma = divmod(old, 256)
    try:
        yield
    finally:
        if old_mma is not None:
            lib.fastattn_emu_set_mma(*old_mma)
        if old_arch is not None:
            lib.fastattn_emu_set_arch(old_arch)
        if old_schedule is not None:
            lib.fastattn_emu_set_schedule(old_schedule)
        if old_ends is not None:
            lib.fastattn_emu_set_block_ends(old_ends)


def stats(reset: bool = False) -> dict:
    lib = load()
    out = (ctypes.c_int64 * 5)()
    lib.fastattn_emu_stats(out, int(reset))
    return dict(zip(("launches", "blocks", "threads", "switches", "collectives"), out))


PROBE = os.path.join(REPO, "tests", "cuda_probe", "layout_probe.cu")
PROBE_WORDS = 17


def layout_probe(bf16: bool) -> torch.Tensor:
    """tests/cuda_probe/layout_probe.cu under the emulation: every lane's registers, (32, 17) int32."""
    lib = load()
    probe = ctypes.CDLL(build.build_extra(build_dir(), PROBE))
    probe.fastattn_layout_probe.argtypes = [ctypes.c_int, ctypes.c_void_p]
    lib.fastattn_emu_register_buffer.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    lib.fastattn_emu_unregister_buffer.argtypes = [ctypes.c_void_p, ctypes.c_int]
    out = torch.zeros(32, PROBE_WORDS, dtype=torch.int32)
    lib.fastattn_emu_register_buffer(out.data_ptr(), out.numel() * 4, 1)
    try:
        err = probe.fastattn_layout_probe(int(bf16), out.data_ptr())
    finally:
        lib.fastattn_emu_unregister_buffer(out.data_ptr(), 1)
    if err != 0:
        raise RuntimeError(lib.fastattn_emu_last_error().decode())
    return out
