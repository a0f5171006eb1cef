"""``fastattn`` command line: ``fastattn info``, ``fastattn check`` and ``fastattn bench``
(also ``python -m fastattn``)."""
from __future__ import annotations

import argparse
import os
import sys

from .version import __version__

EXAMPLES = """\
examples:
  fastattn info                                  what runs here, and why not
  fastattn check --quick                         a short correctness sweep of every backend
  fastattn check --fuzz 1000                     1000 random attention and softmax-gate cases per backend
  fastattn bench                                 the default sweep (about a minute on a 2-core CPU)
  fastattn bench --quick --op attention --reps 15 --out r.json --plot r.png
  fastattn bench --op decode                     decoding over a kv cache, GB/s beside the machine's read bandwidth
"""


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


def _check_device(parser, args):
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: no CUDA device is available here (torch.cuda.is_available() is False)")


def _output_problem(path):
    """Why ``path`` cannot be written, or None. Checked before a run so that a typo does not cost the run."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    if os.path.isdir(path):
        return f"{path} is a directory"
    if not os.path.exists(parent):
        return f"directory {parent} does not exist"
    if not os.path.isdir(parent):
        return f"{parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        return f"{path} is not writable"
    return None


def _check_outputs(parser, args):
    if args.out and (why := _output_problem(args.out)):
        parser.error(f"argument --out: {why}")
    if args.plot:
        if why := _output_problem(args.plot):
            parser.error(f"argument --plot: {why}")
        try:
            import matplotlib  # noqa: F401
            from matplotlib.backend_bases import FigureCanvasBase
        except ImportError:
            parser.error("argument --plot: matplotlib is not installed (pip install matplotlib)")
        formats = FigureCanvasBase.get_supported_filetypes()
        suffix = os.path.splitext(args.plot)[1].lower().lstrip(".")
        if suffix not in formats:
            parser.error(f"argument --plot: {args.plot!r} needs an image suffix matplotlib writes, "
                         f"e.g. .png, .pdf or .svg")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fastattn", description="Fused attention kernels for PyTorch: what runs "
                                     "here, whether it is right, how fast it is. Also python -m fastattn.",
                                     epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fastattn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")
    sub.add_parser("info", help="versions, device, backends")
    c = sub.add_parser("check", help="outputs and gradients of every backend against the float64 reference")
    c.add_argument("--backend", choices=["cuda", "triton", "cpu"], help="only this backend (default: all available)")
    c.add_argument("--device", choices=["cpu", "cuda"],
                   help="default: the device of --backend, else cuda if present, else cpu")
    c.add_argument("--op", action="append", choices=["attention", "varlen_attention", "attention_kvcache",
                                                     "softmax_gate", "score_softmax_gate", "attention_pool"],
                   help="only these ops (repeatable)")
    c.add_argument("--dtype", action="append", choices=["fp64", "fp32", "bf16", "fp16"], help="only these dtypes")
    c.add_argument("--quick", action="store_true", help="a smaller sweep (under a minute on a 2-core CPU)")
    c.add_argument("--fuzz", type=int, metavar="N", help="instead of the sweep: N seeded random cases per op family "
                   "and backend over the whole input space (fastattn.fuzz), each reproducible from its seed")
    c.add_argument("--fuzz-seed", type=int, default=0, metavar="S", help="first fuzz seed (default 0)")
    p = sub.add_parser("bench", help="time fastattn against PyTorch's attention paths in the same run")
    p.add_argument("--quick", action="store_true", help="small smoke run")
    p.add_argument("--op", action="append",
                   choices=["attention", "gated", "bias", "varlen", "softmax_gate", "score_softmax_gate", "decode",
                            "window", "dropout", "deterministic", "attention_pool", "attention_pool_packed"],
                   help="only these ops (repeatable; gated = attention with an elementwise output gate; varlen = "
                        "packed sequences of lengths in [L/4, L], against SDPA on them padded and nested; decode = "
                        "attention_with_kvcache, one query over a long cache; window, dropout, deterministic = causal "
                        "attention in a sliding window, with dropout 0.1, or with the deterministic backward, beside "
                        "the same without it; attention_pool = gated ABMIL pooling of one bag of 8k-100k "
                        "instances against its eager modules, attention_pool_packed = 64 bags of 500-5000 packed "
                        "against a loop over them; these and decode run only when asked for)")
    p.add_argument("--mode", action="append", choices=["fwd", "bwd", "fwd_bwd"], help="only these modes (repeatable)")
    p.add_argument("--dtype", action="append", choices=["fp32", "bf16", "fp16"], help="only these dtypes (repeatable)")
    p.add_argument("--head-dim", action="append", type=int, metavar="D",
                   help="attention at these head dims instead of the sweep's (repeatable; hidden size kept)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if present, else cpu")
    p.add_argument("--reps", type=int, help="timed repetitions per row; the median and interquartile range "
                                            "are reported (default 7, 3 with --quick)")
    p.add_argument("--out", metavar="FILE.json", help="write the results as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="plot TFLOP/s or GB/s against sequence length (needs matplotlib)")
    args = parser.parse_args(argv)
    if args.command == "info":
        return _info(args)
    if args.command == "check":
        _check_device(c, args)
        if args.fuzz is not None and args.fuzz < 1:
            c.error("argument --fuzz: expected a positive number of cases")
        from fastattn import check
        return check.main(args)
    if args.reps is not None and args.reps < 1:
        p.error("argument --reps: expected a positive integer")
    if any(d < 1 for d in args.head_dim or ()):
        p.error("argument --head-dim: expected a positive integer")
    _check_device(p, args)
    _check_outputs(p, args)
    from fastattn import bench
    return bench.main(args)


if __name__ == "__main__":
    sys.exit(main())
