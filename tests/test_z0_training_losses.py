"""Z0's probe losses read from the training forward (``losses_from="auto"``, the default when the
probe is the training set): the core :class:`TrainingLossCapture` without a Trainer, and the
callback in tiny Lightning runs. References: per-example losses computed in float64 loops from
the logits the training step saw (recorded inside ``training_step``), and the eval-mode losses
at the snapshot weights for the fallbacks."""

from __future__ import annotations

import math
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import IndexedDataset, Z0Influence, load_z0
from lightning_influence.demos import CausalLMModule, MLPClassifier, tiny_causal_lm
from lightning_influence.task import ClassificationTask, ModuleTask
from lightning_influence.z0.capture import TrainingLossCapture
from scaffold import quiet_trainer

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*val_dataloader.*")


def _ce64(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy in float64, one example and one class at a time."""
    out = []
    for row, label in zip(logits.double().tolist(), y.tolist()):
        m = max(row)
        out.append(m + math.log(sum(math.exp(v - m) for v in row)) - row[label])
    return torch.tensor(out, dtype=torch.float64)


def _data(n=64, seed=0, d=6, classes=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    return TensorDataset(x, y % classes)


# -- the core object, no Trainer -----------------------------------------------------------------
class _Wrapped(nn.Module):
    """A module whose 'training step' calls a child (``self.net(x)``), not itself."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))

    def forward(self, x):
        return self.net(x)


def _attached(n=16):
    """``(model, capture, x, y)``: a :class:`_Wrapped` with an attached capture, ``n`` examples."""
    model = _Wrapped()
    cap = TrainingLossCapture(model, ClassificationTask())
    cap.attach()
    x, y = _data()[:n]
    return model, cap, x, y


def test_capture_reads_the_forward_losses_of_the_root_module():
    model, cap, x, y = _attached()
    batch = (torch.arange(16), (x, y))
    for step in range(3):  # the losses of each step's own forward, at that step's weights
        cap.begin(batch)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        got = cap.end(loss.detach(), 16)
        assert got.problem is None and cap.chosen == ""
        torch.testing.assert_close(got.losses.double(), _ce64(logits.detach(), y), rtol=1e-6, atol=1e-6)
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.5 * p.grad
                p.grad = None
    assert cap.consistent()
    assert list(cap._handles) == [""]  # the child's hook was removed once the root was chosen
    cap.detach()
    assert not model._forward_hooks and not model.net._forward_hooks


def test_capture_reads_a_child_when_the_step_calls_it():
    model, cap, x, y = _attached()
    cap.begin((torch.arange(16), (x, y)))
    logits = model.net(x)  # the root module is never called
    got = cap.end(F.cross_entropy(logits, y).detach(), 16)
    assert cap.chosen == "net"
    torch.testing.assert_close(got.losses.double(), _ce64(logits.detach(), y), rtol=1e-6, atol=1e-6)
    cap.detach()


def test_capture_refuses_a_loss_that_does_not_add_up():
    model, cap, x, y = _attached()
    cap.begin((torch.arange(16), (x, y)))
    logits = model(x)
    loss = F.cross_entropy(logits, y) + 0.1 * sum(p.pow(2).sum() for p in model.parameters())  # an L2 term
    got = cap.end(loss.detach(), 16)
    assert got.losses is None and cap.chosen is None
    assert "training loss is" in got.problem
    # called twice in one step (two views): refused, whatever the sum
    cap.begin((torch.arange(16), (x, y)))
    loss = F.cross_entropy(model(x), y) + F.cross_entropy(model(x + 0.1), y)
    got = cap.end(loss.detach(), 16)
    assert got.losses is None and "called 2 times" in got.problem
    # a later mismatch (after a verified batch) is found by the lazy check
    cap.begin((torch.arange(16), (x, y)))
    assert cap.end(F.cross_entropy(model(x), y).detach(), 16).losses is not None
    assert cap.consistent()
    cap.begin((torch.arange(16), (x, y)))
    assert cap.end(F.cross_entropy(model(x), y).detach() * 2, 16).losses is not None
    assert not cap.consistent()
    cap.reset_check()
    assert cap.consistent()
    cap.detach()


def test_capture_ignores_eval_mode_and_no_step():
    model, cap, x, y = _attached(8)
    model(x)  # outside begin/end: not recorded
    cap.begin((torch.arange(8), (x, y)))
    model.eval()
    model(x)
    got = cap.end(torch.tensor(1.0), 8)
    assert got.losses is None and "not called" in got.problem
    cap.detach()


# -- the callback ---------------------------------------------------------------------------------
class _Recording(MLPClassifier):
    """An MLP (with dropout when asked) that remembers, per epoch, the float64 losses of the logits
    its training step computed, and whose training loss may carry an extra term."""

    def __init__(self, dropout=0.0, l2=0.0, d_in=6, hidden=8, n_classes=4, lr=0.3) -> None:
        super().__init__(d_in=d_in, hidden=hidden, n_classes=n_classes, lr=lr)
        if dropout:
            self.net = nn.Sequential(self.net[0], nn.Tanh(), nn.Dropout(dropout), self.net[2])
        self.l2 = l2
        self.recorded: dict[int, dict[int, float]] = {}

    def training_step(self, batch, batch_idx):
        ids, (x, y) = batch
        logits = self(x)
        seen = self.recorded.setdefault(self.current_epoch, {})
        for i, v in zip(ids.tolist(), _ce64(logits.detach(), y).tolist()):
            seen[i] = v
        loss = F.cross_entropy(logits, y)
        if self.l2:
            loss = loss + self.l2 * sum(p.pow(2).sum() for p in self.parameters())
        return loss


def _fit(tmp_path, model, callbacks, epochs=3, batch_size=16, data=None, ckpt_path=None, **kw):
    data = data if data is not None else IndexedDataset(_data())
    trainer = quiet_trainer(tmp_path, callbacks, max_epochs=epochs, **kw)
    trainer.fit(model, DataLoader(data, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)),
                ckpt_path=ckpt_path)
    return trainer


