"""Z0Influence in real (tiny) Lightning runs: rows, Gram matrix, losses, artifacts, metrics, resume, errors."""

from __future__ import annotations

import csv
import warnings

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, DataLoader, TensorDataset

from lightning_influence import IndexedDataset, Z0Influence, load_scores, load_z0
from lightning_influence.callbacks.base import DuplicateIdsError
from lightning_influence.demos import MLPClassifier
from lightning_influence.patterns import PatternError
from lightning_influence.task import MissingExampleIdsError
from lightning_influence.validation import InvalidArgumentError
from scaffold import indexed, quiet_trainer

warnings.filterwarnings("ignore", ".*does not have many workers.*")


def _data(n=64, nq=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + nq, 6, generator=g)
    y = (x[:, 0] + 0.3 * torch.randn(n + nq, generator=g) > 0).long() + 2 * (x[:, 1] > 0).long()
    return TensorDataset(x[:n], y[:n]), TensorDataset(x[n:], y[n:])


def _model(seed=0):
    torch.manual_seed(seed)
    return MLPClassifier(d_in=6, hidden=5, n_classes=4, lr=0.3)


def _trainer(root, epochs, callbacks, **kw):
    return quiet_trainer(root, callbacks, max_epochs=epochs, **kw)


def _folder(root, name="z0"):
    return root / "influence" / name


def _explicit_losses(model, ds):
    model.eval()
    with torch.no_grad():
        x, y = ds.tensors
        return F.cross_entropy(model(x), y, reduction="none")


def test_three_epochs_rows_gram_and_losses(tmp_path):
    train, test = _data()
    tr, te = IndexedDataset(train), IndexedDataset(test)
    cb = Z0Influence(probe=tr, queries=te, every_n_epochs=1, record_initial=True, keep_snapshots=True, probe_batch_size=16)
    model = _model()
    init_loss = _explicit_losses(model, train)
    model.train()
    trainer = _trainer(tmp_path, 3, [cb])
    trainer.fit(model, DataLoader(tr, batch_size=16, shuffle=True))
    res = load_z0(_folder(tmp_path) / "recording")
    assert res.directory == _folder(tmp_path) / "recording"
    assert res.num_checkpoints == 4  # initial + 3 epochs
    assert res.epochs.tolist() == [0, 1, 2, 3]
    assert res.steps.tolist() == [0, 4, 8, 12]
    assert res.probe_ids.tolist() == list(range(64)) and res.query_ids.tolist() == list(range(8))
    assert res.probe_losses.shape == (4, 64) and res.query_losses.shape == (4, 8)
    assert res.probe_losses.dtype == torch.float32 and res.gram.dtype == torch.float64
    # first row = initial weights, last row = final weights, computed independently
    torch.testing.assert_close(res.probe_losses[0], init_loss)
    torch.testing.assert_close(res.probe_losses[-1], _explicit_losses(model, train))
    torch.testing.assert_close(res.query_losses[-1], _explicit_losses(model, test))
    # Gram = W Wᵀ of the kept snapshots (float64), and the last snapshot is the final weights
    snaps = [res.snapshot(r) for r in range(4)]
    w = np.stack([np.concatenate([t.double().numpy().ravel() for t in s.values()]) for s in snaps])
    np.testing.assert_allclose(res.gram.numpy(), w @ w.T, rtol=1e-12)
    final = np.concatenate([p.detach().double().numpy().ravel() for p in model.parameters()])
    np.testing.assert_array_equal(w[-1], final)
    # CSV tables next to the safetensors
    csv = (_folder(tmp_path) / "recording" / "self_influence.csv").read_text().splitlines()
    assert csv[0] == "id,loss_variance,mean_loss,final_loss" and len(csv) == 65
    row5 = csv[6].split(",")
    assert int(row5[0]) == 5
    assert float(row5[1]) == pytest.approx(float(res.probe_losses[:, 5].double().var(unbiased=False)), rel=1e-6)
    assert len((_folder(tmp_path) / "recording" / "checkpoints.csv").read_text().splitlines()) == 5
    # the self-influence artifact (default estimator): mean loss of the probe over the 4 rows (brute force, float64)
    ref = torch.tensor([float(np.mean(res.probe_losses[:, j].double().numpy())) for j in range(64)], dtype=torch.float64)
    si = res.self_influence("mean_loss")
    torch.testing.assert_close(si, ref, rtol=1e-10, atol=1e-12)
    scores = load_scores(_folder(tmp_path) / "self_influence")
    assert scores.method == "z0" and scores.epoch == 2 and scores.step == 12
    assert scores.train_ids.tolist() == list(range(64))
    torch.testing.assert_close(scores.self_influence.double(), ref, rtol=1e-6, atol=1e-9)
    assert scores.options["estimator"] == "mean_loss" and scores.options["every_n_epochs"] == 1
    assert scores.meta["checkpoints"] == 4 and scores.meta["epochs_completed"] == 3
    # metrics: the self-influence and its top ids, 1-based (top1_id is the highest)
    order = torch.argsort(ref, descending=True)
    m = trainer.callback_metrics
    assert m["influence/z0/top1_id"].item() == float(res.probe_ids[int(order[0])])
    assert m["influence/z0/top2_id"].item() == float(res.probe_ids[int(order[1])])
    assert "influence/z0/top0_id" not in m and "influence/z0/top11_id" not in m
    assert m["influence/z0/self_max"].item() == pytest.approx(float(ref.max()), rel=1e-5)
    assert m["influence/z0/self_mean"].item() == pytest.approx(float(ref.mean()), rel=1e-5)
    assert m["influence/z0/nonfinite"].item() == 0
    # estimators run on the recording with the library's shapes
    pw = res.pairwise(k=2)
    assert pw.shape == (8, 64) and pw.dtype == torch.float32
    assert res.self_influence("least_squares", k=2).shape == (64,)


