"""Multi-stage influence against explicit float64 references (tiny models, no Trainer)."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset, TensorDataset

import lightning_influence.multistage as multistage
from lightning_influence import IndexedDataset, select_layers
from lightning_influence.data import answer_only_labels, lm_collate, qa_collate
from lightning_influence.demos import CausalLMModule, MLPClassifier, synthetic_token_dataset, tiny_causal_lm
from lightning_influence.ekfac.fit import fit_factors
from lightning_influence.ekfac.scorer import InfluenceScorer
from lightning_influence.multistage import CandidateGradients, MultiStageScorer, NarrowedScores, NoSharedLayersError
from lightning_influence.patterns import PatternError
from lightning_influence.ranking import TopInfluences
from lightning_influence.retrieval import MeanPooledHiddenStates, knn_indices
from lightning_influence.scores import InfluenceScores
from lightning_influence.task import CausalLMTask, ClassificationTask
from lightning_influence.validation import InvalidArgumentError

from cases import STAGES_VOCAB as VOCAB, brute_top, lm_stages, qa_items
from ekfac_reference import dense_multistage, per_example_param_grads


pytestmark = pytest.mark.usefixtures("float64_default")  # fixture in tests/conftest.py


# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damping", [(None, None), (1e-3, 1e-2)])
def test_score_equals_dense_two_stage_computation(damping):
    pt, pt_f, ft, ft_f, train, queries, layers, task = lm_stages()
    d_pt, d_ft = damping
    scorer = MultiStageScorer(pt, pt_f, ft, ft_f, task=task, damping_pt=d_pt, damping_ft=d_ft)
    assert scorer.layers_used == [l.name for l in layers] and scorer.layers_excluded == {}
    q_ex = [qa_collate([queries[i]]) for i in range(len(queries))]
    t_ex = [lm_collate([train[i]]) for i in range(len(train))]
    dense = dense_multistage(pt, pt_f, ft, ft_f, layers, task, q_ex, t_ex, d_pt, d_ft)
    qloader = DataLoader(queries, batch_size=4, collate_fn=qa_collate)
    tloader = DataLoader(train, batch_size=3, collate_fn=lm_collate)
    res = scorer.pairwise(qloader, tloader, per_layer=True)
    assert isinstance(res, InfluenceScores) and res.method == "multistage" and res.self_influence is None
    scores = res.pairwise
    torch.testing.assert_close(scores, dense, rtol=1e-8, atol=1e-10)
    assert set(res.per_layer) == set(scorer.layers_used)
    torch.testing.assert_close(sum(res.per_layer.values()), scores)
    assert res.query_ids.tolist() == list(range(len(queries))) and res.train_ids.tolist() == list(range(len(train)))
    assert res.options["layers"] == scorer.layers_used
    assert res.options["damping_pt"] == pt_f.dampings(d_pt)
    assert res.options["damping_ft"] == ft_f.dampings(d_ft)
    assert scorer.pairwise(qloader, tloader).per_layer == {}
    # the pre-training side computed once is reused across query sets
    cand = scorer.candidates(tloader)
    assert isinstance(cand, CandidateGradients) and len(cand) == len(train) and cand.ids.tolist() == list(range(len(train)))
    sub = scorer.pairwise(DataLoader(Subset(queries, [1, 4]), batch_size=2, collate_fn=qa_collate), cand)
    torch.testing.assert_close(sub.pairwise, dense[[1, 4]], rtol=1e-8, atol=1e-10)
    assert sub.query_ids.tolist() == [1, 4] and sub.train_ids.tolist() == list(range(len(train)))
    # streaming top-k, from stored candidates and from a loader, against a brute-force ranking
    top = scorer.search(qloader, cand, k=3)
    assert isinstance(top, TopInfluences) and top.opponent_ids is None and top.query_ids.tolist() == list(range(len(queries)))
    assert top.ids.tolist() == brute_top(dense, 3).tolist()
    torch.testing.assert_close(top.scores, dense.gather(1, brute_top(dense, 3)), rtol=1e-8, atol=1e-10)
    both = scorer.search(qloader, tloader, k=4, opponents=True)
    assert both.ids.tolist() == brute_top(dense, 4).tolist()
    assert both.opponent_ids.tolist() == brute_top(dense, 4, largest=False).tolist()
    torch.testing.assert_close(both.opponent_scores, dense.gather(1, brute_top(dense, 4, largest=False)), rtol=1e-8, atol=1e-10)
    # a damping sweep from one gradient pass equals separate scorers, and leaves the scorer as it was
    own_pt, own_ft = scorer.preconditioner_pt, scorer.preconditioner_ft
    own_damping = (dict(own_pt.damping), dict(own_ft.damping))
    sweep = scorer.damping_sweep(qloader, tloader, [(d_pt, d_ft), (1e-2, "identity")])
    assert set(sweep) == {(d_pt, d_ft), (1e-2, "identity")}
    assert all(isinstance(v, InfluenceScores) and v.method == "multistage" for v in sweep.values())
    torch.testing.assert_close(sweep[(d_pt, d_ft)].pairwise, scores, rtol=1e-9, atol=1e-11)
    assert sweep[(d_pt, d_ft)].train_ids.tolist() == list(range(len(train)))
    other = MultiStageScorer(pt, pt_f, ft, ft_f, task=task, damping_pt=1e-2, damping_ft="identity").pairwise(qloader, tloader)
    torch.testing.assert_close(sweep[(1e-2, "identity")].pairwise, other.pairwise, rtol=1e-9, atol=1e-11)
    assert sweep[(1e-2, "identity")].options["damping_ft"] == "identity"
    assert sweep[(1e-2, "identity")].options["damping_pt"] == {l.name: 1e-2 for l in layers}
    assert scorer.preconditioner_pt is own_pt and scorer.preconditioner_ft is own_ft
    assert (own_pt.damping, own_ft.damping) == own_damping
    assert own_pt.damping == MultiStageScorer(pt, pt_f, ft, ft_f, task=task, damping_pt=d_pt).preconditioner_pt.damping
    torch.testing.assert_close(scorer.pairwise(qloader, cand).pairwise, dense, rtol=1e-8, atol=1e-10)  # unchanged
    # the two stages are not interchangeable: swapping factors changes the score
    swapped = MultiStageScorer(pt, ft_f, ft, pt_f, task=task, damping_pt=d_pt, damping_ft=d_ft).pairwise(qloader, tloader)
    assert not torch.allclose(swapped.pairwise, scores)


def test_identity_finetuning_preconditioner_reduces_to_single_stage():
    pt, pt_f, _, _, train, queries, layers, task = lm_stages()
    qloader = DataLoader(queries, batch_size=4, collate_fn=qa_collate)
    tloader = DataLoader(train, batch_size=4, collate_fn=lm_collate)
    for damping in (None, 1e-3):
        single = InfluenceScorer(pt, pt_f, task=task, damping=damping).pairwise(qloader, tloader).pairwise
        ms_none = MultiStageScorer(pt, pt_f, pt, None, task=task, damping_pt=damping).pairwise(qloader, tloader)
        ms_flag = MultiStageScorer(pt, pt_f, pt, pt_f, task=task, damping_pt=damping, damping_ft="identity").pairwise(qloader, tloader)
        torch.testing.assert_close(ms_none.pairwise, single, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(ms_flag.pairwise, single, rtol=1e-9, atol=1e-11)
        assert ms_none.options["damping_ft"] == "identity" and ms_flag.options["damping_ft"] == "identity"
    # both identities: plain gradient dot product at the two weights
    gdp = MultiStageScorer(pt, None, pt, None, task=task, layers=[l.name for l in layers]).pairwise(qloader, tloader)
    q_ex = [qa_collate([queries[i]]) for i in range(len(queries))]
    t_ex = [lm_collate([train[i]]) for i in range(len(train))]
    gq = per_example_param_grads(pt, task, q_ex, layers, "measurement")
    gt = per_example_param_grads(pt, task, t_ex, layers, "loss")
    ref = sum(gq[n].reshape(len(q_ex), -1) @ gt[n].reshape(len(t_ex), -1).T for n in gq)
    torch.testing.assert_close(gdp.pairwise, ref, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("damping", [(None, None), (1e-3, 1e-2)])
def test_pretraining_side_in_an_index_is_reused_across_query_sets(tmp_path, damping):
    """Candidates stored once in the index format: exact mode equals the dense two-stage score; a
    projected index gives the same streaming top-k machinery; a mismatched index is refused."""
    pt, pt_f, ft, ft_f, train, queries, layers, task = lm_stages()
    d_pt, d_ft = damping
    scorer = MultiStageScorer(pt, pt_f, ft, ft_f, task=task, damping_pt=d_pt, damping_ft=d_ft)
    q_ex = [qa_collate([queries[i]]) for i in range(len(queries))]
    t_ex = [lm_collate([train[i]]) for i in range(len(train))]
    dense = dense_multistage(pt, pt_f, ft, ft_f, layers, task, q_ex, t_ex, d_pt, d_ft)
    tloader = DataLoader(train, batch_size=3, collate_fn=lm_collate)
    index = scorer.build_index(tloader, tmp_path / "pt", compression="exact", dtype="float64", shard_size=3, per_layer=True)
    assert index.n_examples == len(train) and len(index.shards) == 3
    for rows in ([0, 1, 2, 3, 4, 5], [1, 4]):  # two query sets, one pass over the pre-training data
        ql = DataLoader(Subset(queries, rows), batch_size=4, collate_fn=qa_collate)
        res = scorer.pairwise(ql, index, per_layer=True)
        assert res.method == "multistage" and res.self_influence is None and res.query_ids.tolist() == rows
        torch.testing.assert_close(res.pairwise, dense[rows], rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(sum(res.per_layer.values()), res.pairwise, rtol=1e-10, atol=1e-12)
        assert res.options["damping_pt"] == scorer._options()["damping_pt"]
    qloader = DataLoader(queries, batch_size=4, collate_fn=qa_collate)
    top = scorer.search(qloader, index, k=3, opponents=True)
    assert top.ids.tolist() == brute_top(dense, 3).tolist()
    assert top.opponent_ids.tolist() == brute_top(dense, 3, largest=False).tolist()
    # the index's own self-influence is the pre-training self-influence (single stage, θ_pt)
    single = InfluenceScorer(pt, pt_f, task=task, damping=d_pt).self_influence(tloader).self_influence
    torch.testing.assert_close(index.self_influence().self_influence.double(), single, rtol=1e-5, atol=1e-8)
    # a projected index: its search is the top-k of its own (unbiased, noisier) dense scores
    approx = scorer.build_index(tloader, tmp_path / "sjlt", compression="sjlt", dim=64, dtype="float32")
    est = scorer.pairwise(qloader, approx).pairwise
    assert scorer.search(qloader, approx, k=3).ids.tolist() == brute_top(est, 3).tolist()
    # an index of other layers or another damping is refused
    other = MultiStageScorer(pt, pt_f, ft, ft_f, task=task, damping_pt=0.5, damping_ft=d_ft)
    with pytest.raises(ValueError, match="damping"):
        other.pairwise(qloader, index)
    with pytest.raises(ValueError, match="layers"):
        MultiStageScorer(pt, pt_f, ft, ft_f, task=task, layers="*dense_h_to_4h").search(qloader, index)
    with pytest.raises(InvalidArgumentError, match="unknown options"):
        scorer.build_index(tloader, tmp_path / "bad", compresion="exact")


# ----------------------------------------------------------------------------------------------
def _mlp_stage(d_in, hidden, n_classes, seed, n=16):
    torch.manual_seed(seed)
    model = MLPClassifier(d_in=d_in, hidden=hidden, n_classes=n_classes).double()
    x, y = torch.randn(n, d_in), torch.randint(0, n_classes, (n,))
    ds = IndexedDataset(TensorDataset(x, y))
    return model, ds, fit_factors(model, DataLoader(ds, batch_size=8))


def test_replaced_head_is_excluded_and_reported_and_score_matches_dense():
    pt, pt_ds, pt_f = _mlp_stage(5, 4, 3, seed=0)
    ft, ft_ds, ft_f = _mlp_stage(5, 4, 7, seed=1)  # new head: 7 classes
    task = ClassificationTask()
    scorer = MultiStageScorer(pt, pt_f, ft, ft_f, task=task)
    assert scorer.layers_used == ["net.0"]
    assert list(scorer.layers_excluded) == ["net.2"] and "shape mismatch" in scorer.layers_excluded["net.2"]
    assert "d_out=3" in scorer.layers_excluded["net.2"] and "d_out=7" in scorer.layers_excluded["net.2"]
    assert "excluded net.2" in scorer.describe()
    t_ex = [torch.utils.data.default_collate([pt_ds[i]]) for i in range(len(pt_ds))]
    q_ex = [torch.utils.data.default_collate([ft_ds[i]]) for i in range(4)]
    layers = select_layers(pt, "net.0")
    dense = dense_multistage(pt, pt_f, ft, ft_f, layers, task, q_ex, t_ex, None, None)
    scores = scorer.pairwise(DataLoader(Subset(ft_ds, range(4)), batch_size=4), DataLoader(pt_ds, batch_size=5))
    torch.testing.assert_close(scores.pairwise, dense, rtol=1e-8, atol=1e-10)


def test_ids_default_to_positions_and_search_streams_over_candidate_chunks(monkeypatch):
    pt, pt_ds, pt_f = _mlp_stage(5, 4, 3, seed=0)
    ft, ft_ds, ft_f = _mlp_stage(5, 4, 3, seed=1)
    task = ClassificationTask()
    plain_train = TensorDataset(*[torch.stack(t) for t in zip(*[pt_ds[i][1] for i in range(len(pt_ds))])])  # no ids
    plain_query = TensorDataset(*[torch.stack(t) for t in zip(*[ft_ds[i][1] for i in range(6)])])
    scorer = MultiStageScorer(pt, pt_f, ft, ft_f, task=task, damping_pt=1e-3, damping_ft=1e-2)
    layers = select_layers(pt)
    t_ex = [torch.utils.data.default_collate([plain_train[i]]) for i in range(len(plain_train))]
    q_ex = [torch.utils.data.default_collate([plain_query[i]]) for i in range(len(plain_query))]
    dense = dense_multistage(pt, pt_f, ft, ft_f, layers, task, q_ex, t_ex, 1e-3, 1e-2)
    qloader, tloader = DataLoader(plain_query, batch_size=4), DataLoader(plain_train, batch_size=5)
    res = scorer.pairwise(qloader, tloader)
    torch.testing.assert_close(res.pairwise, dense, rtol=1e-8, atol=1e-10)
    assert res.train_ids.tolist() == list(range(16)) and res.query_ids.tolist() == list(range(6))
    cand = scorer.candidates(tloader)
    assert cand.ids.tolist() == list(range(16)) and cand.ids.dtype == torch.long
    assert cand.select(torch.tensor([3, 0])).ids.tolist() == [3, 0]
    # stored candidates are scored in chunks: 16 candidates, chunks of 3 → 6 updates of the running top-k
    monkeypatch.setattr(multistage.scoring, "CANDIDATE_CHUNK", 3)
    top = scorer.search(qloader, cand, k=5, opponents=True)
    assert top.ids.tolist() == brute_top(dense, 5).tolist()
    assert top.opponent_ids.tolist() == brute_top(dense, 5, largest=False).tolist()
    torch.testing.assert_close(top.scores, dense.gather(1, brute_top(dense, 5)), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(scorer.pairwise(qloader, cand).pairwise, dense, rtol=1e-8, atol=1e-10)
    assert scorer.search(qloader, cand, k=100).ids.shape == (6, 16)
    # ids carried by the batches win over positions
    shifted = IndexedDataset(plain_train, offset=50)
    assert scorer.pairwise(qloader, DataLoader(shifted, batch_size=7)).train_ids.tolist() == list(range(50, 66))
    # mapping dampings in a sweep (fine-tuning keys given with pre-trained names) equal a scorer built with them
    dp, df = {"net.0": 1e-3, "net.2": 2e-3}, {"net.0": 1e-2, "net.2": 1e-4}
    sweep = scorer.damping_sweep(qloader, tloader, [(dp, df), (None, None)])
    ref = dense_multistage(pt, pt_f, ft, ft_f, [layers[0]], task, q_ex, t_ex, 1e-3, 1e-2)
    ref = ref + dense_multistage(pt, pt_f, ft, ft_f, [layers[1]], task, q_ex, t_ex, 2e-3, 1e-4)
    key = (repr(sorted(dp.items())), repr(sorted(df.items())))
    torch.testing.assert_close(sweep[key].pairwise, ref, rtol=1e-8, atol=1e-10)
    heuristic = dense_multistage(pt, pt_f, ft, ft_f, layers, task, q_ex, t_ex, None, None)
    torch.testing.assert_close(sweep[(None, None)].pairwise, heuristic, rtol=1e-8, atol=1e-10)
    # candidates of another scorer (other layers) are refused
    other = MultiStageScorer(pt, pt_f, ft, ft_f, task=task, layers="2")
    assert other.layers_used == ["net.2"]  # "2" matches "net.2" by the one glob rule ("*." + pattern)
    with pytest.raises(ValueError, match="CandidateGradients are for layers"):
        other.pairwise(qloader, cand)
    with pytest.raises(ValueError, match="k=.*0"):
        scorer.search(qloader, cand, k=0)
    with pytest.raises(ValueError, match="no batch"):
        scorer.pairwise(qloader, DataLoader(Subset(plain_train, []), batch_size=4))


class _Wrapper(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def test_layer_missing_from_factors_and_layer_map():
    pt, pt_ds, pt_f = _mlp_stage(5, 4, 3, seed=0)
    ft, ft_ds, _ = _mlp_stage(5, 4, 3, seed=1)
    ft_f = fit_factors(ft, DataLoader(ft_ds, batch_size=8), layers="net.2")
    scorer = MultiStageScorer(pt, pt_f, ft, ft_f)
    assert scorer.layers_used == ["net.2"] and "not in the fine-tuning factors" in scorer.layers_excluded["net.0"]
    # a wrapper with a different prefix: names are mapped explicitly
    wrapped = _Wrapper(ft)
    wrapped_f = copy.deepcopy(ft_f)
    wrapped_f.layers = {"inner." + n: f for n, f in ft_f.layers.items()}
    with pytest.raises(NoSharedLayersError):
        MultiStageScorer(pt, pt_f, wrapped, wrapped_f, task=ClassificationTask())
    mapped = MultiStageScorer(pt, pt_f, wrapped, wrapped_f, task=ClassificationTask(), layer_map=lambda n: "inner." + n)
    assert mapped.layer_pairs == {"net.2": "inner.net.2"}
    assert list(mapped.preconditioner_ft.damping) == ["inner.net.2"]
    ql, tl = DataLoader(ft_ds, batch_size=8), DataLoader(pt_ds, batch_size=8)
    direct = MultiStageScorer(pt, pt_f, ft, ft_f, task=ClassificationTask()).pairwise(ql, tl)
    torch.testing.assert_close(mapped.pairwise(ql, tl).pairwise, direct.pairwise)
    # a fine-tuning damping mapping may use either stage's names
    by_ft = MultiStageScorer(pt, pt_f, wrapped, wrapped_f, task=ClassificationTask(), layer_map={"net.2": "inner.net.2"}, damping_ft={"inner.net.2": 1e-3})
    by_pt = MultiStageScorer(pt, pt_f, wrapped, wrapped_f, task=ClassificationTask(), layer_map={"net.2": "inner.net.2"}, damping_ft={"net.2": 1e-3})
    assert by_ft.preconditioner_ft.damping == by_pt.preconditioner_ft.damping == {"inner.net.2": 1e-3}


def test_no_shared_layers_raises_clear_error():
    pt, _, pt_f = _mlp_stage(5, 4, 3, seed=0)
    ft, _, ft_f = _mlp_stage(6, 3, 2, seed=1)
    with pytest.raises(NoSharedLayersError, match="share no layer") as e:
        MultiStageScorer(pt, pt_f, ft, ft_f)
    assert "net.0: shape mismatch" in str(e.value) and "net.2: shape mismatch" in str(e.value)


def test_constructor_validation_messages():
    pt, _, pt_f = _mlp_stage(5, 4, 3, seed=0)
    with pytest.raises(InvalidArgumentError, match=r"damping_pt=.*-1\.0"):
        MultiStageScorer(pt, pt_f, pt, pt_f, damping_pt=-1.0)
    with pytest.raises(InvalidArgumentError, match=r"damping_pt=.*nan"):
        MultiStageScorer(pt, pt_f, pt, pt_f, damping_pt=float("nan"))
    with pytest.raises(InvalidArgumentError, match=r"damping_pt\['net.0'\]=.*-1"):
        MultiStageScorer(pt, pt_f, pt, pt_f, damping_pt={"net.0": -1.0, "net.2": 1.0})
    with pytest.raises(ValueError, match=r"damping_ft=.*'identity'.*'zero'"):
        MultiStageScorer(pt, pt_f, pt, pt_f, damping_ft="zero")
    with pytest.raises(TypeError, match="pretrained_factors"):
        MultiStageScorer(pt, {"net.0": 1}, pt, pt_f)
    with pytest.raises(TypeError, match="finetuned_model"):
        MultiStageScorer(pt, pt_f, "model", pt_f)
    with pytest.raises(PatternError, match=r"layers=.*'nope\*'"):
        MultiStageScorer(pt, pt_f, pt, pt_f, layers=["nope*"])
    with pytest.raises(PatternError, match=r"layers=.*'nope\*'"):
        MultiStageScorer(pt, None, pt, None, layers=["net.0", "nope*"])
    with pytest.raises(InvalidArgumentError, match=r"layers="):
        MultiStageScorer(pt, pt_f, pt, pt_f, layers=[])
    with pytest.raises(ValueError, match=r"damping_ft=0\.1\) has no effect"):
        MultiStageScorer(pt, pt_f, pt, None, damping_ft=0.1)
    with pytest.raises(ValueError, match="layers=.*required"):
        MultiStageScorer(pt, None, pt, None)
    with pytest.raises(ValueError, match="dtype="):
        MultiStageScorer(pt, pt_f, pt, pt_f, dtype=torch.int64)
    with pytest.raises(ValueError, match="damping_ft=.*lacks layers"):
        MultiStageScorer(pt, pt_f, pt, pt_f, damping_ft={"net.0": 1.0})
    with pytest.raises(TypeError, match="layer_map="):
        MultiStageScorer(pt, pt_f, pt, pt_f, layer_map=3)
    scorer = MultiStageScorer(pt, pt_f, pt, None)
    loader = DataLoader(TensorDataset(torch.randn(4, 5), torch.randint(0, 3, (4,))), batch_size=4)
    with pytest.raises(InvalidArgumentError, match=r"damping_ft=0\.1\) has no effect"):
        scorer.damping_sweep(loader, loader, [(None, 0.1)])
    with pytest.raises(InvalidArgumentError, match="damping_pt=.*lacks layers"):
        scorer.damping_sweep(loader, loader, [({"net.0": 1.0}, None)])
    with pytest.raises(InvalidArgumentError, match="pairs"):
        scorer.damping_sweep(loader, loader, [1e-3])
    with pytest.raises(InvalidArgumentError, match="per_layer="):
        scorer.pairwise(loader, loader, per_layer="yes")
    with pytest.raises(ValueError, match="k=.*0"):
        knn_indices(torch.randn(2, 3), torch.randn(4, 3), 0)
    with pytest.raises(ValueError, match="metric=.*'manhattan'"):
        knn_indices(torch.randn(2, 3), torch.randn(4, 3), 1, "manhattan")


def test_core_modules_import_without_lightning():
    code = (
        "import sys, lightning_influence.multistage, lightning_influence.retrieval\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'lightning_fabric'))\n"
        "assert not bad, bad[:10]\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["cosine", "euclidean", "dot"])
def test_knn_returns_exactly_the_k_nearest(metric):
    g = torch.Generator().manual_seed(0)
    q, c = torch.randn(7, 5, generator=g), torch.randn(40, 5, generator=g)
    idx, _ = knn_indices(q, c, 6, metric, chunk_size=3)
    for i in range(len(q)):
        if metric == "cosine":
            key = [-float(F.cosine_similarity(q[i], c[j], dim=0)) for j in range(len(c))]
        elif metric == "dot":
            key = [-float(q[i] @ c[j]) for j in range(len(c))]
        else:
            key = [float((q[i] - c[j]).norm()) for j in range(len(c))]
        brute = sorted(range(len(c)), key=lambda j: key[j])[:6]
        assert idx[i].tolist() == brute
    assert knn_indices(q, c, 100, metric)[0].shape == (7, 40)


def test_default_embedding_ignores_padding():
    model = CausalLMModule(tiny_causal_lm("gpt_neox", vocab_size=VOCAB, hidden=8, layers=1, heads=2, seed=3)).double()
    seqs = synthetic_token_dataset(5, vocab_size=VOCAB, min_len=2, max_len=6, seed=3)
    emb = MeanPooledHiddenStates(model)
    assert emb.model is model.model  # the transformers model inside the LightningModule
    model.train()
    model.model.gpt_neox.layers[0].eval()  # a submodule deliberately left in eval mode
    batched = emb(lm_collate(seqs))
    assert model.training and model.model.training and not model.model.gpt_neox.layers[0].training  # flags restored
    assert batched.shape == (len(seqs), 8) and batched.dtype == torch.float64
    torch.testing.assert_close(emb((torch.arange(len(seqs)), lm_collate(seqs))), batched)  # (ids, batch) accepted
    hf = model.model
    hf.eval()
    for i, s in enumerate(seqs):
        h = hf(input_ids=s["input_ids"][None], output_hidden_states=True).hidden_states[-1][0]
        torch.testing.assert_close(batched[i], h.mean(0).detach(), rtol=1e-9, atol=1e-10)


def _lm_or_qa_collate(items):
    first = items[0][1] if isinstance(items[0], (tuple, list)) else items[0]
    return qa_collate(items) if "prompt_ids" in first else lm_collate(items)


def test_narrowed_scores_equal_full_computation_for_kept_candidates():
    pt, pt_f, ft, ft_f, train, queries, _, task = lm_stages()
    scorer = MultiStageScorer(pt, pt_f, ft, ft_f, task=task)
    full = scorer.pairwise(DataLoader(queries, batch_size=6, collate_fn=qa_collate), DataLoader(train, batch_size=8, collate_fn=lm_collate)).pairwise
    collate = _lm_or_qa_collate
    res = scorer.narrowed(queries, train, k=3, collate_fn=collate, batch_size=4)
    assert isinstance(res, NarrowedScores) and res.query_ids.tolist() == list(range(len(queries)))
    pool = MeanPooledHiddenStates(pt)
    t_emb = pool(lm_collate([train[i] for i in range(len(train))]))
    q_emb = pool(qa_collate([queries[i] for i in range(len(queries))]))
    ref_idx, _ = knn_indices(q_emb, t_emb, 3)
    assert res.scores.shape == (len(queries), 3)
    for r in range(len(queries)):
        assert sorted(res.indices[r].tolist()) == sorted(ref_idx[r].tolist())
        torch.testing.assert_close(res.scores[r], full[r, res.indices[r]], rtol=1e-8, atol=1e-10)
        assert (res.scores[r][:-1] >= res.scores[r][1:]).all()
    assert res.ids.tolist() == res.indices.tolist()  # IndexedDataset ids are positions here
    assert res.n_candidates == len(torch.unique(ref_idx)) and res.n_train == len(train)
    assert set(res.seconds) >= {"embed", "knn", "candidates", "queries", "scores", "total"}
    assert res.seconds_saved == pytest.approx(res.estimated_full_seconds - res.seconds["total"])
    dense = res.dense()
    assert torch.isinf(dense).sum() == len(queries) * (len(train) - 3)
    # a prebuilt candidate index gives the same result
    index = scorer.embeddings(DataLoader(train, batch_size=3, collate_fn=lm_collate))
    torch.testing.assert_close(index, t_emb, rtol=1e-9, atol=1e-10)
    res2 = scorer.narrowed(queries, train, k=3, collate_fn=collate, batch_size=4, train_embeddings=index)
    torch.testing.assert_close(res2.scores, res.scores)
    assert torch.equal(res2.indices, res.indices)
    # ids come from the batches (an offset), or are dataset positions when the items carry none
    shifted = scorer.narrowed(IndexedDataset(queries.dataset, offset=20), IndexedDataset(train.dataset, offset=100), k=3,
                              collate_fn=collate, batch_size=4, train_embeddings=index)
    assert torch.equal(shifted.indices, res.indices) and (shifted.ids == res.indices + 100).all()
    assert shifted.query_ids.tolist() == list(range(20, 20 + len(queries)))
    torch.testing.assert_close(shifted.scores, res.scores)
    plain = scorer.narrowed(queries.dataset, train.dataset, k=3, collate_fn=collate, batch_size=5, train_embeddings=index)
    assert torch.equal(plain.ids, res.indices) and plain.query_ids.tolist() == list(range(len(queries)))
    torch.testing.assert_close(plain.scores, res.scores)
    with pytest.raises(ValueError, match="train_embeddings"):
        scorer.narrowed(queries, train, k=3, collate_fn=collate, train_embeddings=index[:2])
    with pytest.raises(ValueError, match="k=.*0"):
        scorer.narrowed(queries, train, k=0, collate_fn=collate)
    with pytest.raises(ValueError, match="metric=.*'l1'"):
        scorer.narrowed(queries, train, k=1, collate_fn=collate, metric="l1")
    with pytest.raises(TypeError, match="train_dataset=.*DataLoader"):
        scorer.narrowed(queries, DataLoader(train), k=1, collate_fn=collate)


# ----------------------------------------------------------------------------------------------
def test_qa_collate_answer_only_measurement():
    model = CausalLMModule(tiny_causal_lm("gpt_neox", vocab_size=VOCAB, hidden=8, layers=1, heads=2, seed=4)).double()
    items = qa_items(3, seed=5)
    ids, batch = qa_collate([(10 + i, it) for i, it in enumerate(items)])
    assert ids.tolist() == [10, 11, 12]
    for r, it in enumerate(items):
        p, a = len(it["prompt_ids"]), len(it["answer_ids"])
        lab = batch["labels"][r]
        assert (lab[:p] == -100).all() and lab[p : p + a].tolist() == it["answer_ids"].tolist() and (lab[p + a :] == -100).all()
    m = CausalLMTask().measurement(model, batch)
    for r, it in enumerate(items):
        seq = torch.cat([it["prompt_ids"], it["answer_ids"]])
        logp = torch.log_softmax(model.model(input_ids=seq[None]).logits[0], -1)
        p = len(it["prompt_ids"])
        ref = -sum(logp[t - 1, seq[t]] for t in range(p, len(seq)))
        torch.testing.assert_close(m[r], ref, rtol=1e-9, atol=1e-10)
    with pytest.raises(ValueError, match="prompt_lengths"):
        answer_only_labels(batch["input_ids"], [0, 1, 1])
