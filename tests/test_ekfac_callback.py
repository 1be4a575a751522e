"""EKFACInfluence callback against the offline fitter and explicit references."""

from __future__ import annotations

import pytest
import math

import torch
from torch.utils.data import DataLoader, Subset

from lightning_influence import EKFACInfluence, IndexedDataset, load_factors
from lightning_influence.distributed import UnsupportedStrategyError
from lightning_influence.ekfac.fit import fit_covariances, fit_factors, fit_lambdas, resolve_layers
from lightning_influence.task import CausalLMTask, ClassificationTask
from lightning_influence.demos import CausalLMModule, MLPClassifier, synthetic_token_dataset, tiny_causal_lm
from lightning_influence.data import lm_collate
from cases import digits_loader
from ekfac_reference import assert_same_factors
from scaffold import MergedRanks, exact, trainer


def test_mlp_factors_equal_offline_fit_at_fixed_weights(tmp_path):
    torch.manual_seed(0)
    model = MLPClassifier(hidden=16, lr=0.0)
    loader = digits_loader()
    cb = exact(epochs=1, dirpath=str(tmp_path / "ekfac"))
    trainer(tmp_path, cb, max_epochs=2, precision="64-true").fit(model, loader)
    saved = load_factors(tmp_path / "ekfac" / "factors", model=model)
    ref = fit_factors(model, loader)
    assert saved.n_examples == 160 and cb.state.epochs_accumulated == 1
    assert_same_factors(saved, ref)
    # the accumulated S undoes the batch-mean loss: equal to the summed-loss reference
    ref_covs = fit_covariances(model, loader, resolve_layers(model, None), ClassificationTask())
    for n, acc in cb.state.running.items():
        torch.testing.assert_close(acc.s_sum, ref_covs[n].s_sum, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(acc.a_sum, ref_covs[n].a_sum, rtol=1e-10, atol=1e-12)


def test_causal_lm_with_padding_equals_offline_fit(tmp_path):
    model = CausalLMModule(tiny_causal_lm("gpt_neox", vocab_size=24, hidden=16, layers=1, heads=2), lr=0.0)
    data = IndexedDataset(synthetic_token_dataset(24, vocab_size=24, min_len=3, max_len=9))
    loader = DataLoader(data, batch_size=6, collate_fn=lm_collate)
    cb = exact(exclude="*lm_head", dirpath=str(tmp_path / "ekfac"))
    trainer(tmp_path, cb, precision="64-true").fit(model, loader)
    saved = load_factors(tmp_path / "ekfac" / "factors", model=model)
    assert "model.lm_head" not in saved.layers and len(saved.layers) == 4
    ref = fit_factors(model, loader, layers=list(saved.layers), task=CausalLMTask())
    # transformers computes its training loss from logits.float(), i.e. in float32 even for a
    # float64 model, so the training-pass gradients carry float32 rounding (~1e-7 relative)
    assert_same_factors(saved, ref, rtol=1e-7)
    n_tokens = sum(len(s["input_ids"]) for _, s in data)
    assert next(iter(cb.state.running.values())).a_tokens == n_tokens


def test_gradient_accumulation_gives_summed_loss_s(tmp_path):
    torch.manual_seed(0)
    model = MLPClassifier(hidden=8, lr=0.0)
    loader = digits_loader(n=96, batch_size=16)
    cb = exact(correction="none", dirpath=str(tmp_path / "f"))
    trainer(tmp_path, cb, precision="64-true", accumulate_grad_batches=2).fit(model, loader)
    ref = fit_covariances(model, loader, resolve_layers(model, None), ClassificationTask())
    for n, acc in cb.state.running.items():
        torch.testing.assert_close(acc.s_sum, ref[n].s_sum, rtol=1e-10, atol=1e-12)


def test_grad_scaler_is_undone(tmp_path):
    from lightning.pytorch.plugins.precision import MixedPrecision

    torch.manual_seed(0)
    model = MLPClassifier(hidden=8, lr=0.0)
    loader = digits_loader(n=64, batch_size=16, dtype=torch.float32)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=10_000)
    plugin = MixedPrecision("bf16-mixed", "cpu", scaler=None)
    plugin.scaler = scaler  # a scaler at a known scale (Lightning only pairs one with fp16 on GPUs)
    cb = exact(correction="none", dirpath=str(tmp_path / "f"))
    trainer(tmp_path, cb, plugins=[plugin]).fit(model, loader)
    assert scaler.get_scale() == 1024.0
    ref = fit_covariances(model, loader, resolve_layers(model, None), ClassificationTask())
    for n, acc in cb.state.running.items():
        assert acc.s_sum.dtype == torch.float32
        # bf16 autocast changes the numbers slightly; a missed 1024x scale would be off by 10^6
        torch.testing.assert_close(acc.s_sum, ref[n].s_sum.float(), rtol=5e-2, atol=1e-3)


