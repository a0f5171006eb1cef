"""fastattn across processes on torch.distributed (gloo, CPU): ring attention against attention over the whole
sequence by the rule of docs/CONTRACT.md §4, its memory, its errors; swapped models under DDP and FSDP2.

Each test spawns its ranks once (torch.multiprocessing) and runs its cases in them; a rank that finds a
failure raises, and the spawn reports it with the rank's traceback.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import pathlib
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastattn
from fastattn import distributed as fd
from fastattn.testing import AttentionCase, DTYPE_NAMES, TensorMemory, _as_layout, _run_attention, compare, fresh

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this torch build")


def _entry(rank, world, init, fn, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        dist.barrier()  # no rank tears its group down while a peer still talks to it
    finally:
        dist.destroy_process_group()
    # A rank that passed leaves without the interpreter's finalization, which tears torch.distributed's state
    # down (gloo's threads, finished work and the tensors it holds) in no fixed order. A rank of the FSDP2 test
    # once died there or before of std::terminate ("terminate called without an active exception") with no
    # Python error. A failure above raises before this line and torch.multiprocessing reports it as usual.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(world, fn, *args):
    """Runs ``fn(rank, world, *args)`` on ``world`` fresh processes joined in a gloo group."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_entry, args=(world, f"file://{d}/store", fn, args), nprocs=world)


# ------------------------------------------------------------------------------------------ ring attention
@dataclasses.dataclass(frozen=True)
class RingCase:
    L: int                      # a rank's shard length (the sequence: L · world)
    dtype: torch.dtype = torch.float32
    causal: bool = False
    layout: str = "zigzag"
    B: int = 2
    Hq: int = 4
    Hkv: int = 2
    D: int = 16
    Dv: int | None = None
    gate: str = "none"
    lse_grad: bool = False
    strides: str = "bhld"        # or "blhd": (B, L, H, D) memory seen as (B, H, L, D)
    backend: str = "auto"

    def attention_case(self, world):
        return AttentionCase(B=self.B, Hq=self.Hq, Hkv=self.Hkv, Lq=self.L * world, Lk=self.L * world, D=self.D,
                             Dv=self.Dv, causal=self.causal, gate=self.gate, layout=self.strides,
                             lse_grad=self.lse_grad)

    def __str__(self):
        return f"{DTYPE_NAMES[self.dtype]} {self.layout} L{self.L} causal={self.causal} gate={self.gate} " \
               f"H{self.Hq}-{self.Hkv} {self.strides} lse_grad={self.lse_grad} {self.backend}"


RING_CASES = [
    RingCase(7, torch.float32, layout="contiguous", gate="elementwise", lse_grad=True),  # odd shards
    RingCase(10, torch.bfloat16, causal=True, gate="headwise", lse_grad=True),      # chunks of 5
    RingCase(9, torch.float64, causal=True, layout="contiguous", strides="blhd"),
    RingCase(8, torch.float32, causal=True, Hq=2, Hkv=2, D=40, Dv=24, lse_grad=True),
    RingCase(6, torch.float16, causal=True, Hkv=1, gate="elementwise"),               # MQA
    RingCase(5, torch.bfloat16, layout="contiguous", backend="reference", gate="headwise", lse_grad=True),
    RingCase(6, torch.float32, causal=True, layout="contiguous", backend="reference", lse_grad=True),
]


def _run_ring(case, t, world):
    """The case's inputs sharded, ring_attention forward and backward, the results gathered whole."""
    shard = lambda x: fd.shard_sequence(x, layout=case.layout)
    whole = lambda x: fd.unshard_sequence(x, layout=case.layout)
    leaf = {n: _as_layout(fresh(shard(t[n]), "cpu", case.dtype), case.strides).requires_grad_() for n in "qkv"}
    if "gate" in t:
        leaf["gate"] = fresh(shard(t["gate"]), "cpu", case.dtype).requires_grad_()
    out, lse = fd.ring_attention(leaf["q"], leaf["k"], leaf["v"], causal=case.causal, gate=leaf.get("gate"),
                                 return_lse=True, backend=case.backend, layout=case.layout)
    outputs, grads = [out], [shard(t["dout"]).to(case.dtype)]
    if case.lse_grad:
        outputs.append(lse)
        grads.append(shard(t["dlse"]).to(lse.dtype))
    torch.autograd.backward(outputs, grads)
    res = {"out": whole(out.detach()), "lse": whole(lse.detach())}
    for n, x in leaf.items():
        res["d" + n] = whole(x.grad)
    return res


