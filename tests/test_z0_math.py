"""Z0-Inf core math against explicit P-dimensional float64 references (NumPy / brute force)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

from lightning_influence.validation import InvalidArgumentError
from lightning_influence.z0 import (
    DirectionalFit,
    SnapshotGram,
    Z0Recorder,
    directional_coefficients,
    load_snapshot,
    select_neighbours,
    self_influence_directional,
    self_influence_mean_loss,
    self_influence_variance,
    spearman_matrix,
    squared_distances,
    train_test_influence,
    z0_quadratic_form,
)


def _trajectory(e=7, p=12, seed=0):
    """A wandering weight trajectory W (E × P) in float64."""
    rng = np.random.default_rng(seed)
    steps = rng.normal(size=(e, p)) * rng.uniform(0.2, 1.5, size=(e, 1))
    return np.cumsum(steps, axis=0) + rng.normal(size=p)


def _linreg_losses(w, x, y):
    """Squared-error losses (θ·x − y)² of examples (x, y) at each row of W: (E × n)."""
    return (w @ x.T - y[None, :]) ** 2


# ---------------------------------------------------------------- Gram matrix
def test_incremental_gram_equals_explicit_wwt(tmp_path):
    torch.manual_seed(0)
    snaps = [{"a.weight": torch.randn(5, 3), "a.bias": torch.randn(5), "b.weight": torch.randn(2, 5)} for _ in range(6)]
    sg = SnapshotGram(tmp_path / "snaps")
    for s in snaps:
        sg.append(s)
    w = np.stack([np.concatenate([t.double().numpy().ravel() for t in s.values()]) for s in snaps])
    np.testing.assert_allclose(sg.gram.numpy(), w @ w.T, rtol=1e-12, atol=1e-12)
    assert sg.gram.dtype == torch.float64
    # the snapshots on disk are exact copies
    back = load_snapshot(tmp_path / "snaps", 3, sg.names)
    for n, t in snaps[3].items():
        assert torch.equal(back[n], t)
    # distances from the Gram matrix equal explicit differences
    n2 = squared_distances(sg.gram).numpy()
    ref = ((w[:, None, :] - w[None, :, :]) ** 2).sum(-1)
    np.testing.assert_allclose(n2, ref, rtol=1e-10, atol=1e-10)


def test_gram_state_roundtrip_and_missing_snapshot(tmp_path):
    sg = SnapshotGram(tmp_path / "s")
    sg.append({"w": torch.ones(3)})
    sg.append({"w": torch.arange(3.0)})
    sg2 = SnapshotGram(tmp_path / "s")
    sg2.load_state_dict(sg.state_dict())
    sg2.append({"w": torch.tensor([1.0, -1.0, 2.0])})
    np.testing.assert_allclose(sg2.gram[2].numpy(), [2.0, 3.0, 6.0])
    with pytest.raises(ValueError, match="differ"):
        sg2.append({"w": torch.ones(4)})
    sg2.cleanup()
    with pytest.raises(FileNotFoundError, match="snapshot_dir"):
        sg2.append({"w": torch.ones(3)})


# ---------------------------------------------------------------- neighbours
def test_neighbour_selection_matches_brute_force():
    w = _trajectory(e=8, p=5, seed=1)
    gram = torch.from_numpy(w @ w.T)
    d = np.sqrt(((w[:, None] - w[None]) ** 2).sum(-1))
    e = len(w)
    for k in (1, 3, 10):
        nb = select_neighbours(gram, "knn", k=k)
        for i in range(e):
            others = [j for j in range(e) if j != i]
            ref = sorted(sorted(others, key=lambda j: d[i, j])[:k])
            assert nb[i].tolist() == ref
    tau = float(np.median(d[d > 0]))
    nb = select_neighbours(gram, "threshold", tau=tau)
    for i in range(e):
        assert nb[i].tolist() == [j for j in range(e) if j != i and d[i, j] <= tau]
    nb = select_neighbours(gram, "quantile", band=(0.25, 0.75))
    for i in range(e):
        others = np.array([d[i, j] for j in range(e) if j != i])
        lo, hi = np.quantile(others, 0.25), np.quantile(others, 0.75)
        ref = [j for j in range(e) if j != i and lo - 1e-12 <= d[i, j] <= hi + 1e-12]
        assert nb[i].tolist() == ref
    # identical checkpoints are never neighbours
    w2 = np.concatenate([w[:1], w[:1], w[1:3]])
    nb = select_neighbours(torch.from_numpy(w2 @ w2.T), "knn", k=3)
    assert 1 not in nb[0].tolist() and 0 not in nb[1].tolist()
    with pytest.raises(ValueError, match="mode"):
        select_neighbours(gram, "last")
    with pytest.raises(ValueError, match="tau"):
        select_neighbours(gram, "threshold")


# ---------------------------------------------------------------- self-influence
def test_variance_and_mean_loss_match_numpy():
    rng = np.random.default_rng(2)
    losses = rng.gamma(2.0, size=(6, 30))
    t = torch.from_numpy(losses).float()
    np.testing.assert_allclose(self_influence_variance(t).numpy(), losses.astype(np.float32).astype(np.float64).var(0), rtol=1e-10)
    np.testing.assert_allclose(self_influence_variance(t, unbiased=True).numpy(),
                               losses.astype(np.float32).astype(np.float64).var(0, ddof=1), rtol=1e-10)
    np.testing.assert_allclose(self_influence_mean_loss(t).numpy(), losses.astype(np.float32).astype(np.float64).mean(0), rtol=1e-10)


def _explicit_fd_gradients(w, losses, nb):
    """g_i(x) = mean_j ΔL_ij(x) (θ_j − θ_i) / ‖θ_j − θ_i‖², explicit P-dim vectors: (E, n, P)."""
    e, n = losses.shape
    g = np.zeros((e, n, w.shape[1]))
    for i in range(e):
        js = nb[i].tolist()
        for j in js:
            dth = w[j] - w[i]
            g[i] += np.outer(losses[j] - losses[i], dth) / (dth @ dth) / len(js)
    return g


def _explicit_ls_gradients(w, losses, nb):
    """Minimum-norm g with D_i g = ΔL_i via numpy lstsq on explicit D_i: (E, n, P)."""
    e, n = losses.shape
    g = np.zeros((e, n, w.shape[1]))
    for i in range(e):
        js = nb[i].tolist()
        if js:
            d = w[js] - w[i]
            sol, *_ = np.linalg.lstsq(d, (losses[js] - losses[i]), rcond=None)
            g[i] = sol.T
    return g


def _linreg_problem(seed, e, p, n, k):
    """A trajectory, the squared-error loss table of ``n`` random examples, its Gram matrix and k-NN neighbours."""
    rng = np.random.default_rng(seed)
    w = _trajectory(e=e, p=p, seed=seed)
    x, y = rng.normal(size=(n, p)), rng.normal(size=n)
    losses = _linreg_losses(w, x, y)
    gram = torch.from_numpy(w @ w.T)
    return w, losses, gram, select_neighbours(gram, "knn", k=k)


def test_finite_difference_self_influence_matches_explicit_vectors():
    w, losses, gram, nb = _linreg_problem(seed=3, e=6, p=9, n=20, k=3)
    g = _explicit_fd_gradients(w, losses, nb)
    ref = (g ** 2).sum(axis=(0, 2))
    got = self_influence_directional(gram, torch.from_numpy(losses), nb, fit="finite_difference")
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-9)
    # the coefficients reproduce the explicit vectors
    c = directional_coefficients(gram, torch.from_numpy(losses), nb, fit="finite_difference")
    for i in range(len(w)):
        np.testing.assert_allclose(c[i].numpy().T @ (w[nb[i].numpy()] - w[i]), g[i], rtol=1e-9, atol=1e-12)


def test_least_squares_on_quadratic_model_matches_explicit_vectors():
    """Linear regression (loss exactly quadratic in θ): Gram-only scores = explicit P-dim sums."""
    rng = np.random.default_rng(4)
    p = 10
    w = _trajectory(e=8, p=p, seed=4)
    xtr, ytr = rng.normal(size=(25, p)), rng.normal(size=25)
    xq, yq = rng.normal(size=(4, p)), rng.normal(size=4)
    ltr, lq = _linreg_losses(w, xtr, ytr), _linreg_losses(w, xq, yq)
    gram = torch.from_numpy(w @ w.T)
    for mode, kw in (("knn", {"k": 3}), ("threshold", {"tau": float(np.sqrt(squared_distances(gram).numpy()).mean())})):
        nb = select_neighbours(gram, mode, **kw)
        gtr, gq = _explicit_ls_gradients(w, ltr, nb), _explicit_ls_gradients(w, lq, nb)
        ref = np.einsum("eqp,etp->qt", gq, gtr)
        got = train_test_influence(gram, torch.from_numpy(ltr), torch.from_numpy(lq), nb, out_dtype=torch.float64)
        assert got.shape == (4, 25)
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-7, atol=1e-9)
        si = self_influence_directional(gram, torch.from_numpy(ltr), nb, fit="least_squares")
        np.testing.assert_allclose(si.numpy(), (gtr ** 2).sum(axis=(0, 2)), rtol=1e-7)
    # finite-difference train-test form = Σ_i g_i(x)·g_i(z) with explicit vectors
    nb = select_neighbours(gram, "knn", k=2)
    ref = np.einsum("eqp,etp->qt", _explicit_fd_gradients(w, lq, nb), _explicit_fd_gradients(w, ltr, nb))
    got = train_test_influence(gram, torch.from_numpy(ltr), torch.from_numpy(lq), nb, fit="finite_difference",
                               out_dtype=torch.float64)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-8, atol=1e-10)


def test_least_squares_gradients_are_projected_true_gradients():
    rng = np.random.default_rng(5)
    p = 8
    w = _trajectory(e=7, p=p, seed=5)
    gram = torch.from_numpy(w @ w.T)
    # (a) loss linear in θ (ℓ = θ·a): ΔL = D ∇ℓ exactly, so g_i = projection of ∇ℓ on span(D_i)
    a = rng.normal(size=(5, p))
    losses = w @ a.T
    nb = select_neighbours(gram, "knn", k=3)
    c = directional_coefficients(gram, torch.from_numpy(losses), nb)
    for i in range(len(w)):
        d = w[nb[i].numpy()] - w[i]
        proj = d.T @ np.linalg.pinv(d @ d.T) @ d  # P × P projector on span of the differences
        np.testing.assert_allclose(c[i].numpy().T @ d, a @ proj, rtol=1e-8, atol=1e-10)
    # (b) linear regression (quadratic loss), one neighbour: L_j − L_i = ∇ℓ(midpoint)·(θ_j − θ_i)
    # exactly, so g_i = the true gradient at the midpoint projected on θ_j − θ_i
    x, y = rng.normal(size=(6, p)), rng.normal(size=6)
    losses = _linreg_losses(w, x, y)
    nb = select_neighbours(gram, "knn", k=1)
    c = directional_coefficients(gram, torch.from_numpy(losses), nb)
    for i in range(len(w)):
        j = int(nb[i][0])
        d = w[j] - w[i]
        mid = 0.5 * (w[i] + w[j])
        grad = 2 * (x @ mid - y)[:, None] * x  # n × P true gradients at the midpoint
        expected = np.outer(grad @ d, d) / (d @ d)
        np.testing.assert_allclose(c[i].numpy().T * d[None, :], expected, rtol=1e-8, atol=1e-10)


def test_rank_deficient_neighbours_use_pseudo_inverse():
    # three collinear checkpoints: K_i has rank 1, the pseudo-inverse stays finite and exact
    base = np.array([1.0, 2.0, 0.5])
    w = np.stack([base, base + [1, 0, 0], base + [2, 0, 0], base + [0, 1, 0]])
    gram = torch.from_numpy(w @ w.T)
    a = np.array([[1.0, -2.0, 3.0]])
    losses = w @ a.T
    nb = [torch.tensor([1, 2]), torch.tensor([0, 2]), torch.tensor([0, 1]), torch.tensor([0, 1, 2])]
    si = self_influence_directional(gram, torch.from_numpy(losses), nb, fit="least_squares")
    # rows 0-2 see only the x axis (‖g‖² = 1), row 3 sees x and y (1 + 4)
    np.testing.assert_allclose(si.numpy(), [1.0 * 3 + 5.0], rtol=1e-8)


def test_damped_least_squares_is_the_ridge_fit_on_explicit_differences():
    """DirectionalFit(damping=λ): g_i = D_iᵀ (D_i D_iᵀ + λI)⁻¹ ΔL_i, against numpy on explicit D_i."""
    w, losses, gram, nb = _linreg_problem(seed=10, e=6, p=5, n=7, k=3)
    lam = 0.3
    ref = np.zeros(7)
    for i in range(len(w)):
        d = w[nb[i].numpy()] - w[i]
        g = d.T @ np.linalg.solve(d @ d.T + lam * np.eye(len(d)), losses[nb[i].numpy()] - losses[i])  # P × n
        ref += (g ** 2).sum(axis=0)
    fit = DirectionalFit("least_squares", damping=lam)
    got = self_influence_directional(gram, torch.from_numpy(losses), nb, fit=fit)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-9)
    # the same fit reaches every estimator: the diagonal of the pairwise table, and the quadratic form
    pw = train_test_influence(gram, torch.from_numpy(losses), torch.from_numpy(losses), nb, fit=fit, out_dtype=torch.float64)
    np.testing.assert_allclose(np.diagonal(pw.numpy()), ref, rtol=1e-9)
    q = z0_quadratic_form(gram, nb, fit).numpy()
    np.testing.assert_allclose(np.einsum("en,ef,fn->n", losses, q, losses), ref, rtol=1e-9)
    # a method name is the fit with default rcond / damping
    assert DirectionalFit.of("finite_difference") == DirectionalFit("finite_difference", 1e-10, 0.0)
    undamped = self_influence_directional(gram, torch.from_numpy(losses), nb, fit="least_squares")
    assert (undamped.numpy() > ref).all()  # ridge shrinks every fitted gradient


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "secant"}, r"DirectionalFit\(method=\.\.\.\) must be one of 'least_squares', 'finite_difference'"),
        ({"rcond": -1.0}, r"DirectionalFit\(rcond=\.\.\.\) must be a finite float >= 0, got -1\.0"),
        ({"damping": float("nan")}, r"DirectionalFit\(damping=\.\.\.\) must be a finite float >= 0, got nan"),
    ],
)
def test_directional_fit_validation(kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        DirectionalFit(**kwargs)
    gram = torch.eye(3, dtype=torch.float64)
    if "method" in kwargs:  # a bad method name fails in every estimator, before any work
        with pytest.raises(InvalidArgumentError, match=match):
            z0_quadratic_form(gram, [torch.tensor([1]), torch.tensor([0]), torch.tensor([0])], kwargs["method"])


# ---------------------------------------------------------------- train-test options
def test_spearman_matrix_matches_scipy_with_ties():
    rng = np.random.default_rng(6)
    a = rng.integers(0, 4, size=(7, 5)).astype(float)
    b = rng.normal(size=(7, 6))
    b[:, 0] = b[:, 1]
    got = spearman_matrix(torch.from_numpy(a), torch.from_numpy(b), chunk_size=4).numpy()
    for i in range(5):
        for j in range(6):
            ref = scipy.stats.spearmanr(a[:, i], b[:, j]).statistic
            assert got[i, j] == pytest.approx(ref, abs=1e-12)


def test_centred_spearman_weighted_finite_difference_matches_brute_force():
    """The released code's options, against a loop over pairs and checkpoints."""
    rng = np.random.default_rng(7)
    w = _trajectory(e=6, p=7, seed=7)
    ltr, lq = rng.gamma(2.0, size=(6, 9)), rng.gamma(2.0, size=(6, 3))
    gram = torch.from_numpy(w @ w.T)
    nb = select_neighbours(gram, "knn", k=3)
    ctr, cq = ltr - ltr.mean(1, keepdims=True), lq - lq.mean(1, keepdims=True)
    ref = np.zeros((3, 9))
    for qi in range(3):
        for t in range(9):
            s = 0.0
            for i in range(6):
                js = nb[i].tolist()
                for j in js:
                    for k in js:
                        dj, dk = w[j] - w[i], w[k] - w[i]
                        s += (ctr[j, t] - ctr[i, t]) * (cq[k, qi] - cq[i, qi]) * (dj @ dk) / (dj @ dj) / (dk @ dk) / len(js) ** 2
            ref[qi, t] = s * scipy.stats.spearmanr(lq[:, qi], ltr[:, t]).statistic
    got = train_test_influence(gram, torch.from_numpy(ltr), torch.from_numpy(lq), nb, fit="finite_difference",
                               centre=True, spearman_weight=True, chunk_size=4, out_dtype=torch.float64)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-8, atol=1e-12)