def test_restores_train_mode_and_deletes_snapshots(tmp_path):
    train, _ = _data()
    tr = IndexedDataset(train)
    seen = []

    class Checker(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(pl_module.training and all(m.training for m in pl_module.modules()))

    cb = Z0Influence(probe=tr, every_n_steps=2, params="last_layer", probe_batch_size=32)
    model = _model()
    _trainer(tmp_path, 2, [cb, Checker()]).fit(model, DataLoader(tr, batch_size=16))
    assert seen and all(seen)
    res = load_z0(_folder(tmp_path) / "recording")
    assert res.steps.tolist() == [2, 4, 6, 8]
    assert res.epochs.tolist() == [0, 0, 1, 1]  # step-based rows: the epoch they were taken in
    assert res.manifest["param_names"] == ["net.2.weight", "net.2.bias"]
    assert res.manifest["num_params"] == 5 * 4 + 4
    assert res.manifest["snapshot_dir"] == str(_folder(tmp_path) / ".snapshots")
    assert not (_folder(tmp_path) / ".snapshots").exists()  # deleted at the end of training by default
    last = torch.cat([model.net[2].weight.detach().double().ravel(), model.net[2].bias.detach().double().ravel()])
    assert float(res.gram[-1, -1]) == pytest.approx(float(last @ last), rel=1e-12)


def test_resume_gives_identical_tables(tmp_path):
    train, test = _data()
    tr, te = IndexedDataset(train), IndexedDataset(test)

    def cb():
        return Z0Influence(probe=tr, queries=DataLoader(te, batch_size=3), keep_snapshots=True, probe_batch_size=16)

    full_root, part_root = tmp_path / "full", tmp_path / "part"
    _trainer(full_root, 3, [cb()]).fit(_model(), DataLoader(tr, batch_size=16))
    t1 = _trainer(part_root, 2, [cb()])
    t1.fit(_model(), DataLoader(tr, batch_size=16))
    t1.save_checkpoint(tmp_path / "e2.ckpt")
    _trainer(part_root, 3, [cb()]).fit(_model(seed=1), DataLoader(tr, batch_size=16), ckpt_path=tmp_path / "e2.ckpt")
    a, b = load_z0(_folder(full_root) / "recording"), load_z0(_folder(part_root) / "recording")
    assert a.num_checkpoints == b.num_checkpoints == 3
    for name in ("gram", "probe_losses", "query_losses", "probe_ids", "query_ids", "steps", "epochs"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0, msg=name)
    sa, sb = load_scores(_folder(full_root) / "self_influence"), load_scores(_folder(part_root) / "self_influence")
    torch.testing.assert_close(sa.self_influence, sb.self_influence, rtol=0, atol=0)


def test_probe_without_ids_is_rejected(tmp_path):
    train, _ = _data()
    cb = Z0Influence(probe=train, probe_batch_size=16)  # plain TensorDataset: batches (x, y), no ids
    with pytest.raises(MissingExampleIdsError, match="IndexedDataset"):
        _trainer(tmp_path, 1, [cb]).fit(_model(), DataLoader(train, batch_size=16))


class PerExampleMLP(MLPClassifier):
    """Returns per-example losses and ids from training_step (the free-losses option)."""

    recorded: dict

    def training_step(self, batch, batch_idx):
        ids, (x, y) = batch
        per = F.cross_entropy(self(x), y, reduction="none")
        self.recorded.setdefault(self.current_epoch, {}).update({int(i): float(v) for i, v in zip(ids, per.detach())})
        return {"loss": per.mean(), "per_example_loss": per.detach(), "ids": ids}


def test_losses_from_training_step(tmp_path):
    train, _ = _data()
    tr = IndexedDataset(train)
    torch.manual_seed(0)
    model = PerExampleMLP(d_in=6, hidden=5, n_classes=4, lr=0.3)
    model.recorded = {}
    cb = Z0Influence(losses_from="training_step")
    _trainer(tmp_path, 3, [cb]).fit(model, DataLoader(tr, batch_size=16, shuffle=True))
    res = load_z0(_folder(tmp_path) / "recording")
    assert res.probe_losses.shape == (3, 64) and res.query_losses is None
    for e in range(3):
        ref = torch.tensor([model.recorded[e][i] for i in range(64)])
        torch.testing.assert_close(res.probe_losses[e], ref)
    assert res.manifest["losses_from"] == "training_step"


def test_training_step_mode_needs_per_example_losses(tmp_path):
    train, _ = _data()
    tr = IndexedDataset(train)
    with pytest.raises(ValueError, match="per_example_loss"):
        _trainer(tmp_path, 1, [Z0Influence(losses_from="training_step")]).fit(_model(), DataLoader(tr, batch_size=16))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"every_n_epochs": 0}, r"^Z0Influence\(every_n_epochs=\.\.\.\) must be a positive int or None, got 0$"),
        ({"every_n_steps": -2}, r"^Z0Influence\(every_n_steps=\.\.\.\) must be a positive int or None, got -2$"),
        ({"every_n_steps": 2.0}, r"every_n_steps=\.\.\.\) must be a positive int or None, got 2\.0"),
        ({"every_n_epochs": 1, "every_n_steps": 5}, "every_n_epochs or every_n_steps, not both"),
        ({"losses_from": "logits"}, r"losses_from=\.\.\.\) must be one of 'auto', 'probe', 'training_step', got 'logits'"),
        ({"probe": None}, "probe=None"),
        ({"probe": "train.csv"}, r"probe=\.\.\.\) must be a torch Dataset \(map-style or iterable\) or a DataLoader"),
        ({"queries": 5}, r"queries=\.\.\.\) must be a torch Dataset"),
        ({"losses_from": "training_step", "probe": None, "every_n_steps": 3},
         r"every_n_steps=\.\.\.\) cannot be used with losses_from='training_step'"),
        ({"losses_from": "training_step", "probe": None, "record_initial": True},
         r"record_initial=\.\.\.\) cannot be used with losses_from='training_step'"),
        ({"losses_from": "training_step"}, r"probe=\.\.\.\) cannot be used with losses_from='training_step'"),
        ({"params": 3}, r"params=\.\.\.\) must be a glob pattern string or a non-empty list of them \(or None\), got 3"),
        ({"params": []}, r"params=\.\.\.\) must be a glob pattern string"),
        ({"probe_batch_size": 0}, r"probe_batch_size=\.\.\.\) must be a positive int, got 0"),
        ({"record_initial": 1}, r"record_initial=\.\.\.\) must be True or False, got 1"),
        ({"keep_snapshots": "yes"}, r"keep_snapshots=\.\.\.\) must be True or False"),
        ({"snapshot_dir": 3}, r"snapshot_dir=\.\.\.\) must be a path"),
        ({"top_k": -1}, r"top_k=\.\.\.\) must be an int >= 0, got -1"),
        ({"name": "a/b"}, r"name=\.\.\.\) must be a folder name"),
    ],
)
def test_constructor_validation(kwargs, match):
    train, _ = _data()
    args = {"probe": IndexedDataset(train)}
    args.update(kwargs)
    with pytest.raises(InvalidArgumentError, match=match):
        Z0Influence(**args)


