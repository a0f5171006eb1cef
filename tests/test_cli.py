"""The fastattn command line: info, check, bench (JSON, plot, table) and argument errors."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from fastattn.__main__ import main

ROW_KEYS = {"op", "provider", "mode", "dtype", "B", "Hq", "Hkv", "Lq", "Lk", "D", "Dv", "causal", "mask", "gate",
            "ms", "tflops", "gbps", "peak_mem_mb"}


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


def test_check_unavailable_backend(capsys):
    assert main(["check", "--backend", "cuda", "--device", "cpu"]) == 2
    assert "cannot run here" in capsys.readouterr().err


def test_bench_writes_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    assert main(["bench", "--quick", "--op", "attention", "--op", "softmax_gate", "--reps", "1",
                 "--out", str(out), "--plot", str(png)]) == 0
    res = json.loads(out.read_text())
    for k in ("fastattn", "commit", "timestamp", "device", "torch", "triton", "cuda", "results"):
        assert k in res
    providers = {r["provider"] for r in res["results"]}
    assert {"fastattn-cpu", "torch-sdpa-flash", "torch-eager"} <= providers
    for r in res["results"]:
        assert set(r) == ROW_KEYS and r["ms"] > 0
        assert (r["tflops"] if r["op"] == "attention" else r["gbps"]) > 0
    printed = capsys.readouterr().out
    assert "speed-up" in printed
    try:
        import matplotlib  # noqa: F401
        assert png.stat().st_size > 0
    except ImportError:
        assert "matplotlib is not installed" in printed


@pytest.mark.parametrize("argv", [["bench", "--op", "nope"], ["bench", "--reps", "0"], ["check", "--dtype", "fp8"],
                                  ["frobnicate"], []])
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