class _SnapshotLosses(L.Callback):
    """Records, at each epoch's end, the float64 eval-mode losses of ``train`` (an
    ``IndexedDataset`` of a ``TensorDataset``) in ``finals``."""

    def __init__(self, train) -> None:
        self.train = train
        self.finals: list[torch.Tensor] = []

    def on_train_epoch_end(self, trainer, pl_module):
        x, y = self.train.dataset.tensors
        pl_module.eval()
        with torch.no_grad():
            self.finals.append(_ce64(pl_module(x), y))
        pl_module.train()


def _expected(model, epochs, n=64):
    return torch.stack([torch.tensor([model.recorded[e][i] for i in range(n)], dtype=torch.float64) for e in range(epochs)])


@pytest.mark.parametrize("dropout, accumulate", [(0.0, 1), (0.3, 1), (0.0, 2)])
def test_default_reads_the_training_forward(tmp_path, dropout, accumulate):
    torch.manual_seed(0)
    model = _Recording(dropout=dropout)
    train = IndexedDataset(_data())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback warning
        warnings.filterwarnings("ignore", ".*(workers|val_dataloader|LeafSpec|log_every_n_steps).*")
        _fit(tmp_path, model, [Z0Influence(probe=train)], data=train, accumulate_grad_batches=accumulate)
    res = load_z0(tmp_path / "influence" / "z0" / "recording")
    assert res.manifest["probe_losses_at"] == ["training_step"] * 3
    assert res.manifest["losses_requested"] == "auto"
    assert res.probe_ids.tolist() == list(range(64))
    # each example's loss at the weights (and dropout mask) of the step that trained on it
    torch.testing.assert_close(res.probe_losses.double(), _expected(model, 3), rtol=1e-5, atol=1e-6)


def test_probe_mode_is_the_exact_snapshot_loss(tmp_path):
    torch.manual_seed(0)
    model = _Recording(dropout=0.3)
    train = IndexedDataset(_data())
    snap = _SnapshotLosses(train)
    _fit(tmp_path, model, [Z0Influence(probe=train, losses_from="probe"), snap], data=train)
    res = load_z0(tmp_path / "influence" / "z0" / "recording")
    assert res.manifest["probe_losses_at"] == ["snapshot"] * 3
    torch.testing.assert_close(res.probe_losses.double(), torch.stack(snap.finals), rtol=1e-5, atol=1e-6)


def _check_fallback(tmp_path, model, train, match, **kw):
    snap = _SnapshotLosses(train)
    with pytest.warns(UserWarning, match=match):
        _fit(tmp_path, model, [Z0Influence(probe=train), snap], data=train, **kw)
    res = load_z0(tmp_path / "influence" / "z0" / "recording")
    assert res.manifest["probe_losses_at"] == ["snapshot"] * len(snap.finals)
    torch.testing.assert_close(res.probe_losses.double(), torch.stack(snap.finals), rtol=1e-5, atol=1e-6)


def test_a_loss_with_extra_terms_falls_back_to_the_probe_pass(tmp_path):
    torch.manual_seed(0)
    model = _Recording(l2=1e-2)
    _check_fallback(tmp_path, model, IndexedDataset(_data()), r"losses_from='auto'.*training loss is")


def test_an_epoch_that_leaves_examples_out_falls_back(tmp_path):
    torch.manual_seed(0)
    model = _Recording()
    _check_fallback(tmp_path, model, IndexedDataset(_data()), r"covered 48 of the 64 probe examples", limit_train_batches=3)


def test_another_probe_is_evaluated(tmp_path):
    torch.manual_seed(0)
    model = _Recording()
    train = IndexedDataset(_data())
    probe = IndexedDataset(_data())  # equal content, another object: not known to be the training set
    _fit(tmp_path, model, [Z0Influence(probe=probe)], data=train)
    res = load_z0(tmp_path / "influence" / "z0" / "recording")
    assert res.manifest["probe_losses_at"] == ["snapshot"] * 3


