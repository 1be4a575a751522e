"""The fast paths of the EK-FAC training-time work against float64 references (issue 13):
float32 eigendecompositions, blocked symmetric covariance updates, the correction's squared
sums without per-example tensors, and the adaptive correction sample."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lightning_influence.demos import MLPClassifier, digits_dataset
from lightning_influence.ekfac.capture import LOOP_MIN_ELEMENTS, rotated_square_sums
from lightning_influence.ekfac.covariance import (
    CovarianceAccumulator,
    LambdaAccumulator,
    fill_lower_blocks_,
    symmetric_blocks,
    symmetric_rank_k_update_,
)
from lightning_influence.ekfac.factors import eigendecompose
from lightning_influence.ekfac.fit import eigen_from_covariances, fit_covariances, fit_lambdas, factors_from_parts
from lightning_influence.ekfac.online import AccumulationOptions, OnlineFactors
from lightning_influence.ekfac.scorer import InfluenceScorer
from lightning_influence.layers import select_layers
from lightning_influence.task import ClassificationTask
from scaffold import indexed

EPS32 = torch.finfo(torch.float32).eps


def covariance_with_spectrum(d: int, seed: int = 0) -> torch.Tensor:
    """A float32-accumulated covariance (as the callback keeps them) of ``4d`` rows whose
    spectrum spans 8 decades, with a constant bias column, returned in float64."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    spectrum = torch.logspace(0, -8, d, dtype=torch.float64)
    x = (torch.randn(4 * d, d, generator=g, dtype=torch.float64) * spectrum.sqrt()) @ q.T
    x[:, -1] = 1.0
    x32 = x.float()
    c = (x32.T @ x32).double() / x.shape[0]
    return 0.5 * (c + c.T)


# -- float32 eigendecomposition ----------------------------------------------------------------
@pytest.mark.parametrize("d", [65, 300, 513])
def test_float32_eigendecomposition_error_is_bounded_against_float64(d):
    """Backward-stable bounds: eigenvalues within ``d·eps32·‖C‖`` of float64's, eigenvectors
    orthonormal and an invariant-subspace residual to ``d·eps32`` (measured: 0.003–0.11 of
    these on the spectra below); a half-precision eigendecomposition misses them by ~10⁴."""
    c = covariance_with_spectrum(d)
    vals64, vecs64 = eigendecompose(c, torch.float64)
    vals32, vecs32 = eigendecompose(c, torch.float32)
    # eigenvalues in float64 whatever the precision; eigenvectors in the decomposition's precision
    assert vals32.dtype == vals64.dtype == vecs64.dtype == torch.float64 and vecs32.dtype == torch.float32
    vecs32 = vecs32.double()  # the checks below measure the float32 result exactly
    norm = float(vals64.abs().max())
    bound = d * EPS32 * norm
    assert float((vals32 - vals64).abs().max()) <= bound
    eye = torch.eye(d, dtype=torch.float64)
    assert float((vecs32.T @ vecs32 - eye).abs().max()) <= d * EPS32
    assert float(torch.linalg.matrix_norm(c @ vecs32 - vecs32 * vals32, 2)) <= bound
    # the leading eigenvectors (well separated) agree with float64's up to sign
    top = slice(d - 5, d)
    overlap = (vecs32[:, top] * vecs64[:, top]).sum(0).abs()
    assert float((1 - overlap).abs().max()) < 1e-6
    # and the test can tell: float64 on the same matrix is far tighter than the bound ...
    assert float((vecs64.T @ vecs64 - eye).abs().max()) < 1e-3 * d * EPS32
    # ... and a bfloat16-rounded matrix is far outside it
    rounded = eigendecompose(c.bfloat16().double(), torch.float64)[0]
    assert float((rounded - vals64).abs().max()) > bound


def digits_mlp(n: int = 256, hidden: int = 16):
    torch.manual_seed(0)
    train, _, _ = digits_dataset()
    model = MLPClassifier(hidden=hidden)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = train.tensors
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(model(x[:n]), y[:n]).backward()
        opt.step()
    loader = DataLoader(indexed(train, n), batch_size=64)
    return model.eval(), loader, select_layers(model), ClassificationTask()


