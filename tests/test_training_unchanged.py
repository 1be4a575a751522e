"""An influence callback is a by-product: training with it gives the very weights training
without it gives. Probe passes during training (the id check at setup, Z0's recordings at every
epoch end) iterate DataLoaders, whose iterators draw a base seed from torch's global generator;
before this was guarded, that draw shifted the next epoch's shuffle and the trained model
changed with the callbacks attached (the CNN example's test accuracy went from 0.78 to 0.45)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_influence import EKFACInfluence, LiSSAOptions, LiSSASelfInfluence, Z0Influence
from lightning_influence.demos import MLPClassifier, digits_dataset
from lightning_influence.randomness import RandomnessKeepingLoader
from scaffold import indexed, quiet_trainer


class DropoutMLP(MLPClassifier):
    """Dropout draws from the global generator every training step."""

    def __init__(self) -> None:
        super().__init__(hidden=16, lr=0.1)
        self.net = nn.Sequential(self.net[0], self.net[1], nn.Dropout(0.3), self.net[2])


def train(callbacks) -> dict[str, torch.Tensor]:
    L.seed_everything(0, verbose=False)
    data, test, _ = digits_dataset()
    ids, queries = indexed(data, 128), indexed(test, 8)
    model = DropoutMLP()
    loader = DataLoader(ids, batch_size=32, shuffle=True)
    cbs = {"none": [], "z0": [Z0Influence(probe=ids, queries=queries, every_n_epochs=1)],
           "ekfac": [EKFACInfluence(probe=ids, update_every_n_steps=1)],
           "lissa": [LiSSASelfInfluence(probe=ids, options=LiSSAOptions(depth=2, sample_size=8))]}[callbacks]
    quiet_trainer(f"/tmp/unchanged_{callbacks}", cbs, max_epochs=3).fit(model, loader)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("callback", ["z0", "ekfac", "lissa"])
def test_training_with_a_callback_gives_the_weights_of_training_without_it(callback, tmp_path):
    plain = train("none")
    with_cb = train(callback)
    for k in plain:
        assert torch.equal(plain[k], with_cb[k]), k


def test_a_pass_over_the_wrapped_loader_leaves_the_global_generators_alone():
    import random

    import numpy as np

    loader = RandomnessKeepingLoader(DataLoader(list(range(10)), batch_size=3, shuffle=True))
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    assert sorted(int(i) for b in loader for i in b) == list(range(10)) and len(loader) == 4
    torch.rand(0)  # nothing drawn
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]
    assert next(iter(loader)).numel() == 3 and loader.batch_size == 3  # attributes are the loader's
