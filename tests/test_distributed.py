"""Training under torch.distributed (design.md, "Scale beyond one machine"): DDP and FSDP2
(`fully_shard`, on the whole model and per layer), 2 gloo processes on CPU.

For every training feature (fixed masks, SR-STE, SDGP, SRigL, gradual pruning, group lasso with freezing), both
ranks, each training on its half of every batch, must end with identical weights and masks, equal
to one process training the same model on the whole batches: the oracle is the same training
loop without distribution, which is what data parallelism promises to reproduce.
"""
from __future__ import annotations

import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import sparsec
from sparsec.errors import InvalidInputError
from sparsec.runtime.training import TrainableLayer

STEPS = 6
FREEZE_AT = 3  # group lasso: zero small groups and freeze them after this many steps
LAYERS = ["0", "2", "4"]
CASES = {
    "fixed": dict(pattern="2:4"),
    "ste": dict(pattern="2:4", weight_update="ste"),
    "sdgp": dict(pattern="2:4", grad_pattern="2:4", grad_mode="rescale"),
    "srigl": dict(pattern="fanin:0.75"),
    "gradual": dict(pattern="unstructured:0.5"),
    "lasso": dict(pattern="2:4"),
    "lasso_dense": dict(pattern="dense"),
    "checkpointed": dict(pattern="2:4"),  # layers 2 and 4 run under torch.utils.checkpoint
}
WRAPS = ["ddp", "fsdp", "fsdp_layers"]


class _CheckpointedTail(nn.Sequential):
    def forward(self, x):
        h = self[1](self[0](x))
        return torch.utils.checkpoint.checkpoint(lambda h: self[4](self[3](self[2](h))), h, use_reentrant=False)