def _ring_against_whole(rank, world, cases, poison=None):
    bad = []
    for case in cases:
        ac = case.attention_case(world)
        t = ac.inputs(case.dtype)
        if poison is not None:
            t = poison(t)
        got = _run_ring(case, t, world)
        lowp = _run_attention(ac, t, case.dtype, "cpu", "reference")
        truth = _run_attention(ac, t, torch.float64, "cpu", "reference")
        for n in truth:
            c = compare(n, got[n], lowp[n], truth[n], case.dtype, 2 if n in ("out", "lse") else 3)
            if not c.ok:
                bad.append(f"{case}: {n} err {c.err:.3g} > allowed {c.allowed:.3g}")
    assert not bad, f"rank {rank} of {world}: " + "; ".join(bad)


@pytest.mark.parametrize("world", [2, 3])
def test_ring_attention_equals_attention_over_the_whole_sequence(world):
    """out, lse and every gradient of the sharded run, gathered, against the whole sequence (§4 rule):
    fp32/bf16/fp16/fp64, causal in both layouts or not, GQA/MQA, gates, lse gradient, odd shards, strides,
    the cpu kernels and the reference."""
    spawn(world, _ring_against_whole, RING_CASES)


def _ring_on(rank, world, backend, cases):
    if backend == "cuda_emu":
        import cuda_emu
        cuda_emu.load()  # built once by the parent (cached under build/)
    _ring_against_whole(rank, world, [dataclasses.replace(c, backend=backend) for c in cases])


def _emulation_missing():
    import cuda_emu
    why = cuda_emu.build.requirements()
    return f"the CUDA emulation cannot be built here: {why}" if why else None


@pytest.mark.triton
def test_ring_attention_on_triton():
    """The ring's blocks on the Triton kernels (in Triton's interpreter without a GPU)."""
    if not fastattn.backends()["triton"]["available"] or torch.cuda.is_available():
        pytest.skip("the Triton backend runs CPU tensors only in its interpreter (TRITON_INTERPRET=1)")
    spawn(2, _ring_on, "triton", [RingCase(6, torch.float32, causal=True, gate="headwise", lse_grad=True),
                                  RingCase(5, torch.float16, layout="contiguous", D=32, gate="elementwise")])


def test_ring_attention_on_the_cuda_kernels_emulated():
    """The ring's blocks on csrc/cuda's kernels under the CPU emulation."""
    why = _emulation_missing() or ("a CUDA device runs these kernels for real" if torch.cuda.is_available() else None)
    if why:
        pytest.skip(why)
    import cuda_emu
    cuda_emu.load()
    spawn(2, _ring_on, "cuda_emu", [RingCase(4, torch.bfloat16, causal=True, B=1, Hq=2, Hkv=1, D=64,
                                             gate="headwise", lse_grad=True)])


def _nan_key(t):
    t = dict(t, k=t["k"].clone())
    t["k"][0, 1, 5, 3] = float("nan")  # every row of batch 0, query heads 2-3 becomes NaN
    return t


def _nan_last_query(t):
    t = dict(t, q=t["q"].clone())
    t["q"][0, 2, -1, 3] = float("nan")  # the last row sees every key: all of kv head 1's dk, dv become NaN
    return t


