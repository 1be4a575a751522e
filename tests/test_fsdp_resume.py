"""Resuming sharded training (FSDP2, two CPU processes): EKFACInfluence and Z0Influence continue
from a checkpoint taken after the first epoch and end where an uninterrupted run ends.

The checkpoint holds rank zero's callback state (Lightning saves only that): EK-FAC's sums are
reduced over the ranks before saving; Z0's Gram matrix and tables are the same on every rank,
and each rank reads its own snapshot files (``...shard-RRRRR-of-00002``) from the shared folder.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from fsdp_launch import ShardedMLP, fsdp2, run_ranks, trainer
from lightning_influence import EKFACInfluence, Z0Influence, load_factors, load_z0
from lightning_influence.demos import digits_dataset
from scaffold import indexed

pytestmark = pytest.mark.slow


class MomentumMLP(ShardedMLP):
    """SGD with momentum: Lightning 2.6's loading of a consolidated FSDP2 checkpoint fails on an
    optimizer without state (plain SGD: ``IndexError`` in ``_rekey_optimizer_state_if_needed``)."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.5)


def _run(rank, root, out, epochs, ckpt=None):
    train, _, _ = digits_dataset(dtype=torch.float64)
    data = indexed(train, 48)
    torch.manual_seed(0)
    model = MomentumMLP(hidden=8, lr=0.2).double()
    cbs = [EKFACInfluence(update_every_n_steps=1, correction_max_examples=None, dirpath=str(root / out / "ekfac")),
           Z0Influence(probe=data, record_initial=True, keep_snapshots=True, probe_batch_size=16, dirpath=str(root / out / "z0")),
           ModelCheckpoint(dirpath=str(root / out / "ckpt"), save_last=True)]
    t = trainer(fsdp2(save_distributed_checkpoint=False), root / out, cbs, max_epochs=epochs, enable_checkpointing=True)
    t.fit(model, DataLoader(data, batch_size=8), ckpt_path=ckpt)


def _both(rank, root):
    _run(rank, root, "whole", 2)
    _run(rank, root, "first", 1)
    _run(rank, root, "first", 2, ckpt=str(root / "first" / "ckpt" / "last.ckpt"))


def test_resumed_sharded_run_equals_an_uninterrupted_one(tmp_path):
    run_ranks(_both, tmp_path, tmp_path=tmp_path)
    whole, resumed = load_factors(tmp_path / "whole" / "ekfac" / "factors"), load_factors(tmp_path / "first" / "ekfac" / "factors")
    assert whole.n_examples == resumed.n_examples == 96
    for n, f in whole.layers.items():
        g = resumed.layers[n]
        for q, e in (("q_a", "eig_a"), ("q_s", "eig_s")):
            torch.testing.assert_close(getattr(g, q) @ torch.diag(getattr(g, e)) @ getattr(g, q).T,
                                       getattr(f, q) @ torch.diag(getattr(f, e)) @ getattr(f, q).T, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g.lambdas, f.lambdas, rtol=1e-8, atol=1e-10 * float(f.lambdas.max()))
    z_whole, z_resumed = load_z0(tmp_path / "whole" / "z0" / "recording"), load_z0(tmp_path / "first" / "z0" / "recording")
    assert z_whole.steps.tolist() == z_resumed.steps.tolist() == [0, 3, 6]
    torch.testing.assert_close(z_resumed.gram, z_whole.gram, rtol=1e-12, atol=0)
    torch.testing.assert_close(z_resumed.probe_losses, z_whole.probe_losses, rtol=1e-10, atol=1e-12)