def test_chunking_and_sign_convention():
    rng = np.random.default_rng(8)
    w = _trajectory(e=5, p=6, seed=8)
    gram = torch.from_numpy(w @ w.T)
    ltr = torch.from_numpy(rng.gamma(2.0, size=(5, 50)))
    nb = select_neighbours(gram, "knn", k=2)
    full = train_test_influence(gram, ltr, ltr[:, :7], nb, chunk_size=1000)
    small = train_test_influence(gram, ltr, ltr[:, :7], nb, chunk_size=3)
    assert full.dtype == torch.float32 and full.shape == (7, 50)
    torch.testing.assert_close(full, small)
    # an example's influence on itself equals its self-influence (>= 0)
    si = self_influence_directional(gram, ltr, nb, fit="least_squares")
    torch.testing.assert_close(torch.diagonal(full[:, :7]).double(), si[:7], rtol=1e-5, atol=1e-6)
    assert (si >= 0).all()


def test_sign_convention_against_autograd_gradients():
    """With neighbour moves spanning the (3-dim) parameter space and small moves, the least-squares
    scores approach Σ_i ∇ℓ(x, θ_i)·∇ℓ(z, θ_i) from autograd: positive = z's gradient step lowers x's loss."""
    g = torch.Generator().manual_seed(9)
    p, e = 3, 12
    x, y = torch.randn(30, p, generator=g, dtype=torch.float64), torch.randn(30, generator=g, dtype=torch.float64)
    theta = torch.zeros(p, dtype=torch.float64)
    snaps = []
    for _ in range(e):  # noisy small steps: a trajectory whose local moves span R^3
        snaps.append(theta.clone())
        theta = theta + 0.01 * torch.randn(p, generator=g, dtype=torch.float64)
    w = torch.stack(snaps)
    losses = (w @ x.T - y) ** 2  # [E, n]
    grads = torch.stack([torch.autograd.functional.jacobian(lambda t: (x @ t - y) ** 2, w[i]) for i in range(e)])  # [E, n, P]
    ref = torch.einsum("eqp,etp->qt", grads[:, :5], grads)
    nb = select_neighbours(w @ w.T, "knn", k=4)
    got = train_test_influence(w @ w.T, losses, losses[:, :5], nb, out_dtype=torch.float64)
    assert np.corrcoef(got.numpy().ravel(), ref.numpy().ravel())[0, 1] > 0.99
    big = ref.abs() > 0.1 * ref.abs().max()
    assert torch.equal(torch.sign(got[big]), torch.sign(ref[big]))


