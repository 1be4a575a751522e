"""Bad data through the callbacks: frozen layers, repeated example ids, non-finite values.

Nothing is silently wrong: frozen layers are skipped (and layers that accumulated are never
thrown away), repeated ids raise with the ids on every path of every callback, and a non-finite
batch never enters the EK-FAC factors (it is skipped, counted and warned about with its step);
NaN scores are never ranked, and the report and its plots cope with them.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from lightning_influence import EKFACInfluence, IndexedDataset, LiSSAOptions, LiSSASelfInfluence, Z0Influence, load_factors, load_scores
from lightning_influence.callbacks.base import DuplicateIdsError
from lightning_influence.demos import MLPClassifier, digits_dataset
from lightning_influence.ekfac.fit import fit_covariances, fit_factors, fit_lambdas, resolve_layers
from lightning_influence.layers import LayerSelectionError
from lightning_influence.lissa import LiSSADivergenceError
from lightning_influence.task import ClassificationTask
from scaffold import exact, indexed, quiet_trainer

warnings.filterwarnings("ignore", ".*does not have many workers.*")


def _trainer(tmp_path, callbacks, epochs=1, **kw):
    return quiet_trainer(tmp_path, callbacks, max_epochs=epochs, deterministic=True, **kw)


def _digits(n, dtype=torch.float64):
    train, _, _ = digits_dataset(dtype=dtype)
    return indexed(train, n)


def _same_covariance(saved, ref_acc):
    """The saved eigendecomposition rebuilds the reference's token-averaged covariances."""
    a, s = ref_acc.covariances()
    torch.testing.assert_close(saved.q_a @ torch.diag(saved.eig_a) @ saved.q_a.T, a, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(saved.q_s @ torch.diag(saved.eig_s) @ saved.q_s.T, s, rtol=1e-9, atol=1e-12)


# -- frozen layers ---------------------------------------------------------------------------------
def test_frozen_layers_are_skipped_and_accumulated_layers_are_never_thrown_away(tmp_path, caplog):
    torch.manual_seed(0)
    data = _digits(64)
    loader = DataLoader(data, batch_size=16)
    model = MLPClassifier(hidden=8, lr=0.0)
    model.net[0].requires_grad_(False)
    cb = exact(dirpath=str(tmp_path / "default"))
    # the default selection leaves frozen layers out of a partly frozen model, in one log line
    with caplog.at_level("WARNING", logger="lightning_influence.layers.selection"):
        _trainer(tmp_path, [cb], precision="64-true").fit(model, loader)
    assert any("1 frozen layer(s)" in r.getMessage() and "[net.0]" in r.getMessage() for r in caplog.records)
    saved = load_factors(tmp_path / "default" / "factors")
    assert saved.layer_names == ["net.2"]
    ref = fit_factors(model, loader, layers="net.2")
    torch.testing.assert_close(saved.layers["net.2"].lambdas, ref.layers["net.2"].lambdas, rtol=1e-9, atol=1e-12)

    # named explicitly, the frozen first layer gets no gradient at all: it is left out with a warning, net.2 is kept
    named = EKFACInfluence(layers=["net.0", "net.2"], update_every_n_steps=1, correction="none", dirpath=str(tmp_path / "named"))
    with pytest.warns(UserWarning, match=r"accumulated nothing for layers \['net.0'\]; the factors hold the other 1 layers"):
        _trainer(tmp_path, [named], precision="64-true").fit(model, loader)
    kept = load_factors(tmp_path / "named" / "factors")
    assert kept.layer_names == ["net.2"] and kept.meta["layers_left_out"] == ["net.0"]
    ref_cov = fit_covariances(model, loader, resolve_layers(model, "net.2"), ClassificationTask())
    _same_covariance(kept.layers["net.2"], ref_cov["net.2"])

    model.net[2].requires_grad_(False)  # everything frozen: nothing to track, said at setup
    with pytest.raises(LayerSelectionError, match="every supported layer is frozen"):
        _trainer(tmp_path, [EKFACInfluence(dirpath=str(tmp_path / "none"))]).fit(model, loader)


# -- repeated ids ------------------------------------------------------------------------------------
class ModuloIds(Dataset):
    """320 examples whose ids repeat: ``i % 100`` (the case that used to drop 220 examples)."""

    def __init__(self, n=320):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return i % 100, (self.x[i], self.y[i])


class PerExampleMLP(MLPClassifier):
    def training_step(self, batch, batch_idx):
        ids, (x, y) = batch
        per = F.cross_entropy(self(x), y, reduction="none")
        return {"loss": per.mean(), "per_example_loss": per.detach(), "ids": ids}


DUP_MATCH = r"220 examples repeat an id of another example \(e\.g\. ids \[0, 1, 2, 3, 4, 5, 6, 7, 8, 9\]\)"


@pytest.mark.parametrize("path", ["ekfac-probe", "z0-probe", "z0-queries", "z0-training-step", "lissa-probe"])
def test_repeated_ids_raise_with_the_ids_on_every_path(tmp_path, path):
    dup, good = ModuloIds(), IndexedDataset(TensorDataset(torch.randn(40, 6), torch.randint(0, 3, (40,))))
    opts = LiSSAOptions(depth=2, scale=50.0, damping=0.1, sample_size=8)
    cb, train, model = {
        "ekfac-probe": (EKFACInfluence(probe=dup, update_every_n_steps=1), good, MLPClassifier(d_in=6, hidden=4, n_classes=3)),
        "z0-probe": (Z0Influence(probe=dup), good, MLPClassifier(d_in=6, hidden=4, n_classes=3)),
        "z0-queries": (Z0Influence(probe=good, queries=dup), good, MLPClassifier(d_in=6, hidden=4, n_classes=3)),
        "z0-training-step": (Z0Influence(losses_from="training_step"), dup, PerExampleMLP(d_in=6, hidden=4, n_classes=3)),
        "lissa-probe": (LiSSASelfInfluence(probe=dup, options=opts, max_probe=None), good, MLPClassifier(d_in=6, hidden=4, n_classes=3)),
    }[path]
    with pytest.raises(DuplicateIdsError, match=DUP_MATCH):
        _trainer(tmp_path, [cb]).fit(model, DataLoader(train, batch_size=32))
    assert not (tmp_path / "influence" / cb.name / "self_influence").exists()  # no scores of 100 examples for 320
    if path == "ekfac-probe":
        load_factors(tmp_path / "influence" / "ekfac" / "factors")  # the factors were written before the probe failed


# -- non-finite values ---------------------------------------------------------------------------------
def test_a_non_finite_batch_never_enters_the_factors_and_is_counted(tmp_path):
    """Example 21 is ``x = 1e200``: its activations overflow to inf in ``a aᵀ`` (float64), as
    ``x = 1e38`` does in float32 (and used to make every score NaN). Its batch is left out of A
    and S of the first layer (whose inputs overflow), counted and warned about with its step;
    the second layer's sums of that batch are finite (``tanh`` saturates), so it keeps the batch:
    no layer holds a non-finite value and no layer needs a scratch copy of its factors. Its
    per-example gradient is finite (``ds = 0``), so the correction pass keeps it."""
    from lightning.pytorch.loggers import CSVLogger

    torch.manual_seed(0)
    train, _, _ = digits_dataset(dtype=torch.float64)
    x, y = torch.stack([train[i][0] for i in range(64)]), torch.tensor([int(train[i][1]) for i in range(64)])
    x[21] = 1e200
    data = IndexedDataset(TensorDataset(x, y))
    loader = DataLoader(data, batch_size=16)
    model = MLPClassifier(hidden=8, lr=0.0)
    probe_x = torch.cat([x[:8], torch.full((1, 64), float("nan"))])  # a probe example whose score is NaN (id 8)
    probe = IndexedDataset(TensorDataset(probe_x, torch.cat([y[:8], y[:1]])))
    cb = exact(probe=probe, top_k=3)
    t = _trainer(tmp_path, [cb], epochs=2, precision="64-true", logger=CSVLogger(str(tmp_path), name="run"))
    with pytest.warns(RuntimeWarning, match=r"training batch 1 of epoch 1 \(global step 5\) gave non-finite layer inputs"):
        t.fit(model, loader)
    folder = tmp_path / "run" / "version_0" / "influence" / "ekfac"
    saved = load_factors(folder / "factors")
    assert saved.meta["nonfinite_batches"] == 2 and saved.meta["nonfinite_correction_examples"] == 0
    assert float(t.callback_metrics["influence/ekfac/nonfinite_batches"]) == 2
    assert saved.n_examples == 2 * 48 and saved.n_lambda_examples == 64
    clean = [i for i in range(64) if not 16 <= i < 32]
    first = resolve_layers(model, None)[0].name
    ref = fit_covariances(model, DataLoader(Subset(data, clean), batch_size=16), resolve_layers(model, None), ClassificationTask())
    every = fit_covariances(model, loader, resolve_layers(model, None), ClassificationTask())
    assert len(saved.layers) == 2 and every[first].examples == 64 and saved.layers[first].q_a.shape == (65, 65)
    ref = {n: (ref[n] if n == first else every[n]) for n in saved.layers}
    eigen = {}
    for n, f in saved.layers.items():
        assert all(bool(torch.isfinite(getattr(f, k)).all()) for k in ("q_a", "eig_a", "q_s", "eig_s", "lambdas"))
        _same_covariance(f, ref[n])
        eigen[n] = type("E", (), {"q_a": f.q_a, "q_s": f.q_s})()
    lam = fit_lambdas(model, loader, resolve_layers(model, None), eigen, ClassificationTask())
    for n, f in saved.layers.items():
        torch.testing.assert_close(f.lambdas, lam[n].mean(), rtol=1e-9, atol=1e-12)
    # the NaN probe score is stored, counted, and never ranked; the report and its plots cope
    scores = load_scores(folder / "self_influence")
    assert bool(torch.isnan(scores.self_influence[8])) and bool(torch.isfinite(scores.self_influence[:8]).all())
    top = torch.argsort(scores.self_influence[:8], descending=True)[:3].tolist()
    assert [int(t.callback_metrics[f"influence/ekfac/top{r}_id"]) for r in (1, 2, 3)] == top
    assert float(t.callback_metrics["influence/ekfac/nonfinite"]) == 1
    from lightning_influence.cli import main

    assert main(["report", str(tmp_path / "run" / "version_0"), "--top-k", "9"]) == 0
    assert (tmp_path / "run" / "version_0" / "influence" / "plots" / "self_influence_ekfac.png").stat().st_size > 1000


def test_the_correction_leaves_out_examples_with_non_finite_gradients():
    from lightning_influence.ekfac.covariance import LambdaAccumulator

    g = torch.Generator().manual_seed(0)
    q_a, q_s = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))[0], torch.eye(2, dtype=torch.float64)
    a, ds = torch.randn(4, 1, 3, generator=g, dtype=torch.float64), torch.randn(4, 1, 2, generator=g, dtype=torch.float64)
    bad_a = a.clone()
    bad_a[2, 0, 1] = float("nan")
    acc = LambdaAccumulator(q_a, q_s)
    acc.update(bad_a, ds)
    assert acc.examples == 3 and acc.nonfinite == 1
    keep = [0, 1, 3]
    rot = torch.stack([q_s.T @ torch.outer(ds[b, 0], a[b, 0]) @ q_a for b in keep])  # explicit per-example rotation
    torch.testing.assert_close(acc.mean(), rot.pow(2).mean(0))