def test_validation_and_sanity_check_do_not_count(tmp_path):
    torch.manual_seed(0)
    model = MLPClassifier(hidden=8, lr=0.0)
    train = digits_loader(n=64, batch_size=16)
    val = digits_loader(n=48, batch_size=16)
    cb = exact(correction="none", dirpath=str(tmp_path / "f"))
    trainer(tmp_path, cb, max_epochs=2, precision="64-true", num_sanity_val_steps=2, val_check_interval=2).fit(model, train, val)
    ref = fit_covariances(model, train, resolve_layers(model, None), ClassificationTask())
    for n, acc in cb.state.running.items():
        assert acc.examples == 2 * 64 and acc.a_tokens == 2 * 64
        torch.testing.assert_close(acc.a_sum, 2 * ref[n].a_sum)
        torch.testing.assert_close(acc.s_sum, 2 * ref[n].s_sum)


def test_last_k_epochs_and_update_every_n_steps(tmp_path):
    torch.manual_seed(0)
    model = MLPClassifier(hidden=8, lr=0.0)
    loader = digits_loader(n=64, batch_size=16)
    cb = exact(epochs=2, update_every_n_steps=2, max_examples_per_update=10, correction="none", dirpath=str(tmp_path / "f"))
    trainer(tmp_path, cb, max_epochs=3, precision="64-true").fit(model, loader)
    # 2 epochs × 2 updating batches (0 and 2) × 10 examples
    for acc in cb.state.running.values():
        assert acc.examples == 40 and acc.a_tokens == 40
    first10 = DataLoader(Subset(loader.dataset, [i for s in (0, 32) for i in range(s, s + 10)]), batch_size=10)
    ref = fit_covariances(model, first10, resolve_layers(model, None), ClassificationTask())
    for n, acc in cb.state.running.items():
        torch.testing.assert_close(acc.a_sum, 2 * ref[n].a_sum)


