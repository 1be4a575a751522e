"""Finish EK-FAC factors from a training checkpoint, without training and without Lightning.

:class:`~lightning_influence.EKFACInfluence` keeps its whole state (running covariances, counts,
options, the layers' geometry and its output folder) in every Lightning checkpoint. When a run
dies during its end-of-fit work (a kill inside the correction pass, a full disk at the save),
nothing is lost: resuming the run with ``trainer.fit(..., ckpt_path=...)`` writes the factors,
and :func:`finish_factors` writes them from the checkpoint file alone:

* ``correction="none"`` (K-FAC eigenvalues) or ``"online"`` (when the last epoch's online
  correction completed) need only the checkpoint;
* ``correction="pass"`` (the default of the callback) needs the model and the training loader:
  the weights are loaded from the checkpoint (the model is cast to their dtype) and one pass
  computes the corrected eigenvalues, as the callback would have at the end of fit.

The command line does the same: ``lightning-influence finish-factors CHECKPOINT``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional

import torch
from torch import nn

from .. import validation as check
from ..faults import fault_point
from ..layers import TrackedLayer
from ..task import TaskLike, resolve_task
from .factors import save_factors
from .online import CORRECTIONS, AccumulationOptions, OnlineFactors
from ..errors import InfluenceError

__all__ = ["finish_factors", "ekfac_states", "state_layers", "correction_batches", "CheckpointStateError"]

OWNER = "finish_factors"


class CheckpointStateError(InfluenceError, ValueError):
    """A checkpoint holds no (or no unique) EKFACInfluence state, or one this function cannot use."""


def correction_batches(loader: Iterable[Any]) -> Iterator[Any]:
    """The batches of ``loader``, passing the ``"ekfac.correction_batch"`` fault point before
    each (see :mod:`lightning_influence.faults`)."""
    for batch in loader:
        fault_point("ekfac.correction_batch")
        yield batch


def ekfac_states(checkpoint: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Callback name → EKFACInfluence state of every such callback in a loaded Lightning
    checkpoint (``checkpoint["callbacks"]``)."""
    out = {}
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if isinstance(state, dict) and "running" in state and "layers" in state and str(key).startswith("EKFACInfluence"):
            out[str(state.get("name") or key)] = state
    return out


def state_layers(state: Mapping[str, Any], model: Optional[nn.Module] = None) -> list[TrackedLayer]:
    """The tracked layers a state recorded: the modules of ``model`` of those names (checked
    against the recorded geometry), or, without a model, geometry-only layers (enough for
    ``correction="none"`` or ``"online"``).

    Raises:
        CheckpointStateError: a recorded layer is missing from ``model`` or differs from it.
    """
    modules = dict(model.named_modules()) if model is not None else {}
    layers = []
    for g in state["layers"]:
        if model is None:
            layers.append(TrackedLayer.geometry_only(g["name"], g["d_in"], g["d_out"], g["has_bias"]))
            continue
        module = modules.get(g["name"])
        if module is None:
            raise CheckpointStateError(f"{OWNER}: the checkpoint's layer {g['name']!r} is not in the model")
        layer = TrackedLayer.from_module(g["name"], module)
        if (layer.d_in, layer.d_out, layer.has_bias) != (g["d_in"], g["d_out"], g["has_bias"]):
            raise CheckpointStateError(
                f"{OWNER}: layer {g['name']!r} is (d_in={layer.d_in}, d_out={layer.d_out}, bias={layer.has_bias}) in the "
                f"model but (d_in={g['d_in']}, d_out={g['d_out']}, bias={g['has_bias']}) in the checkpoint"
            )
        layers.append(layer)
    return layers


