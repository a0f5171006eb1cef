"""``fastattn check``: every available backend against the float64 reference, by the rule of docs/CONTRACT.md §4.

Runs each op forward and backward over the sweep of ``fastattn.testing`` (odd sizes, causal modes,
masks, gates, GQA, strided layouts) in every dtype the backend supports on the device, and prints
one row per (backend, op, dtype) group with its worst error ratio (err / allowed; <= 1 passes).
The tests run the same sweep through the same functions.
"""
from __future__ import annotations

import sys
import time

import torch

from . import testing
from .backends import _BACKENDS, Problem, backends

OPS = ("attention", "varlen_attention", "attention_kvcache", "softmax_gate", "score_softmax_gate", "attention_pool")
_SWEEPS = {"attention": (testing.attention_cases, testing.check_attention),
           "varlen_attention": (testing.varlen_cases, testing.check_varlen),
           "attention_kvcache": (testing.kvcache_cases, testing.check_kvcache),
           "attention_pool": (testing.pool_cases, testing.check_pool)}


def _dtypes(device_type):
    if device_type == "cuda":
        return [torch.float32, torch.bfloat16, torch.float16]
    return [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _cases(op, quick, backend, dtype, device):
    """The sweep, moved onto the head dims ``backend`` covers (the cuda kernels: 64 and 128), without the score
    modifiers its kernels lack."""
    if op == "attention_pool":
        return testing.pool_cases(quick=quick)
    if op in _SWEEPS:
        refuses = lambda D, Dv: _BACKENDS[backend].unsupported(Problem(op, device.type, dtype, D=D, Dv=Dv))
        impl = _BACKENDS[backend]
        more = ({"score_mods": getattr(impl, "score_mods", ()), "dropout": getattr(impl, "dropout", False)}
                if op == "attention" else {})
        return testing.cases_covered(_SWEEPS[op][0](quick=quick, **more), refuses)
    return [c for c in testing.gate_cases(quick=quick) if c.op == op]


def _run(op, case, dtype, backend, device):
    if op == "varlen_attention":  # forward alone where the backend has no backward kernel (cuda)
        grad = Problem(op, device.type, dtype, D=case.D, Dv=case.Dv or case.D, grad=True)
        return testing.check_varlen(case, dtype, backend, device, backward=_BACKENDS[backend].unsupported(grad) is None)
    if op in _SWEEPS:
        return _SWEEPS[op][1](case, dtype, backend, device)
    return testing.check_gate(case, dtype, backend, device)


def _supports(backend, op, dtype, device):
    """Whether ``backend`` accepts ``dtype`` for ``op`` at all (asked of the backend's own predicate),
    so that e.g. Triton is not checked in float64, which it refuses by design."""
    return _BACKENDS[backend].unsupported(Problem(op, device.type, dtype, D=64, Dv=64)) is None


def checkable_backends(device_type):
    """Available backends that run on ``device_type`` (the reference is the yardstick, not checked)."""
    return [n for n, b in backends().items()
            if n != "reference" and b["available"] and device_type in b["devices"]]


def fuzz_main(names, dtypes_for, device, n, first_seed, ops) -> int:
    """``fastattn check --fuzz N``: N seeded cases per op family and backend (fastattn.fuzz)."""
    from . import fuzz
    families = [f for f in ("attention", "gates") if f == "attention" and "attention" in ops
                or f == "gates" and {"softmax_gate", "score_softmax_gate"} & set(ops)]
    failures, start, total = [], time.time(), 0
    for b in names:
        limits = fuzz.limits(b, device.type)
        for family in families:
            dtypes = dtypes_for(b, "attention" if family == "attention" else "softmax_gate")
            worst, bad = 0.0, 0
            for seed in range(first_seed, first_seed + n):
                total += 1
                try:
                    cid, comps = fuzz.run(family, seed, b, dtypes, device.type, **limits)
                except Exception as e:  # a crash is a failure of that case
                    cid, comps = f"{family}-seed{seed}", [testing.Comparison(f"error: {type(e).__name__}: {e}",
                                                                            float("inf"), 0.0, 0.0)]
                worst = max([worst] + [c.ratio for c in comps])
                failed = [c for c in comps if not c.ok]
                if failed:
                    bad += 1
                    failures.append(f"{b} {cid}: " + "; ".join(f"{c.name} err {c.err:.3g} > allowed {c.allowed:.3g}"
                                                               for c in failed))
            print(f"{b:<9} fuzz {family:<10} {n:>6} cases  worst err/allowed {worst:8.3f}  "
                  f"{'PASS' if bad == 0 else f'FAIL {bad}'}")
    for f in failures:
        print("FAILED", f)
    print(f"{total} fuzz cases on {device} (seeds {first_seed}..{first_seed + n - 1}), {len(failures)} failed, "
          f"{time.time() - start:.0f}s")
    return 1 if failures else 0


def main(args) -> int:
    default = "cuda" if torch.cuda.is_available() else "cpu"
    if args.backend:  # a backend that cannot run there runs on its own device (--backend cpu on a GPU machine)
        devices = backends()[args.backend]["devices"]
        default = default if default in devices else devices[0]
    device = torch.device(args.device or default)
    names = [args.backend] if args.backend else checkable_backends(device.type)
    if args.backend and args.backend not in checkable_backends(device.type):
        b = backends()[args.backend]
        why = b["reason"] or f"it runs on {' or '.join(b['devices'])} tensors, not {device.type}"
        print(f"fastattn check: --backend {args.backend} cannot run here: {why}", file=sys.stderr)
        return 2
    if not names:
        print(f"no fused backend is available on {device.type}: {backends()}")
        return 1
    ops = args.op or OPS
    dtypes = [testing.DTYPE_NAMES_INV[d] for d in args.dtype] if args.dtype else _dtypes(device.type)
    if getattr(args, "fuzz", None):
        return fuzz_main(names, lambda b, op: [dt for dt in dtypes if _supports(b, op, dt, device)], device,
                         args.fuzz, args.fuzz_seed, ops)
    plan = [(b, op, dt, c) for b in names for op in ops for dt in dtypes if _supports(b, op, dt, device)
            for c in _cases(op, args.quick, b, dt, device)]
    tty = sys.stdout.isatty()
    groups, failures, start = {}, [], time.time()
    for i, (b, op, dt, case) in enumerate(plan):
        label = f"[{i + 1}/{len(plan)}] {b} {op} {testing.DTYPE_NAMES[dt]} {case.id}"
        if tty:
            print(f"\r\033[K{label}", end="", flush=True)
        try:
            comps = _run(op, case, dt, b, device)
        except Exception as e:  # a crash is a failure of that case, reported with the others
            comps = [testing.Comparison(f"error: {type(e).__name__}: {e}", float("inf"), 0.0, 0.0)]
        g = groups.setdefault((b, op, dt), {"cases": 0, "worst": 0.0, "worst_case": "", "failed": 0})
        g["cases"] += 1
        worst = max(comps, key=lambda c: c.ratio)
        if worst.ratio >= g["worst"]:
            g["worst"], g["worst_case"] = worst.ratio, f"{case.id} {worst.name}"
        bad = [c for c in comps if not c.ok]
        if bad:
            g["failed"] += 1
            failures.append(f"{b} {op} {testing.DTYPE_NAMES[dt]} {case.id}: " + "; ".join(
                f"{c.name} err {c.err:.3g} > allowed {c.allowed:.3g}" for c in bad))
    if tty:
        print("\r\033[K", end="")
    print(f"{'backend':<9} {'op':<19} {'dtype':<6} {'cases':>5} {'worst err/allowed':>18}  {'result':<6} worst case")
    for (b, op, dt), g in groups.items():
        result = "PASS" if g["failed"] == 0 else f"FAIL {g['failed']}"
        print(f"{b:<9} {op:<19} {testing.DTYPE_NAMES[dt]:<6} {g['cases']:>5} {g['worst']:>18.3f}  {result:<6} "
              f"{g['worst_case']}")
    for f in failures:
        print("FAILED", f)
    print(f"{len(plan)} cases on {device}, {len(failures)} failed, {time.time() - start:.0f}s")
    return 1 if failures else 0
