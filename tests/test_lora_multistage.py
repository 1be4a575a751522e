"""Multi-stage influence through a LoRA fine-tune: full pre-training, then LoRA adapters on a
frozen base; a query on the fine-tuned model attributed to pre-training sequences.

Only the adapters changed, so the fine-tuned side is the gradient with respect to each adapted
layer's *effective* weight ``W₀ + s·B·A`` (``LoRALinearLayer``: the base weight's gradient,
through the adapters), preconditioned by fine-tuning factors of the same layers, then by the
pre-training factors of the layer it adapts. Checked against a dense float64 reference (autograd
with respect to the base weights, dense Kronecker preconditioners) and against the merged model.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_influence import IndexedDataset, MultiStageScorer
from lightning_influence.data import lm_collate
from lightning_influence.demos import CausalLMModule, synthetic_token_dataset, tiny_causal_lm
from lightning_influence.ekfac.fit import fit_factors
from lightning_influence.layers import LinearLayer, LoRALinearLayer, select_layers
from lightning_influence.task import CausalLMTask

from ekfac_reference import dense_preconditioner, per_example_param_grads

peft = pytest.importorskip("peft")

VOCAB = 40
PATTERNS = ["*q_proj", "*v_proj", "*up_proj", "*down_proj"]
DAMPING_PT, DAMPING_FT = 1e-3, 1e-2


def to_peft_name(name: str) -> str:
    """``model.model.layers.0...`` (pre-trained) → ``model.base_model.model.model.layers.0...`` (peft)."""
    return name.replace("model.", "model.base_model.model.", 1)


@pytest.fixture(scope="module")
def stages():
    task = CausalLMTask()
    pt = CausalLMModule(tiny_causal_lm("llama", vocab_size=VOCAB, hidden=16, layers=1, heads=2, max_len=16, seed=0)).double()
    pretrain = IndexedDataset(synthetic_token_dataset(10, vocab_size=VOCAB, min_len=3, max_len=8, seed=1))
    pt_layers = select_layers(pt, PATTERNS)
    pt_factors = fit_factors(pt, DataLoader(pretrain, batch_size=5, collate_fn=lm_collate), pt_layers, task)
    torch.manual_seed(2)  # random B: a fine-tuned adapter
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                          lora_dropout=0.0, init_lora_weights=False)
    ft = CausalLMModule(peft.get_peft_model(copy.deepcopy(pt.model), cfg)).double()
    finetune = IndexedDataset(synthetic_token_dataset(8, vocab_size=VOCAB, min_len=3, max_len=8, seed=3))
    ft_layers = select_layers(ft, PATTERNS)
    assert [l.name for l in ft_layers] == [to_peft_name(l.name) for l in pt_layers]
    assert {type(l) for l in ft_layers} == {LoRALinearLayer} and {type(l) for l in pt_layers} == {LinearLayer}
    ft_factors = fit_factors(ft, DataLoader(finetune, batch_size=4, collate_fn=lm_collate), ft_layers, task)
    queries = IndexedDataset(synthetic_token_dataset(3, vocab_size=VOCAB, min_len=3, max_len=8, seed=4))
    return task, pt, pt_layers, pt_factors, ft, ft_layers, ft_factors, pretrain, finetune, queries


def test_multistage_through_lora_adapters_equals_dense_reference_and_merged_model(stages):
    task, pt, pt_layers, pt_f, ft, ft_layers, ft_f, pretrain, finetune, queries = stages
    qloader = DataLoader(queries, batch_size=3, collate_fn=lm_collate)
    tloader = DataLoader(pretrain, batch_size=4, collate_fn=lm_collate)
    scorer = MultiStageScorer(pt, pt_f, ft, ft_f, task=task, damping_pt=DAMPING_PT, damping_ft=DAMPING_FT, layer_map=to_peft_name)
    assert scorer.layers_used == [l.name for l in pt_layers] and scorer.layers_excluded == {}
    scores = scorer.pairwise(qloader, tloader).pairwise

    # dense reference: autograd w.r.t. the (frozen) base weights of the fine-tuned model, unfrozen here
    base_weights = [l.parameters()[0] for l in ft_layers]
    for w in base_weights:
        w.requires_grad_(True)
    try:
        gq = per_example_param_grads(ft, task, [lm_collate([queries[i]])[1] for i in range(len(queries))], ft_layers, "measurement")
    finally:
        for w in base_weights:
            w.requires_grad_(False)
    gt = per_example_param_grads(pt, task, [lm_collate([pretrain[i]])[1] for i in range(len(pretrain))], pt_layers)
    dense = 0.0
    for lp, lf in zip(pt_layers, ft_layers):
        p_pt = dense_preconditioner(pt_f.layers[lp.name], DAMPING_PT)
        p_ft = dense_preconditioner(ft_f.layers[lf.name], DAMPING_FT)
        dense = dense + gq[lf.name].reshape(len(queries), -1) @ p_ft @ p_pt @ gt[lp.name].reshape(len(pretrain), -1).T
    torch.testing.assert_close(scores, dense, rtol=1e-7, atol=1e-9 * float(dense.abs().max()))

    # the merged fine-tuned model (merge_and_unload) gives the same scores with its own factors
    merged = CausalLMModule(copy.deepcopy(ft.model).merge_and_unload()).double()
    merged.requires_grad_(True)  # merge_and_unload keeps the base frozen; the passes differentiate layer outputs
    merged_f = fit_factors(merged, DataLoader(finetune, batch_size=4, collate_fn=lm_collate), select_layers(merged, PATTERNS), task)
    via_merged = MultiStageScorer(pt, pt_f, merged, merged_f, task=task, damping_pt=DAMPING_PT, damping_ft=DAMPING_FT)
    torch.testing.assert_close(via_merged.pairwise(qloader, tloader).pairwise, scores, rtol=1e-6, atol=1e-9 * float(dense.abs().max()))
