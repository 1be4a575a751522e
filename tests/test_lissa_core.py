"""LiSSA core against explicit float64 references (no Trainer)."""

from __future__ import annotations

import dataclasses
import re
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn
from torch.utils.data import TensorDataset

from lightning_influence import InfluenceScores
from lightning_influence.lissa import (
    CurvatureOperator,
    LiSSADivergenceError,
    LiSSAOptions,
    SamplePool,
    lissa_inverse_hvp,
    lissa_recursion,
    self_influence,
)
from lightning_influence.lissa.samplers import RandomSampler
from lightning_influence.lissa.self_influence import make_product
from lightning_influence.patterns import PatternError
from lightning_influence.task import ClassificationTask
from lightning_influence.validation import InvalidArgumentError

from cases import tanh_mlp_problem

D_IN, HID, C, N = 6, 5, 3, 48


make_problem = partial(tanh_mlp_problem, n=N, hid=HID, d_in=D_IN, n_classes=C)


def ref_logits(theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Independent forward pass from a flat vector (weight/bias order of named_parameters)."""
    i = 0

    def take(*shape):
        nonlocal i
        n = 1
        for s in shape:
            n *= s
        out = theta[i : i + n].reshape(shape)
        i += n
        return out

    w1, b1, w2, b2 = take(HID, D_IN), take(HID), take(C, HID), take(C)
    return torch.tanh(x @ w1.T + b1) @ w2.T + b2


def ref_loss(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(ref_logits(theta, x), y, reduction="none")


def explicit(model, x, y):
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    H = torch.autograd.functional.hessian(lambda t: ref_loss(t, x, y).mean(), theta)
    grads = torch.stack(
        [torch.autograd.functional.jacobian(lambda t: ref_loss(t, x[i : i + 1], y[i : i + 1]).sum(), theta) for i in range(len(y))]
    )
    return theta, H, grads


def test_full_batch_lissa_matches_explicit_inverse_within_2_percent():
    model, ds, x, y = make_problem()
    _, H, grads = explicit(model, x, y)
    evals = torch.linalg.eigvalsh(H)
    damping = float(max(0.0, -evals.min()) + 0.05)
    scale = 1.2 * float(evals.max() + damping)
    v = grads[:5]
    exact = torch.linalg.solve(H + damping * torch.eye(H.shape[0], dtype=H.dtype), v.T).T
    opts = LiSSAOptions(sampler=RandomSampler(sample_size=N), damping=damping, scale=scale, depth=3000, tol=1e-8)
    res = lissa_inverse_hvp(model, v, ds, opts)
    rel = (res.estimate - exact).norm(dim=1) / exact.norm(dim=1)
    assert float(rel.max()) < 0.02
    assert all(res.converged) and res.total_steps < 3000
    assert res.estimate.dtype == torch.float64 and res.estimate.shape == v.shape
    assert res.scale == scale


def test_minibatch_self_influence_ranks_match_exact():
    model, ds, x, y = make_problem(1)
    _, H, grads = explicit(model, x, y)
    evals = torch.linalg.eigvalsh(H)
    damping = float(max(0.0, -evals.min()) + 0.1)
    scale = 1.5 * float(evals.max() + damping)
    exact = torch.einsum("np,np->n", grads, torch.linalg.solve(H + damping * torch.eye(H.shape[0], dtype=H.dtype), grads.T).T)
    probe = [(torch.arange(N), (x, y))]
    opts = LiSSAOptions(sampler="random", sample_size=32, damping=damping, scale=scale, depth=200, chunk_size=20, tol=None)
    res = self_influence(model, probe, ds, opts)
    assert isinstance(res, InfluenceScores) and res.method == "lissa"
    assert res.train_ids.tolist() == list(range(N))
    assert res.meta["steps"] == [200, 200, 200]  # chunks of 20, 20, 8, full depth (tol=None)
    assert res.meta["converged"] == [False] * 3
    assert res.meta["num_params"] == H.shape[0] and res.meta["scale"] == scale and res.meta["seconds"] > 0
    assert res.options == opts.as_dict() and res.options["chunk_size"] == 20
    scores = res.self_influence
    assert scores.dtype == torch.float64
    rho = spearmanr(scores.numpy(), exact.numpy()).statistic
    assert rho >= 0.99, rho
    assert float(((scores - exact).abs() / exact).median()) < 0.1
    # chunks re-seed the sampler: every example's score equals that of its chunk run alone
    alone = self_influence(model, [(torch.arange(40, N), (x[40:], y[40:]))], ds, opts).self_influence
    torch.testing.assert_close(scores[40:], alone, rtol=1e-10, atol=0)
    assert bool((scores > 0).all())


def test_batched_recursion_equals_each_vector_alone():
    model, ds, x, y = make_problem(2)
    task = ClassificationTask()
    op = CurvatureOperator(model, task)
    pool = SamplePool(ds)
    v = torch.randn(4, op.num_params, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kw = dict(damping=0.5, scale=20.0, depth=15)

    def run(vectors):
        smp = RandomSampler(sample_size=8)
        gen = torch.Generator().manual_seed(7)
        smp.prepare(model, task, pool, gen)
        return lissa_recursion(make_product(op, smp, pool, gen), vectors, **kw).estimate

    batched = run(v)
    alone = torch.stack([run(v[i : i + 1])[0] for i in range(4)])
    torch.testing.assert_close(batched, alone, rtol=1e-10, atol=1e-12)


def test_hessian_and_ggn_products_match_explicit():
    model, ds, x, y = make_problem(3)
    task = ClassificationTask()
    theta, H, _ = explicit(model, x, y)
    v = torch.randn(3, theta.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    batch = (x, y)
    hv = CurvatureOperator(model, task, curvature="hessian").matvec(batch, v)
    torch.testing.assert_close(hv, v @ H.T, rtol=1e-9, atol=1e-10)
    # explicit GGN: J^T H_out J / B with the softmax Hessian per example
    J = torch.autograd.functional.jacobian(lambda t: ref_logits(t, x), theta)  # [N, C, P]
    p = torch.softmax(ref_logits(theta, x), -1)
    Hout = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    G = torch.einsum("ncp,ncd,ndq->pq", J, Hout, J) / N
    gv = CurvatureOperator(model, task, curvature="ggn").matvec(batch, v)
    torch.testing.assert_close(gv, v @ G.T, rtol=1e-9, atol=1e-10)


def test_parameter_subset_uses_the_subset_block_of_the_hessian():
    model, ds, x, y = make_problem(4)
    _, H, _ = explicit(model, x, y)
    op = CurvatureOperator(model, ClassificationTask(), params="2.*")  # last layer only
    assert op.names == ["2.weight", "2.bias"]
    P = op.num_params
    block = H[-P:, -P:]
    v = torch.eye(P, dtype=torch.float64)[:4]
    torch.testing.assert_close(op.matvec((x, y), v), v @ block.T, rtol=1e-9, atol=1e-10)
    assert CurvatureOperator(model, ClassificationTask(), params="last_layer").names == ["2.weight", "2.bias"]
    with pytest.raises(PatternError, match=r"CurvatureOperator\(params=\.\.\.\): pattern 'nope\.\*' matches no trainable parameter"):
        CurvatureOperator(model, ClassificationTask(), params="nope.*")
    with pytest.raises(PatternError, match=r"LiSSAOptions\(params=\.\.\.\): pattern 'nope\.\*' matches no trainable parameter; available: 0\.weight, 0\.bias, 2\.weight, 2\.bias"):
        lissa_inverse_hvp(model, torch.zeros(1, 4), ds, LiSSAOptions(params="nope.*"))
    with pytest.raises(InvalidArgumentError, match=r"CurvatureOperator\(curvature=\.\.\.\) must be one of 'hessian', 'ggn', got 'fisher'"):
        CurvatureOperator(model, ClassificationTask(), curvature="fisher")


def test_per_example_grads_match_loop():
    model, ds, x, y = make_problem(5)
    _, _, grads = explicit(model, x, y)
    op = CurvatureOperator(model, ClassificationTask())
    g = op.per_example_grads((torch.arange(N), (x, y)))
    torch.testing.assert_close(g, grads, rtol=1e-10, atol=1e-12)


def test_divergence_raises_and_names_scale():
    model, ds, x, y = make_problem(6)
    _, H, grads = explicit(model, x, y)
    lam_max = float(torch.linalg.eigvalsh(H).max())
    damping = 0.01
    with pytest.raises(LiSSADivergenceError, match="raise `scale`") as info:
        lissa_inverse_hvp(model, grads[:3], ds, LiSSAOptions(sample_size=N, damping=damping, scale=lam_max / 10, depth=200))
    err = info.value
    assert err.parameter == "scale" and err.scale == pytest.approx(lam_max / 10)
    assert err.suggested_scale >= lam_max + damping  # the suggestion is large enough
    assert err.step < 200


def test_tolerance_stops_early_and_argument_validation():
    A = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    v = torch.ones(2, 3, dtype=torch.float64)
    res = lissa_recursion(lambda h, step: h @ A, v, damping=0.5, scale=4.0, depth=1000, tol=1e-8)
    exact = v / (torch.diag(A) + 0.5)
    torch.testing.assert_close(res.estimate, exact, rtol=1e-6, atol=0)
    assert res.converged == [True] and res.steps[0] < 1000
    assert float(res.rel_change[0][-1]) < 1e-8
    with pytest.raises(ValueError, match=r"lissa_recursion\(scale=\.\.\.\) must be a finite float > 0, got -1"):
        lissa_recursion(lambda h, s: h, v, damping=0.1, scale=-1, depth=3)
    with pytest.raises(ValueError, match=r"lissa_recursion\(depth=\.\.\.\) must be a positive int, got 0"):
        lissa_recursion(lambda h, s: h, v, damping=0.1, scale=1.0, depth=0)
    with pytest.raises(ValueError, match=r"lissa_recursion\(damping=\.\.\.\) must be a finite float >= 0, got -0.5"):
        lissa_recursion(lambda h, s: h, v, damping=-0.5, scale=1.0, depth=3)
    with pytest.raises(ValueError, match=r"lissa_recursion\(tol=\.\.\.\) must be a finite float > 0 or None, got 0"):
        lissa_recursion(lambda h, s: h, v, damping=0.5, scale=1.0, depth=3, tol=0)


PEAK_CODE = """
import sys, time, torch
import lightning_influence.lissa as L
assert not any(m == 'lightning' or m.startswith(('lightning.', 'pytorch_lightning')) for m in sys.modules), 'lightning imported'
big = torch.ones(256 * 2**20 // 4)  # 256 MiB, touched: the process's peak is now well above what follows
del big
with L.PeakMemory(reset_peak={reset}) as m:
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB of float32, touched
    time.sleep(0.05)
    del x
print(m.method, m.peak_bytes)
"""


@pytest.mark.parametrize("reset", [True, False])
def test_core_imports_no_lightning_and_peak_memory_sees_an_allocation_below_an_earlier_peak(reset):
    """The 64 MiB block is seen although the process peaked at 256 MiB before (a rise of the
    peak would report 0): by the kernel's high-water mark after a reset, or by sampling."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", PEAK_CODE.format(reset=reset)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    method, peak = out.stdout.split()
    if sys.platform.startswith("linux"):
        # without the reset it samples; a kernel that refuses the reset falls back to sampling too
        assert method == "linux_vmrss_sampled" if not reset else method in ("linux_vmhwm", "linux_vmrss_sampled")
        assert 60 * 2**20 <= int(peak) <= 100 * 2**20, (method, peak)


def test_per_vector_early_stopping_stops_each_vector_on_its_own():
    """Diagonal curvature: a vector in a stiff direction converges in a few steps, one in a flat
    direction needs many; each stops when its own change is below tol, the product then sees
    only the running rows, and every estimate equals that vector run alone."""
    diag = torch.tensor([1.0, 0.05], dtype=torch.float64)
    rows_seen = []

    def product(h, step):
        rows_seen.append(h.shape[0])
        return h * diag

    v = torch.eye(2, dtype=torch.float64)
    kw = dict(damping=0.01, scale=2.0, depth=2000, tol=1e-6, criterion="quadratic")
    res = lissa_recursion(product, v, **kw)
    fast, slow = res.vector_steps[0].tolist()
    assert fast < 60 < 250 < slow < 2000 and res.steps == [slow] and res.converged == [True]
    assert rows_seen[:fast] == [2] * fast and set(rows_seen[fast:]) == {1} and len(rows_seen) == slow
    exact = v / (diag + 0.01)
    torch.testing.assert_close(res.estimate, exact, rtol=1e-4, atol=0)
    for i in range(2):
        alone = lissa_recursion(product, v[i : i + 1], **kw)
        assert alone.vector_steps[0].tolist() == [res.vector_steps[0][i].item()]
        torch.testing.assert_close(alone.estimate[0], res.estimate[i], rtol=0, atol=0)
    assert res.mean_vector_steps == pytest.approx((fast + slow) / 2)


def test_quadratic_criterion_is_reachable_under_minibatch_noise_where_the_norm_is_not():
    """Noisy curvature ``H_t = H + E_t``: the norm's relative change levels off at the noise and
    never reaches 3e-3; the quadratic form's does, and stops near the exact ``vᵀ(H + λI)⁻¹v``."""
    g = torch.Generator().manual_seed(0)
    P = 30
    q = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))[0]
    H = q @ torch.diag(torch.linspace(0.2, 1.0, P, dtype=torch.float64)) @ q.T
    noise = [0.02 * (lambda e: (e + e.T) / 2)(torch.randn(P, P, generator=g, dtype=torch.float64)) for _ in range(500)]

    def product(h, step):
        return h @ (H + noise[step % 500])

    v = torch.randn(8, P, generator=g, dtype=torch.float64)
    kw = dict(damping=0.1, scale=2.0, depth=400, tol=3e-3)
    by_norm = lissa_recursion(product, v, criterion="norm", **kw)
    by_form = lissa_recursion(product, v, criterion="quadratic", **kw)
    assert by_norm.converged == [False] and int(by_norm.vector_steps[0].min()) == 400
    assert by_form.converged == [True] and float(by_form.vector_steps[0].double().mean()) < 100
    exact = (v * torch.linalg.solve(H + 0.1 * torch.eye(P, dtype=torch.float64), v.T).T).sum(1)
    est = (v * by_form.estimate).sum(1)
    assert float(((est - exact) / exact).abs().max()) < 0.05


