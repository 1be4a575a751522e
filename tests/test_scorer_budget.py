"""InfluenceScorer at scale: queries preconditioned from token vectors and per-example gradients
formed in blocks sized by a memory budget give the per-example float64 reference's scores (dense
Kronecker preconditioners over autograd gradients, one example at a time); a budget too small
for the queries is refused before any work, with the numbers and the knobs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_influence import IndexedDataset, select_layers
from lightning_influence.data import lm_collate
from lightning_influence.demos import CausalLMModule, synthetic_token_dataset, tiny_causal_lm
from lightning_influence.ekfac.fit import fit_factors
from lightning_influence.ekfac.scorer import WORKSPACE_COPIES, InfluenceScorer
from lightning_influence.memory import InsufficientMemoryError, format_bytes
from lightning_influence.task import CausalLMTask

from ekfac_reference import dense_preconditioner, per_example_param_grads

# float32 scoring against the float64 reference: scores agree to this fraction of the largest |score|
REL_TOL = 2e-4


@pytest.fixture(scope="module")
def gpt2_case():
    """A 2-block GPT-2 (transformers Conv1D, fused QKV) in float32, factors fitted on it, and
    float64 reference scores from a float64 copy of the same weights."""
    model = CausalLMModule(tiny_causal_lm("gpt2", vocab_size=50, hidden=16, layers=2, heads=2, seed=3))
    seqs = synthetic_token_dataset(16, vocab_size=50, min_len=5, max_len=24, seed=4)  # long and short: both rotation orders
    train, query = IndexedDataset(seqs[:11]), IndexedDataset(seqs[11:], offset=100)
    layers = select_layers(model, "*.h.*")
    factors = fit_factors(model, DataLoader(train, batch_size=4, collate_fn=lm_collate), layers, CausalLMTask())
    ref_model = copy.deepcopy(model).double()
    task, ref_layers = CausalLMTask(), select_layers(ref_model, "*.h.*")
    gq = per_example_param_grads(ref_model, task, [lm_collate([query[i]]) for i in range(len(query))], ref_layers, which="measurement")
    gt = per_example_param_grads(ref_model, task, [lm_collate([train[i]]) for i in range(len(train))], ref_layers)
    damping = factors.dampings()
    pre = {n: dense_preconditioner(factors.layers[n], damping[n]) for n in gq}
    dense = sum(gq[n].reshape(len(query), -1) @ pre[n] @ gt[n].reshape(len(train), -1).T for n in gq)
    q_self = sum(((gq[n].reshape(len(query), -1) @ pre[n]) * gq[n].reshape(len(query), -1)).sum(1) for n in gq)
    t_self = sum(((gt[n].reshape(len(train), -1) @ pre[n]) * gt[n].reshape(len(train), -1)).sum(1) for n in gt)
    return model, factors, train, query, dense, q_self, t_self


def _loaders(train, query):
    return DataLoader(query, batch_size=5, collate_fn=lm_collate), DataLoader(train, batch_size=6, collate_fn=lm_collate)


def _one_example_budget(scorer, n_query):
    """A budget that leaves exactly one example's workspace of the largest layer."""
    return scorer.fixed_bytes() + scorer.query_bytes(n_query) + WORKSPACE_COPIES * max(scorer._sizes().values()) * scorer.itemsize


def _close(got, want):
    err = float((got.double() - want).abs().max())
    assert err <= REL_TOL * float(want.abs().max()), (err, float(want.abs().max()))