# ---------------------------------------------------------------- the recorder (no Trainer)
def _snap(v):
    return {"a.weight": torch.tensor([[v, 1.0], [0.0, 2 * v]]), "a.bias": torch.tensor([v - 1.0])}


def test_recorder_rows_result_and_state_roundtrip(tmp_path):
    rec = Z0Recorder(tmp_path / "snaps", options={"params": None, "keep_snapshots": True})
    ids = torch.tensor([3, 5, 9])
    q_ids = torch.tensor([100, 101])
    for r, v in enumerate((1.0, 2.0, 4.0)):
        rec.add(step=10 * r, epoch=r, params=_snap(v), probe_ids=ids, probe_losses=torch.tensor([v, 2 * v, v * v]),
                query_ids=q_ids, query_losses=torch.tensor([-v, v]))
        if r == 1:
            state = rec.state_dict()
    res = rec.result(tmp_path / "rec")
    w = np.array([[v, 1.0, 0.0, 2 * v, v - 1.0] for v in (1.0, 2.0, 4.0)])
    np.testing.assert_allclose(res.gram.numpy(), w @ w.T, rtol=1e-12)
    assert res.probe_ids.tolist() == [3, 5, 9] and res.query_ids.tolist() == [100, 101]
    np.testing.assert_allclose(res.probe_losses.numpy(), [[1, 2, 1], [2, 4, 4], [4, 8, 16]])
    np.testing.assert_allclose(res.query_losses.numpy(), [[-1, 1], [-2, 2], [-4, 4]])
    assert res.steps.tolist() == [0, 10, 20] and res.epochs.tolist() == [0, 1, 2]
    assert res.manifest["param_names"] == ["a.weight", "a.bias"] and res.manifest["num_params"] == 5
    assert res.manifest["losses_from"] == "probe" and res.manifest["keep_snapshots"] is True
    # the state after row 1 wrote rows 0 and 1; row 2 is in memory until flush()
    assert sorted(p.name for p in (tmp_path / "snaps").iterdir()) == ["snapshot_00000.safetensors", "snapshot_00001.safetensors"]
    rec.flush()
    assert torch.equal(res.snapshot(2)["a.weight"], _snap(4.0)["a.weight"])
    assert res.snapshot(2)["a.weight"].dtype == _snap(4.0)["a.weight"].dtype
    np.testing.assert_allclose(res.self_influence("variance").numpy(), np.var(res.probe_losses.double().numpy(), axis=0))
    # resuming from the state after row 1 continues to the same tables (same snapshot folder)
    again = Z0Recorder(tmp_path / "snaps", options={"params": None, "keep_snapshots": True})
    again.load_state_dict(state)
    assert again.rows == 2 and again.last_step == 10
    again.add(step=20, epoch=2, params=_snap(4.0), probe_ids=ids, probe_losses=torch.tensor([4.0, 8.0, 16.0]),
              query_ids=q_ids, query_losses=torch.tensor([-4.0, 4.0]))
    res2 = again.result()
    for name in ("gram", "probe_losses", "query_losses", "probe_ids", "query_ids", "steps", "epochs"):
        torch.testing.assert_close(getattr(res2, name), getattr(res, name), rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match="version"):
        Z0Recorder(tmp_path / "x").load_state_dict({**state, "version": 1})
    with pytest.raises(ValueError, match="losses_from='probe'"):
        Z0Recorder(tmp_path / "x", losses_from="training_step").load_state_dict(state)


