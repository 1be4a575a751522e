"""Two-process DDP (CPU, gloo) run of LiSSASelfInfluence: the probe is split unevenly across the
ranks, the gathered scores equal those of one process on the same weights.

The processes are forked (a few seconds) rather than spawned (half a minute of imports on two
cores); once CUDA is initialised in this process forking is unsafe, so it spawns then.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

from lightning_influence import LiSSASelfInfluence, load_scores
from lightning_influence.demos import MLPClassifier, digits_dataset
from lightning_influence.lissa import LiSSAOptions, SamplePool, self_influence
from lightning_influence.task import ClassificationTask
from scaffold import indexed, quiet_trainer


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_ddp_two_ranks_gather_same_scores_as_one_process(tmp_path):
    train, _, _ = digits_dataset(seed=0)
    train = indexed(train, 200)
    probe = Subset(train, list(range(0, 200, 5)) + [199])  # 41 examples: ranks get 21 and 20
    opts = LiSSAOptions(sampler="logit", sample_size=32, curvature="ggn", damping=0.01, scale=50.0, depth=20, tol=None,
                        chunk_size=8, seed=3)
    torch.manual_seed(0)
    model = MLPClassifier(hidden=8)
    initial = [p.detach().clone() for p in model.parameters()]
    trainer = quiet_trainer(tmp_path, [LiSSASelfInfluence(probe=probe, options=opts, probe_batch_size=8)], max_epochs=1, devices=2,
                            strategy="ddp_spawn" if torch.cuda.is_initialized() else "ddp_fork", limit_train_batches=2)
    trainer.fit(model, DataLoader(train, batch_size=32))
    scores = load_scores(tmp_path / "influence" / "lissa" / "self_influence")
    assert scores.meta["world_size"] == 2 and scores.method == "lissa"
    # 3 chunks of at most 8 on each rank, every one the full depth
    assert scores.meta["metrics"]["steps"] == 20 and scores.meta["metrics"]["n_probe"] == 41
    model.eval()  # the launcher copies the trained weights back into `model`
    assert not all(torch.equal(a, b) for a, b in zip(initial, model.parameters()))
    ref = self_influence(model, DataLoader(probe, batch_size=8), SamplePool(train), opts, task=ClassificationTask())
    order = torch.argsort(ref.train_ids)
    assert scores.train_ids.tolist() == ref.train_ids[order].tolist() == list(range(0, 200, 5)) + [199]
    torch.testing.assert_close(scores.self_influence, ref.self_influence[order].float(), rtol=1e-5, atol=1e-7)
    assert bool((scores.self_influence > 0).all())
