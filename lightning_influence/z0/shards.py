"""This rank's part of each parameter, for Gram matrices of sharded parameters (no Lightning).

Under FSDP every rank holds a piece of each parameter. A Gram entry ``<θ_i, θ_j>`` is a sum of
products over elements, so each rank sums the products of its own pieces and the partial sums
are added over ranks (:meth:`~lightning_influence.z0.gram.SnapshotGram.partial_row`); no rank
ever holds a whole parameter it does not already hold. :func:`local_parts` gives, per
parameter, the elements this rank contributes, such that the parts of all ranks, flattened and
concatenated in rank order, are the flattened parameter, every element exactly once:

* FSDP2 (``fully_shard``: a ``DTensor`` sharded along dimension 0): the local shard
  (``to_local()``) on ranks whose mesh coordinate is 0 along every mesh dimension over which
  the parameter is replicated (HSDP), an empty tensor on the others;
* FSDP1 with ``use_orig_params=True``: the parameter *is* this rank's slice of the flattened
  parameter (often empty); a unit that does not shard (``NO_SHARD``) holds whole copies, of
  which rank 0's counts;
* a plain tensor (the same on every rank): rank 0's.

Other layouts (tensor parallelism: a ``DTensor`` sharded along another dimension, or a partial
one) raise: their pieces do not concatenate into the parameter.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import Tensor, nn

from ..layers import unwrapped_name
from ..errors import InfluenceError

__all__ = ["local_parts", "ShardingError"]


class ShardingError(InfluenceError, ValueError):
    """A parameter is split across ranks in a layout whose pieces do not concatenate into it."""


def _fsdp1_views(model: Optional[nn.Module]) -> dict[int, tuple[torch.Size, bool]]:
    """``id(parameter)`` → ``(full shape, sharded)`` for the parameters FSDP1 units manage
    with ``use_orig_params=True``."""
    out: dict[int, tuple[torch.Size, bool]] = {}
    if model is None:
        return out
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except Exception:  # pragma: no cover - torch without distributed
        return out
    for module in model.modules():
        handle = getattr(module, "_handle", None) if isinstance(module, FSDP) else None
        if handle is None:
            continue
        flat = handle.flat_param
        params = getattr(flat, "_params", None)
        if params is None:
            raise ShardingError("an FSDP1 unit has use_orig_params=False: its parameters are not the module's own; "
                                "use use_orig_params=True (Lightning's default)")
        for p, shape in zip(params, flat._shapes):
            out[id(p)] = (torch.Size(shape), bool(handle.uses_sharded_strategy))
    return out


def _dtensor_part(name: str, p: Tensor) -> tuple[Tensor, torch.Size]:
    from torch.distributed.tensor import Replicate, Shard

    coordinate = p.device_mesh.get_coordinate()
    owner = True
    for dim, placement in enumerate(p.placements):
        if isinstance(placement, Replicate):
            owner = owner and (coordinate is not None and coordinate[dim] == 0)
        elif not (isinstance(placement, Shard) and placement.dim == 0):
            raise ShardingError(
                f"parameter {name!r} is laid out as {tuple(p.placements)}; only FSDP's sharding along dimension 0 "
                "(Shard(0)), possibly replicated (HSDP), is supported (no tensor parallelism)"
            )
    local = p.to_local().detach()
    return (local if owner else local.new_zeros(0)), p.shape


def local_parts(params: Mapping[str, Tensor], model: Optional[nn.Module] = None,
                rank: int = 0) -> tuple[dict[str, Tensor], dict[str, list[int]]]:
    """This rank's part of each of ``params`` and the parameters' full shapes.

    Args:
        params: name → parameter (as ``model.named_parameters()`` gives them; FSDP1 names carry
            wrapper segments, which are removed).
        model: the module that holds them (needed for FSDP1 parameters, whose full shapes only
            their FSDP unit knows).
        rank: this process's global rank (plain and ``NO_SHARD`` parameters count on rank 0).

    Returns:
        ``(parts, shapes)``: name (without wrapper segments) → detached tensor of the elements
        this rank contributes (``numel() == 0`` when it contributes none), and name → the full
        shape. Over all ranks, ``cat([parts_r[n].flatten() for r in ranks])`` is
        ``params[n].flatten()``.

    Raises:
        ShardingError: a layout other than FSDP1 or FSDP2 sharding (see the module docstring).
    """
    views = _fsdp1_views(model)
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # pragma: no cover - torch without distributed tensors
        DTensor = ()  # type: ignore[assignment]
    parts: dict[str, Tensor] = {}
    shapes: dict[str, list[int]] = {}
    for raw, p in params.items():
        name = unwrapped_name(raw)
        if DTensor and isinstance(p, DTensor):
            local, shape = _dtensor_part(name, p)
        elif id(p) in views:
            shape, sharded = views[id(p)]
            local = p.detach() if sharded or rank == 0 else p.detach().new_zeros(0)
        else:
            local, shape = (p.detach() if rank == 0 else p.detach().new_zeros(0)), p.shape
        parts[name], shapes[name] = local, [int(s) for s in shape]
    return parts, shapes
