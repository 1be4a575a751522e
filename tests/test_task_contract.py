"""The task contract (issue 22): one list of methods, checked once and completely by
``resolve_task`` when a method is set up, never discovered missing later."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import EKFACInfluence, IndexedDataset, InfluenceTask, LiSSAOptions, LiSSASelfInfluence
from lightning_influence.demos import MLPClassifier
from lightning_influence.ekfac.fit import fit_factors
from lightning_influence.lissa import SamplePool, self_influence
from lightning_influence.task import (
    EVERY_METHOD,
    TASK_CONTRACT,
    ClassificationTask,
    CausalLMTask,
    ModuleTask,
    TaskLike,
    resolve_task,
)
from lightning_influence.validation import InvalidArgumentError
from scaffold import quiet_trainer


class LossOnly:
    """A duck-typed task with only the two methods the old check asked for."""

    def example_ids(self, batch):
        return None

    def per_example_loss(self, model, batch):
        return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


class PlainLoss(InfluenceTask):
    """An InfluenceTask subclass with the defaults and its own loss, nothing for LiSSA's samplers."""

    def per_example_loss(self, model, batch):
        x, y = batch[1] if len(batch) == 2 and isinstance(batch[1], (tuple, list)) else batch
        return F.cross_entropy(model(x), y, reduction="none")


class NoForward(L.LightningModule):
    """Trains through ``self.net`` and never defines ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 3)

    def training_step(self, batch, batch_idx):
        x, y = batch[1]
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def data(n: int = 16) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g))


def test_the_contract_is_complete_and_every_default_task_satisfies_it():
    # every method any module calls on a task is in the contract, with a purpose and a user
    assert set(TASK_CONTRACT) == {"example_ids", "per_example_loss", "measurement", "padding_mask", "gradient_scale",
                                  "sampled_loss", "logits", "targets", "loss_from_outputs"}
    always = {n for n, m in TASK_CONTRACT.items() if m.needed_by == EVERY_METHOD}
    assert always == set(name for name in dir(TaskLike) if not name.startswith("_"))
    for task in (ClassificationTask(), CausalLMTask(), ModuleTask(MLPClassifier(d_in=4, n_classes=3))):
        assert resolve_task(task=task, needs=list(TASK_CONTRACT)) is task
    with pytest.raises(InvalidArgumentError, match="not in the task contract"):
        resolve_task(task=ClassificationTask(), needs=["logit"])


def test_a_custom_task_missing_a_method_is_refused_at_construction_naming_it():
    with pytest.raises(InvalidArgumentError, match=r"lacks required method\(s\) \['measurement', 'padding_mask', 'gradient_scale'\]"):
        resolve_task(task=LossOnly())
    with pytest.raises(InvalidArgumentError, match="padding_mask"):  # a callback refuses it in its constructor
        EKFACInfluence(task=LossOnly())
    # the defaults of InfluenceTask complete it for every method...
    assert isinstance(resolve_task(task=PlainLoss()), PlainLoss)
    # ...and a feature that needs more names what is missing before anything runs
    with pytest.raises(InvalidArgumentError, match=r"\['sampled_loss'\].*fisher='true'"):
        fit_factors(MLPClassifier(d_in=4, n_classes=3), DataLoader(data(), batch_size=8), task=PlainLoss(), fisher="true")
    pool = SamplePool(data())
    with pytest.raises(InvalidArgumentError, match=r"\['logits', 'targets'\].*logit sampler"):
        self_influence(MLPClassifier(d_in=4, n_classes=3), DataLoader(data(), batch_size=8), pool,
                       LiSSAOptions(sampler="logit"), task=PlainLoss())
    with pytest.raises(InvalidArgumentError, match=r"\['logits', 'loss_from_outputs'\]"):
        self_influence(MLPClassifier(d_in=4, n_classes=3), DataLoader(data(), batch_size=8), pool,
                       LiSSAOptions(curvature="ggn"), task=PlainLoss())


def test_a_module_without_forward_is_told_to_define_forward_or_per_example_loss(tmp_path):
    message = "NoForward defines neither forward nor per_example_loss.*define forward"
    with pytest.raises(InvalidArgumentError, match=message):
        resolve_task(NoForward())
    with pytest.raises(InvalidArgumentError, match=message):
        fit_factors(NoForward(), DataLoader(IndexedDataset(data()), batch_size=8))
    probe = IndexedDataset(data(4))
    cb = LiSSASelfInfluence(probe=probe, options=LiSSAOptions(depth=2))
    trainer = quiet_trainer(tmp_path, [cb], max_epochs=1)
    with pytest.raises(InvalidArgumentError, match=message):  # at fit start, not deep inside torch
        trainer.fit(NoForward(), DataLoader(IndexedDataset(data()), batch_size=8))

    class OwnLoss(NoForward):
        def per_example_loss(self, batch):
            x, y = batch[1]
            return F.cross_entropy(self.net(x), y, reduction="none")

    assert isinstance(resolve_task(OwnLoss()), ModuleTask)  # its own loss needs no forward
    with pytest.raises(InvalidArgumentError, match=r"no forward.*logits\(model, batch\)"):
        resolve_task(OwnLoss(), needs=("logits",))


def test_a_module_with_its_own_loss_must_define_loss_from_outputs_where_needed():
    class OwnLoss(MLPClassifier):
        def per_example_loss(self, batch):
            x, y = batch[1]
            return F.cross_entropy(self(x), y, reduction="none")

    m = OwnLoss(d_in=4, n_classes=3)
    assert isinstance(resolve_task(m, needs=("logits", "sampled_loss")), ModuleTask)
    with pytest.raises(InvalidArgumentError, match=r"loss_from_outputs\(outputs, batch\)"):
        resolve_task(m, needs=("loss_from_outputs",))


@pytest.mark.parametrize("make, missing", [
    (lambda t: EKFACInfluence(task=t, fisher="true"), "sampled_loss"),
    (lambda t: LiSSASelfInfluence(probe=IndexedDataset(data(4)), task=t, options=LiSSAOptions(curvature="ggn", depth=2)), "logits"),
    (lambda t: LiSSASelfInfluence(probe=IndexedDataset(data(4)), task=t, options=LiSSAOptions(sampler="logit", depth=2)), "logits"),
])
def test_a_callback_checks_the_task_methods_its_options_need_before_step_0(tmp_path, make, missing):
    """The callbacks pass their options' needs (EK-FAC's true Fisher: sampled_loss; LiSSA's GGN
    or logit sampler: logits, ...) to resolve_task at set-up: a task without them is refused
    before any training step, naming the method, not at the end of fit."""

    class NoExtras:  # every task's five methods, none of the optional ones
        def example_ids(self, batch):
            return batch[0]

        def per_example_loss(self, model, batch):
            x, y = batch[1]
            return F.cross_entropy(model(x), y, reduction="none")

        def measurement(self, model, batch):
            return self.per_example_loss(model, batch)

        def padding_mask(self, batch):
            return None

        def gradient_scale(self, batch):
            return 1.0

    cb = make(NoExtras())
    trainer = quiet_trainer(tmp_path, [cb], max_epochs=1)
    with pytest.raises(InvalidArgumentError, match=rf"lacks required method\(s\) \[.*'{missing}'"):
        trainer.fit(MLPClassifier(d_in=4, hidden=8, n_classes=3), DataLoader(IndexedDataset(data()), batch_size=8))
    assert trainer.global_step == 0
