"""Two CPU processes (gloo, ddp_spawn) against one process: the Z0 recording is the same.

The single-process run is built to take the same optimizer steps as the two-process one: its
batch ``k`` is the union of rank 0's and rank 1's batch ``k`` under the ``DistributedSampler``
that Lightning gives the training loader (shuffled with the global seed, reshuffled each epoch;
63 examples, so rank 1's last batch repeats the first example of the shuffled order as padding),
and the mean loss over 32 examples equals DDP's average of two 16-example means. So the weights,
snapshots, Gram matrix and every loss agree up to float32 round-off.

Covered under DDP: the probe split by striding (ranks get 32 and 31 examples), queries with
their own ids, gathering by id, the broadcast Gram matrix, and ``losses_from="training_step"``
with the sampler's padded duplicate (rank 1's last example) left out by position.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import IndexedDataset, Z0Influence, load_scores, load_z0
from lightning_influence.demos import MLPClassifier
from scaffold import MergedRanks, quiet_trainer

N, BATCH = 63, 16


class PerExampleMLP(MLPClassifier):
    """Returns per-example losses from training_step and remembers, per epoch, the first loss
    seen for each id (in this process)."""

    def training_step(self, batch, batch_idx):
        ids, (x, y) = batch
        per = F.cross_entropy(self(x), y, reduction="none")
        seen = self.__dict__.setdefault("recorded", {}).setdefault(self.current_epoch, {})
        for i, v in zip(ids.tolist(), per.detach().tolist()):
            seen.setdefault(i, v)
        return {"loss": per.mean(), "per_example_loss": per.detach(), "ids": ids}


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 6, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return x, y


def _fit(root, model, loader, devices, train=None):
    """Record the probe and queries; under DDP also the training-step losses (one process
    cannot: its merged batches hold example 0 twice, a real repeated id there, so its module
    keeps those losses instead)."""
    x, y = _data()
    cbs = [Z0Influence(probe=IndexedDataset(TensorDataset(x, y)), queries=IndexedDataset(TensorDataset(x[:5], y[:5]), offset=100),
                       record_initial=True, keep_snapshots=True, probe_batch_size=8)]
    if devices > 1:
        cbs.append(Z0Influence(name="z0-train", losses_from="training_step"))
        # the default (losses_from="auto") with the training set as probe: its rows come from the training steps
        cbs.append(Z0Influence(probe=train, name="z0-auto", probe_batch_size=8))
    trainer = quiet_trainer(root, cbs, max_epochs=2, devices=devices, strategy="ddp_spawn" if devices > 1 else "auto")
    trainer.fit(model, loader)
    return load_z0(root / "influence" / "z0" / "recording")


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_two_processes_record_what_one_process_records(tmp_path):
    x, y = _data()
    tr = IndexedDataset(TensorDataset(x, y))
    torch.manual_seed(0)
    ddp_model = PerExampleMLP(d_in=6, hidden=4, n_classes=2, lr=0.5)
    single_model = PerExampleMLP(d_in=6, hidden=4, n_classes=2, lr=0.5)
    single_model.load_state_dict(ddp_model.state_dict())

    ddp = _fit(tmp_path / "ddp", ddp_model, DataLoader(tr, batch_size=BATCH), devices=2, train=tr)
    ddp_train = load_z0(tmp_path / "ddp" / "influence" / "z0-train" / "recording")
    ddp_auto = load_z0(tmp_path / "ddp" / "influence" / "z0-auto" / "recording")
    order = MergedRanks(N, BATCH)
    for epoch in range(2):  # each epoch the padded duplicate is rank 0's first example, in its first batch
        order.set_epoch(epoch)
        ranks = order.ranks()
        assert len(list(order)) == 64 and len(set(order)) == N and ranks[1][-1] == ranks[0][0]
    one = _fit(tmp_path / "one", single_model, DataLoader(tr, batch_size=2 * BATCH, sampler=MergedRanks(N, BATCH)), devices=1)

    # same rows, ids and tables as one process
    assert ddp.probe_ids.tolist() == one.probe_ids.tolist() == list(range(N))
    assert ddp.query_ids.tolist() == one.query_ids.tolist() == list(range(100, 105))
    assert ddp.steps.tolist() == one.steps.tolist() == [0, 2, 4]
    assert ddp.epochs.tolist() == one.epochs.tolist() == [0, 1, 2]
    torch.testing.assert_close(ddp.probe_losses, one.probe_losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ddp.query_losses, one.query_losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ddp.gram, one.gram, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(ddp.self_influence("variance"), one.self_influence("variance"), rtol=1e-4, atol=1e-9)
    s_ddp, s_one = load_scores(tmp_path / "ddp" / "influence" / "z0" / "self_influence"), \
        load_scores(tmp_path / "one" / "influence" / "z0" / "self_influence")
    assert s_ddp.train_ids.tolist() == s_one.train_ids.tolist()
    torch.testing.assert_close(s_ddp.self_influence, s_one.self_influence, rtol=1e-4, atol=1e-9)
    # the rows are the losses of the recorded weights (ddp_spawn copies the final weights back)
    for row in range(3):
        fresh = MLPClassifier(d_in=6, hidden=4, n_classes=2)
        fresh.load_state_dict(ddp.snapshot(row))
        fresh.eval()
        with torch.no_grad():
            torch.testing.assert_close(ddp.probe_losses[row], F.cross_entropy(fresh(x), y, reduction="none"))
        flat = torch.cat([t.double().ravel() for t in ddp.snapshot(row).values()])
        assert float(ddp.gram[row, row]) == pytest.approx(float(flat @ flat), rel=1e-12)
    final = torch.cat([p.detach().double().ravel() for p in ddp_model.parameters()])
    torch.testing.assert_close(torch.cat([t.double().ravel() for t in ddp.snapshot(2).values()]), final, rtol=0, atol=0)

    # training-step losses under DDP: the padded duplicate of example 0 (rank 1's last) is left out,
    # its real occurrence (rank 0, first batch) kept; every loss equals the one-process training step's
    assert ddp_train.probe_ids.tolist() == list(range(N)) and ddp_train.steps.tolist() == [2, 4]
    for epoch in range(2):
        ref = torch.tensor([single_model.recorded[epoch][i] for i in range(N)])
        torch.testing.assert_close(ddp_train.probe_losses[epoch], ref, rtol=1e-5, atol=1e-6)
    # losses_from="auto" under DDP: the same rows, gathered from both ranks, the padding left out
    assert ddp_auto.manifest["probe_losses_at"] == ["training_step"] * 2
    assert ddp_auto.probe_ids.tolist() == list(range(N)) and ddp_auto.steps.tolist() == [2, 4]
    torch.testing.assert_close(ddp_auto.probe_losses, ddp_train.probe_losses, rtol=0, atol=0)
    torch.testing.assert_close(ddp_auto.gram, ddp_train.gram, rtol=0, atol=0)