def test_float32_eigendecomposition_changes_influence_scores_by_less_than_1e4():
    """Factors from float32 and float64 eigendecompositions of the same float32 covariances,
    each corrected in its own basis, score a float32 MLP's self-influence and pairwise
    influence alike (relative difference < 1e-4; float32 rounding of the scores alone is ~1e-6)."""
    model, loader, layers, task = digits_mlp()
    covs = fit_covariances(model, loader, layers, task)
    scores = {}
    for dtype in (torch.float32, torch.float64):
        eigen = eigen_from_covariances(covs, dtype)
        lambdas = fit_lambdas(model, loader, layers, eigen, task)
        factors = factors_from_parts(layers, eigen, {n: acc.mean() for n, acc in lambdas.items()}, "empirical", 256, 256)
        scorer = InfluenceScorer(model, factors)
        scores[dtype] = (scorer.self_influence(loader).self_influence.double(),
                         scorer.pairwise(loader, loader).pairwise.double())
    for a, b in zip(scores[torch.float32], scores[torch.float64]):
        assert float(((a - b).abs() / b.abs().max()).max()) < 1e-4


def test_eigh_dtype_auto_follows_the_accumulation_dtype(monkeypatch):
    """``eigh_dtype="auto"`` (the default) eigendecomposes float32 sums in float32 and float64
    sums in float64; ``"float64"`` forces float64."""
    seen = []
    eigh = torch.linalg.eigh

    def recording(c, *args, **kwargs):
        seen.append(c.dtype)
        return eigh(c, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", recording)
    for model_dtype, option, expected in ((torch.float32, "auto", torch.float32), (torch.float64, "auto", torch.float64),
                                          (torch.float32, "float64", torch.float64)):
        model, loader, layers, task = digits_mlp(n=64)
        model = model.to(model_dtype)
        state = OnlineFactors(layers, AccumulationOptions(update_every_n_steps=1, correction="none", eigh_dtype=option))
        covs = fit_covariances(model, ((i, (x.to(model_dtype), y)) for i, (x, y) in loader), layers, task)
        for n, acc in covs.items():
            state.running[n] = acc
        seen.clear()
        state.factors(None, lambda t: t)
        assert seen and set(seen) == {expected}, (model_dtype, option, seen)
    assert AccumulationOptions().eigh_dtype == "auto"


# -- blocked symmetric covariance updates ------------------------------------------------------
@pytest.mark.parametrize("d", [100, 384, 513, 1000])
def test_symmetric_update_equals_the_full_product_and_computes_only_the_upper_blocks(d):
    g = torch.Generator().manual_seed(d)
    x = torch.randn(40, d, generator=g, dtype=torch.float64)
    c = torch.full((d, d), float("nan"), dtype=torch.float64)
    symmetric_rank_k_update_(c, x, alpha=0.5, beta=0.0)
    b = symmetric_blocks(d)
    upper = torch.zeros(d, d, dtype=torch.bool)
    for i in range(0, d, b):
        upper[i : i + b, i:] = True
    ref = 0.5 * x.T @ x
    torch.testing.assert_close(c[upper], ref[upper], rtol=1e-12, atol=1e-12)
    if b < d:  # wide: the blocks below the diagonal were not computed (still NaN) ...
        assert bool(c[~upper].isnan().all()) and d >= 384
    fill_lower_blocks_(c)  # ... until filled from the upper ones
    torch.testing.assert_close(c, ref, rtol=1e-12, atol=1e-12)
    symmetric_rank_k_update_(c, x, beta=1.0)
    torch.testing.assert_close(fill_lower_blocks_(c), 1.5 * x.T @ x, rtol=1e-12, atol=1e-12)


def test_accumulator_reads_full_sums_through_merge_scale_release_and_state():
    """A wide accumulator (blocked updates): per-batch accumulators merged into a total (the
    first adopted without a copy, the others added), scaling, the release to an
    eigendecomposition (sums rebuilt on read, and rebuilt before a later update) and state all
    equal float64 sums; an update whose sums would overflow is refused before anything is added."""
    g = torch.Generator().manual_seed(0)
    d_in, d_out = 600, 400
    total = CovarianceAccumulator(d_in, d_out)
    ref_a = torch.zeros(d_in, d_in, dtype=torch.float64)
    ref_s = torch.zeros(d_out, d_out, dtype=torch.float64)
    for step in range(3):
        acc = CovarianceAccumulator(d_in, d_out)
        a = torch.randn(2, 5, d_in, generator=g, dtype=torch.float64)
        ds = torch.randn(2, 5, d_out, generator=g, dtype=torch.float64)
        assert acc.add_batch_if_finite(a, ds, scale=2.0)
        held = acc._sums["a_sum"]
        total.merge_(acc, take=True)
        assert (total._sums["a_sum"] is held) == (step == 0)  # adopted at the first merge only
        ref_a += a.reshape(-1, d_in).T @ a.reshape(-1, d_in)
        ref_s += 4 * ds.reshape(-1, d_out).T @ ds.reshape(-1, d_out)
    torch.testing.assert_close(total.a_sum, ref_a, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(total.s_sum, ref_s, rtol=1e-12, atol=1e-10)
    before = (total.a_sum.clone(), total.s_sum.clone(), total.a_tokens)
    huge = torch.full((1, 1, d_in), 1e160, dtype=torch.float64)  # (1e160)² overflows float64
    assert not total.add_batch_if_finite(huge, torch.ones(1, 1, d_out, dtype=torch.float64))
    assert torch.equal(total.a_sum, before[0]) and torch.equal(total.s_sum, before[1]) and total.a_tokens == before[2]
    a = torch.randn(1, 3, d_in, generator=g, dtype=torch.float64)
    total.update_activations(a)  # a blocked add onto a full sum
    total.scale_(0.5)
    ref_a = 0.5 * (ref_a + a[0].T @ a[0])
    copy = CovarianceAccumulator(d_in, d_out)
    copy.load_state_dict(total.state_dict())
    torch.testing.assert_close(copy.a_sum, ref_a, rtol=1e-12, atol=1e-10)
    cov_a, cov_s = total.covariances()
    torch.testing.assert_close(cov_a, ref_a / total.a_tokens, rtol=1e-12, atol=1e-12)
    total.release_(torch.linalg.eigh(cov_a), torch.linalg.eigh(cov_s))
    assert total.released and total._sums["a_sum"] is None
    torch.testing.assert_close(total.a_sum, ref_a, rtol=1e-9, atol=1e-9)  # rebuilt from the eigendecomposition
    a = torch.randn(1, 2, d_in, generator=g, dtype=torch.float64)
    total.update_activations(a)  # training goes on: the sum is rebuilt first
    torch.testing.assert_close(total.a_sum, ref_a + a[0].T @ a[0], rtol=1e-9, atol=1e-9)
    assert not total.released or "a_sum" not in total._eigen


# -- the correction's squared sums ----------------------------------------------------------------
def brute_force_square_sums(a, ds, q_a, q_s):
    rot = torch.stack([q_s.T @ (ds[b].T @ a[b]) @ q_a for b in range(a.shape[0])])
    return (rot**2).sum(0), (rot**4).sum(0)


@pytest.mark.parametrize("shape", [
    (6, 1, 40, 30),    # one token per example: one matrix product
    (5, 4, 40, 30),    # small: the batched product
    (3, 6, 300, 260),  # wide, short: the per-example loop, tokens rotated first
    (2, 700, 260, 260),  # wide, long: the per-example loop, gradients formed first
])
def test_rotated_square_sums_equal_a_float64_per_example_loop(shape):
    b, t, o, i = shape
    g = torch.Generator().manual_seed(t)
    a = torch.randn(b, t, i, generator=g, dtype=torch.float64)
    ds = torch.randn(b, t, o, generator=g, dtype=torch.float64)
    q_a = torch.linalg.qr(torch.randn(i, i, generator=g, dtype=torch.float64))[0]
    q_s = torch.linalg.qr(torch.randn(o, o, generator=g, dtype=torch.float64))[0]
    ref2, ref4 = brute_force_square_sums(a, ds, q_a, q_s)
    sum2, sum4 = rotated_square_sums(a, ds, q_a, q_s, fourth=True)
    torch.testing.assert_close(sum2, ref2, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sum4, ref4, rtol=1e-10, atol=1e-8)
    assert rotated_square_sums(a, ds, q_a, q_s)[1] is None
    if o * i >= LOOP_MIN_ELEMENTS:
        assert t > 1  # the loop cases above are really wide


@pytest.mark.parametrize("wide", [False, True])
def test_lambda_accumulator_leaves_out_nonfinite_examples_on_every_path(wide):
    o, i = (300, 260) if wide else (6, 5)
    g = torch.Generator().manual_seed(1)
    a = torch.randn(4, 3, i, generator=g, dtype=torch.float64)
    ds = torch.randn(4, 3, o, generator=g, dtype=torch.float64)
    q_a, q_s = torch.eye(i, dtype=torch.float64), torch.eye(o, dtype=torch.float64)
    a[2, 1, 0] = float("inf")
    acc = LambdaAccumulator(q_a, q_s, spread=True)
    acc.update(a, ds, scale=2.0)
    keep = torch.tensor([0, 1, 3])
    ref2, ref4 = brute_force_square_sums(a[keep], ds[keep], q_a, q_s)
    assert acc.nonfinite == 1 and acc.examples == 3
    torch.testing.assert_close(acc.total, 4 * ref2)
    kept = ref4 if acc.spread_index is None else ref4.reshape(-1)[acc.spread_index]  # wide: a fixed subset
    torch.testing.assert_close(acc.total4, 16 * kept)


# -- the adaptive correction sample ------------------------------------------------------------
def test_relative_error_is_the_weighted_standard_error_of_the_damped_mean():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(50, 2, 7, generator=g, dtype=torch.float64)
    ds = torch.randn(50, 2, 4, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 4, dtype=torch.float64)
    q_a = torch.linalg.qr(torch.randn(7, 7, generator=g, dtype=torch.float64))[0]
    q_s = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))[0]
    acc = LambdaAccumulator(q_a, q_s, spread=True)
    assert acc.relative_error() == float("inf")
    for k in range(0, 50, 10):
        acc.update(a[k : k + 10], ds[k : k + 10])
    x = torch.stack([(q_s.T @ (ds[b].T @ a[b]) @ q_a) ** 2 for b in range(50)])  # [n, o, i]
    mean, se = x.mean(0), x.std(0, unbiased=True) / 50**0.5
    lam = 0.1 * mean.mean()
    w = mean / (mean + lam)
    expected = float((w * se / (mean + lam)).sum() / w.sum())
    assert acc.relative_error(0.1) == pytest.approx(expected, rel=1e-9)
    assert LambdaAccumulator(q_a, q_s).relative_error() == float("inf")  # without spread: unknown


