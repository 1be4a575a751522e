"""EK-FAC on nn.Conv2d / nn.Conv1d against dense float64 references.

The references never unfold anything: a patch vector ``a_p`` is read off the module's own
forward as the Jacobian ``∂s[c, p] / ∂W[c]`` (so stride, dilation, padding and padding modes
are the module's), output gradients are autograd's, and per-example gradients come from
autograd over the parameters one example at a time, flattened as ``weight.reshape(C_out, -1)``
with the bias as the last column.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev
from torch.utils.data import DataLoader, Subset, TensorDataset

from lightning_influence import IndexedDataset, load_factors, select_layers
from lightning_influence.ekfac.capture import per_example_gradients
from lightning_influence.ekfac.fit import fit_covariances, fit_factors
from lightning_influence.ekfac.scorer import InfluenceScorer
from lightning_influence.layers import Conv1dLayer, Conv2dLayer, LayerSelectionError, TrackedLayer
from lightning_influence.demos import CNNClassifier, digits_dataset
from lightning_influence.task import ClassificationTask

from ekfac_reference import assert_same_factors, dense_preconditioner
from scaffold import exact, indexed, quiet_trainer

pytestmark = pytest.mark.usefixtures("float64_default")

CONV2D_CONFIGS = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), bias=False),
    dict(kernel_size=4, padding="same"),  # uneven padding (1 before, 2 after)
    dict(kernel_size=(2, 3), dilation=(2, 1), padding="same", padding_mode="reflect"),
    dict(kernel_size=3, stride=2, padding=2, padding_mode="circular"),
    dict(kernel_size=3, stride=(1, 2), padding=1, padding_mode="replicate"),
    dict(kernel_size=2, padding="valid", stride=3),
]
CONV1D_CONFIGS = [
    dict(kernel_size=3, stride=2, padding=1, dilation=2),
    dict(kernel_size=4, padding="same", padding_mode="circular"),
    dict(kernel_size=3, padding=2, padding_mode="reflect", bias=False),
]


def reference_patches(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[B, L, C_in · prod(kernel)]`` from the module's own forward: ``∂s[b, 0, p] / ∂W[0]``."""
    params = dict(conv.named_parameters())

    def out(w):
        return functional_call(conv, {**params, "weight": w}, (x,))

    jac = jacrev(out)(params["weight"].detach())  # [B, C_out, *out, C_out, C_in, *k]
    n = x.dim() - 2
    first = jac[:, 0][(slice(None),) * (n + 1) + (0,)]  # [B, *out, C_in, *k]
    return first.reshape(x.shape[0], -1, conv.weight[0].numel())


def flat_grads(conv: nn.Module, grads) -> torch.Tensor:
    """Autograd's ``(dW[, db])`` → ``[C_out, C_in·prod(k) (+1)]``, written out independently."""
    gw = grads[0].reshape(grads[0].shape[0], -1)
    return torch.cat([gw, grads[1][:, None]], 1) if len(grads) == 2 else gw


@pytest.mark.parametrize("dims,cfg", [(2, c) for c in CONV2D_CONFIGS] + [(1, c) for c in CONV1D_CONFIGS])
def test_rows_equal_module_jacobian_and_per_example_gradients(dims, cfg):
    torch.manual_seed(0)
    conv = (nn.Conv2d if dims == 2 else nn.Conv1d)(2, 3, **cfg)
    x = torch.randn(4, 2, *((7, 9) if dims == 2 else (11,)))
    layer = TrackedLayer.from_module("conv", conv)
    assert isinstance(layer, Conv2dLayer if dims == 2 else Conv1dLayer)
    assert layer.d_in == conv.weight[0].numel() and layer.d_out == 3 and layer.has_bias == (conv.bias is not None)
    out = conv(x)
    r = torch.randn_like(out)  # per-example loss (out[b] * r[b]).sum(): its output gradient is r
    a, ds, mask = layer.rows(x, r)
    patches = reference_patches(conv, x)
    assert mask is None and ds.shape == (4, out[0, 0].numel(), 3)
    torch.testing.assert_close(a[..., : layer.d_in], patches, rtol=0, atol=1e-12)
    if layer.has_bias:
        assert bool((a[..., -1] == 1).all())
    per_ex = per_example_gradients(a, ds)
    for b in range(4):
        g = torch.autograd.grad((conv(x[b : b + 1]) * r[b : b + 1]).sum(), layer.parameters())
        torch.testing.assert_close(per_ex[b], flat_grads(conv, g), rtol=1e-10, atol=1e-12)
        # and the library's own conversion round-trips to the parameters' shapes
        torch.testing.assert_close(layer.flatten_param_grads(g), per_ex[b], rtol=1e-10, atol=1e-12)
        for mine, theirs in zip(layer.param_gradient(per_ex[b]), g):
            torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-12)


