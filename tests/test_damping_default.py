"""The default damping rule ("spectrum": 75% quantile of the pooled eigenvalues) and the old one
("mean": 0.1 × mean per layer) on explicit spectra with closed-form answers, and the one
definition used alike by the single-stage scorer, the multi-stage scorer and the index."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_influence.ekfac.damping import DEFAULT_DAMPING_RULE, quantile, rule_dampings
from lightning_influence.ekfac.factors import EKFACFactors, LayerFactors, save_factors
from lightning_influence.ekfac.preconditioner import Preconditioner
from lightning_influence.ekfac.scorer import InfluenceScorer
from lightning_influence.index import build_index
from lightning_influence.multistage import MultiStageScorer
from lightning_influence.validation import InvalidArgumentError

from cases import mlp_case


def explicit_factors(spectra: dict[str, torch.Tensor]) -> EKFACFactors:
    """Factors with identity eigenvectors and the given ``Λ`` (``[d_out, a_dim]`` each, no bias)."""
    layers = {}
    for n, lam in spectra.items():
        d_out, a_dim = lam.shape
        layers[n] = LayerFactors(torch.eye(a_dim, dtype=torch.float64), torch.ones(a_dim, dtype=torch.float64),
                                 torch.eye(d_out, dtype=torch.float64), torch.ones(d_out, dtype=torch.float64),
                                 lam.double(), d_in=a_dim, d_out=d_out, has_bias=False)
    return EKFACFactors(layers)


def test_quantile_closed_forms_and_torch_agreement():
    assert quantile(torch.arange(9.0), 0.75) == 6.0  # position 6 exactly
    assert quantile(torch.tensor([4.0, 1.0, 3.0, 2.0]), 0.75) == pytest.approx(3.25)  # position 2.25: 3 + 0.25 × (4 - 3)
    assert quantile(torch.tensor([7.0]), 0.75) == 7.0
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1001, generator=g, dtype=torch.float64).exp()
    for q in (0.0, 0.1, 0.5, 0.75, 0.9, 1.0):
        assert quantile(x.reshape(7, 143), q) == pytest.approx(float(torch.quantile(x, q)), rel=1e-12)


def test_spectrum_rule_pools_layers_and_mean_rule_is_per_layer():
    spectra = {"a": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([[5.0, 6.0, 7.0, 8.0]])}
    f = explicit_factors(spectra)
    # pooled 1..8: the 75% quantile is at position 5.25 -> 6.25; the floor 1e-3 × 4.5 does not bind
    assert DEFAULT_DAMPING_RULE == "spectrum"
    assert f.dampings() == f.dampings(None) == f.dampings("spectrum") == {"a": 6.25, "b": 6.25}
    assert f.dampings("mean") == {"a": pytest.approx(0.25), "b": pytest.approx(0.65)}
    # one layer on its own: its own spectrum (1..4: position 2.25 -> 3.25)
    assert f.layers["a"].damping() == pytest.approx(3.25) and f.layers["a"].damping("mean") == pytest.approx(0.25)
    # scale invariance: Λ -> cΛ gives λ -> cλ (both rules)
    g = explicit_factors({n: 1e-9 * v for n, v in spectra.items()})
    assert g.dampings()["a"] == pytest.approx(6.25e-9, rel=1e-12) and g.dampings("mean")["b"] == pytest.approx(0.65e-9)
    # explicit values still win
    assert f.dampings(0.5) == {"a": 0.5, "b": 0.5} and f.dampings({"a": 1.0, "b": 2.0}) == {"a": 1.0, "b": 2.0}


def test_spectrum_rule_floor_for_mostly_zero_spectra():
    lam = torch.zeros(10, 10)
    lam[0, 0] = 100.0  # 99 exact zeros: the 75% quantile is 0, the floor 1e-3 × mean(Λ) = 1e-3 × 1 binds
    assert rule_dampings({"x": lam}) == {"x": pytest.approx(1e-3)}
    assert rule_dampings({"x": torch.zeros(3, 3)}) == {"x": 0.0}


def test_bad_rules_are_refused():
    f = explicit_factors({"a": torch.ones(2, 2)})
    with pytest.raises(InvalidArgumentError, match="spectrum"):
        f.dampings("median")
    with pytest.raises(InvalidArgumentError):
        f.dampings(float("nan"))
    with pytest.raises(ValueError, match="unknown damping rule"):
        rule_dampings({"a": torch.ones(2)}, "median")
    with pytest.raises(ValueError, match="no eigenvalue"):
        rule_dampings({})


def test_preconditioner_records_the_rule():
    f = explicit_factors({"a": torch.tensor([[1.0, 2.0], [3.0, 4.0]])})
    assert Preconditioner(f).damping_rule == "spectrum" and Preconditioner(f).damping == {"a": pytest.approx(3.25)}
    assert Preconditioner(f, damping="mean").damping_rule == "mean"
    assert Preconditioner(f, damping=0.1).damping_rule is None
    p = Preconditioner(f, damping="identity")
    assert p.identity and p.damping_rule == "identity" and p.damping == {}
    # the preconditioner divides by Λ + λ with the rule's λ: identity eigenvectors make it elementwise
    g = torch.ones(1, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(Preconditioner(f, dtype=torch.float64).precondition("a", g),
                               1.0 / (torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64) + 3.25)[None])


def test_scorers_and_index_share_the_one_definition(tmp_path):
    model, factors, train, query = mlp_case(n=16)
    loader, qloader = DataLoader(train, batch_size=8), DataLoader(query, batch_size=5)
    want = factors.dampings()
    pooled = quantile(torch.cat([f.lambdas.reshape(-1) for f in factors.layers.values()]), 0.75)
    assert len(set(want.values())) == 1 and want[factors.layer_names[0]] == pytest.approx(pooled)
    assert want != factors.dampings("mean")  # the old default differs here (so these checks can fail)
    scorer = InfluenceScorer(model, factors)
    assert scorer.damping == want
    res = scorer.pairwise(qloader, loader)
    assert res.options["damping"] == want and res.options["damping_rule"] == "spectrum"
    old = InfluenceScorer(model, factors, damping="mean")
    assert old.damping == factors.dampings("mean") and old.pairwise(qloader, loader).options["damping_rule"] == "mean"
    assert not torch.allclose(old.pairwise(qloader, loader).pairwise, res.pairwise)
    # a layer subset pools only its own eigenvalues
    first = factors.layer_names[0]
    assert InfluenceScorer(model, factors, layers=first).damping == rule_dampings({first: factors.layers[first].lambdas})
    ms = MultiStageScorer(model, factors, model, factors)
    assert ms.preconditioner_pt.damping == want and ms.preconditioner_ft.damping == want
    opts = ms.pairwise(qloader, loader).options
    assert opts["damping_rule_pt"] == opts["damping_rule_ft"] == "spectrum"
    assert MultiStageScorer(model, factors, model, factors, damping_pt="mean").preconditioner_pt.damping == factors.dampings("mean")
    with pytest.raises(InvalidArgumentError, match="rule name"):
        MultiStageScorer(model, factors, model, factors, damping_ft="median")
    index = build_index(model, factors, loader, tmp_path / "idx", compression="exact")
    assert index.transform.damping == pytest.approx(want)
    save_factors(factors, tmp_path / "f")
    manifest = json.loads((tmp_path / "f" / "manifest.json").read_text())
    assert manifest["damping_default"].startswith("spectrum") and manifest["heuristic_damping"] == pytest.approx(want)


# ------------------------------------------------------------------------------------------
# Candidate rules that react to how the model was trained (issue 21), on explicit spectra
# ------------------------------------------------------------------------------------------
def brute_mass_floor(values: list[float], mass: float) -> float:
    """Walk down the sorted values until their running sum reaches ``mass`` of the total."""
    v = sorted((max(x, 0.0) for x in values), reverse=True)
    total, run = sum(v), 0.0
    if total == 0:
        return 0.0
    for x in v:
        run += x
        if run >= mass * total * (1 - 1e-12):
            return x
    return v[-1]


def test_mass_floor_closed_forms_and_brute_force():
    from lightning_influence.ekfac.damping import mass_floor

    v = torch.tensor([10.0, 5.0, 1.0, 0.01])  # total 16.01: 10 → 62%, 15 → 94%, 16 → 99.94%, 16.01 → 100%
    assert mass_floor(v, 0.5) == 10.0 and mass_floor(v, 0.9) == 5.0 and mass_floor(v, 0.99) == 1.0
    assert mass_floor(v, 1.0) == pytest.approx(0.01) and mass_floor(torch.zeros(4), 0.99) == 0.0
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        x = torch.randn(7, 13, generator=g, dtype=torch.float64).exp() ** 3
        for m in (0.5, 0.9, 0.99):
            assert mass_floor(x, m) == pytest.approx(brute_mass_floor(x.reshape(-1).tolist(), m), rel=1e-12)


def test_rules_on_a_collapsed_spectrum():
    # the shape of a converged model: one direction of curvature 100, the bulk in numerical noise
    lam = torch.full((10, 10), 1e-12, dtype=torch.float64)
    lam[0, 0] = 100.0
    mean = float(lam.mean())  # 1.0 + 99e-14
    got = {r: rule_dampings({"x": lam}, r)["x"] for r in ("spectrum", "spectrum_floor", "top", "mass", "pooled_mean", "mean")}
    assert got["spectrum"] == pytest.approx(1e-3 * mean)  # the 75% quantile (1e-12) is below its floor
    assert got["spectrum_floor"] == pytest.approx(1e-2 * mean)
    assert got["top"] == pytest.approx(1e-3 * 100.0)
    assert got["mass"] == 100.0  # the one direction carries > 99% of the mass
    assert got["pooled_mean"] == pytest.approx(0.1 * mean) == got["mean"]
    # a flat spectrum: the quantile binds for every quantile rule, mass is the smallest value
    flat = torch.linspace(1.0, 2.0, 101, dtype=torch.float64).reshape(1, -1)
    q = quantile(flat, 0.75)
    assert q == pytest.approx(1.75)
    for r in ("spectrum", "spectrum_floor", "top"):
        assert rule_dampings({"x": flat}, r)["x"] == pytest.approx(q)
    assert rule_dampings({"x": flat}, "mass")["x"] == pytest.approx(brute_mass_floor(flat.reshape(-1).tolist(), 0.99))


@pytest.mark.parametrize("rule", ["spectrum_floor", "top", "mass", "pooled_mean"])
def test_new_rules_pool_layers_and_are_scale_invariant(rule):
    g = torch.Generator().manual_seed(0)
    spectra = {"a": torch.randn(3, 4, generator=g).exp() ** 4, "b": torch.randn(5, 2, generator=g).exp() ** 4}
    d = rule_dampings(spectra, rule)
    assert d["a"] == d["b"] > 0
    pooled = torch.cat([v.reshape(-1) for v in spectra.values()]).reshape(1, -1)
    assert rule_dampings({"all": pooled}, rule)["all"] == pytest.approx(d["a"], rel=1e-12)
    scaled = rule_dampings({n: 1e-9 * v for n, v in spectra.items()}, rule)
    assert scaled["a"] == pytest.approx(1e-9 * d["a"], rel=1e-9)
    assert explicit_factors(spectra).dampings(rule) == d


@pytest.mark.parametrize("gather,sample", [(1 << 20, 1 << 18), (7, 64), (50, 300), (1000, 97)])
def test_pooled_statistics_are_exact_without_concatenating(monkeypatch, gather, sample):
    """The pooled rules' quantile, mean, max and mass floor (PooledValues: sampled brackets,
    bisection over bit patterns, a final gather of at most GATHER candidates) equal those of the
    concatenated, clamped float64 values: the whole-pool sort (small pools) and every narrowing
    path (tiny GATHER/SAMPLE), with ties, exact zeros, negatives, float32 and float64."""
    from lightning_influence.ekfac.damping import PooledValues

    monkeypatch.setattr(PooledValues, "GATHER", gather)
    monkeypatch.setattr(PooledValues, "SAMPLE", sample)
    g = torch.Generator().manual_seed(gather + sample)
    for trial in range(12):
        parts = [torch.rand(int(torch.randint(1, 2000, (), generator=g)), generator=g).pow(8) * 10.0 ** (trial - 6)
                 for _ in range(1 + trial % 4)]
        if trial % 3 == 0:
            parts.append(torch.zeros(300))
        if trial % 4 == 1:
            parts.append(torch.full((400,), float(parts[0].median())))  # many ties
        if trial % 5 == 2:
            parts = [p - 0.5 * float(p.mean()) for p in parts]  # negatives count as 0
        if trial % 2:
            parts = [p.double() for p in parts]
        pooled = torch.cat([p.double() for p in parts]).clamp_min(0)
        pv = PooledValues(parts)
        for q in (0.0, 0.3, 0.75, 0.999, 1.0):
            assert pv.quantile(q) == pytest.approx(float(torch.quantile(pooled, q)), rel=1e-12, abs=1e-300)
        for mass in (0.5, 0.9, 0.99):
            assert pv.mass_floor(mass) == pytest.approx(brute_mass_floor(pooled.tolist(), mass), rel=1e-12)
        assert pv.mean() == pytest.approx(float(pooled.mean()), rel=1e-12)
        assert pv.max() == float(pooled.max())
