"""Trajectory segments (EKFACInfluence(segments=S)) and TrajectoryScorer, against float64
references built independently of the callback: factors fitted offline over exactly each
segment's batches at the weights each step saw, brute-force input covariances, and explicit
weighted sums of per-segment InfluenceScorer scores with the weights in closed form."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_influence import EKFACInfluence, InfluenceScorer, load_factors
from lightning_influence.demos import MLPClassifier, digits_dataset
from lightning_influence.ekfac.fit import eigen_from_covariances, factors_from_parts, fit_covariances, fit_lambdas, resolve_layers
from lightning_influence.storage import read_artifact
from lightning_influence.task import ClassificationTask
from lightning_influence.trajectory import SEGMENT_WEIGHTS_KIND, TrajectoryScorer, load_segments
from lightning_influence.validation import InvalidArgumentError

from cases import digits_loader
from ekfac_reference import assert_same_factors
from scaffold import MergedRanks, exact, indexed, trainer

LR0, DECAY = 0.3, 0.5


class DecayingMLP(MLPClassifier):
    """SGD whose learning rate halves every epoch (so segments weigh differently)."""

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lambda e: DECAY ** e)}


class StepWeights(L.Callback):
    """Records the model's parameters before every training step, and the batch (reference only)."""

    def __init__(self):
        self.steps = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append((trainer.current_epoch, copy.deepcopy(pl_module.state_dict()), batch))


def make_model():
    torch.manual_seed(0)
    return DecayingMLP(hidden=8, lr=LR0).double()


def loader(n=64, batch_size=16, shuffle=False, seed=0):
    train, _, _ = digits_dataset(dtype=torch.float64)
    g = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(indexed(train, n), batch_size=batch_size, shuffle=shuffle, generator=g)


def queries():
    _, test, _ = digits_dataset(dtype=torch.float64)
    return DataLoader(indexed(test, 6), batch_size=3)


def fit(root, cb, epochs=5, data=None, extra=(), **kw):
    model = make_model()
    trainer(root, cb, max_epochs=epochs, precision="64-true", callbacks=[cb, *extra], **kw).fit(model, data or loader())
    return model


def test_segments_one_writes_no_segment_and_segments_change_neither_training_nor_the_whole_run_factors(tmp_path):
    """segments=1 is today's callback; with segments=3 the whole-run factors and the trained
    weights are bit-identical, on a shuffled loader (the segment-end correction passes iterate it)."""
    one, three = exact(dirpath=str(tmp_path / "one")), exact(dirpath=str(tmp_path / "three"), segments=3)
    m1 = fit(tmp_path / "a", one, data=loader(shuffle=True))
    m3 = fit(tmp_path / "b", three, data=loader(shuffle=True))
    for p, q in zip(m1.parameters(), m3.parameters()):
        assert torch.equal(p, q)
    assert not list((tmp_path / "one").glob("segment=*"))
    assert sorted(p.name for p in (tmp_path / "three").glob("segment=*")) == ["segment=00", "segment=01", "segment=02"]
    a, b = load_factors(tmp_path / "one" / "factors"), load_factors(tmp_path / "three" / "factors")
    for n in a.layer_names:
        for k in ("q_a", "eig_a", "q_s", "eig_s", "lambdas"):
            assert torch.equal(getattr(a.layers[n], k), getattr(b.layers[n], k)), (n, k)