def test_bad_params_pattern_names_available(tmp_path):
    train, _ = _data()
    tr = IndexedDataset(train)
    cb = Z0Influence(probe=tr, params="encoder.*")
    with pytest.raises(PatternError, match=r"Z0Influence\(params=\.\.\.\): pattern 'encoder\.\*' matches no trainable "
                                           r"parameter.*net\.0\.weight"):
        _trainer(tmp_path, 1, [cb]).fit(_model(), DataLoader(tr, batch_size=16))
    assert not _folder(tmp_path).exists()  # failed at setup, before any recording


def test_params_use_the_one_glob_rule(tmp_path):
    """``"2.*"`` matches ``net.2.weight`` / ``net.2.bias`` (fnmatch of the name or of ``"*." + pattern``)."""
    train, _ = _data()
    tr = IndexedDataset(train)
    model = _model()
    cb = Z0Influence(probe=tr, params="2.*", record_initial=True, keep_snapshots=True)
    _trainer(tmp_path, 1, [cb]).fit(model, DataLoader(tr, batch_size=32))
    res = load_z0(_folder(tmp_path) / "recording")
    assert res.manifest["param_names"] == ["net.2.weight", "net.2.bias"]
    assert res.manifest["params"] == ["2.*"]
    assert res.manifest["num_params"] == 5 * 4 + 4
    final = torch.cat([model.net[2].weight.detach().double().ravel(), model.net[2].bias.detach().double().ravel()])
    snap = res.snapshot(1)
    assert list(snap) == ["net.2.weight", "net.2.bias"]
    torch.testing.assert_close(torch.cat([t.double().ravel() for t in snap.values()]), final, rtol=0, atol=0)
    assert float(res.gram[1, 1]) == pytest.approx(float(final @ final), rel=1e-12)