def test_relative_error_of_a_wide_layer_reads_a_fixed_subset_of_entries_and_agrees_with_all():
    """Above SPREAD_ENTRIES entries only a fixed subset's fourth powers are kept (memory: 65536
    numbers, not another Λ); the weighted error it estimates agrees with all entries' within 2%."""
    g = torch.Generator().manual_seed(3)
    o, i, n = 400, 300, 40
    a = torch.randn(n, 2, i, generator=g, dtype=torch.float64) * torch.linspace(0.05, 2, i, dtype=torch.float64)
    ds = torch.randn(n, 2, o, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, o, dtype=torch.float64)
    q_a, q_s = torch.eye(i, dtype=torch.float64), torch.eye(o, dtype=torch.float64)
    acc = LambdaAccumulator(q_a, q_s, spread=True)
    for k in range(0, n, 8):
        acc.update(a[k : k + 8], ds[k : k + 8])
    assert acc.total4.numel() == LambdaAccumulator.SPREAD_ENTRIES < o * i and acc.total.shape == (o, i)
    x = torch.einsum("bto,bti->bo i".replace(" ", ""), ds, a) ** 2  # [n, o, i] squared per-example gradients
    mean, se = x.mean(0), x.std(0, unbiased=True) / n**0.5
    lam = 0.1 * mean.mean()
    w = mean / (mean + lam)
    every_entry = float((w * se / (mean + lam)).sum() / w.sum())
    assert acc.relative_error(0.1) == pytest.approx(every_entry, rel=0.02)
    again = LambdaAccumulator(q_a, q_s, spread=True)
    assert torch.equal(again.spread_index, acc.spread_index)  # fixed: ranks and reruns read the same entries