def test_each_segment_equals_an_offline_fit_over_its_batches_at_the_recorded_weights(tmp_path):
    rec, cb = StepWeights(), exact(dirpath=str(tmp_path / "ekfac"), segments=3)
    data = loader()
    model = fit(tmp_path, cb, data=data, extra=[rec])
    ends = cb.segment_end_epochs(5)
    assert ends == [0, 2, 4]
    ref_model = make_model()
    layers = resolve_layers(ref_model, None)
    first = 0
    for k, last in enumerate(ends):
        steps = [s for s in rec.steps if first <= s[0] <= last]
        covs = None
        for _, state, batch in steps:  # each batch at the weights its training step saw
            ref_model.load_state_dict(state)
            c = fit_covariances(ref_model, [batch], layers, ClassificationTask())
            covs = c if covs is None else {n: covs[n].merge_(c[n]) for n in covs}
        # the segment's end weights: those before the next segment's first step (the final ones for the last)
        after = [s for s in rec.steps if s[0] > last]
        end_state = after[0][1] if after else model.state_dict()
        ref_model.load_state_dict(end_state)
        eigen = eigen_from_covariances(covs)
        lambdas = fit_lambdas(ref_model, data, layers, eigen, ClassificationTask())
        ref = factors_from_parts(layers, eigen, {n: a.mean() for n, a in lambdas.items()}, "empirical",
                                 covs["net.0"].examples, lambdas["net.0"].examples)
        saved = load_factors(tmp_path / "ekfac" / f"segment={k:02d}" / "factors", model=ref_model)  # at the end weights
        assert saved.n_examples == 64 * (last - first + 1)
        assert_same_factors(saved, ref)
        # brute force, no library code: net.0's input covariance is the mean of [x, 1][x, 1]^T over the segment's batches
        x = torch.cat([torch.cat([b[1][0], torch.ones(len(b[1][0]), 1, dtype=torch.float64)], 1) for _, _, b in steps])
        f = saved.layers["net.0"]
        torch.testing.assert_close(f.q_a @ torch.diag(f.eig_a) @ f.q_a.T, x.T @ x / len(x), rtol=1e-9, atol=1e-10)
        # the weights artifact holds the end weights and the segment's record
        tensors, manifest = read_artifact(tmp_path / "ekfac" / f"segment={k:02d}" / "weights", kind=SEGMENT_WEIGHTS_KIND)
        assert sorted(tensors) == ["net.0.bias", "net.0.weight", "net.2.bias", "net.2.weight"]
        for name, t in tensors.items():
            assert torch.equal(t, end_state[name])
        lrs = [LR0 * DECAY ** e for e in range(first, last + 1) for _ in range(4)]  # 4 steps per epoch
        meta = manifest["meta"]
        assert (meta["segment"], meta["first_epoch"], meta["last_epoch"], meta["steps"]) == (k, first, last, len(lrs))
        assert meta["weight"] == pytest.approx(sum(lrs), rel=1e-12)
        first = last + 1


def test_scores_are_the_weighted_sum_of_per_segment_influence_scorer_scores(tmp_path):
    rec, cb = StepWeights(), exact(dirpath=str(tmp_path / "ekfac"), segments=3)
    data = loader()
    model = fit(tmp_path, cb, data=data, extra=[rec])
    # closed-form weights: Σ of the learning rate over each segment's steps (epochs {0}, {1, 2}, {3, 4}; 4 steps each)
    raw = [4 * LR0 * sum(DECAY ** e for e in es) for es in ([0], [1, 2], [3, 4])]
    w = [r / sum(raw) for r in raw]
    end_states = [[s for s in rec.steps if s[0] == e][0][1] for e in (1, 3)] + [model.state_dict()]
    pair = torch.zeros(6, 64, dtype=torch.float64)
    self_inf = torch.zeros(64, dtype=torch.float64)
    terms = []
    for k, state in enumerate(end_states):
        mk = make_model()
        mk.load_state_dict(state)
        scorer = InfluenceScorer(mk, load_factors(tmp_path / "ekfac" / f"segment={k:02d}" / "factors"))
        p = scorer.pairwise(queries(), data).pairwise
        terms.append(w[k] * p)
        pair += w[k] * p
        self_inf += w[k] * scorer.self_influence(data).self_influence
    ts = TrajectoryScorer(model, tmp_path / "ekfac")
    assert ts.weights == pytest.approx(w, rel=1e-12)
    res = ts.pairwise(queries(), data)
    torch.testing.assert_close(res.pairwise, pair, rtol=1e-10, atol=1e-10)
    assert res.method == "trajectory" and list(res.per_layer) == ["segment=00", "segment=01", "segment=02"]
    for k, t in enumerate(terms):
        torch.testing.assert_close(res.per_layer[f"segment={k:02d}"], t, rtol=1e-10, atol=1e-10)
    assert [s["weight"] for s in res.meta["segments"]] == pytest.approx(w)
    torch.testing.assert_close(ts.self_influence(data).self_influence, self_inf, rtol=1e-10, atol=1e-10)
    lean = ts.pairwise(queries(), data, per_segment=False)
    assert lean.per_layer == {}
    torch.testing.assert_close(lean.pairwise, pair, rtol=1e-10, atol=1e-10)
    assert bool((self_inf > 0).all())
    top = ts.search(queries(), data, k=5, opponents=True)
    ids = torch.arange(64)
    torch.testing.assert_close(top.scores, pair.topk(5).values, rtol=1e-10, atol=1e-10)
    assert torch.equal(top.ids, ids[pair.topk(5).indices])
    torch.testing.assert_close(top.opponent_scores, pair.topk(5, largest=False).values, rtol=1e-10, atol=1e-10)
    # the model given is left as it was (segments are loaded into copies)
    for name, t in model.state_dict().items():
        assert torch.equal(t, end_states[-1][name])
    # uniform and explicit weightings; one segment alone is that segment's InfluenceScorer score
    uni = TrajectoryScorer(model, ts.segments, weighting="uniform").pairwise(queries(), data).pairwise
    torch.testing.assert_close(uni, sum(t / wk for t, wk in zip(terms, w)) / 3, rtol=1e-10, atol=1e-10)
    only = TrajectoryScorer(model, ts.segments, weighting=[0, 2.0, 0]).pairwise(queries(), data).pairwise
    torch.testing.assert_close(only, terms[1] / w[1], rtol=1e-10, atol=1e-10)


