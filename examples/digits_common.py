"""Shared by the digits examples: scikit-learn's bundled 8x8 digits (no download), an MLP, a
seeded training loop and test accuracy. Everything is deterministic for a given seed and torch thread count
(threads change the order a convolution sums in, and training carries the last bits into the accuracy)."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from decimal import ROUND_HALF_UP, Decimal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def load_digits_split(seed: int = 0, test_fraction: float = 0.25):
    """Standardised features; returns (x_train, y_train, x_test, y_test) tensors."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-3)
    x = (x - mean) / std
    return x[train], y[train], x[test], y[test]


class DigitsMLP(nn.Module):
    def __init__(self, hidden: int = 256, depth: int = 3):
        super().__init__()
        widths = [64] + [hidden] * depth
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.head = nn.Linear(hidden, 10)

    def forward(self, x):
        for layer in self.hidden:
            x = torch.relu(layer(x))
        return self.head(x)


def make_model(seed: int = 0, **kwargs) -> DigitsMLP:
    torch.manual_seed(seed)
    return DigitsMLP(**kwargs)


def train(model: nn.Module, data, epochs: int = 40, lr: float = 0.05, seed: int = 0, batch: int = 64,
          extra_loss=None, after_step=None, optimizer=None) -> float:
    """SGD with momentum and a cosine schedule; returns wall-clock seconds.
    extra_loss() is added to the loss (e.g. a group-lasso penalty); after_step() runs after every
    optimizer step (e.g. a sparsity scheduler)."""
    x_train, y_train, _, _ = data
    opt = optimizer or torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    steps = epochs * -(-len(x_train) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(x_train), generator=g)
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            if extra_loss is not None:
                loss = loss + extra_loss()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if after_step is not None:
                after_step()
    return time.perf_counter() - start


def steps_per_run(data, epochs: int, batch: int = 64) -> int:
    return epochs * -(-len(data[0]) // batch)


@torch.no_grad()
def accuracy(model: nn.Module, data) -> float:
    model.eval()
    _, _, x_test, y_test = data
    return 100.0 * float((model(x_test).argmax(1) == y_test).float().mean())


def layer_weights(cm, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A compiled DigitsMLP layer's (weight * mask, bias): what it must compute with, in plain torch."""
    layer = cm.sparse_module(name) or cm.graph_module.get_submodule(name)  # (None: a layer left as nn.Linear)
    return layer.weight * cm.mask(name), layer.bias


@torch.no_grad()
def plain_torch_forward(cm, x: torch.Tensor) -> torch.Tensor:
    """DigitsMLP's forward in plain torch on a compiled model's weights and masks (the plan lists the
    layers in the order they run: hidden.0, hidden.1, ..., head), ReLU between."""
    names = [lp.name for lp in cm.plan]
    for i, name in enumerate(names):
        x = F.linear(x, *layer_weights(cm, name))
        x = torch.relu(x) if i < len(names) - 1 else x
    return x


@torch.no_grad()
def check_outputs(cm, x: torch.Tensor) -> float:
    """The compiled model's eval-mode outputs against plain_torch_forward; returns the largest gap,
    relative to the largest output (an AssertionError past 1e-5)."""
    cm.eval()
    expected = plain_torch_forward(cm, x)
    gap = float((cm(x) - expected).abs().max() / expected.abs().max())
    assert gap <= 1e-5, f"the compiled model differs from plain torch on its masked weights by {gap:.2g}"
    return gap


def unstructured_pruned_count(numel: int, sparsity: float) -> int:
    """round(S * numel), halves up, on S as written (written here, not taken from sparsec): the weights
    "unstructured:S" prunes anywhere in a layer."""
    return int((Decimal(repr(sparsity)) * numel).quantize(Decimal(1), rounding=ROUND_HALF_UP))


@torch.no_grad()
def check_against_plain_torch(cm, x: torch.Tensor) -> float:
    """Checks a compiled DigitsMLP: its eval-mode outputs against plain_torch_forward (returns the
    largest gap, relative to the largest output), and each sparse layer's mask against its pattern
    (N:M: exactly N kept in every group of M along the row; fan-in: the same count in every row;
    unstructured: exactly unstructured_pruned_count weights pruned)."""
    gap = check_outputs(cm, x)
    for lp in cm.plan.sparse_layers:
        mask = cm.mask(lp.name)
        if lp.sparsity.startswith("fanin:"):
            assert len(set(mask.sum(1).tolist())) == 1, f"{lp.name}: rows keep different counts"
        elif lp.sparsity.startswith("unstructured:"):
            pruned = unstructured_pruned_count(mask.numel(), float(lp.sparsity.split(":")[1]))
            assert int((~mask).sum()) == pruned, f"{lp.name}: not {lp.sparsity}"
        else:
            n, m = map(int, lp.sparsity.split(":"))
            assert bool((mask.reshape(mask.shape[0], -1, m).sum(-1) == n).all()), f"{lp.name}: not {lp.sparsity}"
    return gap


def nonzero_weights(model: nn.Module) -> int:
    """Weights (not biases) that are nonzero: what a sparse model really keeps."""
    return int(sum((p != 0).sum() for name, p in model.named_parameters() if p.dim() > 1))


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format)."""
    widths = [max(len(h), *(len(format(r[k], f)) for r in rows)) for k, h, f in columns]
    print("  ".join(h.ljust(w) for (_, h, _), w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(format(r[k], f).ljust(w) for (k, _, f), w in zip(columns, widths)))


def seeded(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def example_args() -> argparse.Namespace:
    """The digits examples' command line: --epochs (default 40, at least 1) and --seed (default 0)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")
    return args


def write_results(name: str, payload: dict) -> str:
    """Write an example's results to <$SPARSEC_RESULTS_DIR or bench/results>/<name>-<date>.json; returns the path."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = os.environ.get("SPARSEC_RESULTS_DIR", os.path.join(root, "bench", "results"))
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{name}-{datetime.date.today().isoformat()}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {path}")
    return path
