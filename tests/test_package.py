"""Packaging: the installed layout, the extension, and the Triton kernels' package name."""
import importlib.util
import os

import fastattn


def test_extension_is_loaded_and_reports_its_build():
    from fastattn import ops
    assert ops.extension_error() is None, ops.extension_error()
    info = ops._C.build_info()
    assert info["version"] == fastattn.__version__
    assert isinstance(info["cuda"], bool)


def test_triton_kernels_install_under_fastattn():
    import fastattn.triton_kernels as ours
    assert os.path.dirname(ours.__file__).endswith(os.path.join("triton_kernels"))
    # the global name belongs to Triton's own package (or nobody): never to fastattn's folder
    spec = importlib.util.find_spec("triton_kernels")
    assert spec is None or os.path.dirname(spec.origin) != os.path.dirname(ours.__file__)


def test_python_contract_matches_the_header():
    """fastattn/contract.py mirrors csrc/attention_contract.h: every code and constant the extension exports
    has the same value in Python, and Python defines no code the header lacks."""
    from fastattn import contract, ops
    exported = ops._C.contract()
    assert exported == {name: getattr(contract, name, None) for name in exported}
    mirrored = {n for n in vars(contract) if n.isupper() and not n.startswith("_")}
    assert mirrored == set(exported)