def test_duplicate_probe_ids_raise_naming_them(tmp_path):
    train, _ = _data()
    # a second part whose offset overlaps the first: ids 0..31 and 29..60 (29, 30, 31 twice)
    dup = ConcatDataset([indexed(train, 32), indexed(train, range(32, 64), offset=29)])
    cb = Z0Influence(probe=dup, record_initial=True)
    with pytest.raises(DuplicateIdsError, match=r"3 examples repeat an id of another example \(e\.g\. ids \[29, 30, 31\]\)"):
        _trainer(tmp_path, 1, [cb]).fit(_model(), DataLoader(IndexedDataset(train), batch_size=32))
    assert not (_folder(tmp_path) / "recording").exists()


def test_two_instances_in_one_trainer(tmp_path):
    train, _ = _data()
    tr = IndexedDataset(train)
    a = Z0Influence(probe=tr, name="z0-head", params="last_layer", top_k=2)
    b = Z0Influence(probe=tr, name="z0-all", every_n_steps=3, top_k=2, self_influence="variance")
    model = _model()
    trainer = _trainer(tmp_path, 2, [a, b])
    trainer.fit(model, DataLoader(tr, batch_size=16))
    assert a.state_key != b.state_key
    ra, rb = load_z0(_folder(tmp_path, "z0-head") / "recording"), load_z0(_folder(tmp_path, "z0-all") / "recording")
    assert ra.steps.tolist() == [4, 8] and rb.steps.tolist() == [3, 6]
    assert ra.manifest["num_params"] == 24 and rb.manifest["num_params"] == sum(p.numel() for p in model.parameters())
    for name, res, estimator in (("z0-head", ra, "mean_loss"), ("z0-all", rb, "variance")):
        si = torch.tensor(np.var(res.probe_losses.double().numpy(), axis=0) if estimator == "variance"
                          else np.mean(res.probe_losses.double().numpy(), axis=0))  # brute force
        top = res.probe_ids[int(si.argmax())]
        assert trainer.callback_metrics[f"influence/{name}/top1_id"].item() == float(top)
        scores = load_scores(_folder(tmp_path, name) / "self_influence")
        assert scores.method == "z0" and scores.options["estimator"] == estimator
        torch.testing.assert_close(scores.self_influence.double(), si, rtol=1e-6, atol=1e-9)
        # the report says what the estimator measured
        from lightning_influence.report import read_report, render

        text = render([read_report(_folder(tmp_path, name) / "self_influence", 2)])
        assert ("variance of the example's loss" in text) == (estimator == "variance")
        assert ("mean loss across the recorded checkpoints" in text) == (estimator == "mean_loss")
    trainer.save_checkpoint(tmp_path / "both.ckpt")
    saved = torch.load(tmp_path / "both.ckpt", weights_only=False)["callbacks"]
    assert saved[a.state_key]["steps"] == [4, 8] and saved[b.state_key]["steps"] == [3, 6]


