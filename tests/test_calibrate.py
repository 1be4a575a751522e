"""calibrate(): damping chosen on a user's check (flipped labels → AP against scikit-learn on a
plain-autograd float64 reference; retrained subsets → LDS with losses built to be explained by one
candidate), saved next to the factors and used by every scorer after load_factors."""

from __future__ import annotations

import json

import pytest
import torch
from sklearn.metrics import average_precision_score
from torch.utils.data import DataLoader

from lightning_influence.calibrate import Calibration, calibrate, calibration_path, candidate_dampings, save_calibration
from lightning_influence.ekfac.factors import load_factors, save_factors
from lightning_influence.ekfac.fit import fit_factors
from lightning_influence.ekfac.scorer import InfluenceScorer
from lightning_influence.evaluate import random_subsets
from lightning_influence.index import build_index
from lightning_influence.multistage import MultiStageScorer
from lightning_influence.storage import ArtifactError
from lightning_influence.task import ClassificationTask

from ekfac_reference import dense_preconditioner, per_example_param_grads
from cases import mlp_case

N = 40


def reference_self_influence(model, factors, train, damping: dict[str, float]) -> torch.Tensor:
    """``gᵢᵀ (G + λI)⁻¹ gᵢ`` per example: autograd one example at a time, dense preconditioners."""
    tracked = factors.check_model(model)
    x, y = zip(*(train[i][1] for i in range(len(train))))
    examples = [(xi[None], yi[None]) for xi, yi in zip(x, torch.stack(y))]
    grads = per_example_param_grads(model, ClassificationTask(), examples, tracked)
    out = torch.zeros(len(examples), dtype=torch.float64)
    for name, g in grads.items():
        flat = g.reshape(len(examples), -1).double()
        out += ((flat @ dense_preconditioner(factors.layers[name], damping[name])) * flat).sum(1)
    return out


def test_candidates_are_the_rules_and_multiples_of_the_default():
    _, factors, _, _ = mlp_case(n=N)
    c = candidate_dampings(factors, multipliers=(0.1, 10.0))
    assert list(c)[0] == "spectrum" and {"mean", "mass", "spectrum×0.1", "spectrum×10"} <= set(c)
    base = factors.dampings("spectrum")
    assert c["spectrum×10"] == pytest.approx({n: 10 * v for n, v in base.items()}) and c["mean"] == factors.dampings("mean")
    with pytest.raises(ValueError, match="multipliers"):
        candidate_dampings(factors, multipliers=(0.0,))


def test_flipped_label_check_against_reference_ap_and_saved_choice(tmp_path):
    model, factors, train, _ = mlp_case(n=N)
    loader = DataLoader(train, batch_size=8)
    flipped = torch.zeros(N, dtype=torch.bool)
    flipped[torch.randperm(N, generator=torch.Generator().manual_seed(1))[:6]] = True
    base = factors.dampings("spectrum")
    candidates = {"spectrum": "spectrum", "mean": "mean", "tiny": {n: 1e-3 * v for n, v in base.items()},
                  "huge": {n: 1e3 * v for n, v in base.items()}}
    save_factors(factors, tmp_path / "f")
    cal = calibrate(model, factors, loader, flipped=flipped, candidates=candidates, save_to=tmp_path / "f", tolerance=0.0)
    want = {}
    for name, d in candidates.items():
        ref = reference_self_influence(model, factors, train, factors.dampings(d))
        want[name] = average_precision_score(flipped.numpy(), ref.numpy())
    assert cal.results["mislabel/AP"] == pytest.approx(want, abs=1e-6)
    best = max(want.values())
    assert cal.choice == next(n for n in candidates if want[n] >= best - 1e-9)  # the first of the best
    for tol in (0.05, 1.0):  # within the tolerance of the best, the first candidate is kept
        again = calibrate(model, factors, loader, flipped=flipped, candidates=candidates, tolerance=tol)
        assert again.choice == next(n for n in candidates if want[n] >= best - tol - 1e-9)
    assert cal.damping == pytest.approx(factors.dampings(candidates[cal.choice])) and cal.normalize == "raw"
    loaded = load_factors(tmp_path / "f", model=model)
    assert loaded.dampings() == pytest.approx(cal.damping) and loaded.meta["calibration"]["choice"] == cal.choice
    with pytest.raises(ValueError, match="needs a check"):
        calibrate(model, factors, loader)


