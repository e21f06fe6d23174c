"""What the modules need from torch.distributed: the process group to agree over, per-channel
statistics merged across ranks, and writes to parameters that FSDP2 (``fully_shard``) manages.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def sync_group(process_group):
    """The process group to reduce over: ``process_group`` if given, else the default group when
    one is initialized; None when there is nothing to agree with (a single process)."""
    if process_group is not None:
        return process_group
    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return None


def channel_moments(flat: torch.Tensor, group) -> tuple[int, torch.Tensor, torch.Tensor]:
    """``(count, mean, M2)`` per row of ``flat`` (``[C, n]``, float64) over every rank of ``group``:
    ``M2 = Σ (v - mean)²``. Each rank's moments are computed locally by two passes, gathered, and
    merged in rank order with Chan et al.'s formula, so every rank gets the same bits and the
    result equals the moments of the concatenated data (to float64 rounding) without the
    cancellation of sums of squares; ranks may hold different numbers of values, or none."""
    count = flat.shape[1]
    mean = flat.mean(dim=1) if count else flat.new_zeros(flat.shape[0])
    m2 = (flat - mean[:, None]).square().sum(dim=1)
    if group is None or dist.get_world_size(group) == 1:
        return count, mean, m2
    packed = torch.cat([flat.new_tensor([float(count)]), mean, m2])
    gathered = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, packed, group=group)
    channels = flat.shape[0]
    total, mean, m2 = 0, flat.new_zeros(channels), flat.new_zeros(channels)
    for part in gathered:
        n = int(part[0].item())
        if n == 0:
            continue
        part_mean, part_m2 = part[1:1 + channels], part[1 + channels:]
        merged = total + n
        delta = part_mean - mean
        mean = mean + delta * (n / merged)
        m2 = m2 + part_m2 + delta.square() * (total * n / merged)
        total = merged
    return total, mean, m2


def _fsdp_params_of(module: nn.Module, name: str) -> list:
    """The FSDP2 parameter records (``FSDPParam``) that manage ``module.<name>``, found through the
    registry of composable states. FSDP2 offers no public way to reach the sharded parameter from
    inside a forward, where the module holds the all-gathered copy instead."""
    from torch.distributed import _composable_state  # noqa: PLC0415

    found = []
    seen = set()
    for ref in list(_composable_state._module_state_mapping.values()):
        state = ref()
        if state is None or id(state) in seen:
            continue
        seen.add(id(state))
        for group in getattr(state, "_fsdp_param_groups", None) or []:
            for fsdp_param in group.fsdp_params:
                info = fsdp_param._module_info
                owners = [(info.module, info.param_name),
                          *zip(info.shared_modules, info.shared_param_names)]
                if any(m is module and n == name for m, n in owners):
                    found.append(fsdp_param)
    return found


def _copy_into(target: torch.Tensor, value: torch.Tensor) -> None:
    from torch.distributed.tensor import DTensor, distribute_tensor  # noqa: PLC0415

    value = value.to(device=target.device, dtype=target.dtype)
    if isinstance(target, DTensor):
        value = distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=None)
    target.copy_(value)


@torch.no_grad()
def write_parameter(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """``module.<name>.copy_(value)``, reaching the shards when FSDP2 manages the parameter.

    Inside a forward under ``fully_shard`` the module holds an all-gathered copy that FSDP frees at
    the next reshard and gathers again from the shards, so a write to it alone is lost; outside a
    forward it holds the sharded DTensor. ``value`` must be the same on every rank (each rank keeps
    its own part of it; nothing is communicated)."""
    param = getattr(module, name)
    if dist.is_available() and dist.is_initialized():
        for fsdp_param in _fsdp_params_of(module, name):
            if fsdp_param.sharded_param is not param:
                _copy_into(fsdp_param.sharded_param, value)
    _copy_into(param, value)
