"""The process group of the split ("distributed") weight sync: the trainer is rank 0, each rollout replica's
tensor-parallel ranks follow (SGLang's /init_weights_update_group); the trainer broadcasts every tensor.

Both ends join the same way SGLang does (a TCP rendezvous at the trainer's address, the store prefixed with
the group name, then torch's process-group constructor), so the trainer interoperates with SGLang over NCCL
and with our CPU server over gloo. The group is a named side group: a process's default group, if it has
one (the actor's data-parallel group), is neither needed nor touched.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 600.0


def join_weight_group(master_address: str, master_port: int, rank: int, world_size: int, group_name: str,
                      backend: str, timeout: float = DEFAULT_TIMEOUT_S):
    """Join (rank 0: host) the group; blocks until all `world_size` ranks have joined or `timeout` passes."""
    from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world, rendezvous

    limit = datetime.timedelta(seconds=timeout)
    store, rank, world_size = next(rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size,
                                              timeout=limit))
    store.set_timeout(limit)
    group, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), PrefixStore(group_name, store),
                                         group_name=group_name, timeout=limit)
    # collectives map global to group ranks through this table; the group is its own world here
    _world.pg_group_ranks[group] = {r: r for r in range(world_size)}
    return group


def leave_weight_group(group) -> None:
    dist.destroy_process_group(group)


def transport_device(backend: str, device: torch.device | str) -> torch.device:
    """gloo moves CPU tensors, nccl CUDA ones."""
    return torch.device("cpu") if backend == "gloo" else torch.device(device)


def broadcast_tensors(group, tensors, backend: str) -> None:
    """Rank 0: send each tensor, in order (the receivers post one receive per listed name)."""
    for t in tensors:
        dist.broadcast(t.detach().to(transport_device(backend, t.device)).contiguous(), src=0, group=group)


def receive_tensors(group, specs, backend: str, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """Ranks > 0: one fresh tensor per (dtype, shape) spec, filled by rank 0's broadcast."""
    out = []
    for dtype, shape in specs:
        buffer = torch.empty(shape, dtype=dtype, device=transport_device(backend, device))
        dist.broadcast(buffer, src=0, group=group)
        out.append(buffer)
    return out
