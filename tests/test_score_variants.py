"""Score variants (raw / cosine / relative) of every scorer and the index against brute-force
float64 computations: autograd per-example gradients and dense Kronecker preconditioners."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_influence.data import lm_collate, qa_collate
from lightning_influence.ekfac.scorer import InfluenceScorer
from lightning_influence.index import InfluenceIndexError, build_index
from lightning_influence.multistage import MultiStageScorer
from lightning_influence.validation import InvalidArgumentError
from lightning_influence.normalization import normalize_scores

from cases import brute_top, lm_case, lm_stages, mlp_case
from ekfac_reference import dense_multistage, dense_preconditioner, per_example_param_grads

pytestmark = pytest.mark.usefixtures("float64_default")  # fixture in tests/conftest.py

VARIANTS = ("raw", "cosine", "relative")


def brute_variants(raw, q_self, t_self):
    """The three variants by their definitions, element by element in float64."""
    cos = torch.empty_like(raw)
    rel = torch.empty_like(raw)
    for i in range(raw.shape[0]):
        for j in range(raw.shape[1]):
            cos[i, j] = raw[i, j] / (q_self[i].sqrt() * t_self[j].sqrt())
            rel[i, j] = raw[i, j] / t_self[j]
    return {"raw": raw, "cosine": cos, "relative": rel}


def single_stage_reference(model, factors, task, query, train, collate, layers):
    col = collate or torch.utils.data.default_collate
    gq = per_example_param_grads(model, task, [col([query[i]]) for i in range(len(query))], layers, which="measurement")
    gt = per_example_param_grads(model, task, [col([train[i]]) for i in range(len(train))], layers)
    raw = q_self = t_self = 0.0
    for t in layers:
        p = dense_preconditioner(factors.layers[t.name], factors.dampings()[t.name])
        a, b = gq[t.name].reshape(len(query), -1), gt[t.name].reshape(len(train), -1)
        raw = raw + a @ p @ b.T
        q_self = q_self + ((a @ p) * a).sum(1)
        t_self = t_self + ((b @ p) * b).sum(1)
    return brute_variants(raw, q_self, t_self)


@pytest.mark.parametrize("case", ["mlp", "gpt_neox"])
def test_single_stage_scorer_and_exact_index_variants_equal_brute_force(tmp_path, case):
    model, factors, train, query = mlp_case() if case == "mlp" else lm_case()
    collate = None if case == "mlp" else lm_collate
    loader = DataLoader(train, batch_size=6, collate_fn=collate)
    qloader = DataLoader(query, batch_size=2, collate_fn=collate)
    scorer = InfluenceScorer(model, factors, dtype=torch.float64)
    ref = single_stage_reference(model, factors, scorer.task, query, train, collate, scorer.tracked)
    index = build_index(model, factors, loader, tmp_path / "idx", compression="exact", dtype="float64", shard_size=7, per_layer=True)
    for v in VARIANTS:
        res = scorer.pairwise(qloader, loader, per_layer=True, normalize=v)
        torch.testing.assert_close(res.pairwise, ref[v], rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(sum(res.per_layer.values()), res.pairwise, rtol=1e-9, atol=1e-12)
        assert res.options["normalize"] == v and res.options["damping_rule"] == "spectrum"
        top = scorer.search(qloader, loader, k=4, opponents=True, normalize=v)
        assert top.ids.tolist() == brute_top(ref[v], 4).tolist()
        assert top.opponent_ids.tolist() == brute_top(ref[v], 4, largest=False).tolist()
        torch.testing.assert_close(top.scores, ref[v].gather(1, brute_top(ref[v], 4)), rtol=1e-8, atol=1e-12)
        # the index: its stored self-influence is float32, so its normalised scores agree to float32 precision
        ires = index.scores(qloader, per_layer=True, normalize=v)
        torch.testing.assert_close(ires.pairwise, ref[v], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(sum(ires.per_layer.values()), ires.pairwise, rtol=1e-9, atol=1e-12)
        assert ires.options["normalize"] == v
        assert index.search(qloader, k=4, normalize=v).ids.tolist() == brute_top(ref[v], 4).tolist()
    cos = ref["cosine"]
    assert float(cos.abs().max()) <= 1 + 1e-12  # Cauchy–Schwarz in the P inner product
    # the variants rank differently here (otherwise this test could not tell them apart)
    assert brute_top(ref["raw"], 4).tolist() != brute_top(ref["relative"], 4).tolist()
    assert brute_top(ref["cosine"], 4).tolist() != brute_top(ref["relative"], 4).tolist()


def test_projected_index_divides_by_exact_norms(tmp_path):
    model, factors, train, query = mlp_case(n=30)
    loader, qloader = DataLoader(train, batch_size=8), DataLoader(query, batch_size=5)
    scorer = InfluenceScorer(model, factors, dtype=torch.float64)
    ref = single_stage_reference(model, factors, scorer.task, query, train, None, scorer.tracked)
    q_self = (ref["raw"] / ref["cosine"]) ** 2 / (ref["raw"] / ref["relative"])  # ‖u‖² from the reference
    for compression in ("sjlt", "kronecker"):
        index = build_index(model, factors, loader, tmp_path / compression, compression=compression, dim=16, dtype="float64")
        raw = index.scores(qloader).pairwise
        t_self = index.self_influence().self_influence.double()
        torch.testing.assert_close(t_self, (ref["raw"] / ref["relative"])[0], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(index.scores(qloader, normalize="relative").pairwise, raw / t_self, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(index.scores(qloader, normalize="cosine").pairwise, raw / (q_self[:, :1].sqrt() * t_self.sqrt()),
                                   rtol=1e-5, atol=1e-9)


def test_multistage_variants_equal_brute_force_in_the_pretraining_inner_product(tmp_path):
    pt, pt_f, ft, ft_f, train, queries, layers, task = lm_stages()
    scorer = MultiStageScorer(pt, pt_f, ft, ft_f, task=task)
    q_ex = [qa_collate([queries[i]]) for i in range(len(queries))]
    t_ex = [lm_collate([train[i]]) for i in range(len(train))]
    raw = dense_multistage(pt, pt_f, ft, ft_f, layers, task, q_ex, t_ex, None, None)
    # norms: u = P_ft ∇m and v = ∇ℓ, both under P_pt
    gq = per_example_param_grads(ft, task, q_ex, scorer.tracked_ft, which="measurement")
    gt = per_example_param_grads(pt, task, t_ex, layers, which="loss")
    q_self = t_self = 0.0
    for t in layers:
        fp, ff = pt_f.layers[t.name], ft_f.layers[t.name]
        p_pt, p_ft = dense_preconditioner(fp, pt_f.dampings()[t.name]), dense_preconditioner(ff, ft_f.dampings()[t.name])
        u = gq[t.name].reshape(len(q_ex), -1) @ p_ft
        v = gt[t.name].reshape(len(t_ex), -1)
        q_self = q_self + ((u @ p_pt) * u).sum(1)
        t_self = t_self + ((v @ p_pt) * v).sum(1)
    ref = brute_variants(raw, q_self, t_self)
    qloader = DataLoader(queries, batch_size=4, collate_fn=qa_collate)
    tloader = DataLoader(train, batch_size=3, collate_fn=lm_collate)
    cand = scorer.candidates(tloader)
    index = scorer.build_index(tloader, tmp_path / "idx", compression="exact", dtype="float64")
    for v in VARIANTS:
        for source in (tloader, cand, index):
            res = scorer.pairwise(qloader, source, per_layer=True, normalize=v)
            tol = dict(rtol=1e-5, atol=1e-9) if source is index else dict(rtol=1e-8, atol=1e-12)  # index: float32 self-influence
            torch.testing.assert_close(res.pairwise, ref[v], **tol)
            torch.testing.assert_close(sum(res.per_layer.values()), res.pairwise, rtol=1e-9, atol=1e-12)
            assert res.options["normalize"] == v
            top = scorer.search(qloader, source, k=3, opponents=True, normalize=v)
            assert top.ids.tolist() == brute_top(ref[v], 3).tolist()
            assert top.opponent_ids.tolist() == brute_top(ref[v], 3, largest=False).tolist()
    assert scorer.pairwise(qloader, cand, normalize="relative").options["damping_rule_pt"] == "spectrum"


def test_zero_norms_give_zero_and_bad_arguments_are_refused(tmp_path):
    scores = torch.tensor([[2.0, 0.0, -3.0], [0.0, 0.0, 0.0]])
    out = normalize_scores(scores.clone(), "cosine", torch.tensor([4.0, 0.0]), torch.tensor([1.0, 0.0, 9.0]))
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.0, -0.5], [0.0, 0.0, 0.0]]))
    out = normalize_scores(scores.clone(), "relative", None, torch.tensor([4.0, 0.0, 3.0]))
    torch.testing.assert_close(out, torch.tensor([[0.5, 0.0, -1.0], [0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="self-influence"):
        normalize_scores(scores.clone(), "relative")
    model, factors, train, query = mlp_case(n=12)
    loader, qloader = DataLoader(train, batch_size=6), DataLoader(query, batch_size=5)
    with pytest.raises(InvalidArgumentError, match="normalize"):
        InfluenceScorer(model, factors).pairwise(qloader, loader, normalize="unit")
    with pytest.raises(InvalidArgumentError, match="normalize"):
        InfluenceScorer(model, factors).search(qloader, loader, normalize=None)
    index = build_index(model, factors, loader, tmp_path / "nos", compression="exact", self_influence=False)
    assert index.scores(qloader).pairwise.shape == (5, 12)
    with pytest.raises(InfluenceIndexError, match="self_influence=False"):
        index.scores(qloader, normalize="cosine")
    with pytest.raises(InfluenceIndexError, match="self_influence=False"):
        index.search(qloader, normalize="relative")
    with pytest.raises(InvalidArgumentError, match="approximate"):
        index.search(qloader, normalize="cosine", approximate=object())
