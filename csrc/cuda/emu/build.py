"""Builds the CUDA emulation (emu.h): csrc/cuda's kernels for the CPU, and the binding that runs them.

Two shared objects, cached under ``out_dir`` by the hash of what goes into them:

- the module, ``fastattn_cuda_emu-<hash>.so``: csrc/cuda/binding.cpp compiled with FASTATTN_CUDA_EMU
  (ops ``torch.ops.fastattn.cuda_emu_*`` on CPU tensors), the runtime (runtime.cpp) and the stubs
  that reach the kernels. Loaded once per process, with RTLD_GLOBAL: the kernels link against it.
- the kernels, ``kernels-<hash>.so``: every csrc/cuda/*.cu, translated (``translate``), compiled with
  g++ and GCC's ThreadSanitizer instrumentation (the runtime implements its hooks: every load and
  store is checked), plus kernel_table.cpp. ``mutations`` build a changed copy (the mutation tests);
  the module switches between builds at run time (``fastattn_emu_use_kernels``).

Needs g++ on x86-64 Linux and CUDA's headers (cuda_fp16.h, cuda_bf16.h, cuda_runtime.h; from the
CUDA toolkit, found through CUDA_HOME or nvcc); ``requirements()`` says what is missing.
"""
from __future__ import annotations

import concurrent.futures
import fcntl
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys

EMU_DIR = os.path.dirname(os.path.abspath(__file__))
CUDA_SRC = os.path.dirname(EMU_DIR)
CSRC = os.path.dirname(CUDA_SRC)  # the backends' shared headers (attention_contract.h, describe.h)
CXX = os.environ.get("CXX", "g++")
COMMON = ["-std=c++17", "-O2", "-fPIC", "-g0", "-Wno-attributes", "-Wno-unknown-pragmas"]
# The kernel files: every load and store calls the runtime's __tsan_* hooks (no libtsan linked).
KERNEL_FLAGS = COMMON + ["-fsanitize=thread", "--param=tsan-instrument-func-entry-exit=0", "-DFASTATTN_CUDA_EMU",
                         # as nvcc builds them (torch.utils.cpp_extension's defines): no implicit half conversions
                         "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                         "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]


def cuda_include() -> str | None:
    """The folder of CUDA's headers, or None."""
    cands = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            cands.append(os.path.join(os.environ[var], "include"))
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "include"))
    cands.append("/usr/local/cuda/include")
    for c in cands:
        if all(os.path.exists(os.path.join(c, h)) for h in ("cuda_fp16.h", "cuda_bf16.h", "cuda_runtime.h")):
            return c
    return None


def requirements() -> str | None:
    """None when the emulation can be built here, else why not."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"the emulation's context switch is written for x86-64 Linux, this is {platform.system()} " \
               f"{platform.machine()}"
    if shutil.which(CXX) is None:
        return f"no C++ compiler {CXX!r} on PATH"
    if cuda_include() is None:
        return "CUDA's headers (cuda_fp16.h, cuda_bf16.h, cuda_runtime.h) were not found: install the CUDA " \
               "toolkit or set CUDA_HOME"
    return None


# ------------------------------------------------------------------------------------- translation
_DYNAMIC = re.compile(r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([\w:]+(?:\s+[\w:]+)*?)\s+(\w+)\s*\[\s*\]\s*;")
_STATIC = re.compile(r"__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([\w:]+(?:\s*<[^;{}]*?>)?)\s+(\w+)\s*((?:\[[^\]]+\])*)\s*;")
_LAUNCH = re.compile(r"([\w:]+(?:<[^<>;(){}]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)


def _split_top(args: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in args:
        if ch in "([{<":
            depth += 1
        elif ch in ")]}>":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts]


def translate(name: str, text: str) -> str:
    """A kernel source as g++ compiles it under the emulation: ``k<<<g, b, s, st>>>(args)`` becomes
    ``::fastattn_emu::launch(k, g, b, s, st, args)``, ``extern __shared__ T x[];`` a pointer to the
    block's dynamic shared memory, ``__shared__ T x[n];`` a reference to the block's object of that
    declaration. Everything else stays as nvcc reads it."""
    line_of = lambda pos: text.count("\n", 0, pos) + 1
    text = _DYNAMIC.sub(lambda m: f"{m.group(1)}* const {m.group(2)} = "
                                  f"reinterpret_cast<{m.group(1)}*>(::fastattn_emu::dynamic_smem());", text)
    text = _STATIC.sub(lambda m: f"{m.group(1)} (&{m.group(2)}){m.group(3)} = ::fastattn_emu::shared_object<"
                                 f"{m.group(1)}{m.group(3)}>(\"{name}:{line_of(m.start())}:{m.group(2)}\");", text)

    def launch(m):
        cfg = _split_top(m.group(2))
        if not 2 <= len(cfg) <= 4:
            raise ValueError(f"{name}: a launch with {len(cfg)} configuration arguments: {m.group(0)!r}")
        cfg += ["0", "nullptr"][len(cfg) - 2:]
        rest = text[m.end():].lstrip()
        sep = "" if rest.startswith(")") else ", "
        return f"::fastattn_emu::launch({m.group(1)}, {', '.join(cfg)}{sep}"

    text = _LAUNCH.sub(launch, text)
    for left in ("__shared__", "<<<"):
        if left in text:
            raise ValueError(f"{name}: the emulation's translation left a {left!r} it does not understand")
    return text


# ------------------------------------------------------------------------------------- building
def _hash(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _write_if_changed(path, text):
    if os.path.exists(path) and _read(path) == text:
        return
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"CUDA emulation build failed:\n{' '.join(cmd)}\n{r.stdout}{r.stderr}")
    return r


def _local_includes(text):
    return re.findall(r'#include\s+"([^"]+)"', text)


def _deps(path, seen=None):
    """The text of a file and of every local header it includes, recursively (for the cache key)."""
    seen = set() if seen is None else seen
    if path in seen or not os.path.exists(path):
        return ""
    seen.add(path)
    text = _read(path)
    out = text
    for inc in _local_includes(text):
        for base in (os.path.dirname(path), CUDA_SRC, CSRC):
            cand = os.path.normpath(os.path.join(base, inc))
            if os.path.exists(cand):
                out += _deps(cand, seen)
                break
    return out


def _sources(mutations):
    """csrc/cuda's kernel files (*.cu and the headers they include), mutated: {name: text}."""
    files = {}
    for n in sorted(os.listdir(CUDA_SRC)):
        if n.endswith((".cu", ".h")):
            files[n] = _read(os.path.join(CUDA_SRC, n))
    for (name, old, new) in mutations:
        if files.get(name, "").count(old) != 1:
            raise ValueError(f"mutation of {name}: {old!r} must occur exactly once")
        files[name] = files[name].replace(old, new)
    return files


