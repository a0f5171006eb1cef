"""Train a small gated-attention language model context-parallel: its sequence split across processes.

    python examples/context_parallel_gated_lm.py [--ranks 2] [--seq 4096] [--steps 8]

The task needs attention across the whole sequence: the second half of every sequence repeats its first
half, so predicting a token there means finding its twin L/2 positions back, on another rank's shard.
The model's attention is fastattn.attention with the output gate of "Gated Attention for LLMs", causal.

It trains twice from the same initialisation: in one process on the whole sequence, then on --ranks
processes (gloo, CPU), each holding its shard of every sequence, zigzag (fastattn.distributed.shard_sequence:
two chunks, one from each end, so the causal mask leaves every rank the same work), with the attention on
fastattn.distributed.ring_attention. Losses agree step by step; beside them, each process's peak of the
tensor memory one training step makes (fastattn.testing.TensorMemory). (Inside torch's context_parallel(),
fastattn.attention itself runs the ring over the shards torch makes: see the README.)
"""
import argparse
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastattn
import fastattn.distributed
from fastattn.testing import TensorMemory


class GatedAttention(nn.Module):
    """Causal self-attention whose output is gated per channel by sigmoid(x W_g), on fastattn.attention, or,
    given the process group its sequence is sharded over, on fastattn.distributed.ring_attention."""

    def __init__(self, dim, heads, group=None):
        super().__init__()
        self.heads, self.group = heads, group
        self.qkv, self.gate, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, d)
        gate = self.gate(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        if self.group is None:
            y = fastattn.attention(q, k, v, causal=True, gate=gate)
        else:
            y = fastattn.distributed.ring_attention(q, k, v, causal=True, gate=gate, group=self.group)
        return self.out(y.transpose(1, 2).flatten(2))


class Block(nn.Module):
    def __init__(self, dim, heads, group):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), GatedAttention(dim, heads, group)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class LM(nn.Module):
    def __init__(self, vocab, dim, heads, layers, max_len, group=None):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(max_len, dim)
        self.blocks = nn.Sequential(*[Block(dim, heads, group) for _ in range(layers)])
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, vocab))

    def forward(self, tokens, positions):
        return self.head(self.blocks(self.tok(tokens) + self.pos(positions)))


def make_data(args):
    """(inputs, targets, positions), each (batch, seq): random first halves, repeated."""
    gen = torch.Generator().manual_seed(1)
    half = torch.randint(0, args.vocab, (args.batch, args.seq // 2 + 1), generator=gen)
    seq = torch.cat([half, half], 1)[:, :args.seq + 1]
    positions = torch.arange(args.seq).expand(args.batch, -1).contiguous()
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous(), positions


def train(args, inputs, targets, positions, total_tokens, group=None):
    """Trains a fresh model (seed 0) for args.steps; returns (losses, peak bytes of one step, seconds a step)."""
    torch.manual_seed(0)
    model = LM(args.vocab, args.dim, args.heads, args.layers, args.seq, group)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses, peak, start = [], 0, time.perf_counter()
    for step in range(args.steps):
        if step == 1:  # the first step warms up
            start = time.perf_counter()
        opt.zero_grad()
        with TensorMemory() as mem:
            logits = model(inputs, positions)
            # summed over this process's tokens, divided by all of them: the shards' losses add up
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum") / total_tokens
            loss.backward()
        peak = max(peak, mem.peak)
        loss = loss.detach()
        if group is not None:  # every rank's gradient is its tokens' share
            for p in model.parameters():
                dist.all_reduce(p.grad, group=group)
            dist.all_reduce(loss, group=group)
        opt.step()
        losses.append(float(loss))
    per_step = (time.perf_counter() - start) / max(1, args.steps - 1)
    return losses, peak, per_step


def rank_main(rank, args, init, results):
    """One process of the context-parallel run: its zigzag shard of every sequence."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.ranks))
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=args.ranks)
    try:
        inputs, targets, positions = (fastattn.distributed.shard_sequence(t, dim=1) for t in make_data(args))
        res = train(args, inputs, targets, positions, targets.numel() * args.ranks, dist.group.WORLD)
        gathered = [None] * args.ranks
        dist.all_gather_object(gathered, (inputs.shape[1],) + res)
        if rank == 0:
            results.put(gathered)
    finally:
        dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--seq", type=int, default=4096, help="tokens per sequence (a multiple of 2 x ranks)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=32)
    args = p.parse_args(argv)
    if args.seq % (2 * args.ranks):
        p.error(f"--seq must be a multiple of 2 x --ranks = {2 * args.ranks}")

    inputs, targets, positions = make_data(args)
    single = train(args, inputs, targets, positions, targets.numel())

    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(rank_main, args=(args, f"file://{d}/store", results), nprocs=args.ranks)
    per_rank = results.get()

    mb = lambda n: f"{n / 2**20:8.1f} MB"
    print(f"gated-attention LM, {args.layers} layers, dim {args.dim}, {args.heads} heads, batch {args.batch}, "
          f"sequence {args.seq}, {args.steps} Adam steps")
    print(f"{'step':>4}  {'1 process':>10}  {f'{args.ranks} ranks':>10}")
    for i, (a, b) in enumerate(zip(single[0], per_rank[0][1])):
        print(f"{i:>4}  {a:10.5f}  {b:10.5f}")
    print(f"{'':14}{'tokens':>8}  {'peak tensor memory / step':>26}  {'s / step':>8}")
    print(f"{'1 process':14}{args.seq:>8}  {mb(single[1]):>26}  {single[2]:8.3f}")
    for r, (tokens, _, peak, sec) in enumerate(per_rank):
        print(f"{f'rank {r}':14}{tokens:>8}  {mb(peak):>26}  {sec:8.3f}")
    worst = max(abs(a - b) for a, b in zip(single[0], per_rank[0][1]))
    print(f"largest loss difference: {worst:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