def _compile(case: str):
    torch.manual_seed(0)
    layers = (nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    model = _CheckpointedTail(*layers) if case == "checkpointed" else nn.Sequential(*layers)
    return sparsec.compile(model, example_inputs=(torch.randn(2, 16),), train=True, include=[".*"], min_weights=0,
                           **CASES[case])


def _batches():
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(16, 16, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(STEPS)]


def _wrap(cm, wrap: str | None, world: int):
    if wrap is None:
        return cm
    if wrap == "ddp":
        return nn.parallel.DistributedDataParallel(cm)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    if wrap == "fsdp_layers":  # the usual FSDP2 layout: each block, then the root
        for module in cm.modules():
            if isinstance(module, TrainableLayer):
                fully_shard(module, mesh=mesh)
    fully_shard(cm, mesh=mesh)
    return cm


def _whole(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _train(case: str, wrap: str | None, rank: int, world: int) -> dict:
    """Train case `case` for STEPS steps on this rank's share of each batch; what the checks compare."""
    cm = _compile(case)
    model = _wrap(cm, wrap, world)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    srigl = lasso = frozen = pruner = None
    if case == "srigl":
        torch.manual_seed(1000 + rank)  # ranks draw different numbers: sparse_init must use rank 0's
        srigl = sparsec.SRigL(cm, opt, total_steps=STEPS, delta_t=2, sparse_init=True)
    if case == "gradual":  # updates at steps 2, 4 and 6
        pruner = sparsec.GradualPruning(cm, 0.8, end_step=STEPS, every=2, optimizer=opt)
    if case.startswith("lasso"):
        lasso = sparsec.GroupLasso(cm, 1e-2, ["rows", "cols"])
    out = {}
    for step, (x, y) in enumerate(_batches()):
        share = x.shape[0] // world
        x, y = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
        loss = F.cross_entropy(model(x), y)
        if lasso is not None:
            loss = loss + lasso()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if srigl is not None:
            srigl.step()
        if pruner is not None:
            pruner.step()
        if lasso is not None and step + 1 == FREEZE_AT:
            out["zeroed"] = lasso.zero_small_(0.3)
            frozen = lasso.freeze_zero_groups()
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # fresh: no state moves frozen groups
    out["state"] = {k: _whole(v) for k, v in cm.state_dict().items()}
    out["recomputes"] = "torch.utils.checkpoint.checkpoint(" in cm.graph_module.code
    out["effective"] = {name: cm.effective_weight(name) for name in LAYERS}
    out["mask"] = {name: cm.mask(name) for name in LAYERS}
    if frozen is not None:
        out["frozen"] = frozen.masks
    if wrap is not None and wrap.startswith("fsdp"):
        out.update(_after_sharded_training(case, cm, rank))
    return out


def _after_sharded_training(case: str, cm, rank: int) -> dict:
    """What the error messages tell FSDP users to do, done: save is refused, the gathered model saves."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    out = {}
    try:
        sparsec.save(cm, os.devnull)
    except InvalidInputError as e:
        out["save_error"] = str(e)
    sharded = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10))
    fully_shard(sharded)
    try:
        sparsec.compile(sharded, example_inputs=(torch.randn(2, 16),))
    except TypeError as e:
        out["compile_error"] = str(e)
    state = get_model_state_dict(cm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:  # the whole state dict lands on rank 0 only
        whole = _compile(case)
        whole.load_state_dict(state)
        sparsec.save(whole, path := f"{os.environ['SPARSEC_TEST_DIR']}/{case}.sparsec")
        out["gathered"] = {name: sparsec.load(path).effective_weight(name) for name in LAYERS}
    return out


def _worker(rank: int, world: int, port: int, wrap: str, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), SPARSEC_TEST_DIR=folder)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    results = {case: _train(case, wrap, rank, world) for case in CASES}
    torch.save(results, os.path.join(folder, f"{wrap}-{rank}.pt"))
    dist.barrier()  # both ranks are done with their collectives and files
    # Skip the process group's teardown: ~ProcessGroupGloo joins its worker thread while holding the
    # GIL, and that thread can be waiting for the GIL (a torch deadlock that hung a CI run).
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single():
    """The oracle: each case trained in one process on whole batches."""
    return {case: _train(case, None, 0, 1) for case in CASES}


_RUNS: dict[str, list[dict]] = {}


def _run(wrap: str, tmp_path_factory) -> tuple[str, list[dict]]:
    """Both ranks' results under `wrap` (one 2-process run per wrap, shared by the tests)."""
    if wrap not in _RUNS:
        folder = tmp_path_factory.mktemp(wrap)
        mp.spawn(_worker, args=(2, _free_port(), wrap, str(folder)), nprocs=2, join=True)
        _RUNS[wrap] = [torch.load(folder / f"{wrap}-{rank}.pt") for rank in range(2)]
    return wrap, _RUNS[wrap]


@pytest.fixture(params=WRAPS)
def ranks(request, tmp_path_factory):
    return _run(request.param, tmp_path_factory)


@pytest.fixture(params=[w for w in WRAPS if w.startswith("fsdp")])
def sharded_ranks(request, tmp_path_factory):
    return _run(request.param, tmp_path_factory)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.parametrize("case", list(CASES))
def test_ranks_agree_and_equal_one_process_on_the_whole_batch(ranks, single, case):
    wrap, (r0, r1) = ranks
    a, b, ref = r0[case], r1[case], single[case]
    for key in ("state", "effective", "mask"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), f"{wrap}: ranks differ in {key}"
    masks = [k for k in ref["state"] if k.endswith("weight_mask")]
    assert len(masks) == (0 if case == "lasso_dense" else 3)
    assert all(torch.equal(a["state"][k], ref["state"][k]) for k in masks), f"{wrap}: masks differ from one process"
    assert all(torch.equal(a["mask"][k], ref["mask"][k]) for k in LAYERS)
    assert _max_diff(a["state"], ref["state"]) <= 1e-5
    assert a["recomputes"] == b["recomputes"] == ref["recomputes"] == (case == "checkpointed")
    # effective_weight gathers sharded weights: the whole layer, as one process has it
    assert _max_diff(a["effective"], ref["effective"]) <= 1e-5
    for name in LAYERS:  # a masked weight is exactly 0
        assert not a["effective"][name][~a["mask"][name]].any()


def test_srigl_changed_masks_and_lasso_froze_groups(ranks, single):
    wrap, (r0, _) = ranks
    initial = _compile("srigl")
    assert any(not torch.equal(r0["srigl"]["mask"][k], initial.mask(k)) for k in LAYERS), "SRigL updated masks"
    for case in ("lasso", "lasso_dense"):
        res = r0[case]
        assert res["zeroed"] == single[case]["zeroed"] > 0
        frozen = sum(int((~keep).sum()) for keep in res["frozen"].values())
        assert frozen > 0
        # fine-tuning with momentum after freezing: every frozen weight is still exactly 0
        for name, keep in res["frozen"].items():
            assert not res["effective"][name][~keep].any(), f"{wrap}: frozen groups of {name} moved"


def test_gradual_pruning_reached_its_target_on_every_rank(ranks):
    from oracle import unstructured_pruned_count

    wrap, results = ranks
    initial = _compile("gradual")
    for res in results:
        for name in LAYERS:
            mask = res["gradual"]["mask"][name]
            assert int((~mask).sum()) == unstructured_pruned_count(mask.numel(), 0.8), f"{wrap}: {name}"
            assert not (mask & ~initial.mask(name)).any(), f"{wrap}: masks only shrink"


def test_sharded_models_are_refused_where_whole_weights_are_needed(sharded_ranks):
    _, (r0, _) = sharded_ranks
    message = r0["fixed"]["save_error"]
    assert "sparsec.save" in message and "sharded by FSDP" in message and "get_model_state_dict" in message
    assert "sharded by FSDP" in r0["fixed"]["compile_error"] and "fully_shard(cm)" in r0["fixed"]["compile_error"]


@pytest.mark.parametrize("case", list(CASES))
def test_the_gathered_state_of_a_sharded_model_saves_and_loads_whole(sharded_ranks, single, case):
    _, (r0, _) = sharded_ranks
    assert _max_diff(r0[case]["gathered"], single[case]["effective"]) <= 1e-5


def _fsdp1_worker(rank: int, world: int, port: int, folder: str) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    errors = {}
    for use_orig_params in (True, False):
        cm = _compile("srigl")
        wrapped = FullyShardedDataParallel(cm, device_id=torch.device("cpu"), use_orig_params=use_orig_params)
        opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
        F.cross_entropy(wrapped(torch.randn(4, 16)), torch.zeros(4, dtype=torch.long)).backward()
        opt.step()
        for what, call in {"SRigL": lambda: sparsec.SRigL(cm, opt, total_steps=STEPS),
                           "GroupLasso": lambda: sparsec.GroupLasso(cm, 1e-3),
                           "effective_weight": lambda: cm.effective_weight("2"),
                           "sparsec.save": lambda: sparsec.save(cm, os.devnull),
                           "shrink": lambda: sparsec.shrink(cm)}.items():
            try:
                call()
                errors[what, use_orig_params] = None
            except InvalidInputError as e:
                errors[what, use_orig_params] = str(e)
    torch.save(errors, os.path.join(folder, f"fsdp1-{rank}.pt"))
    dist.barrier()
    os._exit(0)  # see _worker


def test_fsdp1_flattened_weights_are_refused_naming_fully_shard(tmp_path):
    mp.spawn(_fsdp1_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        errors = torch.load(tmp_path / f"fsdp1-{rank}.pt")
        assert len(errors) == 10
        for (what, _), message in errors.items():
            assert message is not None, f"{what} accepted FSDP1's flattened weights"
            assert what.split()[0] in message and "FSDP1" in message and "fully_shard(cm)" in message, message


def _steps_worker(rank: int, world: int, port: int, folder: str) -> None:
    """Ranks whose SRigL step counts differ by a multiple of delta_t: the usual mistake of resuming
    the scheduler's state on rank 0 only. They take the same collectives, so nothing hangs."""
    from sparsec.distributed import check_same_over_ranks

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    out = {}
    check_same_over_ranks(7, "a value every rank passes")
    try:
        check_same_over_ranks(rank, "the rank")
    except InvalidInputError as e:
        out["helper"] = str(e)
    cm = _compile("srigl")
    opt = torch.optim.SGD(cm.parameters(), lr=0.1)
    srigl = sparsec.SRigL(cm, opt, total_steps=20, delta_t=2)
    if rank == 0:  # resumed at step 2; rank 1 did not load the state
        srigl.load_state_dict({**srigl.state_dict(), "steps": 2})
    try:
        for x, y in _batches()[:2]:  # same batches on both ranks: only the step count differs
            F.cross_entropy(cm(x), y).backward()
            opt.step()
            opt.zero_grad()
            srigl.step()
    except InvalidInputError as e:
        out["srigl"] = str(e)
    out["masks"] = {name: cm.mask(name) for name in LAYERS}
    torch.manual_seed(rank)  # each rank compiles its own initial model: different masks
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    other = sparsec.compile(model, example_inputs=(torch.randn(2, 16),), train=True, include=[".*"], min_weights=0,
                            **CASES["srigl"])
    try:
        sparsec.SRigL(other, torch.optim.SGD(other.parameters(), lr=0.1), total_steps=20, delta_t=2)
    except InvalidInputError as e:
        out["seeds"] = str(e)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    x = _batches()[0][0]
    for case in ("fixed", "ste"):  # fixed masks of each rank's own initial model: refused at the first forward
        torch.manual_seed(rank)
        model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        sharded = sparsec.compile(model, example_inputs=(x,), train=True, include=[".*"], min_weights=0, **CASES[case])
        fully_shard(sharded, mesh=init_device_mesh("cpu", (world,)))
        try:
            out[f"sharded_{case}"] = sharded(x).sum().item()
        except InvalidInputError as e:
            out[f"sharded_{case}"] = str(e)
    torch.save(out, os.path.join(folder, f"steps-{rank}.pt"))
    dist.barrier()
    os._exit(0)  # see _worker


@pytest.fixture(scope="module")
def steps_ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("steps")
    mp.spawn(_steps_worker, args=(2, _free_port(), str(folder)), nprocs=2, join=True)
    return [torch.load(folder / f"steps-{rank}.pt") for rank in range(2)]


def test_check_same_over_ranks_names_each_ranks_value(steps_ranks):
    for res in steps_ranks:
        assert "the rank differs between ranks (rank 0: 0, rank 1: 1)" in res["helper"]


def test_srigl_refuses_ranks_at_different_steps(steps_ranks):
    r0, r1 = steps_ranks
    assert all(torch.equal(r0["masks"][k], r1["masks"][k]) for k in LAYERS)  # no update ran on either rank
    for res in steps_ranks:
        assert "SRigL step differs between ranks (rank 0: 4, rank 1: 2)" in res.get("srigl", "")


def test_srigl_refuses_ranks_that_start_from_different_masks(steps_ranks):
    """Under fully_shard nothing makes the ranks' initial masks agree (FSDP broadcasts no weights): ranks
    that compiled different initial models trained different models silently. (The same model on every
    rank, as above, starts.)"""
    for res in steps_ranks:
        assert "the sparse layers' masks (a CRC-32) when SRigL starts differs between ranks" in res.get("seeds", ""), res.get("seeds")
        assert "compile the same initial model on every rank" in res["seeds"]


def test_fixed_masks_that_differ_between_ranks_are_refused_under_fully_shard(steps_ranks):
    """FSDP broadcasts no buffers: each rank masked the gathered weights with the masks of its own initial
    model, and trained a different model silently. SR-STE derives its masks from the gathered weights (the
    same on every rank), so it runs; the training tests above run fixed masks sharded from one model."""
    for res in steps_ranks:
        assert "the sparse layers' masks (a CRC-32) at the first forward under fully_shard differs between ranks" \
            in str(res["sharded_fixed"]), res["sharded_fixed"]
        assert "compile the same initial model on every rank" in res["sharded_fixed"]
    assert isinstance(steps_ranks[0]["sharded_ste"], float)
    assert steps_ranks[0]["sharded_ste"] == steps_ranks[1]["sharded_ste"]  # one gathered model on both ranks


def test_the_distributed_example_runs_and_its_ranks_agree():
    import re
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "train_distributed.py")
    run = subprocess.run([sys.executable, script, "--epochs", "3"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "(identical)" in run.stdout, run.stdout
    trained, condensed = map(float, re.search(r"trained ([\d.]+)%, condensed ([\d.]+)%", run.stdout).groups())
    assert trained == condensed and trained > 50, run.stdout


def _meshes_worker(rank: int, world: int, port: int, folder: str) -> None:
    """Each rank compiles its own initial model (seeded by rank) and shards it over a mesh: the first
    forward compares masks over that mesh, not over the whole world."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    x, out = _batches()[0][0], {}
    meshes = {"own": init_device_mesh("cpu", (world, 1), mesh_dim_names=("stage", "dp"))["dp"],  # a mesh per rank
              "hsdp": init_device_mesh("cpu", (world, 1), mesh_dim_names=("replicate", "shard"))}  # 2-D, both ranks
    for what, mesh in meshes.items():
        torch.manual_seed(rank)
        model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        cm = sparsec.compile(model, example_inputs=(x,), train=True, include=[".*"], min_weights=0, **CASES["fixed"])
        fully_shard(cm, mesh=mesh)
        try:
            out[what] = cm(x).sum().item()
        except InvalidInputError as e:
            out[what] = str(e)
    try:
        out["srigl"] = _srigl_masks(rank, meshes["own"])
    except InvalidInputError as e:
        out["srigl"] = str(e)
    torch.save(out, os.path.join(folder, f"meshes-{rank}.pt"))
    dist.barrier()
    os._exit(0)  # see _worker


def _srigl_masks(seed: int, mesh=None) -> dict[str, torch.Tensor]:
    """SRigL (with sparse_init) on the model seeded `seed`, sharded over `mesh` if given: the masks after STEPS."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    cm = sparsec.compile(model, example_inputs=(torch.randn(2, 16),), train=True, include=[".*"], min_weights=0,
                         **CASES["srigl"])
    if mesh is not None:
        fully_shard(cm, mesh=mesh)
    opt = torch.optim.SGD(cm.parameters(), lr=0.1, momentum=0.9)
    srigl = sparsec.SRigL(cm, opt, total_steps=STEPS, delta_t=2, sparse_init=True)
    for x, y in _batches():
        F.cross_entropy(cm(x), y).backward()
        opt.step()
        opt.zero_grad()
        srigl.step()
    assert srigl.history, "no mask update ran"
    return {name: cm.mask(name) for name in LAYERS}


def test_the_first_forward_compares_masks_over_the_models_own_mesh(tmp_path):
    """Ranks that each shard their own model over a mesh of their own (pipeline stages, independent
    replicas) hold different masks rightly: comparing them over the whole world refused them (and hung
    where the other ranks never ran this model's forward). Over a 2-D (HSDP) mesh of both ranks, they are
    refused on both ranks, each naming both ranks' values."""
    mp.spawn(_meshes_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"meshes-{rank}.pt") for rank in range(2)]
    for res in results:
        assert isinstance(res["own"], float), res["own"]
        assert "masks (a CRC-32) at the first forward under fully_shard differs between ranks (rank 0: " in res["hsdp"]
        assert ", rank 1: " in res["hsdp"], res["hsdp"]
    # SRigL's collectives (its checks, score averages, sparse_init's draw) run over the model's mesh too: each
    # rank's own model trains as it does alone (over the whole world it was refused, or mixed two models)
    for rank, res in enumerate(results):
        assert isinstance(res["srigl"], dict), res["srigl"]
        alone = _srigl_masks(rank)
        assert all(torch.equal(res["srigl"][name], alone[name]) for name in LAYERS)
