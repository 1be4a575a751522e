"""The registry of tracked layer types: lookup, subclasses, optional packages, and adding a type."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import IndexedDataset, select_layers
from lightning_influence.ekfac.fit import fit_factors
from lightning_influence.layers import (
    Conv1dLayer,
    Conv2dLayer,
    LayerSelectionError,
    LinearLayer,
    TrackedLayer,
    TransformersConv1DLayer,
    layer_class_for,
    register_layer_type,
    supported_layer_types,
    supported_type_names,
)
from lightning_influence.layers import base as layers_base
from lightning_influence.task import ClassificationTask


def test_registry_resolves_types_subclasses_and_dotted_paths():
    from transformers.pytorch_utils import Conv1D

    class MyLinear(nn.Linear):
        pass

    from peft.tuners.lora.layer import Linear as LoRALinear

    assert supported_layer_types() == (nn.Linear, nn.Conv1d, nn.Conv2d, Conv1D, LoRALinear)
    assert supported_type_names() == ["torch.nn.Linear", "torch.nn.Conv1d", "torch.nn.Conv2d", "transformers Conv1D",
                                      "peft LoRA Linear"]
    assert layer_class_for(MyLinear(2, 3)) is LinearLayer  # subclasses resolve through the MRO
    assert layer_class_for(nn.Conv1d(1, 1, 1)) is Conv1dLayer and layer_class_for(nn.Conv2d(1, 1, 1)) is Conv2dLayer
    assert layer_class_for(Conv1D(3, 2)) is TransformersConv1DLayer  # registered by dotted path
    assert layer_class_for(nn.ReLU()) is None and layer_class_for(nn.Bilinear(2, 2, 2)) is None
    gpt2 = TrackedLayer.from_module("c", Conv1D(5, 3))  # nf=5 outputs, nx=3 inputs; weight (3, 5)
    assert (gpt2.d_in, gpt2.d_out, gpt2.grad_shape) == (3, 5, (5, 4))
    g = torch.randn(5, 4)
    dw, db = gpt2.param_gradient(g)
    assert dw.shape == (3, 5) and torch.equal(dw, g[:, :3].T) and torch.equal(db, g[:, 3])
    torch.testing.assert_close(gpt2.flatten_param_grads([dw, db]), g)


def test_core_layers_import_no_optional_package():
    code = (
        "import sys, torch, lightning_influence.layers as L\n"
        "L.select_layers(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Conv1d(1, 1, 1)))\n"
        "print('transformers' in sys.modules, 'peft' in sys.modules)\n"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False False"


class TransposedAffine(nn.Module):
    """A layer type the library does not know: ``y = x @ W + b`` with ``W: (d_in, d_out)``."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_in, d_out) / d_in ** 0.5)
        self.bias = nn.Parameter(torch.zeros(d_out))

    def forward(self, x):
        return x @ self.weight + self.bias


@pytest.fixture()
def registered_affine():
    """Registers one class for TransposedAffine, as a user's own file would, then removes it."""

    @register_layer_type(TransposedAffine)
    class TransposedAffineLayer(TrackedLayer):
        type_name = "TransposedAffine"

        @classmethod
        def geometry(cls, module):
            return tuple(module.weight.shape)

        def input_rows(self, x):
            return x[:, None, :]

        def gradient_rows(self, ds):
            return ds[:, None, :]

        def weight_matrix(self, w):
            return w.transpose(-1, -2)

        def weight_from_matrix(self, g):
            return g.transpose(-1, -2)

    yield TransposedAffineLayer
    del layers_base._REGISTRY[TransposedAffine]


def test_adding_a_type_is_one_class_and_everything_uses_it(registered_affine, float64_default):
    torch.manual_seed(0)
    model = nn.Sequential(TransposedAffine(4, 5), nn.Tanh(), nn.Linear(5, 3))
    with pytest.raises(LayerSelectionError, match="unsupported type TransposedAffine"):
        del layers_base._REGISTRY[TransposedAffine]
        try:
            TrackedLayer.from_module("0", model[0])
        finally:
            layers_base._REGISTRY[TransposedAffine] = registered_affine
    layers = select_layers(model)
    assert [type(l) for l in layers] == [registered_affine, LinearLayer]
    assert "TransposedAffine" in supported_type_names()
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    factors = fit_factors(model, DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=4))
    # Λ against per-example autograd gradients, flattened by hand: (d_out, d_in + 1) = [Wᵀ | b]
    task = ClassificationTask()
    grads = []
    for i in range(10):
        gw, gb = torch.autograd.grad(task.per_example_loss(model, (x[i : i + 1], y[i : i + 1])).sum(), [model[0].weight, model[0].bias])
        grads.append(torch.cat([gw.T, gb[:, None]], 1))
    g = torch.stack(grads)
    f = factors.layers["0"]
    assert f.grad_shape == (5, 5)
    torch.testing.assert_close(f.lambdas, (f.q_s.T @ g @ f.q_a).pow(2).mean(0), rtol=1e-9, atol=1e-14)