def test_resume_equals_uninterrupted(tmp_path):
    """At a non-zero learning rate (lr=0 cannot tell a state that is saved but not restored from
    one that is): the resumed run's sums and factors are bit-identical to the uninterrupted run's."""

    def make():
        torch.manual_seed(0)
        return MLPClassifier(hidden=8, lr=0.3).double()  # float64 before fit: Lightning restores weights before converting

    loader = digits_loader(n=64, batch_size=16)
    full_cb = exact(dirpath=str(tmp_path / "full"))
    trainer(tmp_path / "a", full_cb, max_epochs=3, precision="64-true").fit(make(), loader)

    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    first = exact(dirpath=str(tmp_path / "part"))
    trainer(tmp_path / "b", first, max_epochs=2, precision="64-true", enable_checkpointing=True, callbacks=[first, ckpt]).fit(make(), loader)
    resumed = exact(dirpath=str(tmp_path / "resumed"))
    trainer(tmp_path / "c", resumed, max_epochs=3, precision="64-true").fit(make(), loader, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    for n in full_cb.state.running:
        assert resumed.state.running[n].examples == full_cb.state.running[n].examples == 3 * 64
        assert torch.equal(resumed.state.running[n].a_sum, full_cb.state.running[n].a_sum)
        assert torch.equal(resumed.state.running[n].s_sum, full_cb.state.running[n].s_sum)
    a, b = load_factors(tmp_path / "resumed" / "factors"), load_factors(tmp_path / "full" / "factors")
    for n in a.layer_names:
        for k in ("q_a", "eig_a", "q_s", "eig_s", "lambdas"):
            assert torch.equal(getattr(a.layers[n], k), getattr(b.layers[n], k)), (n, k)
    # and the first part alone differs: the resumed run really continued from its state
    assert not torch.equal(first.state.running["net.0"].a_sum, full_cb.state.running["net.0"].a_sum)


def test_online_correction_needs_no_pass_and_matches_at_fixed_weights(tmp_path):
    torch.manual_seed(0)
    model = MLPClassifier(hidden=8, lr=0.0)
    loader = digits_loader(n=64, batch_size=16)
    cb = exact(correction="online", dirpath=str(tmp_path / "f"))
    trainer(tmp_path, cb, max_epochs=2, precision="64-true").fit(model, loader)
    saved = load_factors(tmp_path / "f" / "factors")
    assert saved.n_lambda_examples == 64
    # at fixed weights the previous epochs' basis is the final one, so Λ equals the offline fit's
    ref = fit_factors(model, loader)
    assert_same_factors(saved, ref)


@pytest.mark.slow
def test_ddp_with_uneven_data_counts_every_example_once(tmp_path):
    """Two processes, 63 examples, lr > 0: the DistributedSampler pads rank 1 with a duplicate of
    another example every epoch. The factors must equal one process's over the same optimizer
    steps with that duplicate left out (its position is known from the sampler's own index
    lists), and the correction pass must use the 63 examples once each."""
    n, batch = 63, 8
    data = digits_loader(n=n).dataset
    torch.manual_seed(0)
    ddp_model = MLPClassifier(hidden=8, lr=0.5).double()
    single_model = MLPClassifier(hidden=8, lr=0.5).double()
    single_model.load_state_dict(ddp_model.state_dict())
    ddp = exact(dirpath=str(tmp_path / "ddp"))
    trainer(tmp_path / "d", ddp, max_epochs=2, precision="64-true", strategy="ddp_spawn", devices=2).fit(
        ddp_model, DataLoader(data, batch_size=batch))

    order = MergedRanks(n, batch)
    last = (len(order.ranks()[0]) - 1) // batch
    for epoch in range(2):  # each epoch the duplicate is rank 1's last example: position 15 of the last merged batch
        order.set_epoch(epoch)
        r = order.ranks()
        assert len(set(r[0] + r[1])) == n and r[1][-1] == r[0][0] and len(r[1]) == 32

    class LeaveOutTheDuplicate(EKFACInfluence):
        def padded_positions(self, trainer, batch_size):
            self.seen = getattr(self, "seen", -1) + 1
            return [2 * batch - 1] if self.seen % (last + 1) == last else []

    ref = LeaveOutTheDuplicate(update_every_n_steps=1, correction="none", dirpath=str(tmp_path / "one"))
    trainer(tmp_path / "s", ref, max_epochs=2, precision="64-true").fit(
        single_model, DataLoader(data, batch_size=2 * batch, sampler=MergedRanks(n, batch)))
    for p, q in zip(ddp_model.parameters(), single_model.parameters()):  # the same optimizer steps
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)

    saved, one = load_factors(tmp_path / "ddp" / "factors"), load_factors(tmp_path / "one" / "factors")
    assert saved.n_examples == one.n_examples == 2 * n and saved.n_lambda_examples == n
    eigen = {}
    for name, f in saved.layers.items():
        g = one.layers[name]
        for q, e in (("q_a", "eig_a"), ("q_s", "eig_s")):
            cov_ddp = getattr(f, q) @ torch.diag(getattr(f, e)) @ getattr(f, q).T
            cov_one = getattr(g, q) @ torch.diag(getattr(g, e)) @ getattr(g, q).T
            torch.testing.assert_close(cov_ddp, cov_one, rtol=1e-9, atol=1e-12)
        eigen[name] = f
    lam = fit_lambdas(ddp_model, DataLoader(data, batch_size=16), resolve_layers(ddp_model, None), eigen, ClassificationTask())
    for name, f in saved.layers.items():
        torch.testing.assert_close(f.lambdas, lam[name].mean(), rtol=1e-9, atol=1e-12)


