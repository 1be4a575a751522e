"""peft LoRA linear layers (``peft.tuners.lora.layer.Linear``): the adapted layer as one layer.

A LoRA-adapted linear layer computes ``y = W₀ x + s · B A x`` (``s = lora_alpha / r``) with
a frozen base weight ``W₀`` and trainable ``A`` (``lora_A.<adapter>``, ``r × d_in``) and ``B``
(``lora_B.<adapter>``, ``d_out × r``).

**What the default tracks** (chosen by measurement, see ``docs/lora.md``): the adapters' own
linear maps ``…q_proj.lora_A.default`` and ``…q_proj.lora_B.default``, each as a plain
``nn.Linear`` with its own Kronecker factors. They are the model's trainable layers, so the
default selection of a partly frozen model keeps them and leaves the frozen base out. Against an
explicit float64 influence in the adapters' parameter space (dense empirical Fisher of every
adapter parameter), the two linear maps gave per-query Spearman 0.60 (Pearson 0.68, mean of 3
seeds), the adapted layer as one layer in the base weight's space 0.45 (0.58), and plain
gradient dot products 0.42 (0.51), at the same factor size (``benchmarks/bench_lora.py``).

**This type** (:class:`LoRALinearLayer`) is the adapted layer as a whole, under the base
layer's own name (``…self_attn.q_proj``, as in the model before ``get_peft_model``) and shape:
its gradient matrix is ``Σ_t ds_t x_tᵀ``, the gradient with respect to the effective weight
``W₀ + s·B·A`` (equal to the base weight's gradient). It is selected only when named
(``layers=["*q_proj"]``): its parameter is the frozen base weight, so the default leaves it out.
Use it

* for multi-stage attribution through a LoRA fine-tune: the fine-tuned model's gradient with
  respect to the base weights (through the adapters), preconditioned by the pre-training factors
  of the same layer (same name suffix and shape);
* to compare an unmerged adapter with its merged model (``merge_and_unload()``): the merged
  ``nn.Linear`` computes the same function, so it has the same inputs, output gradients and
  factors.

The wrapper stands for its ``base_layer`` (same input, same output gradient), which is never a
candidate of its own (:meth:`LoRALinearLayer.represented`). Registered by dotted path: peft is
imported only by models that use it.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .base import TrackedLayer, as_tokens, register_layer_type

__all__ = ["LoRALinearLayer"]


def _transposed(module: nn.Module) -> bool:
    """Whether the base weight is stored ``(d_in, d_out)`` (transformers ``Conv1D``, peft's
    ``fan_in_fan_out``)."""
    base = getattr(module, "base_layer", None)
    return bool(getattr(module, "fan_in_fan_out", False)) or type(base).__name__ == "Conv1D"


@register_layer_type("peft.tuners.lora.layer.Linear")
class LoRALinearLayer(TrackedLayer):
    """A peft LoRA ``Linear`` wrapper as one layer of its base layer's shape ``(out, in)``:
    rows are the tokens of its input and output gradient; the gradient matrix is that of the
    effective weight ``W₀ + s·B·A``. Its :meth:`parameters` are the base layer's (frozen under
    LoRA), so the default selection leaves it out and tracks ``lora_A`` / ``lora_B`` instead."""

    type_name = "peft LoRA Linear"

    @classmethod
    def unsupported(cls, module: nn.Module) -> Optional[str]:
        if getattr(module, "base_layer", None) is None:
            return "it has no base_layer"
        if not isinstance(getattr(module, "in_features", None), int) or not isinstance(getattr(module, "out_features", None), int):
            return "it does not declare in_features/out_features"
        return None

    @classmethod
    def geometry(cls, module: nn.Module) -> tuple[int, int]:
        return int(module.in_features), int(module.out_features)

    @classmethod
    def represented(cls, module: nn.Module) -> tuple[nn.Module, ...]:
        return (module.base_layer,)

    def __init__(self, name: str, module: nn.Module) -> None:
        super().__init__(name, module)
        self.has_bias = getattr(module.base_layer, "bias", None) is not None

    def parameters(self) -> list[nn.Parameter]:
        base = self.module.base_layer
        return [base.weight] + ([base.bias] if self.has_bias else [])

    def input_rows(self, x: Tensor) -> Tensor:
        return as_tokens(x)

    def gradient_rows(self, ds: Tensor) -> Tensor:
        return as_tokens(ds)

    def weight_matrix(self, w: Tensor) -> Tensor:
        return w.transpose(-1, -2) if _transposed(self.module) else w

    def weight_from_matrix(self, g: Tensor) -> Tensor:
        return g.transpose(-1, -2) if _transposed(self.module) else g
