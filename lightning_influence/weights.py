"""Weights fingerprints: which weights an artifact was made with, and a check that they are the
model's.

Every artifact that depends on the weights (EK-FAC factors, trajectory segments, an index)
records a fingerprint of the tracked layers' parameters when it is written; loading it with a
model checks the model's fingerprint against it and raises :class:`WeightsMismatchError` when
they differ (factors of a trained model applied to untrained weights give wrong scores without
any other sign). ``allow_other_weights=True`` skips the check for users who mean it (a later
checkpoint, a fine-tuned model).

**What is hashed** (scheme ``"sampled-v1"``): for every tracked layer, in the given order, its
name and, for each of its parameters (``weight``, then ``bias``), the parameter's shape and at
most :data:`SAMPLE_SIZE` entries at evenly spaced positions of the flattened tensor
(``i · numel // k``), cast to float32, hashed with BLAKE2b. The cost is a gather of
``SAMPLE_SIZE`` values per tensor, whatever the tensor's size (a 124M-parameter GPT-2's ~50
tracked tensors: a few milliseconds). Tensors of at most ``SAMPLE_SIZE`` entries are hashed whole.
Two weights that agree at every sampled position share a fingerprint: a change confined to
unsampled entries goes unnoticed (a training update of a dense layer changes nearly all entries).
The dtype is not part of it: float64 and float32 copies of the same float32 weights agree;
a bfloat16 copy does not (its values differ).

**Sharded parameters** are fingerprinted as the full tensors, never as a rank's shard, so the
fingerprint does not depend on the world size: a ``DTensor`` (FSDP2) is gathered with
``full_tensor()``, a collective, so every rank must call :func:`fingerprint_weights` together;
an FSDP1 unit's parameters must be whole when it is called (inside
``FullyShardedDataParallel.summon_full_params(model)`` on every rank), otherwise it raises
:class:`ShardedWeightsError`.

No Lightning import.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from .errors import InfluenceError

__all__ = [
    "SAMPLE_SIZE",
    "SCHEME",
    "WeightsFingerprint",
    "WeightsMismatchError",
    "ShardedWeightsError",
    "fingerprint_weights",
    "fingerprint_sharded",
    "check_weights",
]

SCHEME = "sampled-v1"
SAMPLE_SIZE = 4096
"""Entries hashed per tensor (evenly spaced; all of them for smaller tensors)."""


class WeightsMismatchError(InfluenceError, ValueError):
    """A model's weights are not the ones an artifact was made with (see the module docstring)."""


class ShardedWeightsError(InfluenceError, RuntimeError):
    """A tracked parameter is a shard that :func:`fingerprint_weights` cannot gather itself (FSDP1
    outside ``summon_full_params``)."""


@dataclass(frozen=True)
class WeightsFingerprint:
    """A fingerprint of some layers' weights and where it came from.

    Attributes:
        digest: ``"<scheme>:<hex>"``, e.g. ``"sampled-v1:3f2a…"``.
        layers: the layer names hashed, in order.
        source: where the weights were when it was taken, in words (``"EKFACInfluence(name='ekfac')
            at global_step 120, epoch 12"``, ``"the model given to load_factors"``).
    """

    digest: str
    layers: tuple[str, ...]
    source: str = ""

    @property
    def short(self) -> str:
        """The digest cut to 16 hex digits after the scheme (what messages show)."""
        scheme, _, hexd = self.digest.partition(":")
        return f"{scheme}:{hexd[:16]}"

    def as_manifest(self) -> dict[str, Any]:
        """The JSON record written in artifact manifests (``"weights"``)."""
        return {"fingerprint": self.digest, "layers": list(self.layers), "source": self.source}

    @classmethod
    def from_manifest(cls, record: Any) -> Optional["WeightsFingerprint"]:
        """The fingerprint a manifest's ``"weights"`` record holds, or ``None`` (artifacts written
        before fingerprints, or by code that had no model at hand)."""
        if not isinstance(record, Mapping) or not isinstance(record.get("fingerprint"), str):
            return None
        layers = record.get("layers")
        return cls(record["fingerprint"], tuple(str(n) for n in layers) if isinstance(layers, list) else (),
                   str(record.get("source") or ""))


def _full(p: Tensor) -> Tensor:
    """The whole tensor behind ``p`` (a DTensor is gathered: a collective)."""
    full_tensor = getattr(p, "full_tensor", None)
    if callable(full_tensor):  # torch.distributed.tensor.DTensor
        return full_tensor()
    return p


def _layer_parameters(name: str, module: nn.Module) -> list[tuple[str, Tensor]]:
    """``(parameter name, tensor)`` of a tracked layer: weight, then bias when present. Read as
    attributes, not from ``named_parameters``: FSDP1 units may hold them as plain tensors."""
    out = []
    for pname in ("weight", "bias"):
        t = getattr(module, pname, None)
        if isinstance(t, Tensor):
            out.append((pname, t))
    if not out:  # FSDP1 without use_orig_params removes the attributes while sharded
        raise ShardedWeightsError(f"fingerprint_weights: layer {name!r} ({type(module).__name__}) holds no weight tensor "
                                  "(an FSDP1 unit's shard?); call it inside FullyShardedDataParallel.summon_full_params(model)")
    return out


