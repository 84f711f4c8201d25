"""Weights that may be sharded across ranks: what sparsec's schedulers and inspection need under
torch.distributed.

Under DDP every rank holds whole weights. Under FSDP2 (`torch.distributed.fsdp.fully_shard`) a
layer's weight is a DTensor between forwards (each rank holds a slice of its rows) and a plain
tensor inside forward / backward, while masks stay plain buffers, the same on every rank.
Everything sparsec decides from weights (SRigL's masks, group-lasso thresholds) is decided on full
tensors, identical on every rank, and then applied to each rank's slice with `shard_like`.

`full` and `broadcast_from_rank0` are collectives under sharding / a process group: every rank
must call them, in the same order.
"""
from __future__ import annotations

import zlib

import torch
import torch.distributed as dist
import torch.nn as nn
from sparsec.errors import InvalidInputError, InvalidTypeError

try:  # public since torch 2.4; older torch has no FSDP2, so nothing is ever sharded there
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover
    DTensor, distribute_tensor = (), None
try:  # (public since torch 2.6)
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # pragma: no cover
    FSDPModule = ()


def is_sharded(t: torch.Tensor) -> bool:
    return isinstance(t, DTensor)


def any_sharded(module: torch.nn.Module) -> bool:
    return any(is_sharded(p) for p in module.parameters())


GATHER_RECIPE = ("gather it first: on every rank `sd = torch.distributed.checkpoint.state_dict.get_model_state_dict("
                 "cm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))`, then on rank 0 compile the model "
                 "again with the same options (not sharded) and `load_state_dict(sd)`")


def refuse_sharded(module: torch.nn.Module, what: str) -> None:
    """A clear error, not a wrong result, where `what` needs whole weights held by one process."""
    from sparsec.errors import InvalidInputError

    if any_sharded(module):
        raise InvalidInputError(f"{what} needs whole weights, and this model is sharded by FSDP (fully_shard): "
                                f"{GATHER_RECIPE}")


def check_whole(weight: torch.Tensor, shape: tuple[int, ...], layer: str, what: str) -> None:
    """FSDP1 (`FullyShardedDataParallel`) puts a flat 1-D shard view (use_orig_params=True) or a plain
    tensor over storage it frees between forwards (False) in place of each weight: nothing read
    from it would be right, so say so instead of failing somewhere inside, or not failing at all."""
    if isinstance(weight, nn.Parameter) and tuple(weight.shape) == tuple(shape):
        return
    from sparsec.errors import InvalidInputError

    if tuple(weight.shape) == tuple(shape):  # whole-shaped, but not a parameter: one of two causes
        raise InvalidInputError(
            f"{what}: layer {layer!r}'s weight is a plain tensor, not the parameter it was compiled with. Either "
            f"FSDP1 (FullyShardedDataParallel, use_orig_params=False) put a view of its flat storage there: shard "
            f"with FSDP2 instead, torch.distributed.fsdp.fully_shard(cm); or a forward pre-hook computes it from "
            f"other parameters (torch.nn.utils.prune's weight_orig * weight_mask, the old weight_norm): make it a "
            f"parameter first (torch.nn.utils.prune.remove(module, 'weight'), torch.nn.utils.remove_weight_norm"
            f"(module)), or use torch.nn.utils.parametrize")
    raise InvalidInputError(
        f"{what}: layer {layer!r}'s weight is a {type(weight).__name__} of shape {tuple(weight.shape)}, not the "
        f"{tuple(shape)} parameter it was compiled with; FSDP1 (FullyShardedDataParallel) does that, flattening "
        f"weights. Shard with FSDP2 instead: torch.distributed.fsdp.fully_shard(cm)")


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from the ranks' slices when `t` is sharded (a collective), else `t`."""
    return t.full_tensor() if is_sharded(t) else t


def local_part(t: torch.Tensor) -> torch.Tensor:
    """This rank's slice of `t` when it is sharded (no communication), else `t`."""
    return t.to_local() if is_sharded(t) else t


def shard_like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """A whole tensor `t` laid out as `ref` is: when `ref` is sharded, each rank keeps its own slice
    of `t` (no communication, so `t` must be the same on every rank); otherwise `t` itself."""
    if not is_sharded(ref):
        return t
    return distribute_tensor(t.to(ref.device), ref.device_mesh, ref.placements, src_data_rank=None)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def mean_over_ranks(t: torch.Tensor, groups: list | None = None) -> torch.Tensor:
    """Average a plain tensor across ranks (those of `groups`, one per mesh dimension; default the whole
    world), so that every rank takes the same decisions."""
    if world_size() > 1:
        t, ranks = t.clone(), 1
        for group in groups or [None]:  # (a sum over each dimension in turn is the sum over the mesh)
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
            ranks *= dist.get_world_size(group)
        t /= ranks
    return t


def check_same_over_ranks(value: int, what: str, device: torch.device | str = "cpu",
                          remedy: str = "every rank must make the same calls (load the same state on every rank "
                                        "when resuming)", groups: list | None = None) -> None:
    """Raise on every rank, naming each rank's value, unless all ranks pass the same `value` (a
    collective; `device`: one the backend can reduce on, e.g. a mask's). For state that must agree
    but that no collective compares, such as a scheduler's step count: ranks at steps that differ
    by a multiple of the update interval take the same collectives, so nothing hangs, while each
    decides its own masks."""
    if world_size() > 1:
        # `groups`: those of a device mesh, one per dimension (default: the whole world). Gathered one after
        # the other, each rank ends with every rank's (rank, value) of the mesh, so all decide alike: a rank
        # raising after one dimension would leave the others waiting in the next one's collective.
        pairs = torch.tensor([[dist.get_rank(), int(value)]], dtype=torch.int64, device=device)
        for group in groups or [None]:
            parts = [torch.empty_like(pairs) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, pairs, group=group)
            pairs = torch.cat(parts)
        pairs = sorted(tuple(p) for p in pairs.tolist())
        if len({v for _, v in pairs}) > 1:
            from sparsec.errors import InvalidInputError

            raise InvalidInputError(f"{what} differs between ranks ({', '.join(f'rank {r}: {v}' for r, v in pairs)}), "
                                    f"so they would diverge silently; {remedy}")


