"""SRigL and GradualPruning (and GroupLasso, given the wrapper) under DDP over subgroups: 4 gloo processes on CPU, DDP groups {0, 1} and {2, 3},
each training its own model on its own data (two replica groups, or two pipeline stages).

Given the DDP wrapper or `process_group=`, a scheduler averages scores, draws sparse_init weights and checks
masks and steps over its group only: each group must end as one process training the group's model on the
group's whole batches (the oracle, as in test_distributed.py). Averaged over the whole world (the compiled
model alone, the old behaviour), the two groups took the same masks.
"""
from __future__ import annotations

import datetime
import io
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import sparsec
from test_distributed import LAYERS, _free_port, _max_diff

WORLD, GROUPS = 4, ([0, 1], [2, 3])
STEPS = 6  # SRigL updates at steps 2 and 4 (t_end = 0.75 * 8); GradualPruning at 2, 4 and 6
# (case, how the scheduler learns the group): "ddp" passes the wrapper, "process_group" the compiled model and
# the group, "world" the compiled model alone (DDP still runs over the subgroup)
RUNS = [("srigl", "ddp"), ("srigl", "process_group"), ("gradual", "ddp"), ("gradual", "process_group"),
        ("srigl", "world")]


def _model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))


def _compile(case: str, group: int):
    # GradualPruning: a model per group (their initial masks differ, so averaging over the world is refused
    # at the start). SRigL: one initial model, so that the world run below starts and shows what it mixes.
    pattern = "fanin:0.75" if case == "srigl" else "unstructured:0.5"
    return sparsec.compile(_model(group if case == "gradual" else 0), example_inputs=(torch.randn(2, 16),),
                           train=True, include=[".*"], min_weights=0, pattern=pattern)


