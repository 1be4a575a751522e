"""Which strategies each callback runs under, and the refusals (docs/distributed.md shows them).

Refused at ``setup``, before any training, with a message that says what to do instead:
DeepSpeed (not installed here: a stand-in class of that name, as the callbacks match strategies
by class name along the hierarchy) and XLA FSDP for every callback; LiSSA under FSDP1 and FSDP2;
tensor parallelism (``ModelParallelStrategy(tensor_parallel_size=2)``). Refused at
``on_fit_start``: FSDP1 with parameters in the unit that wraps the whole LightningModule (no
auto-wrap policy). The two-process cases run in forked processes (see ``fsdp_launch.py``).
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch.utils.data import DataLoader

from fsdp_launch import ShardedMLP, fsdp1, fsdp2, run_ranks, trainer
from lightning_influence import EKFACInfluence, LiSSASelfInfluence, Z0Influence
from lightning_influence.distributed import UnsupportedStrategyError
from lightning_influence.callbacks.base import strategy_family
from lightning_influence.demos import MLPClassifier, digits_dataset
from scaffold import indexed, quiet_trainer


def _data():
    train, _, _ = digits_dataset()
    return indexed(train, 16)


CALLBACKS = {
    "EKFACInfluence": lambda: EKFACInfluence(),
    "Z0Influence": lambda: Z0Influence(probe=_data()),
    "LiSSASelfInfluence": lambda: LiSSASelfInfluence(probe=_data()),
}


class DeepSpeedStrategy(SingleDeviceStrategy):
    """Stands in for lightning's DeepSpeedStrategy (deepspeed is not installed)."""


class XLAFSDPStrategy(SingleDeviceStrategy):
    """Stands in for lightning's XLAFSDPStrategy (torch_xla is not installed)."""


@pytest.mark.parametrize("strategy", [DeepSpeedStrategy, XLAFSDPStrategy])
@pytest.mark.parametrize("callback", sorted(CALLBACKS))
def test_deepspeed_and_xla_fsdp_are_refused_at_setup(tmp_path, strategy, callback):
    t = quiet_trainer(tmp_path, [CALLBACKS[callback]()], strategy=strategy(device=torch.device("cpu")), max_epochs=1)
    model = MLPClassifier(hidden=4)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(UnsupportedStrategyError, match=rf"^{callback} does not support {strategy.__name__}: .* (Use|Train with) ") as e:
        t.fit(model, DataLoader(_data(), batch_size=8))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # refused before any training step
    assert strategy_family(t) in ("deepspeed", "xla_fsdp")
    if callback != "LiSSASelfInfluence":  # what to do instead: a strategy that works
        assert "FSDPStrategy" in str(e.value) and "ModelParallelStrategy" in str(e.value)


def _refusals(rank, root):
    """Each case in turn in one two-process job: the refusal's message (every rank refuses)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    cases = {
        "lissa-fsdp1": (lambda: fsdp1(), lambda: CALLBACKS["LiSSASelfInfluence"]()),
        "lissa-fsdp2": (lambda: fsdp2(), lambda: CALLBACKS["LiSSASelfInfluence"]()),
        "ekfac-tensor-parallel": (lambda: ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2),
                                  lambda: EKFACInfluence()),
        "ekfac-fsdp1-root-unit": (lambda: fsdp1(auto_wrap_policy=None), lambda: EKFACInfluence()),
        "z0-fsdp1-root-unit": (lambda: fsdp1(auto_wrap_policy=None), lambda: Z0Influence(probe=_data())),
    }
    out = {}
    for name, (strategy, callback) in cases.items():
        torch.manual_seed(0)
        model = ShardedMLP(hidden=4)
        try:
            trainer(strategy(), root / name, [callback()], max_epochs=1).fit(model, DataLoader(_data(), batch_size=4))
            out[name] = None
        except UnsupportedStrategyError as e:
            out[name] = str(e)
    return out


@pytest.mark.slow
def test_sharded_refusals_in_two_processes(tmp_path):
    ranks = run_ranks(_refusals, tmp_path, tmp_path=tmp_path)
    assert ranks[0] == ranks[1]
    got = ranks[0]
    assert got["lissa-fsdp1"].startswith("LiSSASelfInfluence does not support FSDPStrategy (CPUFSDPStrategy): sampled LiSSA")
    assert got["lissa-fsdp2"].startswith("LiSSASelfInfluence does not support ModelParallelStrategy: sampled LiSSA")
    assert "strategy='ddp'" in got["lissa-fsdp2"] and "consolidated checkpoint" in got["lissa-fsdp2"]
    assert got["ekfac-tensor-parallel"].startswith("EKFACInfluence does not support tensor parallelism (ModelParallelStrategy(tensor_parallel_size=2))")
    for name in ("ekfac-fsdp1-root-unit", "z0-fsdp1-root-unit"):
        assert "are in the FSDP unit that wraps the whole LightningModule" in got[name]
        assert "net.0.weight" in got[name] and "auto_wrap_policy" in got[name]