def test_true_fisher_and_argument_validation(tmp_path):
    torch.manual_seed(0)
    model = MLPClassifier(hidden=8, lr=0.0)
    loader = digits_loader(n=64, batch_size=16)
    cb = exact(fisher="true", dirpath=str(tmp_path / "f"), seed=3)
    trainer(tmp_path, cb, precision="64-true").fit(model, loader)
    emp = fit_covariances(model, loader, resolve_layers(model, None), ClassificationTask())
    for n, acc in cb.state.running.items():
        assert acc.examples == 64
        torch.testing.assert_close(acc.a_sum, emp[n].a_sum)  # same inputs
    last = model.net[2].weight.shape[0]
    # sampled-label output gradients of a softmax layer sum to zero per example, like true ones
    assert cb.state.running["net.2"].s_sum.sum().abs() < 1e-8 * last
    for bad, match in [(dict(fisher="exact"), "fisher"), (dict(update_every_n_steps=0), "update_every_n_steps"),
                       (dict(epochs=0), "epochs"), (dict(ema_decay=1.5), "ema_decay"), (dict(correction="x"), "correction"),
                       (dict(damping=float("nan")), "damping"), (dict(layers=123), "layers"), (dict(exclude=5), "exclude"),
                       (dict(seed="a"), "seed"), (dict(dirpath=123), "dirpath"), (dict(probe="train"), "probe"),
                       (dict(name=".."), "name"), (dict(name="a/b"), "name")]:
        with pytest.raises(ValueError, match=match):
            EKFACInfluence(**bad)


def test_deepspeed_is_refused(tmp_path):
    class DeepSpeedStrategy:  # stands in for lightning's DeepSpeedStrategy (deepspeed is not installed);
        pass                  # FSDP and FSDP2 are supported: tests/test_fsdp_*.py

    cb = EKFACInfluence()
    fake = type("T", (), {"strategy": DeepSpeedStrategy(), "loggers": [], "default_root_dir": str(tmp_path)})()
    with pytest.raises(UnsupportedStrategyError, match="DeepSpeedStrategy"):
        cb.setup(fake, MLPClassifier(), "fit")


