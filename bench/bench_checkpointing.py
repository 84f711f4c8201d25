"""Activation checkpointing through sparsec.compile(train=True): the memory it saves and the time it costs.

A pre-LayerNorm transformer encoder (examples/transformer.py: 4 blocks, dim 256, 4 heads, MLP 1024, batch
8 x 128 tokens, float32) whose forward runs each block under torch.utils.checkpoint (use_reentrant=False),
or not, and its pruning-aware training compile (pattern 2:4 on every block's linear layers):
  eager         the model itself, checkpointed
  eager_flat    the model itself, not checkpointed
  sparsec       sparsec.compile(model, "2:4", train=True): the compiled model recomputes the checkpointed
                blocks in backward (sparsec/checkpointing.py)
  sparsec_flat  the same compile of the model not checkpointed: what sparsec ran for the checkpointed model
                before it kept checkpointing (the traced graph stored every activation)
Memory: bytes of the tensors autograd holds for backward when forward returns (each storage counted once,
parameters excluded), read with torch.autograd.graph.saved_tensors_hooks: checkpointed spans hold none of
theirs (their own hooks take them), only their inputs. Time: a training step (forward, backward of the
summed squares), medians of rounds in which the four take turns, on this machine's CPU threads.
Each pair is checked first: the checkpointed and flat variants give the same input and parameter gradients.

    python bench/bench_checkpointing.py [--rounds 7]
writes bench/results/checkpointing-cpu<cores>-<date>.json.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
import warnings

import torch
import torch.utils.checkpoint as ckpt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

import sparsec  # noqa: E402
from results_io import Disturbance, arg_parser, parse_args, positive_int, write_results  # noqa: E402
from transformer import Encoder  # noqa: E402


class CheckpointedEncoder(Encoder):
    def __init__(self, checkpointing: bool):
        super().__init__(depth=4)
        self.checkpointing = checkpointing

    def forward(self, x):
        for block in self.blocks:
            x = ckpt.checkpoint(block, x, use_reentrant=False) if self.checkpointing else block(x)
        return self.norm(x)


def saved_bytes(model, x) -> int:
    """Bytes autograd holds for backward once forward returns (parameters excluded, storages once)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    held: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            held[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return sum(held.values())


def step(model, x):
    model.zero_grad(set_to_none=True)
    model(x).square().sum().backward()


def gradients(model, x):
    x = x.detach().clone().requires_grad_(True)
    step(model, x)
    return [x.grad] + [p.grad for p in model.parameters()]


def main() -> int:
    parser = arg_parser(__doc__)
    parser.add_argument("--rounds", type=positive_int, default=7)
    args = parse_args(parser)
    torch.manual_seed(0)
    checkpointed = CheckpointedEncoder(True).train()
    flat = CheckpointedEncoder(False).train()
    flat.load_state_dict(checkpointed.state_dict())
    x = torch.randn(8, 128, 256)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the plan's notes)
        compiled = {name: sparsec.compile(m, pattern="2:4", example_inputs=(x,), train=True, include=["blocks.*"])
                    for name, m in (("sparsec", checkpointed), ("sparsec_flat", flat))}
    variants = {"eager": checkpointed, "eager_flat": flat, **compiled}
    recomputes = {name: "torch.utils.checkpoint.checkpoint(" in cm.graph_module.code for name, cm in compiled.items()}
    assert recomputes == {"sparsec": True, "sparsec_flat": False}, recomputes
    worst = {}
    for a, b in (("eager", "eager_flat"), ("sparsec", "sparsec_flat")):
        pairs = zip(gradients(variants[a], x), gradients(variants[b], x))
        worst[a] = max(float((g - h).abs().max() / h.abs().max().clamp_min(1e-30)) for g, h in pairs)
        assert worst[a] <= 1e-5, (a, worst[a])
    disturbance = Disturbance()
    memory = {name: saved_bytes(m, x) for name, m in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for name, m in variants.items():
        step(m, x)  # warm-up
    for _ in range(args.rounds):
        for name, m in variants.items():
            start = time.perf_counter()
            step(m, x)
            times[name].append(time.perf_counter() - start)
    rows = {name: {"saved_mb": memory[name] / 2**20, "step_ms": 1000 * statistics.median(times[name]),
                   "step_ms_all": [1000 * t for t in times[name]]} for name in variants}
    print(f"{'variant':14s} {'held for backward':>18s} {'training step':>14s}")
    for name, row in rows.items():
        print(f"{name:14s} {row['saved_mb']:15.1f} MB {row['step_ms']:11.1f} ms")
    for a, b in (("eager", "eager_flat"), ("sparsec", "sparsec_flat")):
        print(f"{a}: {rows[a]['saved_mb'] / rows[b]['saved_mb']:.2f}x the memory and "
              f"{rows[a]['step_ms'] / rows[b]['step_ms']:.2f}x the step time of {b}")
    payload = {"threads": torch.get_num_threads(),
               "shape": {"batch": 8, "tokens": 128, "dim": 256, "heads": 4, "mlp": 1024, "blocks": 4},
               "gradient_check_max_rel_diff": worst, "rows": rows, "disturbance": disturbance.report()}
    write_results("checkpointing", f"cpu{os.cpu_count()}", payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
