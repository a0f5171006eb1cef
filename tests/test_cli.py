"""The fastattn command line: info, check, bench (JSON, plot, table, spread) and argument errors."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from fastattn.__main__ import main

ROW_KEYS = {"op", "provider", "mode", "dtype", "B", "Hq", "Hkv", "Lq", "Lk", "D", "Dv", "causal", "mask", "gate",
            "window", "dropout", "deterministic", "ms", "tflops", "gbps", "peak_mem_mb", "q1_ms", "q3_ms", "times_ms"}


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "cpu" in out and "available" in out


def test_console_script_and_module():
    exe = shutil.which("fastattn")
    cmd = [exe, "info"] if exe else [sys.executable, "-m", "fastattn", "info"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "reference" in res.stdout


def test_check_passes_on_cpu(capsys):
    assert main(["check", "--quick", "--op", "softmax_gate", "--dtype", "fp32", "--backend", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "FAIL" not in out


def test_check_fails_when_a_backend_is_wrong(capsys, monkeypatch):
    """A check that cannot fail checks nothing: break the kernel's output and expect exit 1."""
    import torch
    real = torch.ops.fastattn.softmax_gate_fwd

    def broken(scores, x, mask, pool):
        y, alpha = real(scores, x, mask, pool)
        return y * 1.01, alpha

    monkeypatch.setattr(torch.ops.fastattn, "softmax_gate_fwd", broken)
    assert main(["check", "--quick", "--op", "softmax_gate", "--dtype", "fp32", "--backend", "cpu"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_check_runs_a_backend_on_its_own_device(capsys, monkeypatch):
    """On a GPU machine `check --backend cpu` checks the CPU kernels rather than refusing the GPU."""
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert main(["check", "--quick", "--op", "softmax_gate", "--dtype", "fp32", "--backend", "cpu"]) == 0
    assert "cases on cpu" in capsys.readouterr().out


def test_check_unavailable_backend(capsys):
    assert main(["check", "--backend", "cuda", "--device", "cpu"]) == 2
    assert "cannot run here" in capsys.readouterr().err


def test_bench_writes_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    assert main(["bench", "--quick", "--device", "cpu", "--op", "attention", "--op", "softmax_gate", "--reps", "2",
                 "--out", str(out), "--plot", str(png)]) == 0
    res = json.loads(out.read_text())
    for k in ("fastattn", "commit", "timestamp", "device", "torch", "triton", "cuda", "results"):
        assert k in res
    providers = {r["provider"] for r in res["results"]}
    assert {"fastattn-cpu", "torch-sdpa-flash", "torch-eager"} <= providers
    for r in res["results"]:
        assert set(r) == ROW_KEYS and r["ms"] > 0
        assert (r["tflops"] if r["op"] == "attention" else r["gbps"]) > 0
        # --reps is honoured under --quick, and every repetition is kept beside the quartiles
        assert len(r["times_ms"]) == 2 and r["q1_ms"] <= r["ms"] <= r["q3_ms"]
    printed = capsys.readouterr().out
    assert "speed-up" in printed and "IQR" in printed
    pytest.importorskip("matplotlib")
    assert png.stat().st_size > 0


def test_bench_runs_only_the_dtypes_and_head_dims_asked(monkeypatch):
    from fastattn import bench
    seen = []
    monkeypatch.setattr(bench, "run_config", lambda cfg, device, reps: seen.append(cfg) or [])
    assert main(["bench", "--device", "cpu", "--op", "attention", "--dtype", "bf16", "--head-dim", "32",
                 "--head-dim", "96"]) == 0
    assert {(c.dtype, c.D, c.Dv) for c in seen} == {(torch.bfloat16, 32, 32), (torch.bfloat16, 96, 96)}
    assert {c.causal for c in seen} == {False, True}


def test_bench_decode_reads_the_cache_against_the_read_bandwidth(monkeypatch, tmp_path, capsys):
    from fastattn import bench
    shapes = {(c.dtype, c.B, c.Lk) for c in bench.default_configs(torch.device("cpu"), ops=["decode"])}
    assert {(dt, B, L) for dt in (torch.float32, torch.bfloat16) for B in (1, 8) for L in (4096, 16384)} <= shapes
    assert all(c.op != "decode" for c in bench.default_configs(torch.device("cpu")))  # only when asked for
    monkeypatch.setattr(bench, "READ_BW_BYTES", 2**24)
    out = tmp_path / "r.json"
    assert main(["bench", "--quick", "--device", "cpu", "--op", "decode", "--reps", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert {"fastattn-cpu", "torch-sdpa-flash"} <= {r["provider"] for r in rows}
    for r in rows:
        cache_bytes = r["B"] * r["Hkv"] * r["Lk"] * (r["D"] + r["Dv"]) * 4
        assert r["Lq"] == 1 and r["gbps"] == pytest.approx(cache_bytes / r["ms"] / 1e6)
        assert r["read_gbps"] > 0 and r["read_frac"] == pytest.approx(r["gbps"] / r["read_gbps"])
    assert "GB/s read bandwidth" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["bench", "--op", "nope"], ["bench", "--reps", "0"], ["bench", "--head-dim", "0"],
                                  ["bench", "--dtype", "fp64"], ["check", "--dtype", "fp8"], ["frobnicate"], []])
def test_argument_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "usage" in capsys.readouterr().err


def test_perf_table_is_current():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "scripts", "perf_table.py")
    res = subprocess.run([sys.executable, script, "--check"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_bench_attention_pool_rows(monkeypatch, tmp_path):
    from fastattn import bench
    sizes = {(c.op, c.Lq, c.D, c.Dv, c.B) for c in bench.default_configs(torch.device("cpu"),
                                                                          ops=["attention_pool", "attention_pool_packed"])}
    assert {("attention_pool", N, D, 256, 1) for N in (8192, 40000, 100000) for D in (1024, 1536)} <= sizes
    assert ("attention_pool_packed", 0, 1024, 256, 64) in sizes
    assert all(c.op not in bench.POOL_OPS for c in bench.default_configs(torch.device("cpu")))  # only when asked for
    lengths = bench.pool_lengths(bench.Config("attention_pool_packed", "fwd", torch.float32, B=64))
    assert len(lengths) == 64 and min(lengths) >= 500 and max(lengths) <= 5000
    small = lambda device, quick, ops, **kw: [bench.Config(op, mode, torch.float32, B=3 if op.endswith("packed") else 1,
                                                           Hq=2, Lq=600, Lk=600, D=32, Dv=16)
                                              for op in ops for mode in ("fwd", "fwd_bwd")]
    monkeypatch.setattr(bench, "default_configs", small)
    monkeypatch.setattr(bench, "pool_lengths", lambda cfg: [cfg.Lq] if cfg.op == "attention_pool" else [7, 0, 40])
    out = tmp_path / "r.json"
    assert main(["bench", "--device", "cpu", "--op", "attention_pool", "--op", "attention_pool_packed", "--reps", "2",
                 "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert {(r["op"], r["provider"]) for r in rows} == {("attention_pool", "fastattn-cpu"), ("attention_pool", "torch-eager"),
                                                        ("attention_pool_packed", "fastattn-cpu"),
                                                        ("attention_pool_packed", "torch-eager-loop")}
    for r in rows:
        n = 600 if r["op"] == "attention_pool" else 47
        flops = 4.0 * n * 32 * 16 * {"fwd": 1, "fwd_bwd": 3}[r["mode"]]
        assert r["tflops"] == pytest.approx(flops / r["ms"] / 1e9) and r["peak_mem_mb"] is not None


def test_bench_says_where_results_went(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["bench", "--quick", "--op", "softmax_gate", "--reps", "1"]
    assert main(argv + ["--out", "r.json"]) == 0
    assert f"results written to {tmp_path / 'r.json'}" in capsys.readouterr().out
    assert main(argv) == 0
    assert "results not saved" in capsys.readouterr().out


@pytest.fixture
def no_benchmarking(monkeypatch):
    """Argument errors must come before any timing: a run that starts is a failure."""
    from fastattn import bench

    def refuse(*a, **k):
        raise AssertionError("the benchmark ran before its arguments were checked")
    monkeypatch.setattr(bench, "run_config", refuse)


def _usage_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage" in err and "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_bench_bad_out_path_fails_before_running(tmp_path, capsys, no_benchmarking):
    (tmp_path / "file").write_text("")
    for path, why in [(tmp_path / "missing" / "r.json", "does not exist"),
                      (tmp_path / "file" / "r.json", "not a directory"),
                      (tmp_path, "is a directory")]:
        msg = _usage_error(["bench", "--out", str(path)], capsys)
        assert "--out" in msg and why in msg, msg


def test_bench_unwritable_out_dir(tmp_path, capsys, monkeypatch, no_benchmarking):
    # os.access stands in for the permission bits, which root (as in CI containers) would override
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real(p, mode))
    msg = _usage_error(["bench", "--out", str(tmp_path / "r.json")], capsys)
    assert "--out" in msg and "not writable" in msg


def test_bench_bad_plot_path_fails_before_running(tmp_path, capsys, monkeypatch, no_benchmarking):
    pytest.importorskip("matplotlib")
    msg = _usage_error(["bench", "--plot", str(tmp_path / "missing" / "r.png")], capsys)
    assert "--plot" in msg and "does not exist" in msg
    msg = _usage_error(["bench", "--plot", str(tmp_path / "r.txt")], capsys)
    assert "--plot" in msg and ".png" in msg
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    msg = _usage_error(["bench", "--plot", str(tmp_path / "r.png")], capsys)
    assert "--plot" in msg and "pip install matplotlib" in msg


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the error is for machines without a GPU")
@pytest.mark.parametrize("command", ["bench", "check"])
def test_device_cuda_without_gpu(command, capsys, no_benchmarking):
    msg = _usage_error([command, "--device", "cuda"], capsys)
    assert "--device" in msg and "no CUDA device" in msg


def test_version(capsys):
    from fastattn.version import __version__
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"fastattn {__version__}"


def test_help_names_every_subcommand_with_an_example(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    for command in ("info", "check", "bench"):
        described = [ln for ln in lines if ln.split()[:1] == [command] and len(ln.split()) > 2]
        assert described, f"no line describing {command}"
    assert any(ln.strip().startswith("fastattn bench") for ln in lines), "no example command line"


def _row(provider, times, op="attention", Lq=256, mode="fwd", causal=False):
    from fastattn import bench
    return bench.make_row(bench.Config(op, mode, __import__("torch").float32, B=1, Hq=2, Hkv=2, Lq=Lq, Lk=Lq, D=16,
                                       Dv=16, causal=causal), provider, times)


def test_wide_spread_is_flagged():
    from fastattn import bench
    steady = [_row("fastattn-cpu", [10.0, 10.1, 10.0, 9.9, 10.0]), _row("torch-sdpa-flash", [20.0, 20.2, 19.9, 20.0])]
    text = bench.speedup_table(steady)
    assert "IQR" in text and "noisy" not in text
    noisy = [_row("fastattn-cpu", [10.0, 10.0, 10.0, 10.0, 10.0]), _row("torch-sdpa-flash", [12.0, 20.0, 8.0, 30.0])]
    text = bench.speedup_table(noisy)
    assert "noisy" in text and "--reps" in text


def test_plot_is_titled_from_zero_and_bars_for_one_length():
    pytest.importorskip("matplotlib")
    from fastattn import bench
    env = {"device": {"type": "cpu", "name": "Test CPU", "threads": 2}, "torch": "9.9.9", "commit": "abcdef1234567"}
    rows = [_row(p, [t, t]) for p, t in [("fastattn-cpu", 10.0), ("torch-sdpa-flash", 12.0)]]
    rows += [_row(p, [t, t], causal=True) for p, t in [("fastattn-cpu", 6.0), ("torch-sdpa-flash", 7.0)]]
    fig = bench.figure(rows, env)
    title = fig._suptitle.get_text()
    assert "Test CPU" in title and "9.9.9" in title and "abcdef1" in title
    from matplotlib.container import BarContainer
    bars = lambda ax: any(isinstance(c, BarContainer) for c in ax.containers)
    axes = [ax for ax in fig.axes if ax.axison]
    assert axes and all(bars(ax) and ax.get_ylim()[0] == 0 for ax in axes)
    lines = bench.figure(rows + [_row(p, [t, t], Lq=512) for p, t in [("fastattn-cpu", 30.0),
                                                                       ("torch-sdpa-flash", 40.0)]], env)
    axes = [ax for ax in lines.axes if ax.axison]
    assert axes and all(ax.lines and not bars(ax) and ax.get_ylim()[0] == 0 for ax in axes)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_bench_bias_providers_compute_the_same_attention(causal):
    """Every provider of the float-bias comparison applies the bias (and, causal, the causal mask) and
    passes its gradient back: fastattn against SDPA, on the inputs the bench times."""
    import torch
    from fastattn import bench
    cfg = bench.Config("bias", "fwd_bwd", torch.float64, B=2, Hq=2, Hkv=2, Lq=24, Lk=24, D=16, Dv=16,
                       causal=causal, mask="float_grad")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 24, 16, generator=g, dtype=torch.float64) for _ in range(3))
    bias = (3 * torch.randn(1, 2, 24, 24, generator=g, dtype=torch.float64)).requires_grad_()
    results = {}
    for name, fn in bench._attention_providers(cfg, torch.device("cpu")).items():
        try:
            out = fn(q, k, v, bias)
        except RuntimeError:  # an SDPA backend that refuses a mask (flash) is skipped by the bench too
            continue
        results[name] = (out, torch.autograd.grad(out.square().sum(), bias)[0])
    assert {"fastattn-cpu", "torch-sdpa-math"} <= set(results)
    want_out, want_grad = results["torch-sdpa-math"]
    assert not torch.allclose(want_out, bench._attention_providers(
        cfg, torch.device("cpu"))["torch-sdpa-math"](q, k, v, torch.zeros_like(bias)))
    for name, (out, grad) in results.items():
        torch.testing.assert_close(out, want_out, msg=name)
        torch.testing.assert_close(grad, want_grad, msg=name)


def test_bench_variants_run_beside_plain_attention(monkeypatch):
    """--op dropout / deterministic: each config beside the same causal attention without it (once, when both are
    asked for; the deterministic backward has no forward row), and every provider applies it: dropout changes each
    one's output; fastattn is asked for the deterministic backward, whose gradients are right."""
    import torch
    from fastattn import bench, functional
    cpu = torch.device("cpu")
    configs = bench.default_configs(cpu, quick=True, ops=["dropout", "deterministic"], modes=["fwd", "fwd_bwd"],
                                    dtypes=[torch.float32])
    assert [(c.op, c.mode) for c in configs] == [("dropout", "fwd"), ("attention", "fwd"), ("dropout", "fwd_bwd"),
                                                 ("attention", "fwd_bwd"), ("deterministic", "fwd_bwd")]
    assert configs[0].dropout > 0 and configs[-1].deterministic and all(c.causal for c in configs)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 24, 16, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    def outputs(cfg):
        out = {}
        for name, fn in bench._attention_providers(cfg, cpu).items():
            try:
                out[name] = fn(q, k, v, None)
            except RuntimeError:  # an SDPA backend that refuses float64 (flash) is skipped by the bench too
                pass
        return out

    plain, dropped = outputs(configs[1]), outputs(configs[0])
    assert {"fastattn-cpu", "torch-sdpa-math"} <= set(dropped) <= set(plain)  # (CPU flash has no dropout)
    for name, out in dropped.items():
        assert not torch.allclose(out, plain[name]), name
    asked = []
    attention = functional.attention
    monkeypatch.setattr(functional, "attention",
                        lambda *a, **kw: asked.append(kw.get("deterministic")) or attention(*a, **kw))
    det = bench._attention_providers(configs[-1], cpu)["fastattn-cpu"](q, k, v, None)
    assert asked == [True]
    want = torch.autograd.grad(plain["fastattn-cpu"].sum(), (q, k, v))
    for got, ref in zip(torch.autograd.grad(det.sum(), (q, k, v)), want):
        torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("quick", [True, False], ids=["quick", "full"])
def test_check_plans_only_cases_each_backend_covers(quick):
    """`fastattn check` moves the sweep onto the head dims a backend covers (the cuda kernels: D == Dv in
    {64, 128}) instead of counting a refusal as a failure, and keeps every other case as it is."""
    import torch
    from fastattn import check, testing
    from fastattn.backends import _BACKENDS, Problem
    for name, dev in (("cuda", "cuda"), ("triton", "cuda"), ("cpu", "cpu")):
        for dt in (torch.float16, torch.bfloat16):
            cases = check._cases("attention", quick, name, dt, torch.device(dev))
            refused = [c.id for c in cases
                       if _BACKENDS[name].unsupported(Problem("attention", dev, dt, D=c.D, Dv=c.Dv or c.D,
                                                              score_mods=c.score_mods, dropout=c.dropout > 0))]
            assert not refused, f"{name}: {refused}"
            assert len(cases) > 0.7 * len(testing.attention_cases(quick=quick)), name
    assert check._cases("attention", quick, "triton", torch.bfloat16, torch.device("cuda")) == \
        testing.attention_cases(quick=quick, score_mods=_BACKENDS["triton"].score_mods,
                                dropout=_BACKENDS["triton"].dropout)
    assert check._cases("attention", quick, "cpu", torch.bfloat16, torch.device("cpu")) == \
        testing.attention_cases(quick=quick)


def test_bench_gate_forward_has_a_copy_yardstick_that_is_never_the_best_torch():
    """A softmax-gate forward is timed beside a plain copy of x (the bytes it must move), reported in
    GB/s like the op, and left out of the speed-up: copying x is no way to compute the gate."""
    import torch
    from fastattn import bench
    cfg = bench.Config("softmax_gate", "fwd", torch.float32, B=4, Hq=2, Lq=64, D=256)
    rows = bench.run_config(cfg, torch.device("cpu"), reps=3, warmup=1)
    copy = [r for r in rows if r["provider"] == "copy"]
    assert len(copy) == 1 and copy[0]["gbps"] > 0
    table = bench.speedup_table(rows)
    assert "torch-eager" in table and "copy" not in table
    assert "copy" not in {r["provider"] for r in bench.run_config(
        bench.Config("softmax_gate", "fwd_bwd", torch.float32, B=4, Hq=2, Lq=64, D=256), torch.device("cpu"), reps=1)}


def test_bench_json_records_the_triton_autotune_choices(tmp_path, monkeypatch):
    """The bench JSON keeps each autotuned Triton kernel's chosen config per autotune key: what the
    config tables are tuned from."""
    import json
    triton = pytest.importorskip("triton")
    from fastattn import bench
    from fastattn.__main__ import main
    from fastattn.triton_kernels import attention
    def kernel(X, n, BLOCK_M: triton.language.constexpr):
        pass

    tuned = triton.autotune(configs=[triton.Config({"BLOCK_M": 16}), triton.Config({"BLOCK_M": 64})],
                            key=["n"])(triton.jit(kernel))
    tuned.cache[(4096, "torch.bfloat16")] = tuned.configs[1]
    monkeypatch.setattr(attention, "_tuned_for_the_test", tuned, raising=False)
    out = tmp_path / "r.json"
    assert main(["bench", "--quick", "--device", "cpu", "--op", "softmax_gate", "--reps", "1", "--out", str(out)]) == 0
    choices = json.load(open(out))["triton_autotune"]
    assert list(choices["_tuned_for_the_test"]) == ["4096, torch.bfloat16"]
    assert "BLOCK_M: 64" in choices["_tuned_for_the_test"]["4096, torch.bfloat16"]
    assert bench.triton_autotune_choices() == choices


def test_bench_varlen_rows(tmp_path, monkeypatch):
    """--op varlen: packed sequences of lengths drawn in [L/4, L], fwd and fwd_bwd, rated over their real lengths,
    beside SDPA on the padded batch. The reference stands in for the kernels of backends that lack one."""
    from fastattn import bench
    from fastattn.backends import Problem, select
    real = bench._fastattn_backends
    monkeypatch.setattr(bench, "_fastattn_backends", lambda device: real(device) + ["reference"])
    out = tmp_path / "r.json"
    assert main(["bench", "--quick", "--device", "cpu", "--op", "varlen", "--reps", "1", "--mode", "fwd", "--mode",
                 "fwd_bwd", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert {(r["mode"], r["causal"]) for r in rows} == {(m, c) for m in ("fwd", "fwd_bwd") for c in (False, True)}

    def has_kernel(name):
        try:
            select(name, Problem("varlen_attention", "cpu", torch.float32, D=64, Dv=64, grad=True))
            return True
        except RuntimeError:
            return False

    want = {"fastattn-reference", "torch-sdpa-math"} | {f"fastattn-{n}" for n in real(torch.device("cpu"))
                                                        if has_kernel(n)}
    for mode in ("fwd", "fwd_bwd"):
        for causal in (False, True):
            assert want <= {r["provider"] for r in rows if r["mode"] == mode and r["causal"] == causal}
    for r in rows:
        assert set(r) == ROW_KEYS and r["op"] == "varlen" and r["ms"] > 0 and r["gbps"] is None
        lens = bench.varlen_lengths(bench.Config("varlen", r["mode"], torch.float32, B=r["B"], Lq=r["Lq"]))
        assert len(lens) == r["B"] and all(r["Lq"] // 4 <= n <= r["Lq"] for n in lens) and len(set(lens)) > 1
        flops = 4 * r["Hq"] * sum(n * n for n in lens) * r["D"] / (2 if r["causal"] else 1)
        flops *= {"fwd": 1, "fwd_bwd": 3.5}[r["mode"]]
        assert r["tflops"] == pytest.approx(flops / r["ms"] / 1e9)


@pytest.mark.parametrize("causal,Hkv", [(False, 4), (False, 2), (True, 2)])
def test_bench_varlen_providers_compute_the_same_attention(causal, Hkv):
    """Every varlen provider times the same attention: the padded SDPA rows give the packed result on the real
    tokens, the nested and fastattn ones give it outright (those that run here)."""
    import fastattn
    from fastattn import bench
    cfg = bench.Config("varlen", "fwd", torch.float64, B=3, Hq=4, Hkv=Hkv, Lq=24, Lk=24, D=8, Dv=8, causal=causal)
    g = torch.Generator().manual_seed(0)
    providers = bench._varlen_providers(cfg, torch.device("cpu"),
                                        lambda *s: torch.randn(*s, generator=g, dtype=torch.float64))
    lens = bench.varlen_lengths(cfg)
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    packed = providers["torch-sdpa-nested"][1]
    want = fastattn.varlen_attention(*packed, cu, cu, max(lens), max(lens), causal=causal, backend="reference")
    keep = torch.arange(max(lens)) < torch.tensor(lens)[:, None]
    checked = []
    for name, (fn, inputs) in providers.items():
        try:
            got = fn(*inputs)
        except RuntimeError:  # a backend without the kernel; SDPA's nested path refuses causal and GQA on CPU
            continue
        torch.testing.assert_close(got.transpose(1, 2)[keep] if inputs is not packed else got, want)
        checked.append(name)
    assert "torch-sdpa-math" in checked and ("torch-sdpa-nested" in checked) == (not causal and Hkv == 4)