def test_auto_damping_and_scale_follow_the_curvature():
    """With every step's mini-batch the whole pool, ``H_t = H``: ``damping="auto"`` is
    ``0.1 · λ_max(H)`` and ``scale="auto"`` ``3 · (λ_max + damping)`` (``λ_max`` by power
    iteration); both reported."""
    model, ds, x, y = make_problem(7)
    _, H, grads = explicit(model, x, y)
    top = float(torch.linalg.eigvalsh(H).abs().max())
    opts = LiSSAOptions(sampler=RandomSampler(sample_size=N), depth=5)
    assert opts.damping == "auto" and opts.scale == "auto" and LiSSAOptions().damping == "auto"
    res = self_influence(model, [(torch.arange(4), (x[:4], y[:4]))], ds, opts)
    # power iteration approaches the top eigenvalue from below; it stops once it changes by < 2%
    assert 0.9 * 0.1 * top <= res.meta["damping"] <= 0.1 * top * (1 + 1e-9)
    assert 0.9 * 3 * 1.1 * top <= res.meta["scale"] <= 3 * 1.1 * top * (1 + 1e-9)
    assert 3 * 2 <= res.meta["auto_products"] <= 3 * 8  # 3 mini-batches, 2 to 8 iterations each
    assert res.options["damping"] == "auto"
    fixed = self_influence(model, [(torch.arange(4), (x[:4], y[:4]))], ds, dataclasses.replace(opts, damping=0.25, scale=9.0))
    assert fixed.meta["damping"] == 0.25 and fixed.meta["scale"] == 9.0


