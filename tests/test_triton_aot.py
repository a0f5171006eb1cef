"""scripts/check_triton_aot.py, the ahead-of-time compile check of the Triton kernels (run by .ci/run):
it must report a config that cannot launch and one that spills, and pass a good one. The configs are
planted in the attention forward's table and compiled for sm_90 without a GPU, in this process.
The whole sweep (every variant, head dim and fp32 at each) is the slow test."""
import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") == "1",
                                reason="the interpreter's configs are one small tile per kernel; "
                                       "the check compiles the GPU ones")

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "check_triton_aot.py"


@pytest.fixture
def aot():
    spec = importlib.util.spec_from_file_location("check_triton_aot", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod          # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    yield mod
    del sys.modules[spec.name]


def test_check_reports_over_limit_and_spilling_configs(aot, monkeypatch, tmp_path):
    from fastattn.triton_kernels import configs as C
    monkeypatch.setattr(C, "FWD_HALF", {
        64: [C._cfg(8, 3, 128, 64)],     # the table's own first D 64 config: fits, no spill
        128: [C._cfg(8, 4, 128, 128)],   # 4 stages of 128 keys x (K + V) at D 128: about 290 KB of shared memory
        256: [C._cfg(4, 1, 128, 16)],    # a 128 x 256 fp32 accumulator over 128 threads: 256 registers each
    })
    # compile_job points triton's cache and ptxas log switches at its own; restore them afterwards
    monkeypatch.setattr(triton.knobs.cache, "dir", triton.knobs.cache.dir)
    monkeypatch.setattr(triton.knobs.nvidia, "dump_ptxas_log", triton.knobs.nvidia.dump_ptxas_log)
    monkeypatch.setenv("FASTATTN_TRITON_AOT_ARCH", "90")
    aot._quiet()
    jobs = [j for j in aot.collect_jobs([90], ["fp16"], [64, 128, 256], (), {"full"}) if j.name == "_attn_fwd"]
    status = {}
    for job in jobs:
        res = aot.compile_job(job, str(tmp_path))
        status.setdefault(job.contexts[0][1], set()).add(aot._status(job, res))
    assert status == {64: {"ok"}, 128: {"OVER-SMEM"}, 256: {"SPILL"}}, status


def _kept_configs(aot, head_dims):
    """(arch, kernel, config, its flags, dtype, variant, head block) of every compile of a sweep over head_dims."""
    from fastattn.triton_kernels.configs import head_block
    jobs = aot.collect_jobs([80, 90], list(aot.DTYPES), head_dims, aot.FP32_SUBSET_HEAD_DIMS, aot.CI_VARIANTS)
    return {(j.arch, j.name, j.config, j.flags, dt, variant, head_block(D))
            for j in jobs for dt, D, variant in j.contexts}


def test_quick_sweep_compiles_every_config_the_default_sweep_keeps(aot):
    """CI runs --quick: fewer head dims, but every config kept at any head dim of the default sweep, for each arch,
    kernel, dtype, variant and head block, is compiled at one of them."""
    missing = _kept_configs(aot, aot.HEAD_DIMS) - _kept_configs(aot, aot.QUICK_HEAD_DIMS)
    assert not missing, sorted(missing)[:10]


@pytest.mark.slow
def test_full_sweep_passes():
    """Every kernel x kept config x head dim (16-256, 111 included) x fp16 / bf16 / fp32, every variant,
    sm_80 and sm_90: about 3,200 compiles at about 0.5 s each on 2 cores."""
    r = subprocess.run([sys.executable, str(SCRIPT), "--full"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_kernels_build_with_float_arguments_typed_as_inductor_types_them(aot, monkeypatch, tmp_path):
    """torch.compile (Inductor, torch 2.11) builds a wrapped kernel with its Python float arguments (the
    softmax scales) typed fp64 where triton's launcher says fp32: every kernel that takes one must still
    build, its scale in fp32 (an fp64 scale turned the forward's accumulator fp64 and tl.dot refused it)."""
    import dataclasses
    monkeypatch.setattr(triton.knobs.cache, "dir", triton.knobs.cache.dir)
    monkeypatch.setattr(triton.knobs.nvidia, "dump_ptxas_log", triton.knobs.nvidia.dump_ptxas_log)
    monkeypatch.setenv("FASTATTN_TRITON_AOT_ARCH", "90")
    aot._quiet()
    first = {}
    for job in aot.collect_jobs([90], ["bf16", "fp32"], [32], [32], {"full", "bcast", "gate-full", "decode"}):
        if "fp32" in job.signature.values():
            first.setdefault((job.name, job.contexts[0][0]), job)
    assert {name for name, _ in first} == {"_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq", "_attn_bwd_dmask",
                                           "_gate_fused_fwd", "_score_bwd", "_gate_scores", "_decode_split"}
    errors = {}
    for (name, dtype), job in first.items():
        sig = {k: "fp64" if v == "fp32" else v for k, v in job.signature.items()}
        res = aot.compile_job(dataclasses.replace(job, signature=sig), str(tmp_path))
        if res["error"]:
            errors[f"{name} {dtype}"] = res["error"]
    assert not errors, errors



def test_the_configs_gpu_runs_chose_lead_their_lists():
    """Where committed bench runs recorded autotuning's choices (``triton_autotune``, per kernel and key),
    the config chosen most often at a head block, when one is, is the first of its list: the one
    FASTATTN_TRITON_AUTOTUNE=0 runs."""
    import collections
    import json
    from fastattn.triton_kernels import configs as C
    lists = {"_attn_fwd": C.FWD_HALF, "_attn_bwd_dkdv": C.DKDV_HALF, "_attn_bwd_dq": C.DQ_HALF,
             "_attn_bwd_dmask": C.DMASK_HALF}
    fields = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
    votes = collections.defaultdict(collections.Counter)
    for path in sorted((ROOT / "bench" / "results").glob("*.json")):
        for kernel, chosen in json.loads(path.read_text()).get("triton_autotune", {}).items():
            for key, cfg in chosen.items():
                d, dv = (int(x) for x in key.split(", ")[2:4])  # the autotune key: Lq, Lk, D, Dv, ...
                pick = dict(kv.split(": ") for kv in cfg.split(", "))
                votes[kernel, C.head_block(max(d, dv))][tuple(int(pick[f]) for f in fields)] += 1
    assert votes, "no committed run recorded triton_autotune"
    checked = 0
    for (kernel, head), counts in votes.items():
        (best, n), *rest = counts.most_common()
        if rest and rest[0][1] == n:
            continue  # a tie: no evidence for either
        first = lists[kernel][head][0]
        assert (first.kwargs["BLOCK_M"], first.kwargs["BLOCK_N"], first.num_warps, first.num_stages) == best, \
            (kernel, head, counts)
        checked += 1
    assert checked >= 4


@pytest.mark.parametrize("mask_kind, gate, acc, kept", [(0, False, True, True), (0, False, False, True),
                                                        (0, True, False, True), (0, True, True, False),
                                                        (1, False, False, False), (2, False, True, False)])
def test_light_only_configs_are_kept_where_they_do_not_spill(monkeypatch, mask_kind, gate, acc, kept):
    """The forward's ``light_only`` tiles spill with a mask, or with a gate and out_acc (triton 3.6): the prune
    keeps them for the other launches alone, which the check compiles (its "light" variant)."""
    import torch
    from fastattn.triton_kernels import configs as C
    monkeypatch.setenv("FASTATTN_TRITON_AOT_ARCH", "90")
    light = [c for c in C.FWD_HALF[128] if c.light_only]
    assert light, "no light_only config to check"
    q = torch.empty(1, 1, 1024, 128, dtype=torch.bfloat16, device="meta")
    named = {"Q": q, "Lq": 1024, "BLOCK_D": 128, "BLOCK_DV": 128, "ALIGN": 8}
    chosen = C.prune_fwd(C.FWD_CONFIGS, named, MASK_KIND=mask_kind, HAS_GATE=gate, STORE_ACC=acc, CAUSAL=True)
    assert all((c in chosen) == kept for c in light), [str(c) for c in chosen]


@pytest.mark.parametrize("varlen, causal, acc, kept", [(False, True, True, True), (True, False, True, True),
                                                        (True, True, False, True), (True, True, True, False)])
def test_packed_causal_acc_configs_are_dropped_where_they_spill(monkeypatch, varlen, causal, acc, kept):
    """The forward's ``packed_causal_acc=False`` tiles spill in varlen launches that are causal and keep out_acc (the
    per-sequence lengths and offset take registers): the prune drops them there alone."""
    import torch
    from fastattn.triton_kernels import configs as C
    monkeypatch.setenv("FASTATTN_TRITON_AOT_ARCH", "80")
    tight = [c for c in C.FWD_HALF[64] if not c.packed_causal_acc]
    assert tight, "no packed_causal_acc=False config to check"
    q = torch.empty(1024, 4, 64, dtype=torch.bfloat16, device="meta")
    named = {"Q": q, "Lq": 1024, "BLOCK_D": 64, "BLOCK_DV": 64, "ALIGN": 8}
    chosen = C.prune_fwd(C.FWD_CONFIGS, named, MASK_KIND=0, HAS_GATE=True, STORE_ACC=acc, CAUSAL=causal,
                         VARLEN=varlen)
    assert all((c in chosen) == kept for c in tight), [str(c) for c in chosen]