class StridedCNN(nn.Sequential):
    """Two convolutions with stride, reflect padding, uneven 'same' padding and dilation."""

    def __init__(self, bias: bool = True):
        super().__init__(
            nn.Conv2d(1, 3, 3, stride=2, padding=1, padding_mode="reflect", bias=bias), nn.Tanh(),
            nn.Conv2d(3, 4, (2, 3), dilation=(2, 1), padding="same", bias=bias), nn.Tanh(),
            nn.Flatten(), nn.Linear(4 * 4 * 4, 3, bias=bias),
        )

    def forward(self, x):
        return super().forward(x.view(-1, 1, 8, 8))


class SequenceCNN(nn.Sequential):
    """Conv1d over a length-10 sequence of 2 channels (circular padding, dilation, stride)."""

    def __init__(self):
        super().__init__(
            nn.Conv1d(2, 3, 3, padding=2, dilation=2, padding_mode="circular"), nn.Tanh(),
            nn.Conv1d(3, 2, 4, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4, 3),
        )

    def forward(self, x):
        return super().forward(x.view(-1, 2, 10))


def cnn_setup(kind: str, n: int = 12, seed: int = 0):
    torch.manual_seed(seed)
    model = {"conv2d": StridedCNN, "conv2d_nobias": lambda: StridedCNN(bias=False), "conv1d": SequenceCNN}[kind]().double()
    x = torch.randn(n, 64 if kind.startswith("conv2d") else 20)
    y = torch.randint(0, 3, (n,))
    return model, x, y, IndexedDataset(TensorDataset(x, y))


def explicit_sums(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor, int]]:
    """Layer index → (A sum, S sum, rows) from a manual forward over the Sequential's children."""
    h = x.view(-1, *({2: (1, 8, 8), 1: (2, 10)}[2 if isinstance(model[0], nn.Conv2d) else 1]))
    inputs, outputs = {}, {}
    for i, m in enumerate(model):
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            inputs[i] = h.detach()
            h = m(h)
            h.retain_grad()
            outputs[i] = h
        else:
            h = m(h)
    F.cross_entropy(h, y, reduction="sum").backward()
    result = {}
    for i, out in outputs.items():
        m = model[i]
        if isinstance(m, nn.Linear):
            a, ds = inputs[i], out.grad
        else:
            a = reference_patches(m, inputs[i]).reshape(-1, m.weight[0].numel())
            ds = out.grad.reshape(out.shape[0], out.shape[1], -1).transpose(1, 2).reshape(-1, out.shape[1])
        if m.bias is not None:
            a = torch.cat([a, torch.ones(a.shape[0], 1)], 1)
        result[i] = (a.T @ a, ds.T @ ds, a.shape[0])
    return result


def per_example_grads(model, task, examples, layers, which="loss"):
    """``{layer: Tensor[N, C_out, a_dim]}`` by autograd over parameters (explicit flattening)."""
    out = {l.name: [] for l in layers}
    for batch in examples:
        loss = task.per_example_loss(model, batch) if which == "loss" else task.measurement(model, batch)
        for l in layers:
            g = torch.autograd.grad(loss.sum(), l.parameters(), retain_graph=True)
            out[l.name].append(flat_grads(l.module, g))
    return {n: torch.stack(g) for n, g in out.items()}


@pytest.mark.parametrize("kind", ["conv2d", "conv2d_nobias", "conv1d"])
def test_covariances_lambdas_and_scores_match_dense_references(kind):
    model, x, y, ds = cnn_setup(kind)
    task = ClassificationTask()
    layers = select_layers(model)
    assert [type(l).__name__ for l in layers] == ["Conv2dLayer" if kind.startswith("conv2d") else "Conv1dLayer"] * 2 + ["LinearLayer"]
    loader = DataLoader(ds, batch_size=5)
    covs = fit_covariances(model, loader, layers, task)
    ref = explicit_sums(model, x, y)
    for l, (a_sum, s_sum, rows) in zip(layers, ref.values()):
        acc = covs[l.name]
        torch.testing.assert_close(acc.a_sum, a_sum, rtol=1e-11, atol=1e-11)
        torch.testing.assert_close(acc.s_sum, s_sum, rtol=1e-11, atol=1e-13)
        assert acc.a_tokens == acc.s_tokens == rows and acc.examples == len(x)
        assert acc.a_sum.shape == (l.a_dim, l.a_dim) and acc.s_sum.shape == (l.d_out, l.d_out)

    factors = fit_factors(model, loader, layers, task)
    examples = [(torch.tensor([i]), (x[i : i + 1], y[i : i + 1])) for i in range(len(x))]
    grads = per_example_grads(model, task, examples, layers)
    for l in layers:
        f = factors.layers[l.name]
        torch.testing.assert_close(f.lambdas, (f.q_s.T @ grads[l.name] @ f.q_a).pow(2).mean(0), rtol=1e-9, atol=1e-14)

    scorer = InfluenceScorer(model, factors, task=task)
    q_idx = [1, 4]
    result = scorer.pairwise(DataLoader(Subset(ds, q_idx), batch_size=2), loader, per_layer=True)
    gq = per_example_grads(model, task, [examples[i] for i in q_idx], layers, which="measurement")
    dense = sum(
        gq[l.name].reshape(len(q_idx), -1) @ dense_preconditioner(factors.layers[l.name], factors.dampings()[l.name])
        @ grads[l.name].reshape(len(x), -1).T
        for l in layers
    )
    torch.testing.assert_close(result.pairwise, dense, rtol=1e-8, atol=1e-10)
    assert result.query_ids.tolist() == q_idx and result.train_ids.tolist() == list(range(len(x)))
    self_scores = scorer.self_influence(loader).self_influence
    all_pairs = sum(
        grads[l.name].reshape(len(x), -1) @ dense_preconditioner(factors.layers[l.name], factors.dampings()[l.name])
        @ grads[l.name].reshape(len(x), -1).T
        for l in layers
    )
    torch.testing.assert_close(self_scores, torch.diagonal(all_pairs), rtol=1e-8, atol=1e-10)
    assert (self_scores > 0).all()