def test_resume_inside_a_segment_equals_an_uninterrupted_run(tmp_path):
    class Crash(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 3:
                raise RuntimeError("simulated crash")

    full = exact(dirpath=str(tmp_path / "full"), segments=2)
    fit(tmp_path / "a", full, epochs=4)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    part = exact(dirpath=str(tmp_path / "resumed"), segments=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(tmp_path / "b", part, epochs=4, extra=[ckpt, Crash()], enable_checkpointing=True)
    assert (tmp_path / "resumed" / "segment=00").exists() and not (tmp_path / "resumed" / "segment=01").exists()
    resumed = exact(dirpath=str(tmp_path / "resumed"), segments=2)
    model = make_model()
    trainer(tmp_path / "c", resumed, max_epochs=4, precision="64-true").fit(model, loader(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    for k in range(2):
        a = load_factors(tmp_path / "resumed" / f"segment={k:02d}" / "factors")
        b = load_factors(tmp_path / "full" / f"segment={k:02d}" / "factors")
        assert a.n_examples == b.n_examples == 128
        for n in a.layer_names:
            for key in ("q_a", "eig_a", "q_s", "eig_s", "lambdas"):
                assert torch.equal(getattr(a.layers[n], key), getattr(b.layers[n], key)), (k, n, key)
        ta, ma = read_artifact(tmp_path / "resumed" / f"segment={k:02d}" / "weights")
        tb, mb = read_artifact(tmp_path / "full" / f"segment={k:02d}" / "weights")
        assert all(torch.equal(ta[n], tb[n]) for n in tb)
        assert {x: ma["meta"][x] for x in ("steps", "weight", "first_epoch")} == {x: mb["meta"][x] for x in ("steps", "weight", "first_epoch")}
    # both segments are one run's: the scorer takes them
    assert [s.index for s in load_segments(tmp_path / "resumed")] == [0, 1]


def test_bad_arguments_are_refused_with_clear_errors(tmp_path):
    with pytest.raises(InvalidArgumentError, match="segments"):
        EKFACInfluence(segments=0)
    with pytest.raises(InvalidArgumentError, match="epochs='all'"):
        EKFACInfluence(segments=2, epochs=1)
    with pytest.raises(InvalidArgumentError, match="max_epochs >= 3"):
        fit(tmp_path, exact(dirpath=str(tmp_path / "x"), segments=3), epochs=2)
    cb = exact(dirpath=str(tmp_path / "ekfac"), segments=2)
    model = fit(tmp_path / "ok", cb, epochs=2)
    with pytest.raises(InvalidArgumentError, match="2 segments"):
        TrajectoryScorer(model, tmp_path / "ekfac", weighting=[1.0])
    with pytest.raises(InvalidArgumentError, match="positive sum"):
        TrajectoryScorer(model, tmp_path / "ekfac", weighting=[0.0, 0.0])
    with pytest.raises(InvalidArgumentError, match="holds .net.0.bias. of shape \(8,\), but the model.s is of shape \(4,\)"):
        TrajectoryScorer(MLPClassifier(hidden=4).double(), tmp_path / "ekfac")
    from lightning_influence.storage import ArtifactError

    with pytest.raises(ArtifactError, match="no trajectory segment"):
        TrajectoryScorer(model, tmp_path / "x")


@pytest.mark.slow
def test_ddp_segments_equal_one_process_over_the_same_steps(tmp_path):
    """Two processes: every segment's factors (sums reduced over ranks, correction over the
    ranks' shares) and end weights equal one process's over the same optimizer steps."""

    n, batch = 64, 8
    data = digits_loader(n=n).dataset
    torch.manual_seed(0)
    ddp_model = MLPClassifier(hidden=8, lr=0.5).double()
    single_model = copy.deepcopy(ddp_model)
    ddp = exact(dirpath=str(tmp_path / "ddp"), segments=2)
    trainer(tmp_path / "d", ddp, max_epochs=3, precision="64-true", strategy="ddp_spawn", devices=2).fit(
        ddp_model, DataLoader(data, batch_size=batch))
    one = exact(dirpath=str(tmp_path / "one"), segments=2)
    trainer(tmp_path / "s", one, max_epochs=3, precision="64-true").fit(
        single_model, DataLoader(data, batch_size=2 * batch, sampler=MergedRanks(n, batch)))
    for p, q in zip(ddp_model.parameters(), single_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    for k, epochs in ((0, 1), (1, 2)):
        a = load_factors(tmp_path / "ddp" / f"segment={k:02d}" / "factors")
        b = load_factors(tmp_path / "one" / f"segment={k:02d}" / "factors")
        assert a.n_examples == b.n_examples == epochs * n and a.n_lambda_examples == b.n_lambda_examples == n
        assert_same_factors(a, b, rtol=1e-8)
        ta, ma = read_artifact(tmp_path / "ddp" / f"segment={k:02d}" / "weights")
        tb, mb = read_artifact(tmp_path / "one" / f"segment={k:02d}" / "weights")
        for name in tb:
            torch.testing.assert_close(ta[name], tb[name], rtol=1e-10, atol=1e-12)
        assert ma["meta"]["steps"] == mb["meta"]["steps"] == 4 * epochs
        assert ma["meta"]["weight"] == pytest.approx(0.5 * 4 * epochs)


def test_a_run_stopped_inside_a_segment_writes_the_part_that_ran(tmp_path):
    rec, cb = StepWeights(), exact(dirpath=str(tmp_path / "ekfac"), segments=2)
    model = fit(tmp_path, cb, epochs=4, extra=[rec], max_steps=10)  # 4 steps per epoch: stops 2 steps into epoch 2
    assert len(rec.steps) == 10
    segs = load_segments(tmp_path / "ekfac")
    assert [s.index for s in segs] == [0, 1]
    assert [s.factors.n_examples for s in segs] == [128, 32]
    assert [(s.meta["first_epoch"], s.meta["last_epoch"], s.meta["steps"]) for s in segs] == [(0, 1, 8), (2, 2, 2)]
    for name, t in segs[1].weights.items():
        assert torch.equal(t, model.state_dict()[name])
    assert segs[1].meta["weight"] == pytest.approx(LR0 * DECAY ** 2 * 2, rel=1e-12)


def test_a_missing_segment_is_named(tmp_path):
    import shutil

    cb = exact(dirpath=str(tmp_path / "ekfac"), segments=3)
    model = fit(tmp_path, cb, epochs=3)
    shutil.rmtree(tmp_path / "ekfac" / "segment=01" / "weights")  # as a write killed between the two artifacts leaves it
    from lightning_influence.storage import ArtifactError

    with pytest.raises(ArtifactError, match=r"lacks segments \[1\]"):
        TrajectoryScorer(model, tmp_path / "ekfac")
    # the remaining ones can still be named explicitly
    ts = TrajectoryScorer(model, [tmp_path / "ekfac" / "segment=00", tmp_path / "ekfac" / "segment=02"])
    assert [s.index for s in ts.segments] == [0, 2]


def test_unrolled_curvature_equals_a_dense_float64_reference(tmp_path):
    """curvature="unrolled": Σ_k (1/S) g_q(θ_k)ᵀ Q_k diag((1 − exp(−h_k Λ_k)) / Λ_k) Q_kᵀ g_z(θ_k)
    with h_k = Σ lr over segment k's steps, from per-example autograd gradients and dense matrices."""
    from ekfac_reference import per_example_param_grads

    cb = exact(dirpath=str(tmp_path / "ekfac"), segments=2)
    data = loader(n=32)
    model = fit(tmp_path, cb, epochs=4, data=data)  # 2 steps per epoch; segments: epochs {0, 1}, {2, 3}
    horizons = [2 * LR0 * (1 + DECAY), 2 * LR0 * (DECAY ** 2 + DECAY ** 3)]
    train, _, _ = digits_dataset(dtype=torch.float64)
    _, test, _ = digits_dataset(dtype=torch.float64)
    t_examples = [(torch.tensor([i]), tuple(t[None] for t in train[i])) for i in range(32)]
    q_examples = [(torch.tensor([i]), tuple(t[None] for t in test[i])) for i in range(6)]
    ref = torch.zeros(6, 32, dtype=torch.float64)
    for k, h in enumerate(horizons):
        mk = make_model()
        tensors, _ = read_artifact(tmp_path / "ekfac" / f"segment={k:02d}" / "weights")
        mk.load_state_dict(tensors, strict=False)
        layers = resolve_layers(mk, None)
        gz = per_example_param_grads(mk, ClassificationTask(), t_examples, layers)
        gq = per_example_param_grads(mk, ClassificationTask(), q_examples, layers, which="measurement")
        f = load_factors(tmp_path / "ekfac" / f"segment={k:02d}" / "factors")
        for l in layers:
            lf = f.layers[l.name]
            q = torch.kron(lf.q_s, lf.q_a)
            lam = lf.lambdas.reshape(-1)
            assert bool((lam >= 0).all()) and float(lam.min()) < 1e-20  # digits has constant pixels: Λ ≈ 0 happens
            # expm1: 1 - exp(-hΛ) loses every digit at Λ ~ 1e-33; h is the limit at Λ = 0
            response = torch.where(lam > 0, -torch.expm1(-h * lam) / lam, torch.full_like(lam, h))
            p = q @ torch.diag(response) @ q.T
            ref += 0.5 * gq[l.name].reshape(6, -1) @ p @ gz[l.name].reshape(32, -1).T
    ts = TrajectoryScorer(model, tmp_path / "ekfac", curvature="unrolled")
    assert ts.weights == [0.5, 0.5]
    torch.testing.assert_close(ts.pairwise(queries(), data).pairwise, ref, rtol=1e-8, atol=1e-10)
    with pytest.raises(InvalidArgumentError, match="needs no damping"):
        TrajectoryScorer(model, tmp_path / "ekfac", curvature="unrolled", damping=0.1)


def test_a_segment_no_batch_contributed_to_joins_the_next_one(tmp_path):
    """4 batches per epoch, updates every 8 batches (batches 0 and 8: epochs 0 and 2): of four
    one-epoch segments, epoch 1 joins epoch 2's segment and epoch 3 is left out, with warnings."""
    cb = exact(dirpath=str(tmp_path / "ekfac"), segments=4, update_every_n_steps=8)
    with pytest.warns(UserWarning) as record:
        model = fit(tmp_path, cb, epochs=4)
    said = " ".join(str(w.message) for w in record)
    assert "epochs 1-1 contributed" in said and "join the next segment" in said
    assert "epochs 3-3 contributed" in said and "left out of the trajectory" in said
    segs = load_segments(tmp_path / "ekfac")
    assert [(s.index, s.meta["first_epoch"], s.meta["last_epoch"], s.meta["steps"], s.factors.n_examples) for s in segs] == [
        (0, 0, 0, 4, 16), (1, 1, 2, 8, 16)]
    assert segs[1].meta["weight"] == pytest.approx(4 * LR0 * (DECAY + DECAY ** 2), rel=1e-12)
    TrajectoryScorer(model, tmp_path / "ekfac").pairwise(queries(), loader())