def test_blocked_scoring_equals_the_float64_reference(gpt2_case):
    model, factors, train, query, dense, q_self, t_self = gpt2_case
    qloader, tloader = _loaders(train, query)
    probe = InfluenceScorer(model, factors)
    budget = _one_example_budget(probe, len(query))
    tight = InfluenceScorer(model, factors, memory_budget=budget)
    ws = tight._workspace(len(query), "test")
    assert [tight._rows(n, ws) for n in tight.layer_names] == [max(1, ws // (WORKSPACE_COPIES * s * 4)) for s in tight._sizes().values()]
    assert min(tight._rows(n, ws) for n in tight.layer_names) == 1  # the largest layer: one example at a time

    res = tight.pairwise(qloader, tloader)
    assert res.query_ids.tolist() == list(range(100, 105)) and res.train_ids.tolist() == list(range(11))
    _close(res.pairwise, dense)
    free = InfluenceScorer(model, factors).pairwise(qloader, tloader).pairwise  # default budget: whole batches
    torch.testing.assert_close(res.pairwise, free, rtol=1e-5, atol=1e-6 * float(free.abs().max()))
    # the queries' norms (computed in the eigenbasis) and the training self-influence
    _close(tight.prepare_queries(qloader).self_influence, q_self)
    _close(tight.self_influence(tloader).self_influence, t_self)
    cos = tight.pairwise(qloader, tloader, normalize="cosine").pairwise.double()
    torch.testing.assert_close(cos, dense / (q_self[:, None].sqrt() * t_self[None, :].sqrt()), rtol=0, atol=REL_TOL)
    top = tight.search(qloader, tloader, k=3)
    assert top.ids.tolist() == torch.topk(dense, 3, dim=1).indices.tolist()


def test_few_training_examples_are_scored_in_the_eigenbasis_with_the_same_scores(gpt2_case):
    """With fewer training examples than it costs to rotate every query back, the queries stay in
    the eigenbasis and the training gradients are rotated instead: the same scores."""
    model, factors, train, query, dense, *_ = gpt2_case
    qloader, tloader = _loaders(train, query)
    scorer = InfluenceScorer(model, factors, memory_budget=_one_example_budget(InfluenceScorer(model, factors), len(query)))
    q = scorer.prepare_queries(qloader, n_train=1)
    assert q.eigenbasis == frozenset(scorer.layer_names)
    assert scorer.prepare_queries(qloader, n_train=10**6).eigenbasis == frozenset() == scorer.prepare_queries(qloader).eigenbasis
    got = torch.cat([blk for _, blk, _ in scorer.batch_scores(q, tloader)], dim=1)
    _close(got, dense)
    one = DataLoader(torch.utils.data.Subset(train, [3]), batch_size=1, collate_fn=lm_collate)  # search picks it for one example
    top = scorer.search(qloader, one, k=1)
    torch.testing.assert_close(top.scores[:, 0].double(), dense[:, 3], rtol=0, atol=REL_TOL * float(dense.abs().max()))


def test_a_budget_too_small_for_the_queries_is_refused_before_any_work(gpt2_case):
    model, factors, train, query, *_ = gpt2_case
    qloader, tloader = _loaders(train, query)
    probe = InfluenceScorer(model, factors)
    budget = _one_example_budget(probe, len(query)) - 1
    scorer = InfluenceScorer(model, factors, memory_budget=budget)
    forwards = []
    hook = model.model.transformer.h[0].mlp.c_fc.register_forward_hook(lambda *a: forwards.append(1))
    try:
        with pytest.raises(InsufficientMemoryError) as e:
            scorer.search(qloader, tloader, k=2)
    finally:
        hook.remove()
    assert forwards == []  # refused from the loader's size, before the first query batch
    msg = str(e.value)
    p = sum(probe._sizes().values())
    for part in (f"{len(query)} queries", f"{p:,} tracked parameters", format_bytes(budget), "memory_budget", "layers=",
                 "fewer queries", format_bytes(probe.query_bytes(len(query)))):
        assert part in msg, (part, msg)
    # one query fewer fits
    fewer = IndexedDataset([query[i][1] for i in range(len(query) - 1)], offset=100)
    InfluenceScorer(model, factors, memory_budget=budget).search(DataLoader(fewer, batch_size=5, collate_fn=lm_collate), tloader, k=2)


def test_unsized_query_loaders_are_counted_as_they_come(gpt2_case):
    model, factors, train, query, *_ = gpt2_case
    probe = InfluenceScorer(model, factors)
    budget = _one_example_budget(probe, 3)
    batches = (lm_collate([query[i] for i in range(s, min(len(query), s + 2))]) for s in range(0, len(query), 2))
    with pytest.raises(InsufficientMemoryError, match="preparing 4 queries"):
        InfluenceScorer(model, factors, memory_budget=budget).prepare_queries(batches)