def test_adaptive_correction_stops_when_precise_enough_and_equals_the_capped_pass():
    model, loader, layers, task = digits_mlp(n=256)
    eigen = eigen_from_covariances(fit_covariances(model, loader, layers, task))
    full = fit_lambdas(model, loader, layers, eigen, task, tol=1e-9)  # never precise enough: every batch
    assert all(acc.examples == 256 for acc in full.values())
    errors = [max(acc.relative_error() for acc in fit_lambdas(model, loader, layers, eigen, task, tol=1e-9,
                                                               max_examples=k).values()) for k in (64, 128, 192)]
    assert errors[0] > errors[1] > errors[2]  # the estimate tightens as examples are added
    tol = (errors[1] + errors[2]) / 2  # reached after the third batch, not before
    adaptive = fit_lambdas(model, loader, layers, eigen, task, tol=tol)
    capped = fit_lambdas(model, loader, layers, eigen, task, max_examples=192)
    for n in adaptive:
        assert adaptive[n].examples == 192
        torch.testing.assert_close(adaptive[n].mean(), capped[n].mean(), rtol=1e-6, atol=0)
    # a minimum sample is kept however loose the tolerance
    loose = fit_lambdas(model, loader, layers, eigen, task, tol=1e9, min_examples=100)
    assert all(acc.examples == 128 for acc in loose.values())
