"""The main demo: compile the three example models and show what sparsec did.

For each model it prints the plan (every layer, with the reason), the weight-byte savings, and how
closely the compiled model agrees with the original model run on weights pruned (and int8-quantized)
as the plan says, computed here in plain torch. It exits with status 1 if any compiled model, or any
weight a layer computes with (cm.effective_weight), disagrees with that reference.

    make demo        (or: python examples/demo.py)
"""
import copy
import dataclasses
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cnn  # noqa: E402
import mlp  # noqa: E402
import transformer  # noqa: E402

import sparsec  # noqa: E402


TOLERANCE = 1e-5  # of the output scale: float32 sums in another order


def keep_largest(groups: torch.Tensor, keep: int) -> torch.Tensor:
    """Mask keeping the `keep` largest magnitudes of each last-dim group, ties to the lower index
    (a stable sort keeps equal magnitudes in index order)."""
    order = torch.sort(groups.abs(), dim=-1, descending=True, stable=True).indices[..., :keep]
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True)


def pruned_in_plain_torch(weight: torch.Tensor, sparsity: str, quant) -> torch.Tensor:
    """The weight as the plan says the layer computes with it: rows = output features (a conv's filter
    flattened in memory order), N:M along each row or the constant fan-in k per row, then per-row
    symmetric int8 (scale = max |row| / 127) where the plan says int8."""
    rows = weight.detach().reshape(weight.shape[0], -1)
    if sparsity.startswith("fanin:"):
        k = max(1, math.floor(rows.numel() * (1 - float(sparsity[6:]))) // rows.shape[0])
        mask = keep_largest(rows, k)
    else:
        n, m = map(int, sparsity.split(":"))
        mask = keep_largest(rows.reshape(rows.shape[0], -1, m), n).reshape(rows.shape)
    rows = rows * mask
    if quant == "int8":
        scale = rows.abs().amax(1, keepdim=True) / 127
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        rows = torch.clamp(torch.round(rows / scale), -127, 127) * scale
    return rows.reshape(weight.shape)


def with_pruned_weights(model, cm):
    """The original model, each layer the plan makes sparse holding its weight pruned in plain torch;
    also the largest gap between those weights and what the compiled layers compute with."""
    ref = copy.deepcopy(model)
    params = dict(ref.named_parameters())
    gap = 0.0
    for lp in cm.plan.sparse_layers:
        target = params.get(f"{lp.name}.weight", params.get(lp.name))
        with torch.no_grad():
            target.copy_(pruned_in_plain_torch(target, lp.sparsity, lp.quant))
            gap = max(gap, float((cm.effective_weight(lp.name) - target).abs().max() / target.abs().max()))
    return ref, gap


def show(title, build, **options) -> bool:
    model, inputs = build()
    start = time.perf_counter()
    cm = sparsec.compile(model, example_inputs=inputs, **options)
    seconds = time.perf_counter() - start
    reference, weight_gap = with_pruned_weights(model, cm)
    with torch.no_grad():
        got, dense = cm(*inputs), model(*inputs)
        expected = reference(*inputs)
    scale = expected.abs().max()
    error = float((got - expected).abs().max())
    ok = error <= TOLERANCE * float(scale) and weight_gap <= 1e-6
    t = cm.plan.totals()
    print(f"\n=== {title}: sparsec.compile({', '.join(f'{k}={v!r}' for k, v in options.items())}) in {seconds:.2f} s ===")
    print(cm.plan)
    line = (f"weight bytes: {t['bytes_before'] / 1024:.1f} KB -> {t['bytes_after'] / 1024:.1f} KB "
            f"({100 * (1 - t['bytes_after'] / t['bytes_before']):.0f}% saved)")
    dense_kept = [lp for lp in cm.plan.sparse_layers if lp.backend == "dense"]
    if dense_kept:  # faster as dense pruned weights here (see their reasons); the compressed form is smaller
        compressed = t["bytes_after"] - sum(lp.stored_bytes() - dataclasses.replace(lp, backend="torch").stored_bytes()
                                            for lp in dense_kept)
        line += (f"; {len(dense_kept)} sparse layers run as dense pruned weights, the faster form on this device "
                 f"(backend='torch' stores them compressed: {compressed / 1024:.1f} KB in all)")
    print(line)
    print(f"output vs the original model on weights pruned in plain torch: max abs error {error:.2e} "
          f"(output scale {float(scale):.2f}); vs the dense model: {float((got - dense).abs().max()):.2e} "
          f"(pruning changes it); effective weights vs plain torch: {weight_gap:.1e} of the largest"
          + ("" if ok else "  <- MISMATCH"))
    return ok


def main() -> int:
    torch.set_printoptions(precision=4)
    ok = [show("MLP", mlp.build_model, pattern="2:4"),
          show("MLP", mlp.build_model, pattern="2:4", quantize="int8"),
          show("CNN", cnn.build_model, pattern="2:4"),
          show("Transformer encoder", transformer.build_model, pattern="2:4", quantize="auto"),
          show("Transformer encoder", transformer.build_model, pattern="fanin:0.9", include=["blocks.0.attn.q"])]
    model, inputs = transformer.build_model()
    cm = sparsec.compile(model, pattern="2:4", example_inputs=inputs)
    print("\n=== the transformed graph of the transformer encoder (cm.graph_module.code) ===")
    print(cm.graph_module.code.strip())
    if not all(ok):
        print(f"\nMISMATCH: {ok.count(False)} of {len(ok)} compiled models disagree with plain torch (see above)")
        return 1
    print(f"\nall {len(ok)} compiled models agree with plain torch on the pruned weights")
    return 0


if __name__ == "__main__":
    sys.exit(main())
