"""The hand-written CUDA backend (csrc/cuda/) against the reference (docs/CONTRACT.md §4), forward and every
gradient, on a CUDA device. The sweep of fastattn.testing, moved onto what the cuda kernels cover
(float16 / bfloat16, D == Dv in {64, 128}), plus shapes that cross several tiles of both kernels
(128-query forward tiles, 64-key backward tiles, the K/V and Q/dO double buffers) and GQA groups."""
import dataclasses

import pytest
import torch

import fastattn
import backend_checks as bc
from conftest import assert_all_ok, dtype_id
from fastattn.testing import PoolCase, check_attention, check_gate, check_kvcache, check_pool, gate_cases, pool_cases

_CUDA = fastattn.backends()["cuda"]
pytestmark = pytest.mark.skipif(
    not _CUDA["available"],
    reason=f"needs a CUDA device and fastattn._C built with CUDA ({_CUDA['reason']})")

DTYPES = [torch.float16, torch.bfloat16]


CASES = bc.cuda_attention_cases()
GATE_CASES = gate_cases()
# and a bag split several times (256 rows a split) next to bags that start and end inside a split
POOL_CASES = pool_cases() + [PoolCase(bags=(700, 3, 300), D=40, Hd=40, K=5, mask="random", weights_grad=True),
                             PoolCase(bags=(5000, 17), D=512, Hd=128, K=2, mask="random")]
VARLEN_CASES = bc.cuda_varlen_cases()
KVCACHE_CASES = bc.cuda_kvcache_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_cuda_attention_matches_reference(case, dtype):
    assert_all_ok(check_attention(case, dtype, backend="cuda", device="cuda"), case.id)