def test_callback_on_cnn_equals_offline_fit_at_lr_zero(tmp_path):
    torch.manual_seed(0)
    model = CNNClassifier(channels=(4, 6), lr=0.0)
    train, _, _ = digits_dataset(dtype=torch.float64)
    loader = DataLoader(indexed(train, 96), batch_size=16)
    cb = exact(dirpath=str(tmp_path / "ekfac"))
    quiet_trainer(tmp_path, [cb], max_epochs=1, precision="64-true").fit(model, loader)
    saved = load_factors(tmp_path / "ekfac" / "factors", model=model)
    assert saved.layer_names == ["net.0", "net.3", "net.6"]
    assert saved.layers["net.0"].grad_shape == (4, 1 * 9 + 1) and saved.layers["net.3"].grad_shape == (6, 4 * 9 + 1)
    assert cb.state.running["net.0"].a_tokens == 96 * 64 and cb.state.running["net.3"].a_tokens == 96 * 16
    assert cb.state.running["net.6"].a_tokens == 96
    ref = fit_factors(model, loader)
    assert_same_factors(saved, ref)


def test_grouped_convolutions_are_refused_with_the_reason_and_the_fix():
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 1, groups=4), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(LayerSelectionError, match=r"(?s)1: groups=2.*2: groups=4.*exclude=\['1', '2'\]"):
        select_layers(model)
    assert [l.name for l in select_layers(model, exclude=["1", "2"])] == ["0", "4"]
    with pytest.raises(LayerSelectionError, match=r"'1' matches no supported layer; it matches layers that cannot be tracked.*groups=2"):
        select_layers(model, "1")
    with pytest.raises(LayerSelectionError, match="groups=4"):
        TrackedLayer.from_module("2", model[2])
    assert [l.name for l in select_layers(model, types=[nn.Linear])] == ["4"]


def test_unsupported_types_are_named_with_the_supported_ones():
    model = nn.Sequential(nn.Conv3d(1, 2, 3), nn.Flatten(), nn.Linear(2, 2))
    with pytest.raises(LayerSelectionError, match=r"matches unsupported modules \['0 \(Conv3d\)'\]"):
        select_layers(model, "0")
    with pytest.raises(LayerSelectionError, match=r"unsupported type Conv3d; supported types: torch.nn.Linear, .*torch.nn.Conv2d"):
        TrackedLayer.from_module("0", model[0])
    with pytest.raises(LayerSelectionError, match=r"types=\['Conv3d'\] are not supported; supported types:.*Conv1d"):
        select_layers(model, types=[nn.Conv3d])


def test_unbatched_input_and_padding_masks():
    conv2 = TrackedLayer.from_module("c", nn.Conv2d(1, 2, 3))
    with pytest.raises(ValueError, match="batched input of rank 4"):
        conv2.input_rows(torch.randn(1, 5, 5))
    # a sequence mask never applies to image positions; for Conv1d it does when lengths agree
    x, mask = torch.randn(2, 1, 3, 3), torch.tensor([[True] * 8 + [False]] * 2)
    assert conv2.mask_applies(mask, conv2.input_rows(torch.randn(2, 1, 5, 5))) is False
    conv1 = TrackedLayer.from_module("c", nn.Conv1d(2, 2, 3, padding=1))
    x = torch.randn(2, 2, 5)
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    a, ds, m = conv1.rows(x, torch.ones(2, 2, 5), mask)
    assert m is mask and bool((a[0, 3:] == 0).all()) and bool((ds[0, 3:] == 0).all()) and bool((a[1] != 0).any())