def _expected_numel(name: str, module: nn.Module, pname: str) -> Optional[int]:
    """The number of entries a whole ``pname`` of ``module`` has, from its declared sizes (``None``
    when the layer type is not one the library tracks)."""
    from .layers import TrackedLayer

    try:
        t = TrackedLayer.from_module(name, module)
    except Exception:
        return None
    return t.d_out * t.d_in if pname == "weight" else t.d_out


def fingerprint_weights(model: nn.Module, layers: Sequence[str], source: str = "") -> WeightsFingerprint:
    """Fingerprint the parameters of ``layers`` of ``model`` (see the module docstring).

    Args:
        model: the model (a LightningModule, a plain module, an FSDP-wrapped one: names are
            compared without wrapper segments).
        layers: qualified layer names (e.g. the factors' layer names), hashed in this order.
        source: where these weights are, in words (recorded, and shown by mismatch errors).

    Returns:
        The :class:`WeightsFingerprint`.

    Raises:
        ValueError: a layer is not in the model.
        ShardedWeightsError: an FSDP1 shard, or a layer without a weight tensor (call it inside
            ``summon_full_params``).
    """
    from .layers import named_modules

    modules = named_modules(model)
    h = hashlib.blake2b(digest_size=32)
    h.update(SCHEME.encode())
    for name in layers:
        module = modules.get(name)
        if module is None:
            raise ValueError(f"fingerprint_weights: layer {name!r} is not in the model")
        h.update(b"\0layer\0" + name.encode())
        for pname, p in _layer_parameters(name, module):
            t = _full(p.detach())
            expected = _expected_numel(name, module, pname)
            if expected is not None and t.numel() != expected:
                raise ShardedWeightsError(
                    f"fingerprint_weights: {name}.{pname} holds {t.numel()} of its {expected} entries (a shard); "
                    "call it inside FullyShardedDataParallel.summon_full_params(model) on every rank"
                )
            flat = t.reshape(-1)
            n = flat.numel()
            if n > SAMPLE_SIZE:
                idx = torch.arange(SAMPLE_SIZE, dtype=torch.int64) * n // SAMPLE_SIZE
                flat = torch.index_select(flat, 0, idx.to(flat.device))  # (advanced indexing can take ~20 ms a tensor)
            # a copy: numpy must never share (and so pin) the storage of a parameter, e.g. an FSDP1
            # unit's unsharded flat parameter, which is freed again by resizing its storage
            values = flat.to(device="cpu", dtype=torch.float32, copy=True)
            h.update(f"\0{pname}{tuple(t.shape)}\0".encode())
            h.update(values.numpy().tobytes())
    return WeightsFingerprint(f"{SCHEME}:{h.hexdigest()}", tuple(layers), source)


def check_weights(
    stored: Optional[WeightsFingerprint],
    model: nn.Module,
    artifact: str,
    model_source: str,
    allow_other_weights: bool = False,
) -> Optional[WeightsFingerprint]:
    """Raise unless ``model``'s weights are the ones ``stored`` was taken of.

    Args:
        stored: the fingerprint an artifact recorded (``None``: nothing recorded, nothing checked).
        model: the model about to be used with the artifact (a sharded one on every rank
            together: see :func:`fingerprint_sharded`).
        artifact: the artifact, in words (``"factors at runs/x/influence/ekfac/factors"``).
        model_source: the model, in words (``"the model given to load_factors"``).
        allow_other_weights: skip the check (the caller means other weights).

    Returns:
        The model's fingerprint (``None`` when nothing was checked).

    Raises:
        WeightsMismatchError: the fingerprints differ; the message gives both, where each came
            from, and how to override.
    """
    if stored is None or allow_other_weights:
        return None
    current = fingerprint_sharded(model, stored.layers, model_source)  # a collective for a sharded model
    if stored.digest.partition(":")[0] != SCHEME:
        return None  # a scheme this version does not know: nothing comparable
    if current.digest != stored.digest:
        made = f" ({stored.source})" if stored.source else ""
        raise WeightsMismatchError(
            f"the model's weights are not the ones the {artifact} was made with:\n"
            f"  {artifact}: weights fingerprint {stored.short}{made}\n"
            f"  {model_source}: weights fingerprint {current.short} (the same {len(stored.layers)} layers, computed now)\n"
            "Load the trained weights (e.g. the checkpoint the run saved: MyModule.load_from_checkpoint(path)); "
            "if you mean to use other weights (a later checkpoint, a fine-tuned model), pass allow_other_weights=True"
        )
    return current


def fingerprint_sharded(model: nn.Module, layers: Sequence[str], source: str = "",
                        root: Optional[nn.Module] = None) -> WeightsFingerprint:
    """:func:`fingerprint_weights` for a model that may be sharded: DTensors are gathered, and
    FSDP1 units' parameters are made whole for the call (``summon_full_params`` on ``root``,
    the outermost FSDP1 module, e.g. Lightning's ``trainer.strategy.model``; default ``model``;
    without write-back). A collective under a sharded strategy: call it on every rank."""
    try:
        return fingerprint_weights(model, layers, source)
    except ShardedWeightsError:
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(root if root is not None else model, writeback=False):
            return fingerprint_weights(model, layers, source)
