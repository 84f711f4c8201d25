"""The main demo: compile the three example models and show what sparsec did.

For each model it prints the plan (every layer, with the reason), the weight-byte savings, and how
closely the compiled model agrees with the original model run on the pruned weights.

    make demo        (or: python examples/demo.py)
"""
import copy
import dataclasses
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cnn  # noqa: E402
import mlp  # noqa: E402
import transformer  # noqa: E402

import sparsec  # noqa: E402


def with_effective_weights(model, cm):
    """The original model, each planned layer's weight replaced by what the compiled layer computes with."""
    ref = copy.deepcopy(model)
    params = dict(ref.named_parameters())
    for lp in cm.plan.sparse_layers:
        target = params.get(f"{lp.name}.weight", params.get(lp.name))
        with torch.no_grad():
            target.copy_(cm.effective_weight(lp.name))
    return ref


def show(title, build, **options):
    model, inputs = build()
    start = time.perf_counter()
    cm = sparsec.compile(model, example_inputs=inputs, **options)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        got, dense = cm(*inputs), model(*inputs)
        expected = with_effective_weights(model, cm)(*inputs)
    scale = expected.abs().max()
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
    print(f"output vs original model on pruned weights: max abs error {float((got - expected).abs().max()):.2e} "
          f"(output scale {float(scale):.2f}); vs the dense model: {float((got - dense).abs().max()):.2e} (pruning changes it)")


def main():
    torch.set_printoptions(precision=4)
    show("MLP", mlp.build_model, pattern="2:4")
    show("MLP", mlp.build_model, pattern="2:4", quantize="int8")
    show("CNN", cnn.build_model, pattern="2:4")
    show("Transformer encoder", transformer.build_model, pattern="2:4", quantize="auto")
    show("Transformer encoder", transformer.build_model, pattern="fanin:0.9", include=["blocks.0.attn.q"])
    model, inputs = transformer.build_model()
    cm = sparsec.compile(model, pattern="2:4", example_inputs=inputs)
    print("\n=== the transformed graph of the transformer encoder (cm.graph_module.code) ===")
    print(cm.graph_module.code.strip())


if __name__ == "__main__":
    main()
