"""``fastattn`` command line: ``fastattn info`` and ``fastattn bench`` (also ``python -m fastattn``)."""
from __future__ import annotations

import argparse
import sys


def _info(args):
    import torch

    import fastattn
    from fastattn import bench, ops
    env = bench.environment()
    print(f"fastattn {env['fastattn']}  torch {env['torch']}  triton {env['triton']}  cuda {env['cuda']}")
    print(f"device: {env['device']['type']} {env['device']['name']} ({torch.get_num_threads()} threads)")
    if ops._C is not None:
        info = ops._C.build_info()
        print(f"extension: built {'with CUDA for ' + info['cuda_archs'] if info['cuda'] else 'without CUDA'}, "
              f"OpenMP {'on' if info['openmp'] else 'off'}")
    for name, b in fastattn.backends().items():
        print(f"  {name:<10} {'available' if b['available'] else 'unavailable: ' + b['reason']}")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fastattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, backends")
    c = sub.add_parser("check", help="outputs and gradients of every backend against the float64 reference")
    c.add_argument("--backend", choices=["cuda", "triton", "cpu"], help="only this backend (default: all available)")
    c.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if present, else cpu")
    c.add_argument("--op", action="append", choices=["attention", "softmax_gate", "score_softmax_gate"],
                   help="only these ops (repeatable)")
    c.add_argument("--dtype", action="append", choices=["fp64", "fp32", "bf16", "fp16"], help="only these dtypes")
    c.add_argument("--quick", action="store_true", help="a smaller sweep (under a minute on a 2-core CPU)")
    p = sub.add_parser("bench", help="time fastattn against PyTorch's attention paths in the same run")
    p.add_argument("--quick", action="store_true", help="small smoke run")
    p.add_argument("--op", action="append", choices=["attention", "gated", "softmax_gate", "score_softmax_gate"],
                   help="only these ops (repeatable; gated = attention with an elementwise output gate)")
    p.add_argument("--mode", action="append", choices=["fwd", "bwd", "fwd_bwd"], help="only these modes (repeatable)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if present, else cpu")
    p.add_argument("--reps", type=int, default=7, help="timed repetitions per row (median reported)")
    p.add_argument("--out", metavar="FILE.json", help="write the results as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="plot TFLOP/s or GB/s against sequence length (needs matplotlib)")
    args = parser.parse_args(argv)
    if args.command == "info":
        return _info(args)
    if args.command == "check":
        from fastattn import check
        return check.main(args)
    from fastattn import bench
    if args.reps < 1:
        parser.error("--reps: expected a positive integer")
    return bench.main(args)


if __name__ == "__main__":
    sys.exit(main())