def test_recorder_refuses_changed_sets_and_keeps_nothing_on_failure(tmp_path):
    rec = Z0Recorder(tmp_path / "s")
    with pytest.raises(RuntimeError, match="nothing is recorded"):
        rec.result()
    rec.add(step=1, epoch=1, params=_snap(1.0), probe_ids=torch.tensor([0, 1]), probe_losses=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"the probe set changed between recordings \(2 ids before, 3 at step 2\)"):
        rec.add(step=2, epoch=2, params=_snap(2.0), probe_ids=torch.tensor([0, 1, 2]), probe_losses=torch.ones(3))
    with pytest.raises(ValueError, match="queries must be given for every row or for none"):
        rec.add(step=2, epoch=2, params=_snap(2.0), probe_ids=torch.tensor([0, 1]), probe_losses=torch.ones(2),
                query_ids=torch.tensor([7]), query_losses=torch.ones(1))
    with pytest.raises(ValueError, match=r"probe losses have shape \(3,\), expected \(2,\)"):
        rec.add(step=2, epoch=2, params=_snap(2.0), probe_ids=torch.tensor([0, 1]), probe_losses=torch.ones(3))
    with pytest.raises(ValueError, match="differ from the first snapshot"):
        rec.add(step=2, epoch=2, params={"w": torch.ones(2)}, probe_ids=torch.tensor([0, 1]), probe_losses=torch.ones(2))
    assert rec.rows == 1 and rec.gram.rows == 1 and not rec.gram.path(1).exists()  # nothing kept


