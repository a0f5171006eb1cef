"""Gated ABMIL on fastattn.nn.AttentionPooling, trained on packed bags of different sizes.

    python examples/attention_pool_mil.py [--steps 150] [--bags 16] [--dim 256] [--out attention_pool_alpha.png]

Synthetic slides: a bag holds 50-400 instance features (what a frozen patch encoder would give); a bag is positive
when a few of its instances are "tumour" patches (a fixed direction added to their features). The classifier is
CLAM's single-branch model: a Linear + ReLU embedding, gated attention pooling (fastattn.nn.AttentionPooling), a
Linear classifier of the pooled vector. Each step takes a batch of bags of their own sizes in one packed call: no
padding, and no batch size 1.

Beside it, the same model in eager PyTorch, looping over the bags as CLAM's training code does, trains from the same
initial weights on the same batches. The script prints both losses (they agree to float32 rounding), each model's
time per step, and the test accuracy; then it plots α over a few test bags (matplotlib, optional; without it α's
mass on the tumour instances is printed).
"""
import argparse
import time

import torch
from torch import nn

from fastattn.nn import AttentionPooling


def make_bags(gen, n_bags, dim, lengths=(50, 400)):
    """n_bags bags: a list of (N_b, dim) features, labels (n_bags,), and which instances are tumour ones."""
    direction = torch.ones(dim) / dim ** 0.5 * 4.0
    bags, labels, tumour = [], [], []
    for _ in range(n_bags):
        n = int(torch.randint(lengths[0], lengths[1] + 1, (1,), generator=gen))
        x = torch.randn(n, dim, generator=gen)
        positive = bool(torch.rand(1, generator=gen) < 0.5)
        is_tumour = torch.zeros(n, dtype=torch.bool)
        if positive:
            is_tumour[torch.randperm(n, generator=gen)[:int(torch.randint(1, 6, (1,), generator=gen))]] = True
        bags.append(x + is_tumour[:, None] * direction)
        labels.append(float(positive))
        tumour.append(is_tumour)
    return bags, torch.tensor(labels), tumour


class GatedABMIL(nn.Module):
    """CLAM_SB's layout: fc (Linear + ReLU), gated attention pooling, a classifier of the pooled vector."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU())
        self.pool = AttentionPooling(hidden, hidden=hidden // 2, gated=True, branches=1)
        self.classifier = nn.Linear(hidden, 1)

    def forward(self, bags):
        """A list of bags -> logits (B,) and α (a list of (N_b,))."""
        lengths = [len(b) for b in bags]
        h = self.fc(torch.cat(bags))                                  # every instance of the batch at once
        offsets = torch.tensor([0] + lengths).cumsum(0)
        y, alpha = self.pool(h, offsets=offsets, return_weights=True)  # (B, 1, hidden), (N_total, 1)
        return self.classifier(y[:, 0]).squeeze(-1), list(alpha[:, 0].split(lengths))


class EagerGatedABMIL(nn.Module):
    """The same model as CLAM writes it, one bag at a time; parameter names match GatedABMIL's."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU())
        self.pool = nn.Module()
        self.pool.attention_a = nn.Linear(hidden, hidden // 2)
        self.pool.attention_b = nn.Linear(hidden, hidden // 2)
        self.pool.attention_c = nn.Linear(hidden // 2, 1, bias=False)
        self.classifier = nn.Linear(hidden, 1)

    def forward(self, bags):
        logits, alphas = [], []
        for x in bags:
            h = self.fc(x)
            a = torch.tanh(self.pool.attention_a(h)) * torch.sigmoid(self.pool.attention_b(h))
            A = torch.softmax(self.pool.attention_c(a).t(), dim=1)   # (1, N)
            logits.append(self.classifier(A @ h)[0, 0])
            alphas.append(A[0])
        return torch.stack(logits), alphas


def train(model, batches, lr):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses, seconds = [], 0.0
    for bags, labels in batches:
        t0 = time.perf_counter()
        loss = nn.functional.binary_cross_entropy_with_logits(model(bags)[0], labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        seconds += time.perf_counter() - t0
        losses.append(loss.item())
    return losses, seconds / len(batches)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--bags", type=int, default=16, help="bags per step")
    ap.add_argument("--dim", type=int, default=256, help="instance features (an encoder's output)")
    ap.add_argument("--hidden", type=int, default=128, help="embedding width; the attention's hidden units are half")
    ap.add_argument("--max-instances", type=int, default=400)
    ap.add_argument("--out", default="attention_pool_alpha.png")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    lengths = (min(50, args.max_instances), args.max_instances)
    batches = [make_bags(gen, args.bags, args.dim, lengths)[:2] for _ in range(args.steps)]
    fused = GatedABMIL(args.dim, args.hidden)
    eager = EagerGatedABMIL(args.dim, args.hidden)
    eager.load_state_dict(fused.state_dict())  # the same initial weights

    fused_losses, fused_s = train(fused, batches, 5e-3)
    eager_losses, eager_s = train(eager, batches, 5e-3)
    for step in sorted({0, args.steps // 2, args.steps - 1}):
        print(f"step {step:4d}  loss fused {fused_losses[step]:.4f}  eager {eager_losses[step]:.4f}")
    gap = max(abs(a - b) for a, b in zip(fused_losses, eager_losses))
    print(f"largest loss difference, fused vs eager: {gap:.2e}")
    print(f"time per step ({args.bags} bags of {lengths[0]}-{lengths[1]} instances, packed vs a loop over bags): "
          f"fused {fused_s * 1e3:.1f} ms, eager {eager_s * 1e3:.1f} ms, {eager_s / fused_s:.2f}x")

    bags, labels, tumour = make_bags(gen, 128, args.dim, lengths)
    with torch.no_grad():
        logits, alpha = fused(bags)
        eager_logits, _ = eager(bags)
    for name, lg in (("fused", logits), ("eager", eager_logits)):
        print(f"test accuracy ({name}) {((lg > 0).float() == labels).float().mean().item():.3f}")
    positive = [b for b in range(len(bags)) if labels[b]]
    mass = sum(float(alpha[b][tumour[b]].sum()) for b in positive) / max(1, len(positive))
    print(f"on positive bags, α puts {mass:.2f} of its mass on the tumour instances")

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return 0
    show = positive[:3] + [b for b in range(len(bags)) if not labels[b]][:1]
    fig, axes = plt.subplots(len(show), 1, figsize=(8, 1.5 * len(show)))
    for ax, b in zip(axes, show):
        n = len(alpha[b])
        ax.bar(range(n), alpha[b].numpy(), color=["tab:red" if t else "tab:blue" for t in tumour[b].tolist()],
               width=1.0)
        ax.set_ylabel(f"bag {b}\n{'pos' if labels[b] else 'neg'}", fontsize=8)
    axes[-1].set_xlabel("instance (red: tumour instance)")
    fig.suptitle("AttentionPooling α over the instances of a bag")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