def test_probe_self_influence_is_logged_and_saved(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    from lightning_influence.ekfac.scorer import InfluenceScorer
    from lightning_influence.scores import load_scores

    torch.manual_seed(0)
    model = MLPClassifier(hidden=8, lr=0.1)
    loader = digits_loader(n=64, batch_size=16)
    probe = Subset(loader.dataset, range(0, 64, 2))
    cb = EKFACInfluence(probe=probe, probe_batch_size=7, top_k=3)
    t = trainer(tmp_path, cb, precision="64-true", logger=CSVLogger(str(tmp_path), name="run"))
    t.fit(model, loader)
    saved = load_factors(tmp_path / "run" / "version_0" / "influence" / "ekfac" / "factors", model=model)
    ref = InfluenceScorer(model, saved).self_influence(DataLoader(probe, batch_size=5)).self_influence
    scores = load_scores(tmp_path / "run" / "version_0" / "influence" / "ekfac" / "self_influence")
    assert scores.method == "ekfac" and scores.epoch == 0
    assert scores.train_ids.tolist() == list(range(0, 64, 2))
    torch.testing.assert_close(scores.self_influence.double(), ref, rtol=1e-5, atol=1e-6)
    top = [i for i, _ in scores.top_self(3)]
    assert top == [int(probe.indices[j]) for j in torch.topk(ref, 3).indices]
    assert t.callback_metrics["influence/ekfac/top1_id"].item() == top[0]
    metrics = (tmp_path / "run" / "version_0" / "metrics.csv").read_text()
    assert "influence/ekfac/self_mean" in metrics and "influence/ekfac/top3_id" in metrics


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpoint_recomputation_counts_once(tmp_path, reentrant):
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(MLPClassifier):
        def forward(self, x):
            h = checkpoint(lambda t: torch.tanh(self.net[0](t)), x.requires_grad_(reentrant), use_reentrant=reentrant)
            return self.net[2](h)

    torch.manual_seed(0)
    model = Checkpointed(hidden=8, lr=0.0)
    loader = digits_loader(n=48, batch_size=16)
    cb = exact(correction="none", dirpath=str(tmp_path / "f"))
    trainer(tmp_path, cb, precision="64-true").fit(model, loader)
    plain = MLPClassifier(hidden=8).double()
    plain.load_state_dict(model.state_dict())
    ref = fit_covariances(plain, loader, resolve_layers(plain, None), ClassificationTask())
    for n, acc in cb.state.running.items():
        assert acc.examples == 48 and acc.a_tokens == 48
        torch.testing.assert_close(acc.a_sum, ref[n].a_sum)
        torch.testing.assert_close(acc.s_sum, ref[n].s_sum)


def test_default_subsampling_and_correction_cap(tmp_path):
    """``update_every_n_steps="auto"``: the layers' update work ``Σ(a² + o²)`` = 65² + 8² + 9² + 10²
    = 4470 multiply-adds per token against a training step's ``6·P`` = 6·610: every 13th step
    keeps the updates at 10% of training, lowered to 20 // 8 = 2 so the 20-step run gets 8+
    updates: batches 0, 2, …, 18."""
    torch.manual_seed(0)
    model = MLPClassifier(hidden=8, lr=0.0)
    assert sum(p.numel() for p in model.parameters()) == 610
    loader = digits_loader(n=320, batch_size=16)  # 20 batches
    cb = EKFACInfluence(correction_max_examples=40, dirpath=str(tmp_path / "f"))
    trainer(tmp_path, cb, precision="64-true").fit(model, loader)
    saved = load_factors(tmp_path / "f" / "factors")
    assert cb.options.update_every_n_steps == 2 and saved.meta["options"]["update_every_n_steps_auto"] is True
    assert saved.n_examples == 10 * 16
    assert saved.n_lambda_examples == 48  # 3 batches of 16 reach the cap of 40 (before the adaptive minimum of 64)
    assert saved.meta["options"]["correction_used"] == "pass" and cb.hook_seconds > 0
    assert saved.meta["options"]["eigh_dtype"] == "auto" and saved.meta["options"]["correction_tol"] == 0.2
    updated = DataLoader(Subset(loader.dataset, [i for b in range(0, 20, 2) for i in range(16 * b, 16 * b + 16)]), batch_size=16)
    ref = fit_covariances(model, updated, resolve_layers(model, None), ClassificationTask())
    for n, acc in cb.state.running.items():
        torch.testing.assert_close(acc.a_sum, ref[n].a_sum)


def test_auto_update_schedule_follows_cost_and_run_length():
    """The closed form on GPT-2 small's shapes: 12 blocks of (769² + 2304²) + (769² + 768²) +
    (769² + 3072²) + (3073² + 768²) against 6 × 124,439,808 parameters → every 5th step at 10%
    overhead; a 30-step run is lowered to 30 // 8 = 3; a tiny model in a long run updates at
    its own rate."""
    from lightning_influence.ekfac.training import resolve_update_every

    shapes = [(769, 2304), (769, 768), (769, 3072), (3073, 768)] * 12
    layers = [type("L", (), {"a_dim": a, "d_out": o})() for a, o in shapes]
    work = sum(a * a + o * o for a, o in shapes)
    assert resolve_update_every(layers, 124_439_808, None) == math.ceil(work / (6 * 124_439_808 * 0.1)) == 5
    assert resolve_update_every(layers, 124_439_808, 30) == 3
    assert resolve_update_every(layers, 124_439_808, 5) == 1
    assert resolve_update_every(layers, 124_439_808, 10_000) == 5
    with pytest.raises(ValueError, match="update_every_n_steps"):
        EKFACInfluence(update_every_n_steps=0)


def test_online_correction_without_an_earlier_basis_warns_and_says_so(tmp_path):
    with pytest.raises(ValueError, match="epochs=1"):
        EKFACInfluence(correction="online", epochs=1)
    torch.manual_seed(0)
    model = MLPClassifier(hidden=8, lr=0.0)
    cb = exact(correction="online", dirpath=str(tmp_path / "f"))
    with pytest.warns(UserWarning, match="running a correction pass instead"):
        trainer(tmp_path, cb, max_epochs=1, precision="64-true").fit(model, digits_loader(n=32, batch_size=16))
    assert load_factors(tmp_path / "f" / "factors").meta["options"]["correction_used"] == "pass"


def test_update_gating_counts_batches_over_the_whole_run(tmp_path):
    """Every 8th training batch of the run, not of each epoch: with 19 unshuffled batches per
    epoch, 3 epochs give batches 0, 8, ..., 56 of the run (8 updates over different examples),
    not batches 0, 8, 16 of every epoch (9 updates over the same examples)."""
    torch.manual_seed(0)
    model = MLPClassifier(hidden=8, lr=0.0)
    loader = digits_loader(n=19 * 16, batch_size=16)
    cb = EKFACInfluence(correction="none", update_every_n_steps=8, dirpath=str(tmp_path / "f"))
    trainer(tmp_path, cb, max_epochs=3, precision="64-true").fit(model, loader)
    run_batches = range(0, 3 * 19, 8)
    local = [b % 19 for b in run_batches]
    assert local == [0, 8, 16, 5, 13, 2, 10, 18]
    rows = [i for b in local for i in range(16 * b, 16 * b + 16)]
    ref = fit_covariances(model, DataLoader(Subset(loader.dataset, rows), batch_size=16), resolve_layers(model, None), ClassificationTask())
    for n, acc in cb.state.running.items():
        assert acc.examples == 8 * 16
        torch.testing.assert_close(acc.a_sum, ref[n].a_sum)
        torch.testing.assert_close(acc.s_sum, ref[n].s_sum)


def test_unmatched_exclude_pattern_raises_and_names_the_layers(tmp_path):
    from lightning_influence.layers import LayerSelectionError

    cb = EKFACInfluence(exclude="*lm_head", dirpath=str(tmp_path / "f"))
    with pytest.raises(LayerSelectionError, match=r"'\*lm_head' matches no supported layer.*net\.0, net\.2"):
        trainer(tmp_path, cb).fit(MLPClassifier(hidden=8), digits_loader(n=32, dtype=torch.float32))


def test_update_gating_counts_from_the_first_contributing_epoch(tmp_path):
    """``epochs=1`` of a 3-epoch run with 7 batches per epoch and ``update_every_n_steps=16``:
    the count starts with the last epoch, so its first batch contributes (counted over the whole
    run, batches 14..20 hold no multiple of 16 and nothing would be accumulated)."""
    torch.manual_seed(0)
    model = MLPClassifier(hidden=8, lr=0.0)
    loader = digits_loader(n=7 * 16, batch_size=16)
    cb = EKFACInfluence(correction="none", update_every_n_steps=16, epochs=1, dirpath=str(tmp_path / "f"))
    trainer(tmp_path, cb, max_epochs=3, precision="64-true").fit(model, loader)
    ref = fit_covariances(model, DataLoader(Subset(loader.dataset, range(16)), batch_size=16), resolve_layers(model, None), ClassificationTask())
    for n, acc in cb.state.running.items():
        assert acc.examples == 16
        torch.testing.assert_close(acc.a_sum, ref[n].a_sum)
        torch.testing.assert_close(acc.s_sum, ref[n].s_sum)