def test_ring_attention_nan_reaches_the_rows_it_reaches():
    """NaN reaches what it reaches as in the whole-sequence reference, across ranks: a NaN key every row (not
    causal), a NaN in the last query its row and every key's gradient (causal: the last row hides no key,
    so docs/CONTRACT.md §2.2 leaves nothing unspecified)."""
    spawn(2, _ring_against_whole, [RingCase(6, torch.float32, layout="contiguous")], _nan_key)
    spawn(2, _ring_against_whole, [RingCase(6, torch.float32, causal=True),
                                   RingCase(6, torch.float32, causal=True, layout="contiguous")], _nan_last_query)


def _ring_memory(rank, world, L, D):
    def peak(group, size, causal):
        q, k, v = (torch.randn(1, 4, L, D, requires_grad=True) for _ in range(3))
        with TensorMemory() as mem:
            fd.ring_attention(q, k, v, causal=causal, group=group).sum().backward()
        assert mem.longest <= L, f"rank {rank} of {size}: made a tensor of sequence length {mem.longest} > {L}"
        return mem.peak

    peak(None, world, True)
    four = dist.new_group([0, 1, 2, 3])  # every rank takes part in making it
    # Not causal: every step computes the same block (a causal zigzag rank's blocks, all queries and half the
    # keys or the reverse, come in a mix that shifts with the ring's size). From step 2 on (4 ranks or more),
    # a step holds its K/V, the next K/V arriving and the dK/dV of two steps in flight: the most it ever does.
    in_four = peak(four, 4, False) if rank < 4 else None
    in_world = peak(None, world, False)
    assert in_four is None or in_world <= in_four + L * 4 * 8, \
        f"rank {rank}: peak {in_world} B over {world} ranks > {in_four} B over 4 (a K shard is {4 * L * D * 4} B)"


def test_ring_attention_holds_no_whole_length_kv():
    """No rank makes a tensor as long as the sequence, and a rank's peak of what it makes does not grow with
    the number of ranks (5 against 4, with the same shards): it holds the K/V shards in flight, never the
    sequence's."""
    spawn(5, _ring_memory, 32, 64)


def _ring_errors(rank, world):
    q = torch.randn(1, 2, 6, 8)
    with pytest.raises(ValueError, match="layout='zigzag'.*must be even, got 5"):
        fd.ring_attention(q[:, :, :5], q[:, :, :5], q[:, :, :5], causal=True)
    with pytest.raises(ValueError, match="causal: the q and k shards must have the same length, got 6 and 4"):
        fd.ring_attention(q, q[:, :, :4], q[:, :, :4], causal=True)
    with pytest.raises(ValueError, match="layout: expected one of"):
        fd.ring_attention(q, q, q, layout="striped")
    with pytest.raises(ValueError, match="k: head dim must equal q's"):
        fd.ring_attention(q, q[..., :4], q)
    with pytest.raises(ValueError, match=r"x: layout='zigzag' over 2 ranks cuts the sequence into 4 equal chunks, "
                                         r"but its length is 6"):
        fd.shard_sequence(q)
    assert fd.ring_attention(q[:0], q[:0], q[:0], causal=True).shape == (0, 2, 6, 8)  # empty: as attention


def test_ring_attention_errors():
    spawn(2, _ring_errors)


def test_ring_attention_needs_an_initialized_group():
    q = torch.randn(1, 1, 4, 8)
    if dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        fd.ring_attention(q, q, q)


# ------------------------------------------------------------------------------------- data parallel
def _model(seed):
    torch.manual_seed(seed)
    layer = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
    model = torch.nn.Sequential(torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
                                torch.nn.Linear(32, 1))
    assert fastattn.replace_attention(model) == 2
    return model


def _train(model, batches, params):
    opt = torch.optim.SGD(params, lr=0.1)
    for x, y in batches:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x).squeeze(-1), y).backward()
        opt.step()