def test_recorder_adopts_the_writers_gram_without_writing(tmp_path):
    """What a non-writing DDP rank does: it gets rank zero's Gram matrix and writes no file."""
    writer, reader = Z0Recorder(tmp_path / "w"), Z0Recorder(tmp_path / "r")
    for r, v in enumerate((1.0, 3.0)):
        row = dict(step=r, epoch=r, params=_snap(v), probe_ids=torch.tensor([0]), probe_losses=torch.tensor([v]))
        writer.add(**row)
        reader.add(**row, gram=writer.gram.gram)
    torch.testing.assert_close(reader.result().gram, writer.result().gram, rtol=0, atol=0)
    writer.flush(), reader.flush()  # the writer's snapshots are held in memory until needed
    assert not (tmp_path / "r").exists() and writer.gram.path(1).exists()
    with pytest.raises(ValueError, match=r"given Gram matrix has shape \(2, 2\), expected \(3, 3\)"):
        reader.add(step=2, epoch=2, params=_snap(5.0), probe_ids=torch.tensor([0]), probe_losses=torch.tensor([5.0]),
                   gram=writer.gram.gram)


def test_recorder_aligns_training_step_rows_by_id(tmp_path):
    warned = []
    rec = Z0Recorder(tmp_path / "s", losses_from="training_step", warn=warned.append)
    rec.observe_training_losses(torch.tensor([4, 0]), torch.tensor([0.4, 0.0]))
    rec.observe_training_losses(torch.tensor([2, 6]), torch.tensor([0.2, 0.6]))
    with pytest.raises(ValueError, match="per_example_loss has shape"):
        rec.observe_training_losses(torch.tensor([1, 2]), torch.ones(3))
    ids, losses = rec.pop_training_losses()
    assert ids.tolist() == [4, 0, 2, 6] and rec.pop_training_losses()[0].numel() == 0
    order = torch.argsort(ids)  # as gathered: sorted by id
    rec.add(step=4, epoch=1, params=_snap(1.0), probe_ids=ids[order], probe_losses=losses[order])
    # the next epoch: id 2 unseen this time (nan), id 5 never seen in the first row (dropped, warned)
    rec.add(step=8, epoch=2, params=_snap(2.0), probe_ids=torch.tensor([0, 4, 5, 6]),
            probe_losses=torch.tensor([1.0, 1.4, 1.5, 1.6]))
    res = rec.result()
    assert res.probe_ids.tolist() == [0, 2, 4, 6]
    torch.testing.assert_close(res.probe_losses, torch.tensor([[0.0, 0.2, 0.4, 0.6], [1.0, float("nan"), 1.4, 1.6]]),
                               equal_nan=True)
    assert warned == ["Z0: 1 training ids unseen in the first recorded epoch were ignored at step 8",
                      "Z0: 1 training ids of the first recorded epoch have no loss at step 8 (e.g. ids [2]); their losses "
                      "in this row are NaN"]
    # the buffer travels in the state (a checkpoint in mid-epoch)
    rec.observe_training_losses(torch.tensor([9]), torch.tensor([0.9]))
    other = Z0Recorder(tmp_path / "s", losses_from="training_step")
    other.load_state_dict(rec.state_dict())
    assert [t.tolist() for t in other.pop_training_losses()] == [[9], [pytest.approx(0.9)]]