def _batches(group: int):
    g = torch.Generator().manual_seed(100 + group)  # each group its own data
    return [(torch.randn(8, 16, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(STEPS)]


def _scheduler(case: str, target, opt, **kwargs):
    if case == "srigl":
        return sparsec.SRigL(target, opt, total_steps=8, delta_t=2, **kwargs)
    return sparsec.GradualPruning(target, 0.8, end_step=STEPS, every=2, optimizer=opt, **kwargs)


def _train(case: str, group: int, how: str | None, rank: int = 0, size: int = 1, pg=None) -> dict:
    """Train group `group`'s model with `case` for STEPS steps on this rank's share of the group's batches
    (how None, size 1: one process on the whole batches); the masks and state, and whether the scheduler's
    state survives a round trip through torch.save / load(weights_only=True) into a fresh scheduler."""
    cm = _compile(case, group)
    model = DDP(cm, process_group=pg) if pg is not None else cm
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    target, kwargs = (model, {}) if how == "ddp" else (cm, {"process_group": pg} if how == "process_group" else {})
    if case == "srigl":  # sparse_init uses the group's first rank's draw, whose seed the oracle has
        torch.manual_seed(1000 * (group + 1) + rank)
        kwargs["sparse_init"] = True
    scheduler = _scheduler(case, target, opt, **kwargs)
    for x, y in _batches(group):
        share = x.shape[0] // size
        x, y = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        scheduler.step()
    assert scheduler.history, "no mask update ran"
    buffer = io.BytesIO()
    torch.save(scheduler.state_dict(), buffer)  # (a process group in it would fail weights_only)
    buffer.seek(0)
    kwargs.pop("sparse_init", None)
    resumed = _scheduler(case, target, opt, **kwargs)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    return {"state": {k: v.detach().clone() for k, v in cm.state_dict().items()},
            "mask": {name: cm.mask(name) for name in LAYERS},
            "resumed": (resumed.steps, len(resumed.history)) == (scheduler.steps, len(scheduler.history))}


def _refusals(pg) -> dict:
    """The error (or None) of each call that must be refused, or accepted, naming what is accepted."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    def error(call):
        try:
            call()
        except (TypeError, ValueError) as e:
            return str(e)
        return None

    out = {}
    plain = _model(0)
    wrapped = DDP(plain, process_group=pg)
    opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    out["srigl_plain_ddp"] = error(lambda: sparsec.SRigL(wrapped, opt, total_steps=8))
    out["gradual_plain_ddp"] = error(lambda: sparsec.GradualPruning(wrapped, 0.8, end_step=4))
    out["lasso_plain_ddp"] = error(lambda: sparsec.GroupLasso(wrapped, lam=1e-3))
    cm = _compile("gradual", 0)  # GroupLasso takes the wrapper too, and penalizes the compiled model's weights
    out["lasso_ddp_penalty"] = (sparsec.GroupLasso(DDP(cm, process_group=pg), lam=1e-3)().item(),
                                sparsec.GroupLasso(cm, lam=1e-3)().item())
    for case in ("srigl", "gradual"):
        model = DDP(_compile(case, 0), process_group=pg)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        out[f"{case}_other_group"] = error(lambda: _scheduler(case, model, opt, process_group=dist.group.WORLD))
        out[f"{case}_same_group"] = error(lambda: _scheduler(case, model, opt, process_group=pg))
    # fully_shard over each pair: its mesh decides; the world contradicts it, the pair's own group does not
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replica", "shard"))["shard"]
    for case in ("srigl", "gradual"):
        cm = _compile(case, 0)
        fully_shard(cm, mesh=mesh)
        opt = torch.optim.SGD(cm.parameters(), lr=0.1)
        out[f"{case}_fsdp_world"] = error(lambda: _scheduler(case, cm, opt, process_group=dist.group.WORLD))
        out[f"{case}_fsdp_pair"] = error(lambda: _scheduler(case, cm, opt, process_group=pg))
    return out


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    groups = [dist.new_group(ranks) for ranks in GROUPS]  # (every rank creates every group)
    group = next(i for i, ranks in enumerate(GROUPS) if rank in ranks)
    pg, group_rank = groups[group], GROUPS[group].index(rank)
    results = {run: _train(run[0], group, run[1], group_rank, len(GROUPS[group]), pg) for run in RUNS}
    results["refusals"] = _refusals(pg)
    torch.save(results, os.path.join(folder, f"{rank}.pt"))
    dist.barrier()
    os._exit(0)  # skip gloo's teardown (see test_distributed._worker)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp_groups")
    mp.spawn(_worker, args=(WORLD, _free_port(), str(folder)), nprocs=WORLD, join=True)
    return [torch.load(folder / f"{rank}.pt") for rank in range(WORLD)]


@pytest.fixture(scope="module")
def single():
    """The oracle: each group's training in one process on the group's whole batches."""
    return {(case, group): _train(case, group, None) for case in ("srigl", "gradual") for group in range(len(GROUPS))}


def _same_masks(a: dict, b: dict) -> bool:
    return all(torch.equal(a["mask"][name], b["mask"][name]) for name in LAYERS)


@pytest.mark.parametrize("run", RUNS[:4], ids=["-".join(r) for r in RUNS[:4]])
def test_each_ddp_group_trains_as_one_process_on_its_own_batches(ranks, single, run):
    case = run[0]
    for group, members in enumerate(GROUPS):
        first, *others = (ranks[rank][run] for rank in members)
        for other in others:  # the ranks of a group agree exactly
            assert all(torch.equal(first["state"][k], other["state"][k]) for k in first["state"])
        ref = single[case, group]
        assert _same_masks(first, ref), f"group {group}'s masks differ from one process on its batches"
        assert _max_diff(first["state"], ref["state"]) <= 1e-5
        assert first["resumed"], "the scheduler's state did not round-trip"
    # different data: the groups' masks differ, so equality with each oracle means nothing was averaged across
    assert not _same_masks(ranks[GROUPS[0][0]][run], ranks[GROUPS[1][0]][run])


def test_without_the_group_srigl_averages_over_the_world(ranks, single):
    """The old behaviour, which the test above would catch: both groups take the same masks, so at least one
    group's differ from its own training alone."""
    results = [ranks[members[0]]["srigl", "world"] for members in GROUPS]
    assert _same_masks(*results)
    assert not all(_same_masks(res, single["srigl", group]) for group, res in enumerate(results))


def test_a_group_that_contradicts_ddp_or_the_mesh_is_refused(ranks):
    for res in (r["refusals"] for r in ranks):
        for case, name in (("srigl", "SRigL"), ("gradual", "GradualPruning")):
            message = res[f"{case}_plain_ddp"]
            assert f"{name} needs a sparsec.CompiledModel, got a DistributedDataParallel wrapping a Sequential" \
                in message and "or the DistributedDataParallel wrapping it" in message, message
            message = res[f"{case}_other_group"]
            assert "process_group holds ranks [0, 1, 2, 3], but the DistributedDataParallel wrapper given runs " \
                   "over ranks [" in message, message
            message = res[f"{case}_fsdp_world"]
            assert "process_group holds ranks [0, 1, 2, 3], but the model is sharded by fully_shard over a mesh " \
                   "of ranks [" in message and "leave process_group out" in message, message
            assert res[f"{case}_same_group"] is None and res[f"{case}_fsdp_pair"] is None
        message = res["lasso_plain_ddp"]
        assert "GroupLasso needs a sparsec.CompiledModel, got a DistributedDataParallel wrapping a Sequential" \
            in message and "or the DistributedDataParallel wrapping it" in message, message
        through_ddp, direct = res["lasso_ddp_penalty"]
        assert through_ddp == direct > 0


def _parts(case: str):
    cm = _compile(case, 0)
    return cm, torch.optim.SGD(cm.parameters(), lr=0.1)


@pytest.mark.parametrize("case", ["srigl", "gradual"])
def test_process_group_must_be_a_process_group(case):
    cm, opt = _parts(case)
    name = "SRigL" if case == "srigl" else "GradualPruning"
    for bad in ("world", [0, 1], DDP):
        with pytest.raises(TypeError, match=f"{name}: process_group must be a torch.distributed.ProcessGroup .*"
                                            f"got {type(bad).__name__}"):
            _scheduler(case, cm, opt, process_group=bad)
    # what torch.distributed.new_group returns on a rank outside the group
    with pytest.raises(ValueError, match="new_group returns on a rank it does not hold"):
        _scheduler(case, cm, opt, process_group=dist.GroupMember.NON_GROUP_MEMBER)
    with pytest.raises(TypeError, match=f"{name} needs a sparsec.CompiledModel, got Sequential.*DistributedDataParallel"):
        _scheduler(case, _model(0), opt)
