"""Swap attention in a small Transformer language model with one line; train both; same losses.

    python examples/swap_transformer_lm.py [--steps 5] [--dtype float64]

Two copies of the same model (nn.TransformerEncoder with a causal mask, i.e. a decoder-only LM) train
on the same synthetic token stream: one on PyTorch's attention, one after
``fastattn.replace_attention(model)``. Dropout is 0 so the runs are deterministic and comparable.
"""
import argparse
import copy

import torch
from torch import nn

import fastattn


class TinyLM(nn.Module):
    def __init__(self, vocab=64, dim=64, heads=4, layers=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(128, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens):
        L = tokens.shape[1]
        causal = nn.Transformer.generate_square_subsequent_mask(L, dtype=self.pos.dtype)
        x = self.emb(tokens) + self.pos[:L]
        return self.head(self.body(x, mask=causal, is_causal=True))


def synthetic_batch(gen, batch=8, length=33, vocab=64):
    """Sequences that follow t[i+1] = (t[i] * 3 + 1) % vocab after a random start: learnable."""
    start = torch.randint(0, vocab, (batch, 1), generator=gen)
    steps = [start]
    for _ in range(length - 1):
        steps.append((steps[-1] * 3 + 1) % vocab)
    return torch.cat(steps, dim=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)

    torch.manual_seed(0)
    ref = TinyLM().to(dtype)
    model = copy.deepcopy(ref)
    swapped = fastattn.replace_attention(model)  # <- the one-line swap
    print(f"swapped {swapped} attention modules for fastattn.nn.MultiheadAttention")

    opts = [torch.optim.AdamW(m.parameters(), lr=3e-3) for m in (ref, model)]
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    print(f"{'step':>4}  {'torch loss':>12}  {'fastattn loss':>13}  {'|diff|':>9}")
    for step in range(args.steps):
        tokens = synthetic_batch(gen)
        losses = []
        for m, opt in zip((ref, model), opts):
            logits = m(tokens[:, :-1])
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        diff = abs(losses[0] - losses[1])
        worst = max(worst, diff)
        print(f"{step:>4}  {losses[0]:>12.8f}  {losses[1]:>13.8f}  {diff:>9.2e}")
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    print("identical losses" if worst <= tol else f"losses differ by {worst:.2e}")
    return 0 if worst <= tol else 1


if __name__ == "__main__":
    raise SystemExit(main())
