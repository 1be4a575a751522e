"""Which layers are tracked, and how each supported module type is read.

The registry maps module types to :class:`TrackedLayer` subclasses, one small class per type:

* ``nn.Linear`` (:class:`~.linear.LinearLayer`),
* transformers' ``Conv1D``, GPT-2's transposed linear layer (:class:`~.transformers_conv1d.TransformersConv1DLayer`),
* ``nn.Conv1d`` and ``nn.Conv2d`` with ``groups=1`` (:class:`~.conv.Conv1dLayer`,
  :class:`~.conv.Conv2dLayer`): rows are output positions and inputs are unfolded patches,
* peft's LoRA ``Linear`` wrapper as one layer in its base weight's space
  (:class:`~.lora.LoRALinearLayer`, selected when named; by default a LoRA model's adapters are
  tracked as their ``lora_A`` / ``lora_B`` linear maps).

Sharded models: geometry comes from declared sizes and names from the unwrapped model
(:func:`unwrapped_name`, :func:`named_modules`); :func:`reshard_fsdp1` cleans up FSDP1 units after
a pass that differentiated only layer outputs.

Add a type by writing one subclass in its own module and decorating it with
:func:`register_layer_type`; see :mod:`lightning_influence.layers.base` for the contract.
"""

from __future__ import annotations

from .base import (
    LayerSelectionError,
    TrackedLayer,
    as_tokens,
    in_backward_pass,
    layer_class_for,
    named_modules,
    register_layer_type,
    supported_layer_types,
    supported_type_names,
    unwrapped_name,
)
from .linear import LinearLayer
from .conv import Conv1dLayer, Conv2dLayer, ConvLayer
from .transformers_conv1d import TransformersConv1DLayer
from .lora import LoRALinearLayer
from .selection import select_layers
from .fsdp import reshard_fsdp1

__all__ = [
    "TrackedLayer",
    "select_layers",
    "LayerSelectionError",
    "supported_layer_types",
    "supported_type_names",
    "register_layer_type",
    "layer_class_for",
    "in_backward_pass",
    "as_tokens",
    "unwrapped_name",
    "named_modules",
    "reshard_fsdp1",
    "LinearLayer",
    "TransformersConv1DLayer",
    "LoRALinearLayer",
    "ConvLayer",
    "Conv1dLayer",
    "Conv2dLayer",
]