def masks_checksum(masks: dict[str, torch.Tensor]) -> int:
    """A CRC-32 of masks, in name order: equal on every rank exactly when the masks are (but for a
    collision), and the same in every process (Python's hash of bytes is salted per process)."""
    crc = 0
    for name in sorted(masks):
        crc = zlib.crc32(masks[name].detach().cpu().numpy().tobytes(), crc)
    return crc


def check_same_masks(masks: dict[str, torch.Tensor], when: str, groups: list | None = None) -> None:
    """Raise on every rank (of `groups`, see check_same_over_ranks) unless all hold the same masks (a
    collective). Under fully_shard nothing makes them agree (FSDP broadcasts no weights or buffers): ranks
    that compiled different initial models keep different masks, and would train different models silently."""
    if masks:
        check_same_over_ranks(masks_checksum(masks), f"the sparse layers' masks (a CRC-32) {when}",
                              next(iter(masks.values())).device,
                              "compile the same initial model on every rank (a common seed)", groups)


def fsdp_groups(module: nn.Module) -> list | None:
    """The process groups of the mesh fully_shard shards `module` (or its sharded submodules) over, one per
    mesh dimension; None where none is found (torch's FSDP state differs): the whole world then. Masks must
    agree over that mesh only: ranks outside it run other models (pipeline stages, a mesh per replica), and
    may not run this one's forward at all, so a collective over the world there hung or refused them."""
    for m in module.modules():
        if not isinstance(m, FSDPModule):
            continue
        get_state = getattr(m, "_get_fsdp_state", None)  # (private: torch versions differ)
        state = get_state() if get_state is not None else None
        for group in getattr(state, "_fsdp_param_groups", None) or [getattr(state, "_fsdp_param_group", None)]:
            info = getattr(group, "mesh_info", None)  # (the groups FSDP itself gathers and reduces over: HSDP's two)
            found = [g for g in (getattr(info, "replicate_process_group", None),
                                 getattr(info, "shard_process_group", None)) if g is not None]
            if found:
                return found
    return None


def broadcast_from_rank0(t: torch.Tensor, groups: list | None = None) -> torch.Tensor:
    """The first rank's value of `t` on every rank (of `groups`, as mean_over_ranks; random draws that must
    agree: DDP syncs parameters only when it is constructed, so a later draw that differs between ranks
    would never be reconciled)."""
    if world_size() > 1:
        t = t.contiguous()
        for group in groups or [None]:
            dist.broadcast(t, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return t


def unwrap_ddp(model, process_group, what: str) -> tuple[object, object]:
    """(the model inside, the process group its ranks train over) for a scheduler given `model`: a
    DistributedDataParallel wrapper gives its .module and its process group; `process_group=` names the
    group directly (it must agree with a DDP wrapper's). None for the group: the default (see
    scheduler_groups). DDP over a subgroup (replica groups, pipeline stages) trains one model per group:
    scores averaged over the whole world mixed the groups' models, or hung where they differ."""
    if process_group is not None and not isinstance(process_group, getattr(dist, "ProcessGroup", ())):
        if isinstance(process_group, int) and process_group == -100:  # (GroupMember.NON_GROUP_MEMBER)
            raise InvalidInputError(f"{what}: process_group is what torch.distributed.new_group returns on a rank it "
                                    f"does not hold; pass each rank the group it trains in")
        raise InvalidTypeError(f"{what}: process_group must be a torch.distributed.ProcessGroup (the one "
                               f"DistributedDataParallel runs over) or None, got {type(process_group).__name__}")
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        return model, process_group
    group = model.process_group
    if process_group is not None and _ranks(process_group) != _ranks(group):
        raise InvalidInputError(f"{what}: process_group holds ranks {_ranks(process_group)}, but the "
                                f"DistributedDataParallel wrapper given runs over ranks {_ranks(group)}; give one of "
                                f"the two (the wrapper alone uses its group)")
    return model.module, process_group if process_group is not None else group


def described(given, inner) -> str:
    """What the user passed, for an error: 'Sequential', or 'a DistributedDataParallel wrapping a Sequential'."""
    return type(given).__name__ if given is inner else f"a {type(given).__name__} wrapping a {type(inner).__name__}"


def _ranks(group) -> list[int]:
    return sorted(dist.get_process_group_ranks(group))


def scheduler_groups(module: nn.Module, process_group, what: str) -> list | None:
    """The groups a scheduler's collectives run over (see mean_over_ranks): under fully_shard its mesh's
    (fsdp_groups), else `process_group` (from unwrap_ddp), else None, the whole world. A process_group
    given with fully_shard must hold exactly the mesh's ranks, and then changes nothing: one holding
    others contradicts the mesh the weights are gathered over, so it is refused rather than guessed at."""
    groups = fsdp_groups(module)
    if groups is None:
        return [process_group] if process_group is not None else None
    if process_group is not None:
        mesh = next((sorted(p.device_mesh.mesh.flatten().tolist()) for p in module.parameters() if is_sharded(p)), None)
        if mesh != _ranks(process_group):
            raise InvalidInputError(f"{what}: process_group holds ranks {_ranks(process_group)}, but the model is "
                                    f"sharded by fully_shard over a mesh of ranks {mesh}, which the scheduler uses: "
                                    f"leave process_group out")
    return groups
