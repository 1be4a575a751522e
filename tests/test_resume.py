"""Nothing lost across interruptions, in one process: a full disk at the end-of-fit save, then a
resume that completes the factors (and LiSSA's scores); finishing factors from a checkpoint
without training (function and CLI); a resumed run under a new logger version keeps its
folders; output folders that are not the library's are never replaced or deleted."""

from __future__ import annotations

import errno
import textwrap
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, Subset

from lightning_influence import EKFACInfluence, LiSSAOptions, LiSSASelfInfluence, Z0Influence, load_factors, load_scores, load_z0
from lightning_influence import faults
from lightning_influence.demos import MLPClassifier, digits_dataset
from lightning_influence.ekfac.finish import finish_factors
from lightning_influence.storage import read_artifact
from scaffold import indexed, quiet_trainer

warnings.filterwarnings("ignore", ".*does not have many workers.*")
LISSA = LiSSAOptions(depth=4, scale=50.0, damping=0.1, sample_size=16)


def _data(n=64):
    train, _, _ = digits_dataset(dtype=torch.float64)
    return indexed(train, n)


def _model():
    """A float64 model: Lightning restores checkpoint weights before precision="64-true" converts
    the model, so a float32 model would round the resumed weights to float32."""
    torch.manual_seed(0)
    return MLPClassifier(hidden=8, lr=0.2).double()


def _callbacks(probe):
    return [EKFACInfluence(update_every_n_steps=1, probe=probe, top_k=3), Z0Influence(probe=probe, top_k=3),
            LiSSASelfInfluence(probe=probe, options=LISSA, top_k=3)]


def _fit(root, epochs=2, ckpt_path=None, logger=False, extra=()):
    data = _data()
    cbs = _callbacks(Subset(data, range(0, 64, 4)))
    trainer = quiet_trainer(root, [*cbs, ModelCheckpoint(dirpath=str(root / "ckpt"), save_last=True), *extra], max_epochs=epochs,
                            precision="64-true", logger=logger, enable_checkpointing=True, deterministic=True, num_sanity_val_steps=0)
    trainer.fit(_model(), DataLoader(data, batch_size=16), ckpt_path=ckpt_path)
    return trainer, cbs


