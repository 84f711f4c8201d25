"""SRigL under FSDP2 on two CPU processes (gloo): scikit-learn's bundled digits, no download.

Compile first, then shard the compiled model (each hidden layer, then the root), then build the
optimizer and the SRigL scheduler. Each rank trains on its half of every batch; SRigL averages
its scores over the ranks, so both decide the same masks. Afterwards the whole state dict is
gathered to rank 0, loaded into an unsharded compile of the same model, checked against plain torch
on its weights and masks, and condensed (the condensed model checked against it). Exits 1 when the
ranks' masks differ or a check fails.

    python examples/train_distributed.py [--epochs 30] [--sparsity 0.9]
"""
import argparse
import datetime
import hashlib
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from digits_common import accuracy, check_against_plain_torch, load_digits_split, make_model  # noqa: E402

import sparsec  # noqa: E402

BATCH = 64  # the global batch: each of the 2 ranks takes 32


def compiled(sparsity: float, x):
    return sparsec.compile(make_model(0), pattern=f"fanin:{sparsity}", example_inputs=(x[:1],), train=True,
                           include=[".*"])


def worker(rank: int, world: int, port: int, epochs: int, sparsity: float) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    data = load_digits_split(seed=0)
    x_train, y_train = data[0], data[1]
    cm = compiled(sparsity, x_train)
    for lp in cm.plan:  # each layer's module (the TrainableLayer compile put in its place), then the root
        fully_shard(cm.sparse_module(lp.name))
    fully_shard(cm)
    steps = epochs * -(-len(x_train) // BATCH)
    opt = torch.optim.SGD(cm.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    # about 11 mask updates over the first 75% of training, however many epochs
    srigl = sparsec.SRigL(cm, opt, total_steps=steps, delta_t=max(2, steps // 15), sparse_init=True)
    g = torch.Generator().manual_seed(0)  # the same batch order on every rank; each takes its half
    for _ in range(epochs):
        order = torch.randperm(len(x_train), generator=g)
        for i in range(0, len(order), BATCH):
            idx = order[i:i + BATCH].tensor_split(world)[rank]
            F.cross_entropy(cm(x_train[idx]), y_train[idx]).backward()
            opt.step()
            opt.zero_grad()
            srigl.step()
    masks = b"".join(cm.mask(name).numpy().tobytes() for name in srigl.layers)
    digest = hashlib.sha256(masks).hexdigest()[:16]
    digests = [None] * world
    dist.all_gather_object(digests, digest)
    state = get_model_state_dict(cm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    ok = True
    if rank == 0:
        whole = compiled(sparsity, x_train)
        whole.load_state_dict(state)
        whole.eval()
        small = whole.condense()
        same = len(set(digests)) == 1
        print(f"ranks' masks: {digests} ({'identical' if same else 'DIFFERENT'})")
        print(f"mask updates: {len(srigl.history)}; last: {srigl.history[-1].layers if srigl.history else None}")
        gap = check_against_plain_torch(whole, data[2])  # the gathered model against plain torch on its masks
        with torch.no_grad():
            expected = whole(data[2])
            condensed_gap = float((small(data[2]) - expected).abs().max() / expected.abs().max())
        print(f"test accuracy: trained {accuracy(whole, data):.1f}%, condensed {accuracy(small, data):.1f}%; "
              f"outputs vs plain torch {gap:.1e}, condensed vs trained {condensed_gap:.1e} (of the largest output)")
        ok = same and condensed_gap <= 1e-5
    dist.barrier()
    os._exit(0 if ok else 1)  # skip gloo's teardown, which can deadlock at interpreter exit (see tests/test_distributed.py)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--sparsity", type=float, default=0.9)
    args = parser.parse_args()
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")
    if not 0 < args.sparsity < 1:
        parser.error(f"--sparsity must lie strictly between 0 and 1, got {args.sparsity}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        mp.spawn(worker, args=(2, port, args.epochs, args.sparsity), nprocs=2, join=True)
    except mp.ProcessExitedException as e:  # rank 0 exits 1 when a check failed (printed above)
        print(f"FAILED: {e}")
        sys.exit(1)


if __name__ == "__main__":
    main()