def test_core_imports_no_lightning():
    import subprocess
    import sys

    code = ("import sys, lightning_influence.z0; "
            "bad = sorted(m for m in sys.modules if m == 'lightning' or m.startswith('lightning.')); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_gram_in_memory_copies_match_files_and_a_float64_loop(tmp_path, monkeypatch):
    """While the snapshots fit ``cache_bytes`` the rows come from RAM (no file opened); past it,
    from the files; both equal float64 dot products computed in plain loops."""
    import lightning_influence.z0.gram as gram_module
    from lightning_influence.z0.gram import SnapshotGram

    g = torch.Generator().manual_seed(0)
    snaps = [{"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g).double()} for _ in range(6)]
    numbers = 16
    cached = SnapshotGram(tmp_path / "cached")  # the default budget: everything fits
    files = SnapshotGram(tmp_path / "files", cache_bytes=0)
    crossing = SnapshotGram(tmp_path / "crossing", cache_bytes=numbers * 8 * 3)  # 3 snapshots fit, then files
    real_open = gram_module.safe_open
    for i, s in enumerate(snaps):
        def no_reads(*a, **k):
            raise AssertionError("a snapshot file was read although it is in memory")

        monkeypatch.setattr(gram_module, "safe_open", no_reads)
        cached.append(s)
        monkeypatch.setattr(gram_module, "safe_open", real_open)
        files.append(s)
        crossing.append(s)
        assert crossing._held == (i + 1 if i < 3 else 0)
    ref = torch.zeros(6, 6, dtype=torch.float64)
    for i in range(6):
        for j in range(6):
            total = 0.0
            for name in ("w", "b"):
                for a, b in zip(snaps[i][name].double().reshape(-1).tolist(), snaps[j][name].double().reshape(-1).tolist()):
                    total += a * b
            ref[i, j] = total
    for gm in (cached, files, crossing):
        torch.testing.assert_close(gm.gram, ref, rtol=1e-13, atol=1e-13)
        assert sorted(p.name for p in gm.directory.iterdir()) == [f"snapshot_{r:05d}.safetensors" for r in range(6)]
