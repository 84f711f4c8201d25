"""Pruning-aware training on scikit-learn's bundled digits (no download), seeded:

    dense | 2:4 weights | 2:4 weights + SDGP (2:4 data gradients) | fan-in 0.9 | group lasso + shrink

Prints a table of test accuracy, weights kept and training time, and saves it to
bench/results/digits-<date>.json (or $SPARSEC_RESULTS_DIR). The shrunk model is checked to compute what the
unshrunk one does; each compiled model's outputs against plain torch on its masked weights, and
its masks against their pattern. Targets (issue 5): 2:4 + SDGP within 1.5 points of dense;
shrink keeps accuracy within 0.5 points while removing at least 30% of hidden units.

    python examples/train_digits.py [--epochs 40] [--seed 0]
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from digits_common import (write_results, accuracy, example_args, check_against_plain_torch, load_digits_split, make_model,  # noqa: E402
                           nonzero_weights, print_table, train)

import sparsec  # noqa: E402

LASSO_LAMBDA = 5e-3      # penalty on the sum of row norms: zeroes the neurons the task does not need
LASSO_THRESHOLD = 1e-2   # row norms below this after training are set to exactly 0


def compiled(model, data, **options):
    """Every layer whose shape fits is made sparse (include=['.*'] overrides the first/last policy)."""
    return sparsec.compile(model, example_inputs=(data[0][:2],), train=True, include=[".*"], **options)


def run_config(name: str, data, epochs: int, seed: int, build) -> dict:
    model = build()
    seconds = train(model, data, epochs=epochs, seed=seed)
    row = {"config": name, "accuracy": accuracy(model, data), "weights": nonzero_weights(model),
           "train_s": seconds, "model": model}
    if isinstance(model, sparsec.CompiledModel):  # outputs and masks checked in plain torch
        row["max_rel_gap_vs_torch"] = check_against_plain_torch(model, data[2])
    return row


def group_lasso_and_shrink(data, epochs: int, seed: int, dense_acc: float) -> list[dict]:
    """FSSL: train with a row group-lasso penalty, zero the tiny rows, fine-tune, then shrink."""
    from sparsec.group_lasso import GroupLasso
    from sparsec.shrink import shrink

    model = make_model(seed)
    cm = sparsec.compile(model, pattern="dense", example_inputs=(data[0][:2],), train=True)
    lasso = GroupLasso(cm, lam=LASSO_LAMBDA, groups="rows")
    seconds = train(cm, data, epochs=epochs, seed=seed, extra_loss=lasso)
    lasso.zero_small_(threshold=LASSO_THRESHOLD)  # SSL: groups this small are noise; make them exactly 0
    frozen = lasso.freeze_zero_groups()          # fine-tune without the penalty, zero groups held at 0
    seconds += train(cm, data, epochs=max(1, epochs // 4), seed=seed + 1, lr=0.01)
    frozen.remove()
    before = {"config": "group lasso (before shrink)", "accuracy": accuracy(cm, data), "weights": nonzero_weights(cm),
              "train_s": seconds}
    small = shrink(cm, threshold=0.0)
    report = small.shrink_report
    with torch.no_grad():  # the shrunk model must compute what the unshrunk one does
        cm.eval(), small.eval()
        expected = cm(data[2])
        gap = float((small(data[2]) - expected).abs().max() / expected.abs().max())
    assert gap <= 1e-5, f"the shrunk model's outputs differ from the unshrunk model's by {gap:.2g}"
    after = {"config": "group lasso + shrink", "accuracy": accuracy(small, data), "weights": nonzero_weights(small),
             "train_s": seconds, "hidden_before": report.hidden_before, "hidden_after": report.hidden_after,
             "max_rel_gap_vs_unshrunk": gap}
    print(report)
    print(f"shrunk vs unshrunk outputs on the test set: max gap {gap:.1e} of the largest output")
    return [before, after]


def main() -> None:
    args = example_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = load_digits_split(seed=args.seed)
    e, s = args.epochs, args.seed
    configs = [
        ("dense", lambda: make_model(s)),
        ("2:4 weights", lambda: compiled(make_model(s), data, pattern="2:4")),
        ("2:4 weights + SDGP 2:4", lambda: compiled(make_model(s), data, pattern="2:4", grad_pattern="2:4")),
        ("dense weights + SDGP 2:4", lambda: compiled(make_model(s), data, pattern="dense", grad_pattern="2:4")),
        ("fan-in 0.9", lambda: compiled(make_model(s), data, pattern="fanin:0.9")),
    ]
    rows = [run_config(name, data, e, s, build) for name, build in configs]
    dense_acc = rows[0]["accuracy"]
    rows += group_lasso_and_shrink(data, e, s, dense_acc)
    for r in rows:
        r["vs_dense"] = r["accuracy"] - dense_acc
        r.pop("model", None)
    print_table(rows, [("config", "config", ""), ("accuracy", "test acc %", ".2f"), ("vs_dense", "vs dense", "+.2f"),
                       ("weights", "nonzero weights", ","), ("train_s", "train s", ".1f")])
    sdgp = next(r for r in rows if r["config"] == "2:4 weights + SDGP 2:4")
    shrunk = rows[-1]
    removed = 1 - shrunk["hidden_after"] / shrunk["hidden_before"]
    print(f"\n2:4 + SDGP vs dense: {sdgp['vs_dense']:+.2f} points (target within -1.5)")
    print(f"shrink: {shrunk['vs_dense']:+.2f} points vs dense, {100 * removed:.0f}% of hidden units removed "
          f"(target within -0.5 points, >= 30% removed)")
    write_results("digits", {"example": "train_digits", "epochs": e, "seed": s, "torch": torch.__version__, "rows": rows})


if __name__ == "__main__":
    main()
