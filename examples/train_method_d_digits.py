"""Method (d) (Pietron & Zurek) on scikit-learn's bundled digits (no download), seeded:

    dense | gradual unstructured pruning to 0.9 / 0.95 / 0.98, then levels: none, int8, codebook:4, log2:4

Each sparse model starts at unstructured:0.5, is raised to its target by sparsec.GradualPruning on Zhu &
Gupta's cubic schedule over the first 60% of training (masks only shrink; the rest is retraining with the
masks fixed), then compiled for inference with each quantization. Every model is checked against plain
torch on its effective weights (F.linear + ReLU), each mask against round(S * numel) pruned weights, and
the levels against their definition (codebook: at most 2^4 - 1 distinct nonzero values per layer; log2:
every kept weight a power of two); accuracy, weight bytes (the plan's count) and the backend auto chose
are printed and saved to bench/results/method-d-digits-<date>.json.

    python examples/train_method_d_digits.py [--epochs 40] [--seed 0]
"""
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from digits_common import (write_results, accuracy, example_args, check_outputs, load_digits_split, make_model, print_table, steps_per_run,  # noqa: E402
                           train, unstructured_pruned_count)

import sparsec  # noqa: E402

TARGETS = (0.9, 0.95, 0.98)
QUANTS = (None, "int8", "codebook:4", "log2:4")
INITIAL = 0.5       # the compiled (starting) sparsity
RAMP = 0.6          # fraction of training over which the sparsity rises; the rest retrains


@torch.no_grad()
def check_model(cm, x, sparsity: float, quant) -> None:
    check_outputs(cm, x)  # outputs against F.linear on the effective (masked, dequantized) weights
    for lp in cm.plan.sparse_layers:
        mask, weight = cm.mask(lp.name), cm.effective_weight(lp.name)
        assert int((~mask).sum()) == unstructured_pruned_count(mask.numel(), sparsity), f"{lp.name}: pruned count"
        assert not weight[~mask].any(), f"{lp.name}: a pruned weight is nonzero"
        kept = weight[mask & (weight != 0)].double()
        if quant == "codebook:4":
            assert kept.unique().numel() <= 15, f"{lp.name}: more than 15 shared values"
        if quant == "log2:4":
            assert torch.equal(kept.abs().log2(), kept.abs().log2().round()), f"{lp.name}: not powers of two"


def run(data, target: float, epochs: int, seed: int) -> list[dict]:
    model = make_model(seed)
    cm = sparsec.compile(model, pattern=f"unstructured:{INITIAL}", example_inputs=(data[0][:1],), train=True,
                         include=[".*"])  # every layer, the first and last included
    opt = torch.optim.SGD(cm.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    steps = steps_per_run(data, epochs)
    pruner = sparsec.GradualPruning(cm, target, end_step=int(RAMP * steps), every=25, optimizer=opt)
    seconds = train(cm, data, epochs=epochs, seed=seed, optimizer=opt, after_step=pruner.step)
    cm.eval()
    rows = []
    for quant in QUANTS:
        inference = sparsec.compile(cm, example_inputs=(data[2][:1],), quantize=quant)
        check_model(inference, data[2], target, quant)
        totals = inference.plan.totals()
        # what the compressed form (CSR, levels) stores, also for layers auto kept dense as faster
        compressed = sum(dataclasses.replace(lp, backend=None).stored_bytes() for lp in inference.plan)
        rows.append({"config": f"unstructured {target} " + (quant or "float32"), "sparsity": target, "quant": quant,
                     "accuracy": accuracy(inference, data), "weight_bytes": totals["bytes_after"],
                     "compressed_bytes": compressed,
                     "dense_bytes": totals["bytes_before"], "train_s": seconds, "updates": len(pruner.history),
                     "backends": sorted({lp.backend for lp in inference.plan.sparse_layers})})
    return rows


def main() -> None:
    args = example_args()
    data = load_digits_split(seed=args.seed)
    dense = make_model(args.seed)
    seconds = train(dense, data, epochs=args.epochs, seed=args.seed)
    dense_bytes = sum(p.numel() * p.element_size() for name, p in dense.named_parameters() if p.dim() > 1)
    rows = [{"config": "dense", "sparsity": 0.0, "quant": None, "accuracy": accuracy(dense, data),
             "weight_bytes": dense_bytes, "compressed_bytes": dense_bytes, "dense_bytes": dense_bytes, "train_s": seconds, "updates": 0, "backends": []}]
    for target in TARGETS:
        rows.extend(run(data, target, args.epochs, args.seed))
    for r in rows:
        r["vs_dense"] = r["accuracy"] - rows[0]["accuracy"]
        r["bytes_ratio"] = r["weight_bytes"] / r["dense_bytes"]
        r["compressed_ratio"] = r["compressed_bytes"] / r["dense_bytes"]
    print_table(rows, [("config", "config", ""), ("accuracy", "test acc %", ".2f"), ("vs_dense", "vs dense", "+.2f"),
                       ("bytes_ratio", "held bytes x dense", ".3f"), ("compressed_ratio", "compressed x dense", ".3f"), ("updates", "mask updates", "d"),
                       ("train_s", "train s", ".1f")])
    print("held bytes: the plan's count of what the compiled model holds for its weights: the dense pruned weight "
          "(plus its mask as bits) where backend auto kept a layer dense as faster (these layers are 64-256 wide: "
          "the CSR product's call cost outweighs its arithmetic; bench/bench_unstructured.py times layers large "
          "enough to matter); compressed: what the compressed form stores (CSR values + int32 columns + int64 row "
          "pointers; 1-byte int8 values or level codes plus scales / a table), as backend='torch' keeps it")
    write_results("method-d-digits", {"example": "train_method_d_digits", "epochs": args.epochs, "seed": args.seed, "initial": INITIAL,
                   "ramp": RAMP, "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows})


if __name__ == "__main__":
    main()