def test_default_depth_is_a_truncated_series_between_its_closed_form_bound_and_the_exact_inverse():
    """At the default depth the recursion need not converge: with positive semi-definite curvature
    (GGN) and the whole pool every step, the estimate of ``gᵀ(G + λI)⁻¹g`` is the partial sum
    ``Σ_{t<2T} gᵀ(I − A/s)ᵗg / s`` (``A = G + λI``, ``T = depth``: the quadratic recursion
    reaches order ``2T − 1`` with ``T`` products), which lies between ``(1 − (1 − λ/s)^{2T})``
    times the exact value and the exact value (dense float64 solve), and ranks the examples like it."""
    model, ds, x, y = make_problem(5)
    theta, _, grads = explicit(model, x, y)
    J = torch.autograd.functional.jacobian(lambda t: ref_logits(t, x), theta)  # [N, C, P]
    p = torch.softmax(ref_logits(theta, x), -1)
    G = torch.einsum("ncp,ncd,ndq->pq", J, torch.diag_embed(p) - p[:, :, None] * p[:, None, :], J) / N
    depth = LiSSAOptions().depth
    assert depth == 20
    opts = LiSSAOptions(sampler=RandomSampler(sample_size=N), curvature="ggn", tol=None)
    res = self_influence(model, [(torch.arange(N), (x, y))], ds, opts)
    lam, s = res.meta["damping"], res.meta["scale"]
    A = G + lam * torch.eye(G.shape[0], dtype=G.dtype)
    exact = (grads * torch.linalg.solve(A, grads.T).T).sum(1)
    M, term, partial = torch.eye(G.shape[0], dtype=G.dtype) - A / s, grads.T.clone(), torch.zeros_like(grads.T)
    for _ in range(2 * depth):
        partial += term
        term = M @ term
    series = (grads * partial.T).sum(1) / s
    torch.testing.assert_close(res.self_influence, series, rtol=1e-8, atol=1e-12)
    floor = 1 - (1 - lam / s) ** (2 * depth)
    assert 0.3 < floor < 1  # the default does not converge on this problem: the bound is not trivial
    assert bool((res.self_influence >= floor * exact * (1 - 1e-9)).all()) and bool((res.self_influence <= exact * (1 + 1e-9)).all())
    assert spearmanr(res.self_influence, exact)[0] > 0.95


