"""LiSSASelfInfluence inside a Lightning Trainer (CPU, tiny MLP on digits)."""

from __future__ import annotations

import csv
import dataclasses
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, IterableDataset, Subset, TensorDataset

import lightning_influence.callbacks.lissa as lissa_callback
from lightning_influence import LiSSASelfInfluence, load_scores
from lightning_influence.demos import MLPClassifier, digits_dataset
from lightning_influence.lissa import LiSSADivergenceError, LiSSAOptions, self_influence
from lightning_influence.lissa.samplers import SamplePool
from lightning_influence.storage import read_manifest
from lightning_influence.task import ClassificationTask, MissingExampleIdsError
from lightning_influence.validation import InvalidArgumentError
from scaffold import indexed, quiet_trainer


@pytest.fixture(scope="module")
def data():
    train, _, _ = digits_dataset(seed=0)
    train = indexed(train, 200)
    probe = Subset(train, range(0, 200, 5))  # 40 examples, ids 0, 5, ..., 195
    return train, probe


def trainer(tmp_path, callbacks, epochs=2, logger=True):
    return quiet_trainer(tmp_path, callbacks, max_epochs=epochs, logger=CSVLogger(tmp_path) if logger else False,
                         limit_train_batches=4)


@pytest.fixture()
def core_calls(monkeypatch):
    """Counts the callback's calls into the core."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return self_influence(*args, **kwargs)

    monkeypatch.setattr(lissa_callback, "self_influence", counting)
    return calls


class ModeSpy(ClassificationTask):
    """Records the model's mode whenever the callback evaluates a loss."""

    def __init__(self):
        super().__init__()
        self.modes = []

    def per_example_loss(self, model, batch):
        self.modes.append((model.training, torch.is_grad_enabled()))
        return super().per_example_loss(model, batch)


