"""torch.library registration of the C++ ops (CPU kernels): opcheck (schemas, fake impls, autograd)
and torch.compile(fullgraph=True) through every op."""
import pytest

import backend_checks as bc


@pytest.mark.parametrize("sample", range(4))
def test_opcheck_attention(sample):
    bc.opcheck_attention("", sample)


@pytest.mark.parametrize("sample", [0, 2])
def test_opcheck_attention_with_score_modifiers(sample):
    bc.opcheck_attention("", sample, score_mods=True)


@pytest.mark.parametrize("pool", [False, True])
def test_opcheck_softmax_gates(pool):
    bc.opcheck_softmax_gates("", pool)


@pytest.mark.parametrize("backend", ["cpu", "auto"])
def test_torch_compile_fullgraph(backend):
    bc.torch_compile_fullgraph(backend)


def test_cpu_backend_declares_its_kernels():
    bc.declared_kernels_are_registered("cpu", "CPU")


def test_opcheck_varlen_and_kvcache():
    bc.opcheck_varlen_and_kvcache("")