def test_lds_check_picks_the_candidate_that_explains_the_retrained_losses():
    model, factors, train, query = mlp_case(n=N)
    loader, qloader = DataLoader(train, batch_size=8), DataLoader(query, batch_size=5)
    masks = random_subsets(N, 16, seed=3)
    truth = InfluenceScorer(model, factors, damping="mean").pairwise(qloader, loader).pairwise.double()
    losses = -(masks.double() @ truth.T)  # a linear datamodel of the "mean" rule's scores: its LDS is exactly 1

    class Subsets:  # the two fields calibrate reads of evaluate.SubsetLosses
        pass

    sub = Subsets()
    sub.masks, sub.losses = masks, losses
    cal = calibrate(model, factors, loader, queries=qloader, subsets=sub, candidates={"spectrum": "spectrum", "mean": "mean"},
                    normalize=("raw", "cosine"))
    lds = cal.results["retrained subsets/LDS"]
    assert lds["mean|raw"] == pytest.approx(1.0) and max(lds["spectrum|raw"], lds["spectrum|cosine"], lds["mean|cosine"]) < 0.999
    assert (cal.choice, cal.normalize) == ("mean", "raw") and cal.damping == pytest.approx(factors.dampings("mean"))


def test_a_saved_calibration_is_the_damping_every_scorer_uses(tmp_path):
    model, factors, train, query = mlp_case(n=N)
    loader, qloader = DataLoader(train, batch_size=8), DataLoader(query, batch_size=5)
    chosen = {n: 0.37 * (i + 1) for i, n in enumerate(factors.layer_names)}  # no rule gives these
    assert chosen != factors.dampings()
    save_factors(factors, tmp_path / "f")
    save_calibration(Calibration(damping=chosen, choice="by hand"), tmp_path / "f")
    loaded = load_factors(tmp_path / "f", model=model)
    assert loaded.dampings() == chosen and loaded.dampings(None) == chosen
    scorer = InfluenceScorer(model, loaded)
    assert scorer.damping == chosen
    res = scorer.self_influence(loader)
    ref = reference_self_influence(model, factors, train, chosen)
    torch.testing.assert_close(res.self_influence.double()[torch.argsort(res.train_ids)], ref, rtol=1e-8, atol=1e-10)
    pw = scorer.pairwise(qloader, loader).pairwise
    torch.testing.assert_close(pw, InfluenceScorer(model, factors, damping=chosen).pairwise(qloader, loader).pairwise)
    assert not torch.allclose(pw, InfluenceScorer(model, factors).pairwise(qloader, loader).pairwise)
    ms = MultiStageScorer(model, loaded, model, loaded)
    assert ms.preconditioner_pt.damping == chosen and ms.preconditioner_ft.damping == chosen
    assert build_index(model, loaded, loader, tmp_path / "idx", compression="exact").transform.damping == pytest.approx(chosen)
    # an explicit damping still wins; a layer subset keeps its own calibrated values
    assert InfluenceScorer(model, loaded, damping="spectrum").damping == factors.dampings("spectrum")
    first = factors.layer_names[0]
    assert InfluenceScorer(model, loaded, layers=first).damping == {first: chosen[first]}


def test_a_calibration_of_refitted_factors_is_ignored_and_a_damaged_one_refused(tmp_path):
    model, factors, train, _ = mlp_case(n=N)
    save_factors(factors, tmp_path / "f")
    save_calibration(Calibration(damping={n: 0.5 for n in factors.layer_names}, choice="x"), tmp_path / "f")
    refit = fit_factors(model, DataLoader(torch.utils.data.Subset(train, range(20)), batch_size=8))
    save_factors(refit, tmp_path / "f")  # same folder, other tensors
    with pytest.warns(UserWarning, match="other factors"):
        loaded = load_factors(tmp_path / "f", model=model)
    assert loaded.dampings() == refit.dampings("spectrum") and "calibration" not in loaded.meta
    save_calibration(Calibration(damping={n: 0.5 for n in factors.layer_names}, choice="x"), tmp_path / "f")
    manifest = calibration_path(tmp_path / "f") / "manifest.json"
    m = json.loads(manifest.read_text())
    m["damping"] = {n: 5.0 for n in factors.layer_names}  # edited by hand: the checksum no longer matches
    manifest.write_text(json.dumps(m))
    with pytest.raises(ArtifactError):
        load_factors(tmp_path / "f", model=model)
    with pytest.raises(ArtifactError, match="layers"):
        save_calibration(Calibration(damping={"other": 1.0}, choice="x"), tmp_path / "f")