def build_kernels(out_dir: str, mutations=(), jobs: int = 2) -> str:
    """The kernels' shared object for csrc/cuda with ``mutations`` [(file, old, new)] applied; cached."""
    inc = cuda_include()
    files = {n: translate(n, t) for n, t in _sources(mutations).items()}
    shared = {f"../{n}": _read(os.path.join(CSRC, n)) for n in sorted(os.listdir(CSRC)) if n.endswith(".h")}
    key = _hash(repr(KERNEL_FLAGS), CXX, *(f"{n}\n{t}" for n, t in sorted({**files, **shared}.items())),
                _deps(os.path.join(EMU_DIR, "kernel_table.cpp")), _deps(os.path.join(EMU_DIR, "prelude.h")))
    so = os.path.join(out_dir, f"kernels-{key}.so")
    if os.path.exists(so):
        return so
    # the translated sources in a directory of this process's own: test workers (pytest-xdist) building the same
    # kernels at once each compile from theirs and remove it; objects and the library are renamed into place
    src = os.path.join(out_dir, f"src-{key}-{os.getpid()}")
    obj = os.path.join(out_dir, "obj")
    os.makedirs(src, exist_ok=True)
    os.makedirs(obj, exist_ok=True)
    for n, t in files.items():
        _write_if_changed(os.path.join(src, n), t)
    flags = KERNEL_FLAGS + ["-include", os.path.join(EMU_DIR, "prelude.h"), "-I", src, "-I", CUDA_SRC,
                            "-I", CSRC, "-I", EMU_DIR, "-I", inc]
    jobs_list = []
    for n in sorted(files):
        if not n.endswith(".cu"):
            continue
        # cache per translation unit: a mutation rebuilds only the files that see it
        tu_key = _hash(repr(KERNEL_FLAGS), CXX, inc, _deps(os.path.join(EMU_DIR, "prelude.h")),
                       _deps(os.path.join(src, n)))
        o = os.path.join(obj, f"{n[:-3]}-{tu_key}.o")
        jobs_list.append((o, [CXX, *flags, "-x", "c++", "-c", os.path.join(src, n), "-o", o]))
    table = os.path.join(obj, f"kernel_table-{_hash(CXX, _deps(os.path.join(EMU_DIR, 'kernel_table.cpp')))}.o")
    jobs_list.append((table, [CXX, *COMMON, "-I", CSRC, "-I", inc, "-c", os.path.join(EMU_DIR, "kernel_table.cpp"),
                             "-o", table]))
    _compile_all(jobs_list, jobs)
    tmp = so + f".tmp{os.getpid()}"
    # -Bsymbolic: the table must point at this build's entry points, not at the module's stubs of the
    # same names (the module is loaded with RTLD_GLOBAL)
    _run([CXX, "-shared", "-Wl,-Bsymbolic", "-o", tmp, *[o for o, _ in jobs_list]])
    os.replace(tmp, so)
    shutil.rmtree(src, ignore_errors=True)
    return so


