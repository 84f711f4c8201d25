"""Channel pruning of a small MobileNet-style CNN on scikit-learn's bundled 8x8 digits (no download):

    group lasso on the depthwise filters and the expansion rows -> zero the small ones -> fine-tune
    with them frozen -> sparsec.shrink removes the dead channels (expansion, BatchNorm, depthwise,
    projection columns) and computes exactly what the model with them zeroed computes.

A dead depthwise filter outputs a constant (BatchNorm of 0, then ReLU6), which shrink folds into
the projection's bias. One row per group-lasso strength: test accuracy, expansion channels kept,
parameters, and the largest output difference between the shrunk model and the model it came from.

    python examples/shrink_cnn_digits.py [--epochs 30] [--lams 0 0.03 0.06]
"""
import argparse
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from digits_common import write_results, accuracy, load_digits_split, print_table, seeded, train  # noqa: E402

import sparsec  # noqa: E402

THRESHOLD = 5e-2  # group norms below this after training are set to exactly 0
FINE_TUNE_EPOCHS = 5


class DigitsMobileNet(nn.Module):
    """Stem conv, one inverted residual block (expand 1x1, depthwise 3x3, project 1x1), pool, linear."""

    def __init__(self, width: int = 32, expand: int = 4):
        super().__init__()
        hidden = width * expand
        self.stem, self.bn0 = nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.exp, self.bn1 = nn.Conv2d(width, hidden, 1, bias=False), nn.BatchNorm2d(hidden)
        self.dw, self.bn2 = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False), nn.BatchNorm2d(hidden)
        self.proj = nn.Conv2d(hidden, width, 1)  # its bias absorbs the constants of dead channels
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x.view(x.size(0), 1, 8, 8))))
        x = x + self.proj(F.relu6(self.bn2(self.dw(F.relu6(self.bn1(self.exp(x)))))))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def run(data, lam: float, epochs: int, seed: int) -> dict:
    seeded(seed)
    cm = sparsec.compile(DigitsMobileNet(), pattern="dense", example_inputs=(data[0][:2],), train=True)
    lasso = sparsec.GroupLasso(cm, lam=lam, groups="rows", layers=["exp", "dw"]) if lam > 0 else None
    seconds = train(cm, data, epochs=epochs, seed=seed, extra_loss=lasso)
    if lasso is not None:
        lasso.zero_small_(THRESHOLD)  # SSL: groups this small are noise; make them exactly 0
        frozen = lasso.freeze_zero_groups()
        seconds += train(cm, data, epochs=FINE_TUNE_EPOCHS, seed=seed + 1, lr=0.01)
        frozen.remove()
    cm.eval()
    small = sparsec.shrink(cm)
    x_test = data[2]
    with torch.no_grad():
        difference = float((small(x_test) - cm(x_test)).abs().max())
    report = small.shrink_report["exp"]
    return {"lam": lam, "accuracy": accuracy(small, data), "channels": f"{report.after}/{report.before}",
            "params": sum(p.numel() for p in small.parameters()), "params_before": sum(p.numel() for p in cm.parameters()),
            "max_abs_difference": difference, "train_s": seconds}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lams", type=float, nargs="+", default=[0.0, 0.03, 0.06])
    args = parser.parse_args(argv)
    data = load_digits_split(seed=args.seed)
    rows = [run(data, lam, args.epochs, args.seed) for lam in args.lams]
    print_table(rows, [("lam", "group lasso", "g"), ("accuracy", "test acc %", ".2f"), ("channels", "expansion kept", ""),
                       ("params", "params", ","), ("max_abs_difference", "shrunk vs unshrunk", ".1e"),
                       ("train_s", "train s", ".1f")])
    write_results("shrink-cnn-digits", {"example": "shrink_cnn_digits", "epochs": args.epochs, "seed": args.seed, "threshold": THRESHOLD,
                   "torch": torch.__version__, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
