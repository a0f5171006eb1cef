"""Version shims that let the Triton kernels run on every torch / triton / numpy fastattn is tested
with (CI: torch 2.13, triton 3.9; the GPU machine: torch 2.11, triton 3.6; see
scripts/second_stack.sh).

``wrap_triton``: under TRITON_INTERPRET=1, ``triton.jit`` makes an ``InterpretedFunction`` instead
of a ``JITFunction`` (and ``triton.autotune`` wraps that). torch 2.13's
``torch.library.wrap_triton`` hands such kernels back unwrapped, to be launched eagerly; torch
2.11's rejects a bare one ("wrap_triton only works on functions annotated with triton.jit or
triton.autotune") and wraps an autotuned one into a launcher that fails when called ("'function'
object has no attribute 'fn'"). This ``wrap_triton`` returns interpreted kernels itself and leaves
compiled ones to torch.

Interpreter scalars: Triton's interpreter holds every scalar (kernel arguments, program ids and
what is computed from them) as a one-element 1-D numpy array, and the ``__index__`` it gives
``tl.tensor`` is ``int(data)``. numpy 2.4 refuses ``int()`` of an array that is not 0-d ("only
0-dimensional arrays can be converted to Python scalars"), so every ``for i in range(lo, hi, STEP)``
with run-time bounds fails in triton 3.6's interpreter (newer ones squeeze first).
:func:`fix_interpreter_scalar_index` gives ``__index__`` ``int(data.item())`` where the installed
interpreter's fails; importing this module applies it when TRITON_INTERPRET=1.
"""
from __future__ import annotations

import operator
import os
from typing import Any, Callable

from torch.library import wrap_triton as _torch_wrap_triton

__all__ = ["wrap_triton", "is_interpreted_kernel", "fix_interpreter_scalar_index"]


def is_interpreted_kernel(kernel: Any) -> bool:
    """True when ``kernel`` (a ``triton.jit`` function, possibly under ``triton.autotune`` /
    ``triton.heuristics``) runs in Triton's interpreter."""
    try:
        from triton.runtime.autotuner import Autotuner, Heuristics
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    seen = set()
    while isinstance(kernel, (Autotuner, Heuristics)) and id(kernel) not in seen:
        seen.add(id(kernel))
        kernel = kernel.fn
    return isinstance(kernel, InterpretedFunction)


def wrap_triton(kernel: Callable, /) -> Any:
    """``torch.library.wrap_triton``, except that interpreted kernels come back as they are."""
    if is_interpreted_kernel(kernel):
        return kernel
    return _torch_wrap_triton(kernel)


def _scalar_index(self) -> int:
    return int(self.handle.data.item())


def fix_interpreter_scalar_index() -> bool:
    """Makes the interpreter's ``tl.tensor.__index__`` accept one-element arrays if it does not.
    Returns whether a fix is in place. Probes the interpreter's own patch on a scalar first, so an
    interpreter that works (or whose internals differ) is left alone."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter as interp
        patch_tensor = interp._patch_lang_tensor
        scope_cls, handle_cls = interp._LangPatchScope, interp.TensorHandle
    except (ImportError, AttributeError):
        return False
    if getattr(patch_tensor, "_fastattn_scalar_index", False):
        return True
    scope = scope_cls()
    try:
        patch_tensor(tl.tensor, scope)
        scalar = tl.tensor(handle_cls(np.array([3], dtype=np.int32), tl.int32), tl.int32)
        operator.index(scalar)
        return False
    except TypeError:
        pass
    except Exception:   # internals other than the ones probed for: not ours to change
        return False
    finally:
        scope.restore()

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", _scalar_index)   # restored (LIFO) with the rest of the scope

    patched._fastattn_scalar_index = True
    interp._patch_lang_tensor = patched
    return True


if os.environ.get("TRITON_INTERPRET", "0") == "1":
    fix_interpreter_scalar_index()