def _data_parallel(rank, world, wrap):
    gen = torch.Generator().manual_seed(7)
    batches = [(torch.randn(4 * world, 9, 32, generator=gen), torch.randn(4 * world, 9, generator=gen))
               for _ in range(3)]
    single = _model(0)
    _train(single, batches, single.parameters())

    model = _model(0)
    if wrap == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard
        for mod in model[0].layers:
            fully_shard(mod)
        fully_shard(model)
    mine = [(x[4 * rank:4 * (rank + 1)], y[4 * rank:4 * (rank + 1)]) for x, y in batches]
    _train(model, mine, model.parameters())
    params = dict(model.module.named_parameters() if wrap == "ddp" else model.named_parameters())
    for name, ref in single.named_parameters():
        got = params[name]
        got = got.full_tensor() if hasattr(got, "full_tensor") else got
        torch.testing.assert_close(got.detach(), ref.detach(), rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert isinstance(single[0].layers[0].self_attn, fastattn.nn.MultiheadAttention)


@pytest.mark.parametrize("wrap", ["ddp", "fsdp2"])
def test_swapped_model_trains_data_parallel(wrap):
    """A model after replace_attention, 3 SGD steps under DDP / FSDP2 (fully_shard) on 2 ranks, each on half of
    every batch: its parameters equal a single process's on the whole batches."""
    spawn(2, _data_parallel, wrap)


# ------------------------------------------------------------------------- torch's context parallelism
def _close(got, want, what):
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m: f"{what}: {m}")