def test_step_recording_and_initial_row_use_the_probe(tmp_path):
    torch.manual_seed(0)
    train = IndexedDataset(_data())
    cbs = [Z0Influence(probe=train, every_n_steps=2, name="steps"), Z0Influence(probe=train, record_initial=True, name="init")]
    _fit(tmp_path, _Recording(), cbs, epochs=2, data=train)
    for name in ("steps", "init"):
        res = load_z0(tmp_path / "influence" / name / "recording")
        assert set(res.manifest["probe_losses_at"]) == {"snapshot"}


class _LM(CausalLMModule):
    """The demo causal-LM module (its training step calls ``self.model``, a child), remembering the
    float64 summed token losses of the logits each training step computed."""

    def training_step(self, batch, batch_idx):
        ids, f = batch
        out = self.model(input_ids=f["input_ids"], attention_mask=f.get("attention_mask"), labels=f["labels"])
        seen = self.__dict__.setdefault("recorded", {}).setdefault(self.current_epoch, {})
        logits = out.logits.detach()[:, :-1].double()
        labels = f["labels"][:, 1:]
        for b, i in enumerate(ids.tolist()):
            total = 0.0
            for t in range(labels.shape[1]):
                if int(labels[b, t]) != -100:
                    row = logits[b, t].tolist()
                    m = max(row)
                    total += m + math.log(sum(math.exp(v - m) for v in row)) - row[int(labels[b, t])]
            seen[i] = total
        return out.loss


def test_causal_lm_child_module(tmp_path):
    pytest.importorskip("transformers")
    from lightning_influence import lm_collate
    from lightning_influence.demos import synthetic_token_dataset

    torch.manual_seed(0)
    data = IndexedDataset(synthetic_token_dataset(n=24, vocab_size=32))
    model = _LM(tiny_causal_lm("gpt2", vocab_size=32, hidden=16, layers=1, heads=2, max_len=16), lr=1e-2)
    trainer = quiet_trainer(tmp_path, [Z0Influence(probe=DataLoader(data, batch_size=8, collate_fn=lm_collate))], max_epochs=2)
    trainer.fit(model, DataLoader(data, batch_size=8, shuffle=True, collate_fn=lm_collate))
    res = load_z0(tmp_path / "influence" / "z0" / "recording")
    assert res.manifest["probe_losses_at"] == ["training_step"] * 2
    expected = torch.stack([torch.tensor([model.recorded[e][i] for i in range(24)], dtype=torch.float64) for e in range(2)])
    torch.testing.assert_close(res.probe_losses.double(), expected, rtol=1e-5, atol=1e-5)


# -- when the artifacts are written -----------------------------------------------------------------
class _CrashAtTrainEnd(L.Callback):
    """Saves a checkpoint after the last epoch, then dies before any later callback's on_train_end."""

    def __init__(self, path) -> None:
        self.path = path

    def on_train_end(self, trainer, pl_module):
        trainer.save_checkpoint(self.path)
        raise RuntimeError("killed")


def test_writes_left_for_the_end_and_a_skipped_resume_writes_them(tmp_path, monkeypatch):
    import lightning_influence.callbacks.z0_rows as z0_callback

    monkeypatch.setattr(z0_callback, "WRITE_SPACING", 1e12)  # after the first recording, writes wait for the end
    train = IndexedDataset(_data())

    def cb():
        return Z0Influence(probe=train, keep_snapshots=True, dirpath=str(tmp_path / "z0"))

    # uninterrupted: the metrics of every row are logged, the artifacts hold every row at the end
    metrics = []

    class Metrics(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            metrics.append(trainer.callback_metrics.get("influence/z0/self_mean"))

    torch.manual_seed(0)
    full = _Recording()
    _fit(tmp_path / "full", full, [Z0Influence(probe=train, dirpath=str(tmp_path / "full-z0")), Metrics()], data=train)
    ref = load_z0(tmp_path / "full-z0" / "recording")
    assert ref.num_checkpoints == 3 and metrics[0] is None and all(m is not None for m in metrics[1:])
    # killed between the last recording and the end of training: the folder holds the rows of the
    # first write and of the first self-influence (rows 1 and 2), not the third
    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match="killed"):
        _fit(tmp_path / "run", _Recording(),
             [_CrashAtTrainEnd(tmp_path / "last.ckpt"), cb()], data=train)
    assert load_z0(tmp_path / "z0" / "recording").num_checkpoints == 2
    # a resume that Lightning skips (max_epochs reached) writes the checkpoint's rows
    _fit(tmp_path / "run", _Recording(), [cb()], data=train,
         ckpt_path=str(tmp_path / "last.ckpt"))
    res = load_z0(tmp_path / "z0" / "recording")
    assert res.num_checkpoints == 3
    for name in ("gram", "probe_losses", "probe_ids", "steps", "epochs"):
        torch.testing.assert_close(getattr(res, name), getattr(ref, name), rtol=0, atol=0, msg=name)
    from lightning_influence import load_scores

    torch.testing.assert_close(load_scores(tmp_path / "z0" / "self_influence").self_influence,
                               load_scores(tmp_path / "full-z0" / "self_influence").self_influence, rtol=0, atol=0)