def test_estimate_scale_finds_the_largest_curvature_eigenvalue():
    from lightning_influence.lissa import estimate_scale

    model, ds, x, y = make_problem(7)
    _, H, _ = explicit(model, x, y)
    top = float(torch.linalg.eigvalsh(H).abs().max())
    s = estimate_scale(model, ds, LiSSAOptions(sampler=RandomSampler(sample_size=N), damping=0.1), n_batches=1, iters=200,
                       safety=1.0, tol=None)
    assert s == pytest.approx(top + 0.1, rel=0.01)
    # the default early stop (< 2% change) costs accuracy from below only, which the safety factor 1.5 covers
    early = estimate_scale(model, ds, LiSSAOptions(sampler=RandomSampler(sample_size=N), damping=0.1), n_batches=1, safety=1.0)
    assert 0.9 * (top + 0.1) <= early <= (top + 0.1) * (1 + 1e-9)
    # mini-batches of 8 have larger extremes than the full batch
    assert estimate_scale(model, ds, LiSSAOptions(sample_size=8, damping=0.0), n_batches=5, iters=50, safety=1.0) > top
    with pytest.raises(InvalidArgumentError, match=r"estimate_scale\(safety=\.\.\.\) must be a finite float >= 1, got 0.5"):
        estimate_scale(model, ds, safety=0.5)


