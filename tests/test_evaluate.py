"""The evaluation toolkit against independent references: scikit-learn (AUROC, AP), numpy brute
force (top-p share, MRR, recall@k), scipy (Spearman), a hand-written SGD loop (retraining)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.metrics import average_precision_score, roc_auc_score

from lightning_influence.evaluate import (
    fact_tracing,
    linear_datamodeling_score,
    mislabel_detection,
    query_losses,
    random_subsets,
    retrain_subsets,
    spearman,
    trainer_retrain,
)
from lightning_influence.scores import InfluenceScores
from lightning_influence.storage import ArtifactError
from scaffold import quiet_trainer


def test_mislabel_detection_matches_sklearn_and_brute_force():
    g = torch.Generator().manual_seed(0)
    n = 500
    flags = torch.rand(n, generator=g) < 0.1
    scores = torch.randn(n, generator=g, dtype=torch.float64) + 1.5 * flags  # informative but noisy
    r = mislabel_detection(scores, flags, fractions=(0.02, 0.1, 0.5))
    y, s = flags.numpy(), scores.numpy()
    assert r.auroc == pytest.approx(roc_auc_score(y, s), abs=1e-6)
    assert r.average_precision == pytest.approx(average_precision_score(y, s), abs=1e-6)
    order = np.argsort(-s, kind="stable")
    for p in (0.02, 0.1, 0.5):
        k = int(p * n)
        hits = y[order[:k]].sum()
        assert r.found[p] == pytest.approx(hits / y.sum()) and r.precision[p] == pytest.approx(hits / k)
    assert (r.n, r.n_mislabeled) == (n, int(y.sum()))
    assert r.as_dict()["found@0.1"] == r.found[0.1]


@pytest.mark.parametrize("scale", [1e-6, 1e5])
def test_mislabel_detection_depends_only_on_the_order_of_the_scores(scale):
    # influence scores are unbounded (EK-FAC self-influence reaches 1e5): none may saturate to a tie
    g = torch.Generator().manual_seed(3)
    flags = torch.rand(300, generator=g) < 0.1
    scores = (torch.rand(300, generator=g, dtype=torch.float64) + flags) * scale + scale
    r = mislabel_detection(scores, flags)
    assert r.auroc == pytest.approx(roc_auc_score(flags.numpy(), scores.numpy()), abs=1e-6)
    assert r.average_precision == pytest.approx(average_precision_score(flags.numpy(), scores.numpy()), abs=1e-6)


def test_mislabel_detection_never_ranks_nan_first_and_rejects_bad_input():
    scores = torch.tensor([float("nan"), 3.0, 2.0, 1.0, float("inf")])
    flags = torch.tensor([False, True, False, False, False])
    r = mislabel_detection(scores, flags, fractions=(0.2,))
    assert r.found[0.2] == 1.0 and r.auroc == 1.0  # nan and inf rank below every finite score
    with pytest.raises(ValueError, match="some but not all"):
        mislabel_detection(torch.randn(4), torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="one flag per score"):
        mislabel_detection(torch.randn(4), torch.ones(3, dtype=torch.bool))


def _brute_retrieval(s: np.ndarray, rel: np.ndarray, ks) -> tuple[float, dict]:
    rr, rec = [], {k: [] for k in ks}
    for q in range(s.shape[0]):
        if not rel[q].any():
            continue
        order = np.argsort(-s[q], kind="stable")
        first = int(np.nonzero(rel[q][order])[0][0]) + 1
        rr.append(1.0 / first)
        for k in ks:
            rec[k].append(rel[q][order[:k]].sum() / rel[q].sum())
    return float(np.mean(rr)), {k: float(np.mean(v)) for k, v in rec.items()}


def test_fact_tracing_matches_brute_force_and_skips_queries_without_sources():
    g = torch.Generator().manual_seed(1)
    q, n = 12, 300
    rel = torch.rand(q, n, generator=g) < 0.02
    rel[3] = False  # no source: skipped
    scores = torch.randn(q, n, generator=g, dtype=torch.float64) + 2.0 * rel
    r = fact_tracing(scores, rel, ks=(1, 5, 10))
    mrr, rec = _brute_retrieval(scores.numpy(), rel.numpy(), (1, 5, 10))
    assert r.mrr == pytest.approx(mrr, rel=1e-6)
    for k in (1, 5, 10):
        assert r.recall[k] == pytest.approx(rec[k], rel=1e-6)
    assert (r.n_queries, r.skipped) == (11, 1)
    with pytest.raises(ValueError, match="no query"):
        fact_tracing(scores, torch.zeros_like(rel))


def _brute_lds(scores: np.ndarray, masks: np.ndarray, losses: np.ndarray) -> np.ndarray:
    out = []
    for q in range(scores.shape[0]):
        pred = np.array([scores[q][m].sum() for m in masks])  # summed scores of each subset
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy warns on the constant query; its nan counts as 0
            rho = spearmanr(pred, -losses[:, q]).statistic
        out.append(0.0 if np.isnan(rho) else rho)
    return np.array(out)


def test_linear_datamodeling_score_matches_scipy_per_query():
    g = torch.Generator().manual_seed(2)
    q, n, m = 5, 40, 30
    scores = torch.randn(q, n, generator=g, dtype=torch.float64)
    masks = random_subsets(n, m, 0.5, seed=3)
    # losses that the scores partly explain: helpful examples present => lower loss
    losses = -(masks.double() @ scores.T) + 2.0 * torch.randn(m, q, generator=g, dtype=torch.float64)
    losses[:, 4] = 1.0  # a constant query
    r = linear_datamodeling_score(scores, masks, losses)
    ref = _brute_lds(scores.numpy(), masks.numpy(), losses.numpy())
    assert torch.allclose(r.per_query, torch.from_numpy(ref), atol=1e-9)
    assert r.lds == pytest.approx(ref.mean()) and r.se == pytest.approx(ref.std(ddof=1) / np.sqrt(q))
    assert r.constant == 1 and r.n_subsets == m and r.lds > 0.3
    omit = linear_datamodeling_score(scores, masks, losses, constant="omit")
    assert omit.lds == pytest.approx(ref[:4].mean()) and torch.isnan(omit.per_query[4])


def test_linear_datamodeling_score_takes_influence_scores_in_id_order():
    g = torch.Generator().manual_seed(4)
    scores = torch.randn(3, 20, generator=g)
    masks = random_subsets(20, 10, seed=0)
    losses = torch.randn(10, 3, generator=g)
    perm = torch.randperm(20, generator=g)
    shuffled = InfluenceScores("ekfac", perm, pairwise=scores[:, perm])  # columns in another order, named by id
    assert torch.allclose(linear_datamodeling_score(shuffled, masks, losses).per_query,
                          linear_datamodeling_score(scores, masks, losses).per_query)
    with pytest.raises(ValueError, match="positions 0..N-1"):
        linear_datamodeling_score(InfluenceScores("ekfac", perm + 5, pairwise=scores), masks, losses)


def test_spearman_matches_scipy():
    a, b = torch.randn(4, 25), torch.randn(4, 25)
    b = a + 0.5 * b
    assert spearman(a, b) == pytest.approx(spearmanr(a.numpy().ravel(), b.numpy().ravel()).statistic, abs=1e-6)


def test_random_subsets_are_reproducible_and_of_the_asked_size():
    m = random_subsets(101, 7, 0.3, seed=5)
    assert m.shape == (7, 101) and (m.sum(1) == 30).all()
    assert torch.equal(m, random_subsets(101, 7, 0.3, seed=5)) and not torch.equal(m, random_subsets(101, 7, 0.3, seed=6))


def test_retrain_subsets_saves_each_result_and_resumes(tmp_path):
    calls = []

    def retrain(j, idx):
        calls.append(j)
        if j == 3 and len(calls) == 4:
            raise KeyboardInterrupt  # interrupted during the 4th retrain
        return torch.stack([idx.double().mean(), idx.double().max(), torch.tensor(float(j))])

    with pytest.raises(KeyboardInterrupt):
        retrain_subsets(50, retrain, n_subsets=6, seed=1, workdir=tmp_path, progress=False)
    assert calls == [0, 1, 2, 3] and len(list(tmp_path.glob("subset=*"))) == 3
    resumed = retrain_subsets(50, retrain, n_subsets=6, seed=1, workdir=tmp_path, progress=False)
    assert calls[4:] == [3, 4, 5] and resumed.resumed == 3  # only the missing ones ran
    fresh = retrain_subsets(50, lambda j, idx: torch.stack([idx.double().mean(), idx.double().max(), torch.tensor(float(j))]),
                            n_subsets=6, seed=1, progress=False)
    assert torch.equal(resumed.losses, fresh.losses) and torch.equal(resumed.masks, fresh.masks)
    for j in range(6):  # each saved result is the retrain on its own subset
        idx = torch.nonzero(fresh.masks[j]).flatten().double()
        assert resumed.losses[j, 0] == pytest.approx(float(idx.mean()))
    with pytest.raises(ArtifactError, match="another subset"):
        retrain_subsets(50, retrain, n_subsets=6, seed=2, workdir=tmp_path, progress=False)


def test_trainer_retrain_fits_a_fresh_lightning_model_like_a_plain_sgd_loop():
    from torch.utils.data import DataLoader, Subset, TensorDataset

    from lightning_influence.demos import MLPClassifier

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 6, generator=g), torch.randint(0, 3, (60,), generator=g)
    train, queries = TensorDataset(x[:48], y[:48]), TensorDataset(x[48:], y[48:])
    make_model = lambda: MLPClassifier(d_in=6, hidden=8, n_classes=3, lr=0.2)  # noqa: E731
    make_trainer = lambda: quiet_trainer(None, max_epochs=2)  # noqa: E731
    retrain = trainer_retrain(make_trainer, make_model, train, queries, batch_size=16, seed=7)
    idx = torch.arange(0, 48, 2)
    got = retrain(3, idx)
    # the same recipe by hand: seed 7 + 3, fresh model, shuffled loader with the same generator seed
    torch.manual_seed(10)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    loader = DataLoader(Subset(train, idx.tolist()), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(10))
    for _ in range(2):
        for xb, yb in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(model(x[48:]), y[48:], reduction="none").double()
    assert got.shape == (12,) and torch.allclose(got, ref, atol=1e-5)
    assert torch.allclose(query_losses(model, queries), ref)
