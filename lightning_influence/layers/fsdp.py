"""FSDP1 (``FullyShardedDataParallel``) after passes that differentiate only layer outputs.

The library's passes (eigenvalue correction, scoring, the true Fisher's sampled backward) take
gradients with respect to the tracked layers' *outputs*, never the parameters. Under FSDP1 the
backward of such a pass still gathers each unit's parameters (its pre-backward hook: later
layers' weights are needed to carry the gradient back), but the hook that shards them again runs
only when a gradient reaches the parameters, and FSDP1's end-of-backward clean-up only when the
pass went through the root unit that wraps the whole LightningModule (Lightning's own calls do;
a callback calling the LightningModule does not). The units are then left holding whole
parameters (plain tensors, so ``model.parameters()`` even misses them) until the next training
forward. :func:`reshard_fsdp1` does that clean-up: it is FSDP1's own catch-all reshard and state
reset, run on every unit (torch's private FSDP1 helpers; FSDP1 is frozen in torch, and FSDP2
needs none of this: its units shard again after each backward of their own).
"""

from __future__ import annotations

from torch import nn

__all__ = ["reshard_fsdp1"]


def reshard_fsdp1(model: nn.Module) -> int:
    """Shard again the parameters of every FSDP1 unit in ``model`` that a pass left whole, and
    reset the units' training state, as FSDP1's end-of-backward callback does.

    Call it on every rank after a pass (it runs no collective). A no-op for units already
    sharded and for models without FSDP1 units.

    Args:
        model: the (LightningModule) model holding the units.

    Returns:
        The number of FSDP1 units with parameters it visited.
    """
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp._common_utils import TrainingState
        from torch.distributed.fsdp._flat_param import HandleTrainingState
        from torch.distributed.fsdp._runtime_utils import _catch_all_reshard
    except ImportError:  # pragma: no cover - torch without distributed
        return 0
    visited = 0
    for unit in model.modules():
        handle = getattr(unit, "_handle", None) if isinstance(unit, FullyShardedDataParallel) else None
        if handle is None:
            continue
        _catch_all_reshard(unit)
        unit.training_state = TrainingState.IDLE
        handle._ran_pre_backward_hook = False
        handle._needs_pre_backward_unshard = False
        handle._post_forward_index = None
        handle._training_state = HandleTrainingState.IDLE
        handle._prefetched = False
        visited += 1
    return visited