def test_z0_names_the_step_and_ids_of_non_finite_losses_and_never_ranks_them(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g)
    probe_x = x.clone()
    probe_x[7] = float("nan")
    cb = Z0Influence(probe=IndexedDataset(TensorDataset(probe_x, y)), top_k=3)
    t = _trainer(tmp_path, [cb], epochs=2)
    with pytest.warns(UserWarning, match=r"Z0: 1 probe losses are not finite \(NaN or inf\) at step 3 \(row 0\), e\.g\. ids \[7\]"):
        t.fit(MLPClassifier(d_in=6, hidden=4, n_classes=3, lr=0.3), DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=16))
    scores = load_scores(tmp_path / "influence" / "z0" / "self_influence")
    assert bool(torch.isnan(scores.self_influence[7]))
    finite = [i for i in range(40) if i != 7]
    top = [finite[j] for j in torch.argsort(scores.self_influence[finite], descending=True)[:3].tolist()]
    assert [int(t.callback_metrics[f"influence/z0/top{r}_id"]) for r in (1, 2, 3)] == top
    assert float(t.callback_metrics["influence/z0/nonfinite"]) == 1


def test_lissa_says_the_weights_or_losses_are_not_finite_instead_of_raise_scale(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)
    bad_x = x.clone()
    bad_x[3] = float("nan")  # one NaN training example: the first step makes every weight NaN
    opts = LiSSAOptions(depth=5, scale=10.0, damping=0.1, sample_size=8)
    probe = IndexedDataset(TensorDataset(x[:8], y[:8]))
    with pytest.raises(LiSSADivergenceError, match=r"the model's weights are not finite \(4 parameters hold NaN or inf") as e:
        _trainer(tmp_path, [LiSSASelfInfluence(probe=probe, options=opts)]).fit(
            MLPClassifier(d_in=6, hidden=4, n_classes=3, lr=0.1), DataLoader(IndexedDataset(TensorDataset(bad_x, y)), batch_size=16))
    assert "raise `scale`" not in str(e.value) and "cannot help" in str(e.value) and e.value.suggested_scale is None
    # finite weights, one probe example with a NaN input: its id is named
    nan_probe = IndexedDataset(TensorDataset(bad_x[:8], y[:8]))
    with pytest.raises(LiSSADivergenceError, match=r"1 probe examples have non-finite loss gradients \(e\.g\. ids \[3\]\): their losses"):
        _trainer(tmp_path, [LiSSASelfInfluence(probe=nan_probe, options=opts)]).fit(
            MLPClassifier(d_in=6, hidden=4, n_classes=3, lr=0.1), DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=16))


def test_lissa_recursion_names_non_finite_inputs():
    from lightning_influence.lissa import lissa_recursion

    v = torch.ones(3, 4)
    v[1, 2] = float("inf")
    with pytest.raises(LiSSADivergenceError, match=r"1 of the 3 vectors are not finite \(rows \[1\]\)"):
        lissa_recursion(lambda h, t: h, v, damping=0.1, scale=10.0, depth=3)
    with pytest.raises(LiSSADivergenceError, match="the curvature product at step 2 of repeat 0 is not finite") as e:
        lissa_recursion(lambda h, t: h * (float("nan") if t == 1 else 1.0), torch.ones(2, 4), damping=0.1, scale=10.0, depth=3)
    assert e.value.parameter is None