WEIGHTS = (1.0, 2.0, 3.0)


class OwnLossNet(nn.Module):
    """A module with its own loss, a class-weighted squared error ``sum_c w_c (f(x)_c - [y = c])^2``:
    its output Hessian is ``2 diag(w)``, unlike the default cross-entropy's."""

    def __init__(self, with_outputs_loss: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(D_IN, HID), nn.Tanh(), nn.Linear(HID, C)).double()
        self.with_outputs_loss = with_outputs_loss

    def forward(self, x):
        return self.net(x)

    def per_example_loss(self, batch):
        x, y = batch
        return _weighted_se(self(x), y)


class OwnLossAndOutputsNet(OwnLossNet):
    def loss_from_outputs(self, outputs, batch):
        return _weighted_se(outputs, batch[1])


def _weighted_se(out, y):
    w = torch.tensor(WEIGHTS, dtype=out.dtype)
    return (w * (out - F.one_hot(y, C).to(out.dtype)) ** 2).sum(-1)


def test_ggn_of_a_module_with_its_own_loss_matches_explicit_ggn():
    from lightning_influence.task import resolve_task

    _, _, x, y = make_problem(8)
    model = OwnLossAndOutputsNet()
    task = resolve_task(model)  # the module's per_example_loss and loss_from_outputs
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    v = torch.randn(4, theta.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    J = torch.autograd.functional.jacobian(lambda t: ref_logits(t, x), theta)  # [N, C, P]
    G = 2 * torch.einsum("ncp,c,ncq->pq", J, torch.tensor(WEIGHTS, dtype=torch.float64), J) / N
    gv = CurvatureOperator(model, task, curvature="ggn").matvec((x, y), v)
    torch.testing.assert_close(gv, v @ G.T, rtol=1e-9, atol=1e-10)
    # not the default cross-entropy GGN, and the exact Hessian of the module's own loss
    ce = CurvatureOperator(model, ClassificationTask(), curvature="ggn").matvec((x, y), v)
    assert (ce - gv).norm() > 0.1 * gv.norm()
    H = torch.autograd.functional.hessian(lambda t: _weighted_se(ref_logits(t, x), y).mean(), theta)
    hv = CurvatureOperator(model, task, curvature="hessian").matvec((x, y), v)
    torch.testing.assert_close(hv, v @ H.T, rtol=1e-9, atol=1e-10)
    # end to end: a full-batch GGN LiSSA solve equals the explicit damped inverse
    ds = TensorDataset(x, y)
    top = float(torch.linalg.eigvalsh(G).max())
    damping = 0.2 * top
    opts = LiSSAOptions(sampler=RandomSampler(sample_size=N), curvature="ggn", damping=damping, scale=1.1 * (top + damping),
                        depth=500, tol=1e-10)
    res = lissa_inverse_hvp(model, v, ds, opts)
    exact = torch.linalg.solve(G + damping * torch.eye(G.shape[0], dtype=G.dtype), v.T).T
    assert all(res.converged) and res.total_steps < 500
    torch.testing.assert_close(res.estimate, exact, rtol=1e-6, atol=1e-8)


def test_ggn_needs_the_loss_as_a_function_of_the_outputs():
    import warnings

    from lightning_influence.task import resolve_task

    _, ds, x, y = make_problem(9)
    model = OwnLossNet()  # per_example_loss only
    task = resolve_task(model)
    v = torch.ones(2, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # raised before any vmap, so no "looping instead" fallback warning
        with pytest.raises(NotImplementedError, match=r"defines its own per_example_loss.*define loss_from_outputs\(outputs, batch\)"):
            CurvatureOperator(model, task, curvature="ggn").matvec((x, y), v)
        with pytest.raises(InvalidArgumentError, match=r"OwnLossNet defines its own per_example_loss.*loss_from_outputs"):
            lissa_inverse_hvp(model, v, ds, LiSSAOptions(curvature="ggn", sample_size=8, depth=3))  # refused at setup
    # the exact Hessian needs only the per-example loss
    H = torch.autograd.functional.hessian(lambda t: _weighted_se(ref_logits(t, x), y).mean(), torch.cat(
        [p.detach().reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(CurvatureOperator(model, task).matvec((x, y), v), v @ H.T, rtol=1e-9, atol=1e-10)

    class BareTask:  # the two required methods only
        def example_ids(self, batch):
            return None

        def per_example_loss(self, model, batch):
            return F.cross_entropy(model(batch[0]), batch[1], reduction="none")

    with pytest.raises(InvalidArgumentError, match=r"curvature='ggn'.*lacks \['logits', 'loss_from_outputs'\]"):
        CurvatureOperator(model, BareTask(), curvature="ggn")


def test_scale_auto_is_the_estimate_and_ids_fall_back_to_id_map_or_positions():
    from lightning_influence.lissa import estimate_scale

    model, ds, x, y = make_problem(10)
    auto = LiSSAOptions(sample_size=16, damping=0.2, scale="auto", depth=20, chunk_size=7)
    expected = estimate_scale(model, ds, auto)  # defaults: 3 mini-batches, up to 8 iterations (tol 2%), safety 1.5
    probe = [(x[:10], y[:10]), (x[10:20], y[10:20])]  # no ids in the batches
    res = self_influence(model, probe, ds, auto)
    assert res.meta["scale"] == pytest.approx(expected, rel=1e-12) and res.options["scale"] == "auto"
    assert res.train_ids.tolist() == list(range(20))
    assert res.meta["steps"] == [20, 20, 20]  # chunks of 7, 7, 6
    fixed = self_influence(model, probe, ds, dataclasses.replace(auto, scale=expected), id_map=torch.arange(100, 148))
    assert fixed.train_ids.tolist() == list(range(100, 120))
    torch.testing.assert_close(fixed.self_influence, res.self_influence, rtol=1e-12, atol=0)
    assert bool((res.self_influence > 0).all())


@pytest.mark.parametrize(
    "name, value, accepted",
    [
        ("sampler", "bogus", "one of 'random', 'logit', 'feature', 'feature_topk', 'feature_weighted'"),
        ("sample_size", 0, "a positive int"),
        ("redraw", 1, "True or False"),
        ("n_clusters", -2, "a positive int"),
        ("params", 3, "a glob pattern string or a non-empty list of them.*"),
        ("curvature", "fisher", "one of 'hessian', 'ggn'"),
        ("damping", -1.0, "a finite float >= 0 or .auto."),
        ("damping", float("nan"), "a finite float >= 0 or .auto."),
        ("scale", 0, "a finite float > 0 .*or 'auto'"),
        ("scale", "big", "a finite float > 0 .*or 'auto'"),
        ("depth", 0, "a positive int"),
        ("repeats", 1.5, "a positive int"),
        ("tol", -1.0, "a finite float > 0 or None"),
        ("chunk_size", 0, "a positive int"),
        ("seed", "0", "an int"),
    ],
)
def test_options_validation(name, value, accepted):
    """``accepted``: a regex of what the option takes."""
    message = rf"LiSSAOptions\({name}=\.\.\.\) must be {accepted}, got {re.escape(repr(value))}"
    with pytest.raises(InvalidArgumentError, match=message):
        LiSSAOptions(**{name: value})


def test_options_normal_forms_and_manifest_dict():
    import json

    o = LiSSAOptions(params=("net.0.*", "net.2.*"), scale=3, damping=1, tol=1e-3)
    assert o.params == ["net.0.*", "net.2.*"] and o.scale == 3.0 and isinstance(o.damping, float)
    assert LiSSAOptions(params="last_layer").params == "last_layer"
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.depth = 5
    d = LiSSAOptions(sampler=RandomSampler(sample_size=7, redraw=False), scale="auto").as_dict()
    assert d["sampler"] == {"name": "random", "redraw": False, "sample_size": 7} and d["scale"] == "auto"
    assert json.loads(json.dumps(d)) == d
    assert set(d) == {"sampler", "sample_size", "redraw", "n_clusters", "params", "curvature", "damping", "scale", "depth",
                      "repeats", "tol", "chunk_size", "seed", "memory_budget", "time_budget"}
    assert d["memory_budget"] is None and d["time_budget"] == 600.0
    with pytest.raises(InvalidArgumentError, match=r"self_influence\(options=\.\.\.\) must be a LiSSAOptions"):
        self_influence(nn.Linear(2, 2), [], [(torch.zeros(2), 0)], {"depth": 3})