def _torch_context_parallel(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import context_parallel_unshard

    mesh = init_device_mesh("cpu", (world,))
    gen = torch.Generator().manual_seed(3)
    L = 6 * world  # 2·world chunks: torch shards head-tail (fastattn's "zigzag")
    for causal in (True, False):
        q, k, v = (torch.randn(2, 4, L, 16, generator=gen, requires_grad=True) for _ in range(3))
        want = fastattn.attention(q, k, v, causal=causal)
        want.backward(torch.ones_like(want))
        shards = [t.detach().clone() for t in (q, k, v)]
        with context_parallel(mesh, buffers=shards, buffer_seq_dims=[2, 2, 2], no_restore_buffers=set(shards)):
            for t in shards:
                t.requires_grad_()
            out = fastattn.scaled_dot_product_attention(*shards, is_causal=causal)
            out.backward(torch.ones_like(out))
            got = context_parallel_unshard(mesh, [out.detach()] + [t.grad for t in shards], [2] * 4)
        for name, g, w in zip(("out", "dq", "dk", "dv"), got, (want, q.grad, k.grad, v.grad)):
            _close(g, w.detach(), f"rank {rank} causal={causal} {name}")

    # a gated-attention model whose sequence torch shards: fastattn.nn modules follow
    torch.manual_seed(0)
    mha = fastattn.nn.GatedMultiheadAttention(32, 4, batch_first=True)
    x = torch.randn(2, L, 32, generator=gen, requires_grad=True)
    y, _ = mha(x, x, x, need_weights=False, is_causal=True, attn_mask=torch.nn.Transformer.generate_square_subsequent_mask(L))
    y.sum().backward()
    want = {n: p.grad.clone() for n, p in mha.named_parameters()}
    mha.zero_grad()
    xs = x.detach().clone()
    with context_parallel(mesh, buffers=[xs], buffer_seq_dims=[1], no_restore_buffers={xs}):
        hint = torch.nn.Transformer.generate_square_subsequent_mask(xs.shape[1])  # required with is_causal, unread
        ys, _ = mha(xs, xs, xs, need_weights=False, is_causal=True, attn_mask=hint)
        ys.sum().backward()
        (whole,) = context_parallel_unshard(mesh, [ys.detach()], [1])
    _close(whole, y.detach(), f"rank {rank} GatedMultiheadAttention out")
    for n, p in mha.named_parameters():
        dist.all_reduce(p.grad)  # each rank's gradient is its shard's share
        _close(p.grad, want[n], f"rank {rank} GatedMultiheadAttention d{n}")

    with context_parallel(mesh, buffers=[torch.zeros(1, 1, L)], buffer_seq_dims=[2]):
        with pytest.raises(NotImplementedError, match="attn_mask: masks over a sequence sharded"):
            fastattn.attention(q, k, v, attn_mask=torch.ones(L, L, dtype=torch.bool))

    # context_parallel() keeps its mesh in a module global after it exits (torch 2.11-2.13); the gloo group
    # it holds, torn down with the interpreter, then aborts the process now and then
    from torch.distributed.tensor.experimental._context_parallel import _attention
    _attention._replaced_functions.clear()


def _dtensors(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.experimental._context_parallel import _cp_options

    mesh = init_device_mesh("cpu", (world,))
    gen = torch.Generator().manual_seed(4)
    L = 4 * world
    q, k, v = (torch.randn(2, 4, L, 16, generator=gen, requires_grad=True) for _ in range(3))
    gate = torch.randn(2, 4, L, 16, generator=gen, requires_grad=True)
    want, want_lse = fastattn.attention(q, k, v, causal=True, gate=gate, return_lse=True)
    want.backward(torch.ones_like(want))
    layout = "zigzag" if _cp_options.enable_load_balance else "contiguous"
    for dim in (2, 1, 0):
        shard = (lambda t: fd.shard_sequence(t.detach(), layout=layout)) if dim == 2 else \
            (lambda t: t.detach().chunk(world, dim)[rank].clone())
        whole = (lambda t: fd.unshard_sequence(t, layout=layout)) if dim == 2 else \
            (lambda t: torch.cat([torch.empty_like(t) for _ in range(world)], dim))
        local = [shard(t).requires_grad_() for t in (q, k, v, gate)]
        qd, kd, vd, gd = (DTensor.from_local(t, mesh, [Shard(dim)], run_check=False) for t in local)
        out, lse = fastattn.attention(qd, kd, vd, causal=True, gate=gd, return_lse=True)
        assert isinstance(out, DTensor) and out.placements == (Shard(dim),) and out.shape == want.shape
        assert isinstance(lse, DTensor) and lse.shape == want_lse.shape
        out.to_local().backward(torch.ones_like(out.to_local()))
        if dim == 2:
            for name, g, w in zip(("out", "dq", "dk", "dv", "dgate"), [out.to_local()] + [t.grad for t in local],
                                  (want, q.grad, k.grad, v.grad, gate.grad)):
                _close(whole(g.detach()), w.detach(), f"rank {rank} Shard(2) {name}")
        else:
            for name, g, w in zip(("out", "dq", "dgate"), (out.full_tensor(), local[0].grad, local[3].grad),
                                  (want, q.grad, gate.grad)):
                _close(g.detach(), shard(w) if name != "out" else w.detach(), f"rank {rank} Shard({dim}) {name}")
    sdpa = fastattn.scaled_dot_product_attention(qd, kd, vd)
    assert isinstance(sdpa, DTensor)


def test_torch_context_parallel_runs_fastattn():
    """Inside torch's context_parallel(), fastattn.scaled_dot_product_attention (causal, head-tail sharded, or
    not) and a GatedMultiheadAttention model run the ring over the shards torch made: out and every gradient
    as on the whole sequence; a mask there is refused."""
    spawn(2, _torch_context_parallel)


def test_dtensor_inputs():
    """fastattn.attention on DTensors: sharded along the sequence it runs the ring, along batch or heads each
    rank its part; DTensors come back, gradients as on whole tensors."""
    spawn(2, _dtensors)


def test_context_parallel_example_runs(capsys, monkeypatch):
    """examples/context_parallel_gated_lm.py at tiny sizes: the 2-rank run's losses are the single process's."""
    examples = pathlib.Path(__file__).resolve().parents[1] / "examples"
    monkeypatch.syspath_prepend(str(examples))  # the ranks it spawns import it by name
    example = importlib.import_module("context_parallel_gated_lm")
    assert example.main(["--ranks", "2", "--seq", "64", "--steps", "3", "--dim", "32", "--layers", "1"]) == 0
    out = capsys.readouterr().out
    worst = float(out.rsplit("largest loss difference:", 1)[1])
    assert worst < 1e-5 and out.count("rank ") == 2, out
