"""Z0Influence snapshots exactly the trainable parameters (issue 24): a frozen part of the model
(a frozen layer, a LoRA adapter's frozen base) is never snapshotted, so snapshots are the size of
what trains. Checked against the parameters read at each recording point by an independent
callback, and the Gram matrix against float64 dot products in plain loops."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import IndexedDataset, Z0Influence, load_z0
from lightning_influence.demos import MLPClassifier
from scaffold import quiet_trainer

warnings.filterwarnings("ignore", ".*does not have many workers.*")


def _data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    return IndexedDataset(TensorDataset(x, y))


class _Reference(L.Callback):
    """Copies of the trainable parameters (``requires_grad=True``) at every epoch end, in float64."""

    def __init__(self) -> None:
        self.rows: list[dict[str, torch.Tensor]] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.rows.append({n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad})


def _fit(tmp_path, model, epochs=3):
    ref = _Reference()
    cb = Z0Influence(probe=_data(), keep_snapshots=True, losses_from="probe", probe_batch_size=16)
    trainer = quiet_trainer(tmp_path, [cb, ref], max_epochs=epochs)
    trainer.fit(model, DataLoader(_data(), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0)))
    return load_z0(tmp_path / "influence" / "z0" / "recording"), ref


def _check_snapshots_are_the_trainable_parameters(res, ref, model) -> None:
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert trainable and frozen
    assert res.manifest["param_names"] == trainable
    assert res.manifest["num_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert res.num_checkpoints == len(ref.rows)
    for row, expected in enumerate(ref.rows):
        snap = res.snapshot(row)
        assert list(snap) == trainable  # exactly the trainable parameters, no frozen one
        for name in trainable:
            assert snap[name].dtype == expected[name].dtype
            assert torch.equal(snap[name], expected[name]), (row, name)
    # the Gram matrix: float64 dot products of the trainable parameters, element by element
    e = len(ref.rows)
    for i in range(e):
        for j in range(e):
            dot = 0.0
            for name in trainable:
                for a, b in zip(ref.rows[i][name].double().reshape(-1).tolist(), ref.rows[j][name].double().reshape(-1).tolist()):
                    dot += a * b
            assert res.gram[i, j].item() == pytest.approx(dot, rel=1e-12, abs=1e-12)
    # the files hold the trainable parameters only
    files = sorted(Path(res.manifest["snapshot_dir"]).glob("snapshot_*.safetensors"))
    assert len(files) == e
    trainable_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    frozen_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    for f in files:
        assert trainable_bytes <= f.stat().st_size < trainable_bytes + frozen_bytes


def test_frozen_layer_is_not_snapshotted(tmp_path):
    torch.manual_seed(0)
    model = MLPClassifier(d_in=6, hidden=16, n_classes=4, lr=0.3)
    model.net[0].requires_grad_(False)  # a frozen first layer (16 x 6 + 16 numbers)
    frozen_before = model.net[0].weight.detach().clone()
    res, ref = _fit(tmp_path, model)
    assert torch.equal(model.net[0].weight, frozen_before)  # it really stayed frozen
    _check_snapshots_are_the_trainable_parameters(res, ref, model)
    assert res.manifest["param_names"] == ["net.2.weight", "net.2.bias"]


def test_lora_adapters_only(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = MLPClassifier(d_in=6, hidden=16, n_classes=4, lr=0.3)
    model.net = peft.get_peft_model(model.net, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"]))
    res, ref = _fit(tmp_path, model)
    _check_snapshots_are_the_trainable_parameters(res, ref, model)
    assert all(".lora_A." in n or ".lora_B." in n for n in res.manifest["param_names"])
    assert len(res.manifest["param_names"]) == 4
    # LoRA's B starts at zero and moved: the snapshots saw training, not only the initial adapter
    assert res.snapshot(0)["net.base_model.model.2.lora_B.default.weight"].abs().sum() > 0
