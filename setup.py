"""Build of fastattn and its C++/CUDA extension ``fastattn._C``.

fastattn compiles against the torch that is already installed, so it must be built without build
isolation (a PEP 517 isolated build environment would fetch a second, possibly different torch and
produce an extension with the wrong ABI):

    pip install torch                       # first, the torch you want
    pip install --no-build-isolation .      # then fastattn, built against it

Environment:
    FASTATTN_CUDA=0     never build the CUDA sources (csrc/cuda/), even where nvcc and CUDA torch exist
    FASTATTN_CUDA=1     require them (fail if CUDA torch or nvcc is missing)
    MAX_JOBS=N          parallel compile jobs (ninja)
    CXX=...             the C++ compiler (default c++); one that links libstdc++ statically is replaced
"""
import glob
import os
import shlex
import shutil
import subprocess
import sys
import tempfile

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # the classic isolated-build trap: say what to do instead of "No module named torch"
    sys.exit(
        "fastattn: PyTorch is not importable in this build environment.\n"
        "fastattn builds its extension against the torch you have installed. Install torch first, then\n"
        "    pip install --no-build-isolation .\n"
        "(without --no-build-isolation pip builds in an isolated environment that has no torch)."
    )

HERE = os.path.dirname(os.path.abspath(__file__))


def _links_libstdcxx_statically(cxx):
    """True when ``cxx`` puts libstdc++ itself into a shared library (a toolchain configured with static
    standard libraries). The extension would then carry a second libstdc++ whose locale nobody set up:
    every number formatted into an error message is dropped, or the process crashes. Unknown: False."""
    readelf = shutil.which("readelf")
    if not readelf or not shutil.which(shlex.split(cxx)[0]):
        return False
    with tempfile.TemporaryDirectory() as d:
        src, lib = os.path.join(d, "probe.cpp"), os.path.join(d, "probe.so")
        with open(src, "w") as f:
            f.write("#include <sstream>\nstd::string f(long x) { std::ostringstream s; s << x; return s.str(); }\n")
        if subprocess.run(shlex.split(cxx) + ["-shared", "-fPIC", src, "-o", lib], capture_output=True).returncode:
            return False
        needed = subprocess.run([readelf, "-d", lib], capture_output=True, text=True).stdout
        return "libstdc++" not in needed


def _use_shared_libstdcxx():
    """Keep the extension on the process's own libstdc++ (the one torch uses): if CXX links it statically,
    build with the first g++ / c++ on PATH or in /usr/bin that does not."""
    if not sys.platform.startswith("linux"):
        return
    cxx = os.environ.get("CXX", "c++")
    if not _links_libstdcxx_statically(cxx):
        return
    dirs = os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin"]
    for d in dict.fromkeys(dirs):
        for name in ("g++", "c++"):
            alt = os.path.join(d, name)
            if os.access(alt, os.X_OK) and not _links_libstdcxx_statically(alt):
                print(f"fastattn: CXX={cxx} links libstdc++ statically; building with {alt} instead")
                os.environ["CXX"] = alt
                cc = os.path.join(d, "gcc" if name == "g++" else "cc")
                if os.access(cc, os.X_OK):
                    os.environ["CC"] = cc
                return
    sys.exit(f"fastattn: CXX={cxx} links libstdc++ statically, which breaks the extension's error messages "
             "(and can crash them); set CXX to a C++ compiler that links it as a shared library")


def _want_cuda():
    flag = os.environ.get("FASTATTN_CUDA", "auto").lower()
    have = torch.version.cuda is not None and CUDA_HOME is not None
    if flag in ("0", "false", "off", "no"):
        return False
    if flag in ("1", "true", "on", "yes"):
        if not have:
            sys.exit("fastattn: FASTATTN_CUDA=1 but torch has no CUDA or nvcc/CUDA_HOME was not found")
        return True
    return have and bool(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")))


def _extension():
    _use_shared_libstdcxx()
    rel = lambda pattern: sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))
    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    cxx = ["-O3", "-fopenmp", "-DFASTATTN_VERSION=\"%s\"" % _version()]
    ldflags = ["-fopenmp"]
    if sys.platform == "darwin":  # Apple clang has no -fopenmp: at::parallel_for then runs on torch's own pool
        cxx.remove("-fopenmp")
        ldflags = []
    if _want_cuda():
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0;9.0a"
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch
        nvcc = ["-O3", "--use_fast_math", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
        return CUDAExtension(
            "fastattn._C",
            sources + rel("csrc/cuda/*.cu") + rel("csrc/cuda/*.cpp"),
            include_dirs=[os.path.join(HERE, "csrc")],
            define_macros=[("FASTATTN_WITH_CUDA", "1"), ("FASTATTN_CUDA_ARCHS", '"%s"' % arch)],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=ldflags,
        )
    return CppExtension(
        "fastattn._C",
        sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=ldflags,
    )


def _version():
    with open(os.path.join(HERE, "fastattn", "version.py")) as f:
        return f.read().split("=")[1].strip().strip('"')


setup(
    name="fastattn",
    version=_version(),
    description="Fused score -> softmax -> gating attention kernels (CUDA, Triton, C++ CPU) for PyTorch",
    packages=["fastattn", "fastattn.integrations", "fastattn.triton_kernels"],
    # The Triton kernels live in the top-level triton_kernels/ folder but install as fastattn.triton_kernels:
    # Triton itself ships a global package called triton_kernels, which ours must not shadow.
    package_dir={"fastattn": "fastattn", "fastattn.triton_kernels": "triton_kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"triton": ["triton"], "test": ["pytest"], "plot": ["matplotlib"], "hf": ["transformers"]},
    entry_points={"console_scripts": ["fastattn=fastattn.__main__:main"]},
)
