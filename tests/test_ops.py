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


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_torch_compile_with_score_modifiers(dynamic):
    """The window, softcap and ALiBi slopes pass through torch.compile(fullgraph=True) to the kernels, forward and
    backward, at two lengths (one graph with dynamic shapes)."""
    import torch
    import fastattn

    def f(q, k, v, slopes):
        return fastattn.attention(q, k, v, causal=True, window_size=(3, -1), softcap=5.0, alibi_slopes=slopes,
                                  backend="cpu")

    compiled = torch.compile(f, fullgraph=True, dynamic=dynamic, backend="eager")
    slopes = torch.tensor([0.5, 0.25])
    for L in (9, 13):
        q, k, v = (torch.randn(1, 2, L, 16, requires_grad=True) for _ in range(3))
        got = compiled(q, k, v, slopes)
        want = f(q, k, v, slopes)
        torch.testing.assert_close(got, want)
        g = torch.randn_like(want)
        torch.testing.assert_close(torch.autograd.grad(got, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g))
