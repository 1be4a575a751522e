"""LiSSA samplers and k-means against explicit computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare, spearmanr
from torch import nn
from torch.utils.data import TensorDataset

from lightning_influence.data import IndexedDataset
from lightning_influence.lissa import FeatureSampler, LiSSAOptions, LogitSampler, RandomSampler, SamplePool, kmeans, make_sampler
from lightning_influence.task import CausalLMTask, ClassificationTask, ModuleTask
from lightning_influence.validation import InvalidArgumentError


def linear_problem(n=30, d=4, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.arange(n) % c
    torch.manual_seed(seed)
    model = nn.Linear(d, c)
    return model, IndexedDataset(TensorDataset(x, y)), x, y


def test_logit_sampler_frequencies_match_softmax_probabilities():
    model, ds, x, y = linear_problem()
    smp = LogitSampler(k=50)
    gen = torch.Generator().manual_seed(0)
    smp.prepare(model, ClassificationTask(), SamplePool(ds, batch_size=7), gen)
    assert smp.classes.tolist() == [0, 1, 2]
    with torch.no_grad():
        p = torch.softmax(model(x).double(), -1)  # independent reference
    counts = torch.zeros(30, 3)
    draws = 400
    for _ in range(draws):
        pos = smp.sample(gen).view(3, 50)
        for c in range(3):
            counts[:, c] += torch.bincount(pos[c], minlength=30)
    for c in range(3):
        expected = (p[:, c] / p[:, c].sum() * draws * 50).numpy()
        stat = chisquare(counts[:, c].numpy(), expected)
        assert stat.pvalue > 1e-3, (c, stat)
    # and the frequencies really depend on the probabilities (not uniform)
    uniform = chisquare(counts[:, 0].numpy(), np.full(30, draws * 50 / 30))
    assert uniform.pvalue < 1e-6


def test_logit_sampler_budget_and_redraw_modes():
    model, ds, *_ = linear_problem()
    pool = SamplePool(ds)
    gen = torch.Generator().manual_seed(1)
    fixed = LogitSampler(sample_size=12, redraw=False)
    fixed.prepare(model, ClassificationTask(), pool, gen)
    a, b = fixed.sample(gen), fixed.sample(gen)
    assert fixed.k == 4 and a.numel() == 12 and torch.equal(a, b)
    redraw = LogitSampler(sample_size=12)
    redraw.prepare(model, ClassificationTask(), pool, gen)
    assert not torch.equal(redraw.sample(gen), redraw.sample(gen))


def test_random_sampler_is_uniform_without_replacement():
    smp = RandomSampler(sample_size=5)
    smp.prepare(nn.Identity(), None, SamplePool(list(range(20))))
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(20)
    for _ in range(2000):
        pos = smp.sample(gen)
        assert pos.unique().numel() == 5
        counts += torch.bincount(pos, minlength=20)
    assert chisquare(counts.numpy()).pvalue > 1e-3


def blobs(seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    x = torch.cat([c + torch.randn(25, 2, generator=g) for c in centers])
    return x, torch.arange(4).repeat_interleave(25)


def test_kmeans_recovers_blobs_like_sklearn():
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    x, truth = blobs()
    c, labels = kmeans(x, 4, generator=torch.Generator().manual_seed(0))
    assert adjusted_rand_score(truth.numpy(), labels.numpy()) == 1.0
    ref = KMeans(4, n_init=10, random_state=0).fit(x.numpy())
    inertia = float(((x.double() - c[labels]) ** 2).sum())
    assert inertia == pytest.approx(ref.inertia_, rel=1e-6)
    # centroids are the cluster means
    for j in range(4):
        torch.testing.assert_close(c[j], x[labels == j].double().mean(0))


class FeatureNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(2, 3), nn.Tanh())
        self.head = nn.Linear(3, 4)

    def forward(self, x):
        return self.head(self.body(x))


def test_default_features_are_penultimate_activations_and_topk_returns_nearest():
    x, y = blobs(1)
    model = FeatureNet()
    ds = TensorDataset(x, y)
    smp = FeatureSampler(n_clusters=4, k=3, selection="topk")
    smp.prepare(model, ClassificationTask(), SamplePool(ds, batch_size=16), torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = torch.tanh(x @ model.body[0].weight.T + model.body[0].bias).double()
    torch.testing.assert_close(smp.features, feats)
    pos = smp.sample(torch.Generator()).view(4, 3)
    cent = smp.centroids.numpy()
    f = feats.numpy()
    for j in range(4):  # brute-force nearest points to each centroid
        d = [float(np.sqrt(((f[i] - cent[j]) ** 2).sum())) for i in range(len(f))]
        assert set(pos[j].tolist()) == set(np.argsort(d)[:3].tolist())


def test_weighted_feature_sampling_favours_nearer_points():
    x, y = blobs(2)
    smp = FeatureSampler(n_clusters=4, k=20, selection="weighted", feature_fn=lambda m, b: b[0], temperature=0.5)
    smp.prepare(nn.Identity(), ClassificationTask(), SamplePool(TensorDataset(x, y)), torch.Generator().manual_seed(0))
    torch.testing.assert_close(smp.features, x.double())
    gen = torch.Generator().manual_seed(1)
    counts = torch.zeros(100, 4)
    for _ in range(300):
        pos = smp.sample(gen).view(4, 20)
        for j in range(4):
            counts[:, j] += torch.bincount(pos[j], minlength=100)
    d = torch.cdist(x.double(), smp.centroids)
    for j in range(4):
        rho = spearmanr(counts[:, j].numpy(), d[:, j].numpy()).statistic
        assert rho < -0.8, rho
        w = torch.exp(-d[:, j] / (0.5 * d[:, j].mean()))
        keep = w / w.sum() * 6000 > 5  # chi-square needs non-tiny expected counts
        expected = (w / w.sum() * 6000)[keep]
        observed = counts[keep, j]
        expected = expected * observed.sum() / expected.sum()
        assert chisquare(observed.numpy(), expected.numpy()).pvalue > 1e-3


def test_logit_sampler_on_sequences_uses_first_target_token():
    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb = nn.Embedding(8, 4)
            self.out = nn.Linear(4, 8)

        def forward(self, input_ids, attention_mask=None):
            return self.out(self.emb(input_ids))

    ids = torch.tensor([[1, 2, 3], [4, 5, 0], [6, 7, 3]])
    labels = torch.tensor([[1, 2, 3], [4, 5, -100], [-100, -100, 3]])
    data = [{"input_ids": ids[i], "labels": labels[i]} for i in range(3)]
    model = TinyLM()
    smp = LogitSampler(k=2)
    smp.prepare(model, CausalLMTask(), SamplePool(data), torch.Generator().manual_seed(0))
    # targets: first non-ignored shifted label: 2, 5, 3 → classes [2, 3, 5]
    assert smp.classes.tolist() == [2, 3, 5]
    with torch.no_grad():
        logits = model(ids)
    pos = torch.tensor([0, 0, 1])  # position predicting that token
    p = torch.softmax(logits[torch.arange(3), pos], -1)[:, [2, 3, 5]].double()
    torch.testing.assert_close(smp.probs, p / p.sum(0, keepdim=True))
    # a module's task falls back to CausalLMTask for these dict batches: same positions, same probabilities
    via_module = LogitSampler(k=2)
    via_module.prepare(model, ModuleTask(model), SamplePool(data), torch.Generator().manual_seed(0))
    torch.testing.assert_close(via_module.probs, smp.probs, rtol=0, atol=0)


def test_make_sampler_names_and_errors():
    assert isinstance(make_sampler("random", 10), RandomSampler)
    assert isinstance(make_sampler("logit", 10), LogitSampler)
    assert make_sampler("feature", 10).selection == "topk"
    assert make_sampler("feature_weighted", 10).selection == "weighted"
    own = RandomSampler(3)
    assert make_sampler(own) is own
    with pytest.raises(InvalidArgumentError, match=r"make_sampler\(sampler=\.\.\.\) must be one of .*'feature_weighted' or a lissa\.Sampler instance, got 'nearest'"):
        make_sampler("nearest")
    with pytest.raises(InvalidArgumentError, match=r"FeatureSampler\(selection=\.\.\.\) must be one of 'topk', 'weighted', got 'all'"):
        FeatureSampler(selection="all")
    with pytest.raises(InvalidArgumentError, match=r"FeatureSampler\(temperature=\.\.\.\) must be a finite float > 0, got 0"):
        FeatureSampler(temperature=0)
    with pytest.raises(InvalidArgumentError, match=r"LogitSampler\(k=\.\.\.\) must be a positive int or None, got 0"):
        LogitSampler(k=0)
    with pytest.raises(InvalidArgumentError, match=r"RandomSampler\(redraw=\.\.\.\) must be True or False, got 'yes'"):
        RandomSampler(3, redraw="yes")
    with pytest.raises(InvalidArgumentError, match=r"SamplePool\(dataset=\.\.\.\) is empty"):
        SamplePool([])
    with pytest.raises(RuntimeError, match="before prepare"):
        RandomSampler(3).sample()
    # named samplers get the options' budget, redraw mode and clusters
    made = LiSSAOptions(sampler="feature_weighted", sample_size=40, redraw=False, n_clusters=4).make_sampler()
    assert (type(made), made.selection, made.k, made.redraw, made.n_clusters) == (FeatureSampler, "weighted", 10, False, 4)
