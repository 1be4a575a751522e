"""OnlineFactors (the callback's state machine) driven by a plain PyTorch loop: no Trainer."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lightning_influence.demos import MLPClassifier, digits_dataset
from lightning_influence.ekfac.capture import LayerCapture
from lightning_influence.ekfac.fit import fit_covariances, fit_factors, fit_lambdas
from lightning_influence.ekfac.online import AccumulationOptions, OnlineFactors
from lightning_influence.layers import select_layers
from lightning_influence.task import ClassificationTask
from scaffold import indexed

IDENTITY = lambda t: t  # noqa: E731  (one process: the sum over ranks is the tensor itself)


def setup(n=64, batch_size=16):
    torch.manual_seed(0)
    model = MLPClassifier(hidden=8).double()
    train, _, _ = digits_dataset(dtype=torch.float64)
    loader = DataLoader(indexed(train, n), batch_size=batch_size)
    return model, loader, select_layers(model), ClassificationTask()


def run_epochs(state, model, loader, task, epochs, start=0, total=None):
    """Forward/backward with a batch-mean loss at fixed weights (no optimizer step)."""
    total = total or epochs
    with LayerCapture(state.layers, on_gradient=state.observe) as cap:
        for epoch in range(start, start + epochs):
            state.begin_epoch(epoch, total)
            for batch in loader:
                active, mask = state.begin_batch(batch, task, epoch, total, grad_factor=1.0 / task.gradient_scale(batch))
                cap.enabled, cap.mask = active, mask
                x, y = batch[1]
                F.cross_entropy(model(x), y).backward()
                cap.enabled = False
                state.end_batch()
            state.end_epoch(epoch, total, IDENTITY)


def test_online_state_equals_offline_fit_without_a_trainer():
    model, loader, layers, task = setup()
    state = OnlineFactors(layers, AccumulationOptions(update_every_n_steps=1, correction_max_examples=None, correction_tol=None))
    run_epochs(state, model, loader, task, epochs=2)
    ref = fit_covariances(model, loader, layers, task)
    for n, acc in state.running.items():
        assert acc.examples == 2 * 64 and state.epochs_accumulated == 2
        torch.testing.assert_close(acc.a_sum, 2 * ref[n].a_sum, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(acc.s_sum, 2 * ref[n].s_sum, rtol=1e-12, atol=1e-12)
    factors = state.factors(lambda eigen: fit_lambdas(model, loader, layers, eigen, task), IDENTITY)
    offline = fit_factors(model, loader, layers, task)
    assert state.correction_used == "pass" and factors.n_lambda_examples == 64
    for n in offline.layers:
        g = torch.randn(3, *offline.layers[n].grad_shape, dtype=torch.float64)
        lam = offline.layers[n].damping()
        torch.testing.assert_close(factors.layers[n].precondition(g, lam), offline.layers[n].precondition(g, lam), rtol=1e-8, atol=1e-10)


def test_ema_and_last_k_folding_closed_form():
    model, loader, layers, task = setup()
    ref = fit_covariances(model, loader, layers, task)
    ema = OnlineFactors(layers, AccumulationOptions(update_every_n_steps=1, ema_decay=0.25))
    run_epochs(ema, model, loader, task, epochs=3)
    last = OnlineFactors(layers, AccumulationOptions(update_every_n_steps=1, epochs=2))
    run_epochs(last, model, loader, task, epochs=3)
    for n in ref:
        # fixed weights: every epoch adds X; EMA gives ((X·d + X)·d + X) = (d² + d + 1) X
        torch.testing.assert_close(ema.running[n].a_sum, (0.25 ** 2 + 0.25 + 1) * ref[n].a_sum)
        assert ema.running[n].examples == pytest.approx((0.25 ** 2 + 0.25 + 1) * 64)
        torch.testing.assert_close(last.running[n].s_sum, 2 * ref[n].s_sum)
        assert last.running[n].examples == 2 * 64


def test_uncorrected_factors_are_kfac_and_state_round_trips():
    model, loader, layers, task = setup()
    opts = AccumulationOptions(update_every_n_steps=3, correction="none")
    whole = OnlineFactors(layers, opts)
    run_epochs(whole, model, loader, task, epochs=3)
    # interrupted after one epoch, state saved and loaded into a fresh object, then continued
    first = OnlineFactors(layers, opts)
    run_epochs(first, model, loader, task, epochs=1, total=3)
    resumed = OnlineFactors(layers, opts)
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    run_epochs(resumed, model, loader, task, epochs=2, start=1, total=3)
    assert resumed.batches_seen == whole.batches_seen == 12
    for n in whole.running:
        torch.testing.assert_close(resumed.running[n].a_sum, whole.running[n].a_sum, rtol=0, atol=0)
        assert resumed.running[n].examples == whole.running[n].examples == 4 * 16  # batches 0, 3, 6, 9
    factors = whole.factors(None, IDENTITY)
    assert whole.correction_used == "none"
    for n, f in factors.layers.items():
        torch.testing.assert_close(f.lambdas, torch.outer(f.eig_s, f.eig_a).clamp_min(0))


def test_options_are_validated_with_the_argument_named():
    for bad, match in [(dict(fisher="exact"), "fisher"), (dict(ema_decay=float("nan")), "ema_decay"),
                       (dict(correction="online", epochs=1), "epochs=1"), (dict(update_every_n_steps=True), "update_every_n_steps")]:
        with pytest.raises(ValueError, match=match):
            AccumulationOptions(**bad)
