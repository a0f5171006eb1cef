"""Attention pooling for multiple-instance learning with fastattn.nn.AttentionGate.

    python examples/attention_gate_mil.py [--steps 300] [--out attention_gate_alpha.png]

Each bag holds N instances (feature vectors); a bag is positive when it contains at least one
"key" instance (a fixed direction added to its features). The classifier embeds the instances,
pools them with α = softmax over instances of a learned score (AttentionGate(pool=True), on
fastattn.score_softmax_gate), and classifies the pooled vector. After training α concentrates on
the key instances: the plot (matplotlib, optional; without it α is printed) shows α per instance
with the key instances marked.
"""
import argparse

import torch
from torch import nn

from fastattn.nn import AttentionGate

D_IN, D = 16, 32


def make_bags(gen, n_bags, n_inst=12):
    x = torch.randn(n_bags, n_inst, D_IN, generator=gen)
    key_dir = torch.ones(D_IN) / D_IN ** 0.5 * 3.0
    label = torch.rand(n_bags, generator=gen) < 0.5
    is_key = torch.zeros(n_bags, n_inst, dtype=torch.bool)
    for b in torch.nonzero(label).flatten():
        k = int(torch.randint(1, 3, (1,), generator=gen))
        idx = torch.randperm(n_inst, generator=gen)[:k]
        is_key[b, idx] = True
    x = x + is_key[..., None] * key_dir
    return x, label.float(), is_key


class MILClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(D_IN, D), nn.Tanh())
        self.pool = AttentionGate(D, num_heads=1, pool=True)
        self.cls = nn.Linear(D, 1)

    def forward(self, bags, return_weights=False):
        h = self.embed(bags)                                   # (B, N, D)
        z, alpha = self.pool(h, return_weights=True)           # (B, D), (B, N, 1)
        logit = self.cls(z).squeeze(-1)
        return (logit, alpha.squeeze(-1)) if return_weights else logit


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default="attention_gate_alpha.png")
    args = ap.parse_args()

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = MILClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(args.steps):
        x, y, _ = make_bags(gen, 32)
        loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")

    x, y, is_key = make_bags(gen, 256)
    with torch.no_grad():
        logit, alpha = model(x, return_weights=True)
    acc = ((logit > 0).float() == y).float().mean().item()
    pos = y.bool()
    on_keys = (alpha * is_key).sum(1)[pos].mean().item()
    print(f"test accuracy {acc:.3f}; on positive bags, α puts {on_keys:.2f} of its mass on the key instances")

    show = torch.nonzero(pos).flatten()[:4].tolist() + torch.nonzero(~pos).flatten()[:2].tolist()
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: α per instance (* = key instance)")
        for b in show:
            row = " ".join(f"{a:.2f}{'*' if k else ' '}" for a, k in zip(alpha[b].tolist(), is_key[b].tolist()))
            print(f"bag {b:3d} ({'pos' if y[b] else 'neg'}): {row}")
        return 0
    fig, axes = plt.subplots(len(show), 1, figsize=(7, 1.4 * len(show)), sharex=True)
    for ax, b in zip(axes, show):
        n = alpha.shape[1]
        colors = ["tab:red" if k else "tab:blue" for k in is_key[b].tolist()]
        ax.bar(range(n), alpha[b].numpy(), color=colors)
        ax.set_ylabel(f"bag {b}\n{'pos' if y[b] else 'neg'}", fontsize=8)
        ax.set_ylim(0, 1)
    axes[-1].set_xlabel("instance (red = key instance)")
    fig.suptitle("AttentionGate α over the instances of each bag")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