def build_extra(out_dir: str, path: str) -> str:
    """A kernel file of the tests (``path``, including csrc/cuda's headers), translated and built as a
    shared object of its own; its extern "C" functions are then called through ctypes."""
    inc = cuda_include()
    text = translate(os.path.basename(path), _read(path))
    key = _hash(repr(KERNEL_FLAGS), CXX, text, _deps(os.path.join(EMU_DIR, "prelude.h")),
                _deps(os.path.join(CUDA_SRC, "ptx.h")))
    so = os.path.join(out_dir, f"{os.path.basename(path).split('.')[0]}-{key}.so")
    if os.path.exists(so):
        return so
    src = os.path.join(out_dir, f"{key}-{os.getpid()}-{os.path.basename(path)}")  # per process, as build_kernels
    _write_if_changed(src, text)
    obj = src[:-3] + ".o"
    _run([CXX, *KERNEL_FLAGS, "-include", os.path.join(EMU_DIR, "prelude.h"), "-I", CUDA_SRC, "-I", CSRC,
          "-I", EMU_DIR, "-I", inc, "-x", "c++", "-c", src, "-o", obj])
    tmp = so + f".tmp{os.getpid()}"
    _run([CXX, "-shared", "-Wl,-Bsymbolic", "-o", tmp, obj])
    os.replace(tmp, so)
    for f in (src, obj):
        os.remove(f)
    return so


def _compile_all(jobs_list, jobs):
    """Compiles the objects not yet built. Processes building the same objects at once (test workers) share the
    work: each object is compiled under a lock by whichever takes it first; a process first compiles the objects
    nobody holds, then waits for the others'."""
    todo = [(o, cmd) for o, cmd in jobs_list if not os.path.exists(o)]

    def one(item, wait):
        o, cmd = item
        with open(o + ".lock", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                return item  # another process is compiling it
            if not os.path.exists(o):
                tmp = o + f".tmp{os.getpid()}"
                _run(cmd[:-1] + [tmp])
                os.replace(tmp, o)
        return None

    with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as ex:
        held = [item for item in ex.map(lambda item: one(item, False), todo) if item is not None]
        list(ex.map(lambda item: one(item, True), held))


def build_module(out_dir: str, jobs: int = 2) -> str:
    """The module: binding.cpp under FASTATTN_CUDA_EMU, the runtime and the stubs; cached."""
    import torch
    from torch.utils import cpp_extension

    inc = cuda_include()
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    torch_inc = [f for p in cpp_extension.include_paths() for f in ("-isystem", p)]
    libs = cpp_extension.library_paths()
    srcs = [os.path.join(CUDA_SRC, "binding.cpp"), os.path.join(EMU_DIR, "runtime.cpp"),
            os.path.join(EMU_DIR, "host_stubs.cpp")]
    key = _hash(CXX, torch.__version__, repr(COMMON), *(_deps(s) for s in srcs))
    so = os.path.join(out_dir, f"fastattn_cuda_emu-{key}.so")
    if os.path.exists(so):
        return so
    obj = os.path.join(out_dir, "obj")
    os.makedirs(obj, exist_ok=True)
    base = COMMON + ["-I", CUDA_SRC, "-I", CSRC, "-I", EMU_DIR, "-I", inc]
    objs = [
        (os.path.join(obj, f"binding-{key}.o"),
         [CXX, *base, "-DFASTATTN_CUDA_EMU", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *torch_inc, "-c", srcs[0], "-o", "x"]),
        (os.path.join(obj, f"runtime-{key}.o"), [CXX, *base, "-c", srcs[1], "-o", "x"]),
        (os.path.join(obj, f"host_stubs-{key}.o"), [CXX, *base, "-c", srcs[2], "-o", "x"]),
    ]
    _compile_all(objs, jobs)
    tmp = so + f".tmp{os.getpid()}"
    _run([CXX, "-shared", "-o", tmp, *[o for o, _ in objs], *[f"-L{p}" for p in libs],
          *[f"-Wl,-rpath,{p}" for p in libs], "-lc10", "-ltorch_cpu", "-ltorch", "-ldl", "-lpthread"])
    os.replace(tmp, so)
    return so


if __name__ == "__main__":
    why = requirements()
    if why:
        sys.exit(f"cannot build the CUDA emulation: {why}")
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.dirname(CUDA_SRC)), "build",
                                                             "cuda_emu")
    os.makedirs(out, exist_ok=True)
    print(build_module(out))
    print(build_kernels(out))