def test_every_epoch_artifacts_metrics_and_end_of_fit_reuse_match_core(tmp_path, data, core_calls):
    train, probe = data
    torch.manual_seed(0)
    model = MLPClassifier(hidden=8)
    spy = ModeSpy()
    opts = LiSSAOptions(sampler="logit", sample_size=32, curvature="ggn", damping=0.01, scale=5.0, depth=30, tol=None,
                        chunk_size=16, seed=3)
    cb = LiSSASelfInfluence(probe=probe, options=opts, every_n_epochs=1, probe_batch_size=16, task=spy, top_k=3)
    t = trainer(tmp_path, [cb])
    t.fit(model, DataLoader(train, batch_size=32, shuffle=True))
    assert model.training  # mode restored
    assert spy.modes and all(not training and grad for training, grad in spy.modes)
    assert len(core_calls) == 2  # epochs 0 and 1; the end of fit reuses epoch 1

    root = tmp_path / "lightning_logs" / "version_0" / "influence" / "lissa"
    assert sorted(p.name for p in root.iterdir()) == ["epoch=0000", "epoch=0001", "examples", "self_influence"]
    scores = load_scores(root / "self_influence")
    last = load_scores(root / "epoch=0001" / "self_influence")
    first = load_scores(root / "epoch=0000" / "self_influence")
    assert (scores.method, scores.epoch, scores.step) == ("lissa", 1, 8) and (first.epoch, first.step) == (0, 4)
    assert scores.train_ids.tolist() == last.train_ids.tolist() == list(range(0, 200, 5))
    assert torch.equal(scores.self_influence, last.self_influence)
    assert not torch.allclose(first.self_influence, last.self_influence)  # the weights moved in between
    assert bool((scores.self_influence > 0).all())
    manifest = read_manifest(root / "self_influence")
    assert manifest["kind"] == "scores" and manifest["method"] == "lissa" and manifest["options"] == opts.as_dict()
    assert scores.meta["callback"] == "lissa" and scores.meta["num_params"] == 64 * 8 + 8 + 8 * 10 + 10
    rows = list(csv.reader(open(root / "self_influence" / "self_influence.csv")))
    assert rows[0] == ["id", "self_influence"] and len(rows) == 41
    assert cb.scores is not None and torch.equal(cb.scores.self_influence, scores.self_influence)

    # the same numbers from the core on the trained model (model in eval mode, same seed)
    model.eval()
    ref = self_influence(model, DataLoader(probe, batch_size=16), SamplePool(train), opts, task=ClassificationTask())
    torch.testing.assert_close(scores.self_influence, ref.self_influence.float(), rtol=1e-4, atol=1e-6)

    logged = list(csv.DictReader(open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv")))
    rows = [r for r in logged if r.get("influence/lissa/self_mean")]
    assert len(rows) == 2  # one per scored epoch, nothing again at the end
    last_row = rows[-1]
    s = scores.self_influence.double()
    assert float(last_row["influence/lissa/self_mean"]) == pytest.approx(float(s.mean()), rel=1e-5)
    assert float(last_row["influence/lissa/self_max"]) == pytest.approx(float(s.max()), rel=1e-5)
    assert [int(float(last_row[f"influence/lissa/top{i}_id"])) for i in (1, 2, 3)] == [i for i, _ in scores.top_self(3)]
    assert "influence/lissa/top4_id" not in last_row and "influence/lissa/top_id_0" not in last_row
    for q in (50, 90, 99):
        assert float(last_row[f"influence/lissa/self_q{q}"]) == pytest.approx(float(torch.quantile(s, q / 100)), rel=1e-5)
    assert float(last_row["influence/lissa/steps"]) == 30 and float(last_row["influence/lissa/converged_fraction"]) == 0
    assert float(last_row["influence/lissa/n_probe"]) == 40 and float(last_row["influence/lissa/scale"]) == 5.0
    assert float(last_row["influence/lissa/nonfinite"]) == 0
    for key in ("seconds", "peak_mem_mb"):
        assert float(last_row[f"influence/lissa/{key}"]) >= 0


def test_default_runs_once_at_the_end_and_two_instances_share_a_trainer(tmp_path, data, core_calls):
    train, probe = data
    small = LiSSAOptions(sample_size=16, depth=5, scale=50.0, damping=0.1)
    a = LiSSASelfInfluence(probe=DataLoader(probe, batch_size=20), options=small)
    b = LiSSASelfInfluence(probe=Subset(probe, range(10)), options=dataclasses.replace(small, curvature="ggn"), name="lissa-ggn")
    t = trainer(tmp_path, [a, b], epochs=2, logger=False)
    t.fit(MLPClassifier(hidden=8), DataLoader(train, batch_size=32))
    assert len(core_calls) == 2  # once per callback, at the end of fit
    for cb, n in ((a, 40), (b, 10)):
        folder = tmp_path / "influence" / cb.name
        assert sorted(p.name for p in folder.iterdir()) == ["examples", "self_influence"]  # no per-epoch artifacts by default
        saved = load_scores(folder / "self_influence")
        assert saved.n_train == n and saved.epoch == 1 and saved.options["curvature"] == cb.options.curvature
        assert t.callback_metrics[f"influence/{cb.name}/n_probe"] == n
        assert t.callback_metrics[f"influence/{cb.name}/top1_id"] == saved.top_self(1)[0][0]
    assert a.state_key != b.state_key


def test_every_n_epochs_computes_the_end_afresh_when_the_last_epoch_was_not_due(tmp_path, data, core_calls):
    train, probe = data
    opts = LiSSAOptions(sample_size=16, depth=5, scale="auto", damping=0.1)
    cb = LiSSASelfInfluence(probe=probe, options=opts, every_n_epochs=2)
    t = trainer(tmp_path, [cb], epochs=3, logger=False)
    t.fit(MLPClassifier(hidden=8), DataLoader(train, batch_size=32))
    folder = tmp_path / "influence" / "lissa"
    assert sorted(p.name for p in folder.iterdir()) == ["epoch=0001", "examples", "self_influence"]
    assert len(core_calls) == 2
    end, mid = load_scores(folder / "self_influence"), load_scores(folder / "epoch=0001" / "self_influence")
    assert (end.epoch, end.step, mid.epoch, mid.step) == (2, 12, 1, 8)
    used = float(t.callback_metrics["influence/lissa/scale"])
    assert used > 1.5 * 0.1  # safety * (largest mini-batch eigenvalue + damping)
    assert end.options["scale"] == "auto" and end.meta["metrics"]["scale"] == pytest.approx(used)


def test_max_probe_scores_the_same_seeded_subset_every_epoch(tmp_path, data, core_calls):
    """``max_probe`` scores a seeded random subset of the probe (the same examples at every
    computation), equal to the core on that subset; ``None`` scores all, and a probe no larger
    than the default is scored whole."""
    train, probe = data
    opts = LiSSAOptions(sample_size=16, depth=5, scale=50.0, damping=0.1, seed=4)
    cb = LiSSASelfInfluence(probe=DataLoader(probe, batch_size=7), options=opts, every_n_epochs=1, max_probe=12)
    t = trainer(tmp_path, [cb], epochs=2, logger=False)
    model = MLPClassifier(hidden=8)
    t.fit(model, DataLoader(train, batch_size=32))
    keep = torch.randperm(len(probe), generator=torch.Generator().manual_seed(4))[:12].sort().values
    expected_ids = torch.tensor([probe[int(i)][0] for i in keep])
    folder = tmp_path / "influence" / "lissa"
    for artifact in (folder / "epoch=0000" / "self_influence", folder / "self_influence"):
        assert load_scores(artifact).train_ids.tolist() == expected_ids.tolist()
    assert t.callback_metrics["influence/lissa/n_probe"] == 12
    model.eval()
    ref = self_influence(model, DataLoader(Subset(probe, keep.tolist()), batch_size=7), SamplePool(train), opts,
                         task=ClassificationTask())
    torch.testing.assert_close(cb.scores.self_influence, ref.self_influence.float(), rtol=1e-4, atol=1e-6)
    assert LiSSASelfInfluence(probe=probe, max_probe=64).scored_probe() is probe  # 40 <= 64
    assert len(LiSSASelfInfluence(probe=train, max_probe=None).scored_probe()) == len(train)
    assert len(LiSSASelfInfluence(probe=train, max_probe=64).scored_probe()) == 64


def test_default_scores_every_probe_example_without_warning(tmp_path, data, recwarn):
    """Self-influence ranks the whole probe (mislabel detection), so by default every example is
    scored, with no subsampling warning, equal to the core on the whole probe."""
    train, _ = data
    opts = LiSSAOptions(sample_size=16, depth=5, scale=50.0, damping=0.1)
    cb = LiSSASelfInfluence(probe=train, options=opts)
    assert cb.scored_probe() is train
    t = trainer(tmp_path, [cb], epochs=1, logger=False)
    model = MLPClassifier(hidden=8)
    t.fit(model, DataLoader(train, batch_size=32))
    assert not [w for w in recwarn if "max_probe" in str(w.message)]
    assert t.callback_metrics["influence/lissa/n_probe"] == len(train) == 200
    assert load_scores(tmp_path / "influence" / "lissa" / "self_influence").train_ids.tolist() == list(range(200))
    model.eval()
    ref = self_influence(model, DataLoader(train, batch_size=64), SamplePool(train), opts, task=ClassificationTask())
    torch.testing.assert_close(cb.scores.self_influence, ref.self_influence.float(), rtol=1e-4, atol=1e-6)


def test_peak_memory_metric_sees_an_allocation_below_the_process_peak(tmp_path, data, monkeypatch):
    """``peak_mem_mb`` measures the LiSSA computation's own memory: a 128 MiB block allocated
    (and freed) inside it is seen although the process's resident peak was far higher before
    (a rise of that peak, as ``ru_maxrss`` reports it, would be 0)."""
    import time

    train, probe = data

    def allocating(*args, **kwargs):
        block = torch.ones(128 * 2**20 // 4)  # 128 MiB of float32, touched
        time.sleep(0.05)
        del block
        return self_influence(*args, **kwargs)

    monkeypatch.setattr(lissa_callback, "self_influence", allocating)
    earlier = torch.ones(512 * 2**20 // 4)  # raise the process's peak well above what follows
    del earlier
    cb = LiSSASelfInfluence(probe=probe, options=LiSSAOptions(sample_size=16, depth=3, scale=50.0, damping=0.1))
    t = trainer(tmp_path, [cb], epochs=1, logger=False)
    t.fit(MLPClassifier(hidden=8), DataLoader(train, batch_size=32))
    peak = float(t.callback_metrics["influence/lissa/peak_mem_mb"])
    assert 120 <= peak <= 320, peak
    assert cb.scores.meta["peak_memory_method"] in ("linux_vmhwm", "linux_vmrss_sampled", "ru_maxrss")


def test_diverging_configuration_raises_documented_error(tmp_path, data):
    train, probe = data
    opts = LiSSAOptions(sample_size=32, scale=1e-3, damping=0.01, depth=50, tol=None)
    model = MLPClassifier(hidden=8)
    t = trainer(tmp_path, [LiSSASelfInfluence(probe=probe, options=opts)], epochs=1, logger=False)
    with pytest.raises(LiSSADivergenceError, match="raise `scale`"):
        t.fit(model, DataLoader(train, batch_size=32))
    assert model.training


def test_probe_without_ids_fails_at_setup_before_any_work(tmp_path, data):
    train, _ = data
    x, y = torch.randn(12, 64), torch.randint(0, 10, (12,))
    spy = ModeSpy()
    model = MLPClassifier(hidden=8)
    t = trainer(tmp_path, [LiSSASelfInfluence(probe=TensorDataset(x, y), task=spy)], epochs=1, logger=False)
    with pytest.raises(MissingExampleIdsError, match=r"LiSSASelfInfluence\(probe=\.\.\.\): the probe's batches carry no example ids.*IndexedDataset"):
        t.fit(model, DataLoader(train, batch_size=32))
    assert t.global_step == 0 and spy.modes == []


class Stream(IterableDataset):
    def __iter__(self):
        yield from ()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(probe=3), r"LiSSASelfInfluence\(probe=\.\.\.\) must be a torch Dataset .*, got 3"),
        (dict(probe="train"), r"LiSSASelfInfluence\(probe=\.\.\.\) must be a torch Dataset"),
        (dict(options={"depth": 3}), r"LiSSASelfInfluence\(options=\.\.\.\) must be a LiSSAOptions or None, got \{'depth': 3\}"),
        (dict(pool=Stream()), r"LiSSASelfInfluence\(pool=\.\.\.\) must be a map-style Dataset .*got Stream"),
        (dict(every_n_epochs=0), r"LiSSASelfInfluence\(every_n_epochs=\.\.\.\) must be a positive int or None, got 0"),
        (dict(probe_batch_size=0), r"LiSSASelfInfluence\(probe_batch_size=\.\.\.\) must be a positive int, got 0"),
        (dict(top_k=-1), r"LiSSASelfInfluence\(top_k=\.\.\.\) must be an int >= 0, got -1"),
        (dict(name="../x"), r"LiSSASelfInfluence\(name=\.\.\.\) must be a folder name"),
        (dict(max_probe=0), r"LiSSASelfInfluence\(max_probe=\.\.\.\) must be a positive int or None, got 0"),
    ],
)
def test_constructor_validation(data, kwargs, message):
    _, probe = data
    with pytest.raises(InvalidArgumentError, match=message):
        LiSSASelfInfluence(**{"probe": probe, **kwargs})


class FakeStrategy:
    """Records collectives and answers them as a second rank would: the failure votes say
    whether the other rank failed (``other_fails`` holds the indices of the votes where it did),
    gathered ids come back with the other rank's (distinct) ids beside this rank's."""

    def __init__(self, rank: int, other_fails=()):
        self.calls = []
        self.rank = rank
        self.other_fails = set(other_fails)
        self.votes = 0
        self.root_device = torch.device("cpu")

    def reduce(self, tensor, reduce_op="sum"):
        self.calls.append("reduce")
        return tensor * 2

    def _pair(self, mine, other):
        return torch.stack([mine, other] if self.rank == 0 else [other, mine])

    def all_gather(self, tensor):
        self.calls.append("all_gather")
        if tensor.is_floating_point() and tensor.numel() == 1:  # a failure vote
            other = torch.full_like(tensor, float(self.votes in self.other_fails))
            self.votes += 1
            return self._pair(tensor, other)
        if tensor.dtype == torch.long and tensor.numel() > 1:  # ids
            return self._pair(tensor, tensor + 1000)
        return self._pair(tensor, tensor)

    def broadcast(self, obj, src=0):
        self.calls.append("broadcast")
        return obj if src == self.rank else "LiSSADivergenceError: boom"


def fake_trainer(tmp_path, train, rank, other_fails=()):
    return SimpleNamespace(
        current_epoch=0, global_step=0, loggers=[], default_root_dir=str(tmp_path), global_rank=rank, world_size=2,
        callbacks=[], max_epochs=1,
        strategy=FakeStrategy(rank, other_fails), train_dataloader=DataLoader(train, batch_size=32),
        is_global_zero=rank == 0, callback_metrics={},
    )


def run_epoch(cb, t, model):
    cb.setup(t, model, "fit")
    cb.on_train_epoch_end(t, model)


def test_ranks_make_the_same_collectives_whatever_happens(tmp_path, data):
    train, probe = data
    model = MLPClassifier(hidden=8)
    opts = LiSSAOptions(sample_size=16, depth=3, scale=50.0, damping=0.1, tol=None)
    # success on both ranks: 20 of the 40 probe examples each, ids interleaved
    seqs = []
    for rank in (0, 1):
        t = fake_trainer(tmp_path / str(rank), train, rank)
        cb = LiSSASelfInfluence(probe=probe, options=opts, every_n_epochs=1, probe_batch_size=8)
        run_epoch(cb, t, model)
        seqs.append(t.strategy.calls)
        assert cb.scores.n_train == 40 and sorted(cb.scores.train_ids.tolist()[:20]) == list(range(0, 200, 5))[rank::2]
        assert t.callback_metrics["influence/lissa/steps"] == 3 and t.callback_metrics["influence/lissa/n_probe"] == 40
    # setup's id check, its folder check and run id; the computation, the gather by id (sizes, ids, values), the
    # step counts, the write
    assert seqs[0] == seqs[1] == ["all_gather", "all_gather", "broadcast"] + ["all_gather"] * 4 + ["reduce", "all_gather"]
    # rank 1 diverges: it still votes, sends its message and raises; rank 0 learns of it and raises too
    bad = fake_trainer(tmp_path, train, 1)
    with pytest.raises(LiSSADivergenceError):
        run_epoch(LiSSASelfInfluence(probe=probe, options=dataclasses.replace(opts, scale=1e-4, depth=50), every_n_epochs=1),
                  bad, model)
    good = fake_trainer(tmp_path, train, 0, other_fails={2})  # votes: id check, folder check, computation
    with pytest.raises(RuntimeError, match=r"failed on rank 1 \(LiSSADivergenceError: boom\)"):
        run_epoch(LiSSASelfInfluence(probe=probe, options=opts, every_n_epochs=1), good, model)
    assert bad.strategy.calls == good.strategy.calls == ["all_gather", "all_gather", "broadcast", "all_gather", "broadcast"]
    assert model.training  # restored after the failure too


def test_probe_split_across_ranks_covers_every_example_once(tmp_path, data):
    train, probe = data
    cb = LiSSASelfInfluence(probe=probe, probe_batch_size=7)
    seen = []
    for rank in range(3):
        t = SimpleNamespace(world_size=3, global_rank=rank)
        seen += [int(i) for batch in cb.probe_loader(t, probe) for i in batch[0]]
    assert sorted(seen) == list(range(0, 200, 5))