def _same_artifact(a, b, keys=()):
    ta, ma = read_artifact(a)
    tb, mb = read_artifact(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    for k in keys:
        assert ma.get(k) == mb.get(k), k


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("whole")
    _fit(root)
    return root / "influence"


@pytest.fixture(scope="module")
def disk_full(tmp_path_factory):
    """A run whose EK-FAC save hits a full disk (fault injected at the tensor write)."""
    root = tmp_path_factory.mktemp("full")
    mp = pytest.MonkeyPatch()
    mp.setenv(faults.ENV, "storage.tensors:ekfac=enospc")
    faults.reset()
    try:
        with pytest.raises(OSError) as e:
            _fit(root)
    finally:
        mp.undo()
        faults.reset()
    assert e.value.errno == errno.ENOSPC
    return root


def test_a_full_disk_at_the_save_loses_nothing_and_a_resume_completes_the_factors(disk_full, uninterrupted):
    folder = disk_full / "influence"
    assert not (folder / "ekfac" / "factors").exists() and not list((folder / "ekfac").glob(".factors.*"))
    assert not (folder / "lissa" / "self_influence").exists()  # its end-of-fit work came after EK-FAC's
    snapshots = sorted(p.name for p in (folder / "z0" / ".snapshots").iterdir())
    assert snapshots == ["snapshot_00000.safetensors", "snapshot_00001.safetensors"]
    # resuming the finished run (max_epochs reached: Lightning skips training) writes what is missing
    with pytest.warns(UserWarning, match="stopped before writing its factors; writing them now"):
        _fit(disk_full, ckpt_path=str(disk_full / "ckpt" / "last.ckpt"))
    _same_artifact(folder / "ekfac" / "factors", uninterrupted / "ekfac" / "factors", keys=["n_examples", "n_lambda_examples", "layers"])
    for name in ("ekfac", "lissa", "z0"):
        _same_artifact(folder / name / "self_influence", uninterrupted / name / "self_influence", keys=["step", "epoch", "n_train"])
    _same_artifact(folder / "z0" / "recording", uninterrupted / "z0" / "recording")
    # the skipped resume deletes no snapshot, and a second one rewrites nothing (the factors are current)
    assert sorted(p.name for p in (folder / "z0" / ".snapshots").iterdir()) == snapshots
    stamp = (folder / "ekfac" / "factors" / "manifest.json").stat().st_mtime_ns
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(disk_full, ckpt_path=str(disk_full / "ckpt" / "last.ckpt"))
    assert not [w for w in caught if "stopped before writing" in str(w.message)]
    assert (folder / "ekfac" / "factors" / "manifest.json").stat().st_mtime_ns == stamp


def test_finish_factors_from_the_checkpoint_without_training(disk_full, uninterrupted, tmp_path, monkeypatch, capsys):
    ckpt = disk_full / "ckpt" / "last.ckpt"
    data = _data()
    out = finish_factors(ckpt, MLPClassifier(hidden=8), DataLoader(data, batch_size=16), output=tmp_path / "f")
    _same_artifact(out, uninterrupted / "ekfac" / "factors", keys=["n_examples", "n_lambda_examples"])
    kfac = load_factors(finish_factors(ckpt, correction="none", output=tmp_path / "kfac"))
    for f in kfac.layers.values():
        torch.testing.assert_close(f.lambdas, torch.outer(f.eig_s, f.eig_a).clamp_min(0))  # K-FAC eigenvalues, same bases
    # the command line: --correction none alone, or the run's own pass with factories for the model and data
    from lightning_influence.cli import main

    (tmp_path / "mytrain.py").write_text(textwrap.dedent("""
        import torch
        from torch.utils.data import DataLoader, Subset
        from lightning_influence import IndexedDataset
        from lightning_influence.demos import MLPClassifier, digits_dataset

        def model():
            return MLPClassifier(hidden=8)

        def data():
            train, _, _ = digits_dataset(dtype=torch.float64)
            return DataLoader(IndexedDataset(Subset(train, range(64))), batch_size=16)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["finish-factors", str(ckpt), "--out", str(tmp_path / "cli"), "--model", "mytrain:model", "--data", "mytrain:data"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    _same_artifact(tmp_path / "cli", uninterrupted / "ekfac" / "factors", keys=["n_examples"])
    assert main(["finish-factors", str(ckpt), "--out", str(tmp_path / "cli-none"), "--correction", "none"]) == 0
    _same_artifact(tmp_path / "cli-none", tmp_path / "kfac")
    assert main(["finish-factors", str(ckpt), "--out", str(tmp_path / "x")]) == 2
    assert "needs the model and the training loader" in capsys.readouterr().err
    assert main(["finish-factors", str(tmp_path / "missing.ckpt")]) == 2
    assert main(["finish-factors", str(ckpt), "--name", "other", "--correction", "none"]) == 2
    assert "no such EKFACInfluence state; the checkpoint holds ['ekfac']" in capsys.readouterr().err


def test_a_resume_under_a_new_logger_version_keeps_writing_into_the_original_folders(tmp_path):
    data = _data()
    probe = Subset(data, range(0, 64, 4))

    def fit(epochs, ckpt_path=None):
        cbs = [EKFACInfluence(update_every_n_steps=1, every_n_epochs=1), Z0Influence(probe=probe, keep_snapshots=True),
               LiSSASelfInfluence(probe=probe, options=LISSA, every_n_epochs=1)]
        trainer = quiet_trainer(None, [*cbs, ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)], max_epochs=epochs,
                                precision="64-true", logger=CSVLogger(str(tmp_path), name="run"), enable_checkpointing=True,
                                num_sanity_val_steps=0)
        trainer.fit(_model(), DataLoader(data, batch_size=16), ckpt_path=ckpt_path)
        return trainer

    fit(2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(3, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))  # the logger makes version_1
    said = [str(w.message) for w in caught if "resuming into the folder the checkpoint recorded" in str(w.message)]
    assert len(said) == 3 and all("version_0" in m and "version_1" in m for m in said)
    v0 = tmp_path / "run" / "version_0" / "influence"
    assert not (tmp_path / "run" / "version_1" / "influence").exists()
    assert load_z0(v0 / "z0" / "recording").steps.tolist() == [4, 8, 12]  # no missing-snapshot error, one recording
    assert sorted(p.name for p in (v0 / "lissa").iterdir()) == ["epoch=0000", "epoch=0001", "epoch=0002", "examples", "self_influence"]
    assert sorted(p.name for p in (v0 / "ekfac").iterdir()) == ["epoch=0000", "factors"]  # epoch 1 ended run 1: its factors were the end-of-fit ones
    assert load_factors(v0 / "ekfac" / "factors").n_examples == 3 * 64
    assert load_scores(v0 / "lissa" / "self_influence").epoch == 2


def test_a_resume_without_the_snapshots_fails_before_training(tmp_path):
    data = _data()

    class Steps(L.Callback):
        steps = 0

        def on_train_batch_start(self, *a):
            Steps.steps += 1

    t = quiet_trainer(tmp_path, [Z0Influence(probe=data)], max_epochs=1)
    t.fit(_model(), DataLoader(data, batch_size=32))
    t.save_checkpoint(tmp_path / "e1.ckpt")  # the finished run deleted its snapshots (keep_snapshots=False)
    t2 = quiet_trainer(tmp_path, [Z0Influence(probe=data), Steps()], max_epochs=2)
    with pytest.raises(FileNotFoundError, match=r"1 of the 1 snapshot files this recording needs are missing"):
        t2.fit(_model(), DataLoader(data, batch_size=32), ckpt_path=tmp_path / "e1.ckpt")
    assert Steps.steps == 0


def test_folders_the_library_did_not_create_keep_their_files(tmp_path):
    data = _data(32)
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("keep")
    (mine / "sub" / "a.txt").write_text("keep too")
    snaps = tmp_path / "my_snapshots"
    snaps.mkdir()
    (snaps / "readme.txt").write_text("mine")
    cbs = [EKFACInfluence(dirpath=str(mine)), Z0Influence(probe=data, snapshot_dir=str(snaps), dirpath=str(tmp_path / "z"))]
    quiet_trainer(tmp_path, cbs, max_epochs=2).fit(_model(), DataLoader(data, batch_size=16))
    assert (mine / "notes.txt").read_text() == "keep" and (mine / "sub" / "a.txt").read_text() == "keep too"
    load_factors(mine / "factors")
    assert sorted(p.name for p in snaps.iterdir()) == ["readme.txt"]  # only its own snapshot files were deleted
    # a new recording never overwrites another recording's snapshots
    (snaps / "snapshot_00000.safetensors").write_bytes(b"someone else's")
    with pytest.raises(FileExistsError, match="already holds 1 snapshot files of another recording"):
        quiet_trainer(tmp_path, [Z0Influence(probe=data, snapshot_dir=str(snaps), dirpath=str(tmp_path / "z2"))], max_epochs=1).fit(
            _model(), DataLoader(data, batch_size=16))
    assert (snaps / "snapshot_00000.safetensors").read_bytes() == b"someone else's"


def test_snapshot_cleanup_deletes_only_what_the_recording_wrote(tmp_path):
    from lightning_influence.z0.gram import SnapshotGram

    own = SnapshotGram(tmp_path / "own")  # created by the recording: removed once empty
    for v in (1.0, 2.0):
        own.append({"w": torch.full((3,), v)})
    own.cleanup()
    assert not (tmp_path / "own").exists()
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "other.bin").write_bytes(b"x")
    (tmp_path / "shared" / "snapshot_00007.safetensors").write_bytes(b"not ours")
    g = SnapshotGram(tmp_path / "shared")
    g.append({"w": torch.ones(3)})
    g.cleanup()
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == ["other.bin", "snapshot_00007.safetensors"]


def test_a_mid_epoch_checkpoint_under_ddp_stores_the_epoch_sums_of_every_rank_once():
    """Lightning saves rank zero's callback state only: the partial epoch's sums are reduced over
    the ranks into the checkpoint and restored on rank zero alone (not W times)."""
    from types import SimpleNamespace

    from lightning_influence.ekfac.online import OnlineFactors
    from lightning_influence.layers import select_layers
    from lightning_influence.task import ClassificationTask

    model = MLPClassifier(d_in=4, hidden=3, n_classes=2)
    layers = select_layers(model)

    def fake(rank, calls):
        def reduce(t, reduce_op="sum"):
            calls.append(reduce_op)
            return t * 2  # the other rank holds the same sums
        return SimpleNamespace(world_size=2, global_rank=rank, strategy=SimpleNamespace(reduce=reduce, root_device=torch.device("cpu")))

    cb = EKFACInfluence(update_every_n_steps=1)
    cb.state = OnlineFactors(layers, cb.options)
    batch = (torch.arange(5), (torch.randn(5, 4), torch.zeros(5, dtype=torch.long)))
    cb.state.begin_batch(batch, ClassificationTask(), 0, 2)
    g = torch.Generator().manual_seed(0)
    for l in layers:
        cb.state.observe(l, torch.randn(5, 1, l.a_dim, generator=g), torch.randn(5, 1, l.d_out, generator=g), None)
    cb.state.end_batch()
    local = {n: acc.a_sum.clone() for n, acc in cb.state.epoch_accs.items()}
    calls = []
    cb._trainer = fake(0, calls)
    state = cb.state_dict()
    assert state["epoch_reduced"] and calls
    for n in local:
        torch.testing.assert_close(state["epoch"][n]["a_sum"], 2 * local[n])
        assert state["epoch"][n]["examples"] == 10
        torch.testing.assert_close(cb.state.epoch_accs[n].a_sum, local[n])  # the live state is untouched
    for rank, expected in ((0, 10), (1, 0)):
        other = EKFACInfluence(update_every_n_steps=1)
        other._trainer = fake(rank, [])
        other.state = OnlineFactors(layers, other.options)
        other.load_state_dict(state)
        assert all(acc.examples == expected for acc in other.state.epoch_accs.values())