def finish_factors(
    checkpoint: str | os.PathLike | Mapping[str, Any],
    model: Optional[nn.Module] = None,
    loader: Optional[Iterable[Any]] = None,
    *,
    name: Optional[str] = None,
    output: Optional[str | os.PathLike] = None,
    correction: Optional[str] = None,
    task: Optional[TaskLike] = None,
    device: str | torch.device = "cpu",
    weights_only: bool = True,
    storage: str = "auto",
) -> Path:
    """Write the factors an EKFACInfluence run accumulated, from its checkpoint.

    Args:
        checkpoint: a Lightning checkpoint file (``last.ckpt``), or one already loaded.
        model: the model the run trained (needed for ``correction="pass"``); its weights are
            replaced by the checkpoint's ``state_dict`` and it is cast to their dtype.
        loader: the training loader for the correction pass (same order as in training for
            factors equal to the run's own; capped as the run was, by
            ``correction_max_examples`` / ``correction_max_batches``).
        name: which EKFACInfluence callback (its ``name``), when the checkpoint holds several.
        output: the factors folder (default ``<the callback's recorded folder>/factors``).
        correction: ``"pass"``, ``"online"`` or ``"none"`` (default: the run's own option).
        task: how to read batches (default: from the model's methods or the batch layout).
        device: where the correction pass runs.
        weights_only: load the checkpoint file with ``torch.load(weights_only=True)`` (the safe
            default); ``False`` unpickles arbitrary objects: only for files you trust.
        storage: how the factors are written (``save_factors``'s ``storage``; default ``"auto"``,
            the callback's default: float16 eigenvectors and bfloat16 Λ for float32 factors).

    Returns:
        The folder written (load it with :func:`~lightning_influence.load_factors`).

    Raises:
        CheckpointStateError: no EKFACInfluence state (or several without ``name``), or the
            layers do not match ``model``.
        InvalidArgumentError: ``correction="pass"`` without a model or loader, or a bad value.
        RuntimeError: no layer accumulated anything.
    """
    ckpt = checkpoint if isinstance(checkpoint, Mapping) else torch.load(checkpoint, map_location="cpu", weights_only=weights_only)
    states = ekfac_states(ckpt)
    if not states:
        raise CheckpointStateError(f"{OWNER}: the checkpoint holds no EKFACInfluence state (was the callback in the Trainer?)")
    if name is None and len(states) > 1:
        raise CheckpointStateError(f"{OWNER}: the checkpoint holds several EKFACInfluence states {sorted(states)}; pass name=")
    key = name if name is not None else next(iter(states))
    if key not in states:
        raise CheckpointStateError(f"{OWNER}(name={name!r}): no such EKFACInfluence state; the checkpoint holds {sorted(states)}")
    state = dict(states[key])
    opts = dict(state["options"])
    if correction is not None:
        opts["correction"] = check.choice(OWNER, "correction", correction, CORRECTIONS)
    options = AccumulationOptions(**opts)
    if options.correction == "pass" and (model is None or loader is None):
        raise check.InvalidArgumentError(
            f"{OWNER}: correction='pass' needs the model and the training loader (or pass correction='none', or "
            "'online' when the run used it)"
        )
    if model is not None:
        weights = ckpt.get("state_dict") or {}
        dtypes = [t.dtype for t in weights.values() if torch.is_tensor(t) and t.is_floating_point()]
        model.to(device=device, dtype=dtypes[0] if dtypes else None)  # first: loading into float32 would round
        model.load_state_dict(weights)
    layers = state_layers(state, model)
    online = OnlineFactors(layers, options)
    online.load_state_dict(state)
    if any(acc.examples for acc in online.epoch_accs.values()):  # a checkpoint inside an epoch
        online.end_epoch(int(ckpt.get("epoch", 0)), None, lambda t: t)
    if model is not None:
        online.acc_dtype = torch.promote_types(next(model.parameters()).dtype, torch.float32)
    run_task = resolve_task(model, task) if model is not None else None

    correction_pass = (options.correction_pass(model, correction_batches(loader), layers, run_task, seed_offset=999)
                       if model is not None else None)
    factors = online.factors(correction_pass, lambda t: t, device,
                             warn=lambda m: warnings.warn(m, stacklevel=3))
    factors.meta.update({
        "source": OWNER, "callback": key, "run_id": state.get("run_id"), "global_step": ckpt.get("global_step"),
        "epochs_accumulated": online.epochs_accumulated, "options": {**opts, "correction_used": online.correction_used},
        "nonfinite_batches": online.nonfinite_batches, "nonfinite_correction_examples": online.nonfinite_correction,
        "layers_left_out": [l.name for l in layers if l.name not in factors.layers],
    })
    folder = state.get("folder")
    if output is None and not folder:
        raise CheckpointStateError(f"{OWNER}: the checkpoint records no output folder; pass output=")
    return save_factors(factors, Path(output) if output is not None else Path(folder) / "factors", storage=storage, in_place=True)