def test_resume_without_snapshots_says_what_to_do(tmp_path):
    train, _ = _data()
    tr = IndexedDataset(train)
    t1 = _trainer(tmp_path, 1, [Z0Influence(probe=tr)])  # snapshots deleted at the end of training (default)
    t1.fit(_model(), DataLoader(tr, batch_size=32))
    t1.save_checkpoint(tmp_path / "e1.ckpt")
    with pytest.raises(FileNotFoundError, match="snapshot_dir"):
        _trainer(tmp_path, 2, [Z0Influence(probe=tr)]).fit(_model(), DataLoader(tr, batch_size=32),
                                                            ckpt_path=tmp_path / "e1.ckpt")


def test_csv_logger_location_and_metrics(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    train, _ = _data()
    tr = IndexedDataset(train)
    trainer = quiet_trainer(tmp_path, [Z0Influence(probe=tr, record_initial=True, top_k=3)], max_epochs=1,
                            logger=CSVLogger(tmp_path))
    trainer.fit(_model(), DataLoader(tr, batch_size=16))
    d = tmp_path / "lightning_logs" / "version_0"
    res = load_z0(d / "influence" / "z0" / "recording")
    assert res.num_checkpoints == 2
    rows = list(csv.DictReader((d / "metrics.csv").read_text().splitlines()))
    header = set(rows[0])
    assert {"influence/z0/self_mean", "influence/z0/self_max", "influence/z0/nonfinite", "influence/z0/top1_id",
            "influence/z0/top3_id"} <= header
    assert "influence/z0/top4_id" not in header and "influence/z0/top0_id" not in header
    logged = next(r for r in rows if r["influence/z0/top1_id"])
    order = torch.argsort(res.self_influence("mean_loss"), descending=True)
    assert [int(float(logged[f"influence/z0/top{r}_id"])) for r in (1, 2, 3)] == res.probe_ids[order[:3]].tolist()


def test_causal_lm_dict_batches(tmp_path):
    from functools import partial

    from lightning_influence.demos import CausalLMModule, synthetic_token_dataset
    from lightning_influence.data import lm_collate

    seqs = synthetic_token_dataset(n=12, vocab_size=32, seed=0)
    ds = IndexedDataset(seqs)
    torch.manual_seed(0)
    module = CausalLMModule(lr=1e-2, vocab_size=32, hidden=16, layers=1, heads=2, max_len=16)
    cb = Z0Influence(probe=DataLoader(ds, batch_size=5, collate_fn=lm_collate), params="last_layer", record_initial=True)
    trainer = _trainer(tmp_path, 1, [cb])
    trainer.fit(module, DataLoader(ds, batch_size=4, collate_fn=partial(lm_collate, pad_id=0)))
    res = load_z0(_folder(tmp_path) / "recording")
    assert res.probe_losses.shape == (2, 12)
    module.eval()
    with torch.no_grad():  # summed next-token cross-entropy of each unpadded sequence, one at a time
        ref = torch.stack([
            F.cross_entropy(module.model(input_ids=s["input_ids"][None]).logits[0, :-1], s["input_ids"][1:], reduction="sum")
            for s in seqs
        ])
    torch.testing.assert_close(res.probe_losses[-1], ref, rtol=1e-4, atol=1e-4)
    assert res.manifest["param_names"] == ["model.lm_head.weight"]  # params="last_layer": the LM head
    w = module.model.lm_head.weight.detach().double()
    assert float(res.gram[-1, -1]) == pytest.approx(float((w * w).sum()), rel=1e-12)