@pytest.mark.parametrize("case", GATE_CASES, ids=[c.id for c in GATE_CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_cuda_softmax_gates_match_reference(case, dtype):
    assert_all_ok(check_gate(case, dtype, backend="cuda", device="cuda"), case.id)


@pytest.mark.parametrize("case", POOL_CASES, ids=[c.id for c in POOL_CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_cuda_attention_pool_matches_reference(case, dtype):
    assert_all_ok(check_pool(case, dtype, backend="cuda", device="cuda"), case.id)


@pytest.mark.parametrize("case", VARLEN_CASES, ids=[c.id for c in VARLEN_CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_cuda_varlen_forward_matches_reference(case, dtype):
    assert_all_ok(bc.check_varlen_forward(case, dtype, "cuda", device="cuda"), case.id)


@pytest.mark.parametrize("case", KVCACHE_CASES, ids=[c.id for c in KVCACHE_CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_cuda_kvcache_matches_reference(case, dtype):
    assert_all_ok(check_kvcache(case, dtype, backend="cuda", device="cuda"), case.id)


def _qkv(D, Dv=None, dtype=torch.float16):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 2, 33, D, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(1, 2, 40, D, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(1, 2, 40, Dv or D, device="cuda", dtype=dtype, generator=g)
    return q, k, v


def test_cuda_refuses_uncovered_inputs_by_name():
    q, k, v = _qkv(96)
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        fastattn.attention(q, k, v, backend="cuda")
    with pytest.raises(RuntimeError, match="float16 and bfloat16"):
        fastattn.attention(*(t.float() for t in _qkv(64)), backend="cuda")
    # the op itself names the argument (D != Dv slips past the backend's max(D, Dv) check)
    with pytest.raises(RuntimeError, match="head dims"):
        torch.ops.fastattn.attention_fwd(*_qkv(64, Dv=128), None, None, 0.125, 0)


def test_auto_falls_through_for_uncovered_inputs():
    q, k, v = _qkv(96)
    out = fastattn.attention(q, k, v, backend="auto")
    ref = fastattn.attention(q, k, v, backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-2, rtol=1e-2)


def test_cuda_output_written_everywhere_and_finite():
    """Poisoned allocator pages must not survive: every element of out and lse is written."""
    q, k, v = _qkv(128, dtype=torch.bfloat16)
    for _ in range(2):
        torch.empty(1 << 24, device="cuda").fill_(float("nan"))  # poison recently freed memory
        out, lse = fastattn.attention(q, k, v, causal="bottom_right", return_lse=True, backend="cuda")
        assert torch.isfinite(out).all() and torch.isfinite(lse).all()


def test_cuda_transposed_inputs_are_not_copied(monkeypatch):
    bc.transposed_inputs_are_not_copied(monkeypatch, "cuda", "attention_fwd", "cuda", torch.float16)


def test_repeated_keys_keep_dq_exact():
    bc.repeated_keys_keep_dq_exact("cuda", "cuda")


def test_saturated_fp16_rows_meet_the_rule():
    """delta summed by dP's own chain of MMAs: the saturated rows of bc.SATURATED_FP16_SEEDS on the tensor cores."""
    bc.fuzz_passes("attention", "cuda", bc.saturated_fp16_seeds(), "cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_score_softmax_gate_saturated(dtype):
    bc.saturated_score_gates_meet_the_rule("cuda", dtype, "cuda")


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_deterministic_backward(dropout):
    """deterministic: 50 backwards bitwise alike (dq without atomics), and right (torch's setting on, which
    fastattn.attention follows); with dropout too (its own kernels)."""
    case = dataclasses.replace(bc.DETERMINISM_CASE, dropout=dropout)
    bc.backward_is_bitwise_repeatable("cuda", torch.bfloat16, "cuda", case=case)
    bc.deterministic_backward_matches_reference("cuda", "cuda", case)


def test_extreme_dropout_keeps_dv_finite():
    bc.extreme_dropout_keeps_dv_finite("cuda", "cuda")


def test_dropout_is_reproducible_and_fresh_each_call():
    bc.dropout_is_reproducible_and_fresh_each_call("cuda", "cuda", torch.float16, D=64)


def test_fully_masked_rows_are_zero_without_nan():
    bc.fully_masked_rows_are_zero_without_nan("cuda", "cuda", torch.float16, D=64)


@pytest.mark.parametrize("sample", range(4))
def test_opcheck_attention(sample):
    bc.opcheck_attention("", sample, "cuda", torch.float16, D=64, Dv=64)


def test_opcheck_varlen_kvcache():
    bc.opcheck_varlen_and_kvcache("", "cuda", torch.float16, D=64, Dv=64, backward=False)


def test_cuda_backend_declares_its_kernels():
    bc.declared_kernels_are_registered("cuda", "CUDA")


@pytest.mark.parametrize("pool", [False, True])
def test_opcheck_softmax_gates(pool):
    bc.opcheck_softmax_gates("", pool, "cuda", torch.float16)


def test_torch_compile_fullgraph():
    bc.torch_compile_fullgraph("cuda", "cuda", torch.float16, dim=256)  # head dim 64: covered by the kernels


def test_layout_probe_matches_the_emulation():
    """tests/cuda_probe/layout_probe.cu on this GPU and under the CPU emulation (csrc/cuda/emu/): every
    lane's ldmatrix, ldmatrix.trans and mma.sync registers agree bit for bit, so the fragment layouts
    the emulation implements from the PTX ISA are the hardware's."""
    import cuda_emu
    from torch.utils.cpp_extension import load_inline

    why = cuda_emu.build.requirements()
    if why:
        pytest.skip(f"the CUDA emulation cannot be built here: {why}")
    gpu = load_inline(
        "fastattn_layout_probe", functions=["probe"], with_cuda=True,
        cuda_sources=[open(cuda_emu.PROBE).read()], extra_include_paths=[f"{cuda_emu.REPO}/csrc/cuda"],
        cpp_sources=['extern "C" int fastattn_layout_probe(int, uint32_t*);\n'
                     "torch::Tensor probe(bool bf16) {\n"
                     "  auto out = torch::zeros({32, 17}, torch::dtype(torch::kInt32).device(torch::kCUDA));\n"
                     "  TORCH_CHECK(fastattn_layout_probe(bf16, reinterpret_cast<uint32_t*>(out.data_ptr<int>())) == 0);\n"
                     "  return out; }\n"])
    for bf16 in (False, True):
        hw = gpu.probe(bf16).cpu()
        emulated = cuda_emu.layout_probe(bf16)
        bad = (hw != emulated).nonzero().tolist()
        assert not bad, f"{'bf16' if bf16 else 'fp16'}: (lane, word) differing: {bad[:8]}"
