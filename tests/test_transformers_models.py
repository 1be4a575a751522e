"""transformers models from small configs, end to end: the three callbacks in one Trainer and
the scorer, each against an independent float64 reference.

Per architecture (random weights, lr = 0 so that the weights are fixed and references exist):

* EKFACInfluence's factors equal the offline fit (hooks, padding masks and the task's gradient
  scale on a real training loop), and the scorer's pairwise and self-influence scores equal
  dense ``(Q_S ⊗ Q_A) diag(1/(Λ+λ)) (Q_S ⊗ Q_A)ᵀ`` products of per-example autograd gradients;
* Z0Influence's recorded losses equal per-example losses computed here from the model's logits,
  and its Gram entry equals ``‖θ‖²``;
* LiSSASelfInfluence (whole pool per step, so deterministic) equals ``gᵀ (H + λI)⁻¹ g`` with an
  explicit Hessian on a small parameter subset.

Tied input/output embeddings (GPT-2, Gemma): a tracked ``lm_head`` contributes the gradient of
its own use of the shared weight; the reference takes gradients with respect to an untied copy.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, Subset

from lightning_influence import IndexedDataset, LiSSASelfInfluence, Z0Influence, load_factors
from lightning_influence.data import classification_collate, lm_collate
from lightning_influence.demos import (
    CausalLMModule,
    DigitsImages,
    HFClassifierModule,
    digits_dataset,
    synthetic_sequence_classification,
    synthetic_token_dataset,
    tiny_causal_lm,
    tiny_image_classifier,
    tiny_sequence_classifier,
)
from lightning_influence.ekfac.fit import fit_factors
from lightning_influence.ekfac.scorer import InfluenceScorer
from lightning_influence.layers import select_layers
from lightning_influence.lissa import LiSSAOptions
from lightning_influence.lissa.samplers import RandomSampler
from lightning_influence.task import CausalLMTask, ImageClassificationTask, SequenceClassificationTask, default_task_for
from lightning_influence.z0 import load_z0

from ekfac_reference import assert_same_factors, dense_preconditioner
from scaffold import exact, quiet_trainer

N_TRAIN, BATCH, QUERIES = 8, 4, [1, 6]
VOCAB = 24


def causal(arch, attn=None):
    model = tiny_causal_lm(arch, vocab_size=VOCAB, hidden=16, layers=1, heads=2, max_len=16, seed=0, attn_implementation=attn)
    data = IndexedDataset(synthetic_token_dataset(N_TRAIN, vocab_size=VOCAB, min_len=3, max_len=9, seed=1))
    return CausalLMModule(model, lr=0.0), data, lm_collate


def sequence_classifier(arch):
    model = tiny_sequence_classifier(arch, n_classes=3, vocab_size=VOCAB, hidden=16, layers=1, heads=2, max_len=16, seed=0)
    data = IndexedDataset(synthetic_sequence_classification(N_TRAIN, n_classes=3, vocab_size=VOCAB, min_len=3, max_len=9, seed=1))
    return HFClassifierModule(model, lr=0.0), data, classification_collate


def image_classifier(_):
    model = tiny_image_classifier(n_classes=10, hidden=16, layers=1, heads=2, seed=0)
    train, _, _ = digits_dataset()
    return HFClassifierModule(model, lr=0.0), IndexedDataset(DigitsImages(Subset(train, range(N_TRAIN)))), None


CASES = {
    # name: (builder, arch, expected task, a small parameter for the LiSSA reference, layer types expected)
    "llama": (causal, "llama", CausalLMTask, "model.model.norm.weight", {"LinearLayer"}),
    # LiSSA through attention differentiates it twice: fused SDPA kernels cannot, eager attention can
    "qwen2": (lambda a: causal(a, "eager"), "qwen2", CausalLMTask, "model.model.layers.0.self_attn.k_proj.bias", {"LinearLayer"}),
    "mistral": (causal, "mistral", CausalLMTask, "model.model.norm.weight", {"LinearLayer"}),
    "gemma": (causal, "gemma", CausalLMTask, "model.model.norm.weight", {"LinearLayer"}),
    "gpt2": (causal, "gpt2", CausalLMTask, "model.transformer.ln_f.bias", {"TransformersConv1DLayer", "LinearLayer"}),
    "bert": (sequence_classifier, "bert", SequenceClassificationTask, "model.classifier.bias", {"LinearLayer"}),
    "vit": (image_classifier, "vit", ImageClassificationTask, "model.classifier.bias", {"Conv2dLayer", "LinearLayer"}),
}


def untied(module: nn.Module) -> nn.Module:
    """A copy whose output embedding no longer shares the input embedding's weight."""
    ref = copy.deepcopy(module)
    hf = ref.model
    out = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    if out is not None and out.weight is hf.get_input_embeddings().weight:
        out.weight = nn.Parameter(out.weight.detach().clone())
    return ref


def reference_losses(module, batch) -> torch.Tensor:
    """Per-example losses from the model's logits, written out here (summed over tokens)."""
    f = batch[1]
    if "pixel_values" in f:
        return F.cross_entropy(module.model(pixel_values=f["pixel_values"]).logits, f["labels"], reduction="none")
    logits = module.model(input_ids=f["input_ids"], attention_mask=f["attention_mask"]).logits
    if f["labels"].dim() == 1:
        return F.cross_entropy(logits, f["labels"], reduction="none")
    labels = f["labels"][:, 1:]
    tok = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none")
    return tok.view(labels.shape).sum(1)


def per_example_grads(module, layers, examples):
    """``{layer: Tensor[N, d_out, a_dim]}`` of each example's loss, autograd over the layer's
    parameters (flattened by hand: weight as (d_out, d_in), bias last)."""
    modules = dict(module.named_modules())
    out = {l.name: [] for l in layers}
    for batch in examples:
        loss = reference_losses(module, batch).sum()
        for l in layers:
            m = modules[l.name]
            params = [m.weight] + ([m.bias] if m.bias is not None else [])
            g = torch.autograd.grad(loss, params, retain_graph=True)
            w = g[0].T if type(m).__name__ == "Conv1D" else g[0].reshape(g[0].shape[0], -1)
            out[l.name].append(torch.cat([w, g[1][:, None]], 1) if len(g) == 2 else w)
    return {n: torch.stack(v) for n, v in out.items()}


def lissa_reference(module, param: str, examples, probe_idx):
    """``(damping, scale, exact scores)`` for the mean-loss Hessian over ``examples`` on ``param``."""
    base = dict(module.named_parameters())[param].detach().clone()
    mean = lambda p: torch.stack([_loss_with(module, param, p, b).sum() for b in examples]).mean()  # noqa: E731
    H = torch.autograd.functional.hessian(mean, base)
    G = torch.stack([_grad(module, param, base, examples[i]) for i in probe_idx])
    evals = torch.linalg.eigvalsh(H)
    damping = float(max(0.0, -evals.min()) + 0.3 * evals.max())
    scale = 1.05 * float(evals.max() + damping)
    exact = (G * torch.linalg.solve(H + damping * torch.eye(len(base), dtype=H.dtype), G.T).T).sum(1)
    return damping, scale, exact


def _loss_with(module, param, value, batch):
    """Per-example losses with parameter ``param`` replaced by ``value`` (differentiable in it)."""
    real = dict(module.named_parameters())[param]
    owner_name, _, attr = param.rpartition(".")
    owner = dict(module.named_modules())[owner_name]
    del owner._parameters[attr]
    setattr(owner, attr, value)
    try:
        return reference_losses(module, batch)
    finally:
        delattr(owner, attr)
        owner._parameters[attr] = real


def _grad(module, param, base, batch):
    p = base.clone().requires_grad_(True)
    return torch.autograd.grad(_loss_with(module, param, p, batch).sum(), [p])[0]


@pytest.mark.parametrize("name", list(CASES))
def test_three_callbacks_and_scorer_match_references(name, tmp_path):
    builder, arch, task_type, lissa_param, layer_types = CASES[name]
    module, data, collate = builder(arch)
    module = module.double()
    loader = DataLoader(data, batch_size=BATCH, collate_fn=collate)
    first = next(iter(loader))
    assert type(default_task_for(first)) is task_type  # the default the callbacks will use
    # every supported layer, the vocabulary-sized head included: tied embeddings are part of what
    # this test checks; the default selection is the same list without the head
    layers = select_layers(module, "*")
    assert {type(l).__name__ for l in layers} == layer_types
    assert [l.name for l in select_layers(module)] == [l.name for l in layers if l.name != "model.lm_head"]

    examples = [(collate or torch.utils.data.default_collate)([data[i]]) for i in range(N_TRAIN)]
    probe_idx = [0, 3, 5]
    damping, scale, exact_lissa = lissa_reference(module, lissa_param, examples, probe_idx)
    probe_loader = DataLoader(Subset(data, probe_idx), batch_size=2, collate_fn=collate)
    ekfac = exact(layers="*", dirpath=str(tmp_path / "ekfac"))
    z0 = Z0Influence(probe=DataLoader(data, batch_size=3, collate_fn=collate), queries=probe_loader,
                     params=lissa_param, dirpath=str(tmp_path / "z0"))
    lissa = LiSSASelfInfluence(probe=probe_loader, dirpath=str(tmp_path / "lissa"), options=LiSSAOptions(
        sampler=RandomSampler(sample_size=N_TRAIN), params=lissa_param, damping=damping, scale=scale,
        depth=300, tol=1e-6, chunk_size=8))
    quiet_trainer(tmp_path, [ekfac, z0, lissa], max_epochs=1, precision="64-true").fit(module, loader)

    # EK-FAC: training-time factors = offline fit; scores = dense reference
    saved = load_factors(tmp_path / "ekfac" / "factors", model=module)
    assert saved.layer_names == [l.name for l in layers] and saved.n_examples == N_TRAIN
    offline = fit_factors(module, loader, layers)
    # transformers' causal-LM loss upcasts logits to float32 even in a float64 model
    assert_same_factors(saved, offline, rtol=1e-6 if task_type is CausalLMTask else 1e-9)
    scorer = InfluenceScorer(module, saved)
    qloader = DataLoader(Subset(data, QUERIES), batch_size=2, collate_fn=collate)
    pairwise = scorer.pairwise(qloader, loader).pairwise
    self_scores = scorer.self_influence(loader).self_influence
    ref_module = untied(module)
    grads = per_example_grads(ref_module, layers, examples)
    dense = sum(grads[l.name][QUERIES].reshape(len(QUERIES), -1)
                @ dense_preconditioner(saved.layers[l.name], saved.dampings()[l.name])
                @ grads[l.name].reshape(N_TRAIN, -1).T for l in layers)
    torch.testing.assert_close(pairwise, dense, rtol=1e-6, atol=1e-9 * float(dense.abs().max()))
    torch.testing.assert_close(self_scores[QUERIES], torch.diagonal(dense[:, QUERIES]), rtol=1e-6, atol=0.0)

    # Z0: recorded losses = losses from the logits; the Gram entry = ‖θ‖²
    rec = load_z0(tmp_path / "z0" / "recording")
    ref_losses = torch.cat([reference_losses(module, b) for b in examples]).detach()
    assert rec.probe_ids.tolist() == list(range(N_TRAIN))
    torch.testing.assert_close(rec.probe_losses[-1].double(), ref_losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rec.query_losses[-1].double(), ref_losses[probe_idx], rtol=1e-5, atol=1e-6)
    theta = dict(module.named_parameters())[lissa_param].detach()
    assert float(rec.gram[-1, -1]) == pytest.approx(float(theta.pow(2).sum()), rel=1e-12)

    # LiSSA: the deterministic recursion converges to the explicit inverse-Hessian product
    assert lissa.scores.train_ids.tolist() == probe_idx
    torch.testing.assert_close(lissa.scores.self_influence.double(), exact_lissa, rtol=2e-3, atol=0.0)


def test_tied_output_embedding_counts_its_own_use_only():
    """GPT-2 and Gemma tie lm_head to the input embedding: the tracked lm_head gradient is the
    gradient of the output projection alone (an untied copy's), not of the shared parameter."""
    module, data, collate = causal("gemma")
    module = module.double()
    hf = module.model
    assert hf.lm_head.weight is hf.get_input_embeddings().weight
    batch = collate([data[0]])
    layers = select_layers(module, "*lm_head")
    scorer_grads = InfluenceScorer(module, fit_factors(module, DataLoader(data, batch_size=4, collate_fn=collate), layers)) \
        .gradients(DataLoader(Subset(data, [0]), batch_size=1, collate_fn=collate))[1]["model.lm_head"][0]
    own = per_example_grads(untied(module), layers, [batch])["model.lm_head"][0]
    shared = torch.autograd.grad(reference_losses(module, batch).sum(), [hf.lm_head.weight])[0]
    torch.testing.assert_close(scorer_grads, own, rtol=1e-6, atol=1e-12)
    assert float((shared - own).norm()) > 1e-3 * float(own.norm())  # the embedding's use is left out


def test_sequence_classification_padding_is_invisible_to_the_factors():
    """Padded batches give the covariances of the same sequences run one by one unpadded: the
    task's padding mask (attention_mask) keeps padding tokens out of token-wise layers."""
    from lightning_influence.ekfac.fit import fit_covariances

    module, data, collate = sequence_classifier("bert")
    module = module.double()
    layers = select_layers(module)
    task = SequenceClassificationTask()
    padded = fit_covariances(module, DataLoader(data, batch_size=4, collate_fn=collate), layers, task)
    single = fit_covariances(module, DataLoader(data, batch_size=1, collate_fn=collate), layers, task)
    n_tokens = sum(len(d["input_ids"]) for _, d in data)
    for l in layers:
        torch.testing.assert_close(padded[l.name].a_sum, single[l.name].a_sum, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(padded[l.name].s_sum, single[l.name].s_sum, rtol=1e-9, atol=1e-14)
        # encoder layers see every real token; the pooler and classifier one row per sequence
        assert padded[l.name].a_tokens == (N_TRAIN if l.name.endswith(("pooler.dense", "classifier")) else n_tokens)


def test_default_task_by_batch_layout():
    ids = torch.ones(2, 5, dtype=torch.long)
    assert type(default_task_for({"input_ids": ids, "labels": torch.tensor([0, 2])})) is SequenceClassificationTask
    assert type(default_task_for((torch.tensor([3, 4]), {"input_ids": ids, "labels": torch.tensor([0, 2])}))) is SequenceClassificationTask
    assert type(default_task_for({"input_ids": ids, "labels": ids})) is CausalLMTask
    assert type(default_task_for({"input_ids": ids, "attention_mask": ids})) is CausalLMTask
    assert type(default_task_for({"pixel_values": torch.zeros(2, 1, 8, 8), "labels": torch.tensor([1, 2])})) is ImageClassificationTask
    task = SequenceClassificationTask()
    batch = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1] * 5]), "labels": torch.tensor([0, 2])}
    assert task.gradient_scale(batch) == 0.5 and task.padding_mask(batch).sum() == 8
    assert ImageClassificationTask().padding_mask({"pixel_values": torch.zeros(2, 1, 8, 8), "labels": torch.tensor([1, 2])}) is None
    with pytest.raises(ValueError, match="SequenceClassificationTask expects a dict batch with 'input_ids' and 'labels'"):
        task.per_example_loss(nn.Identity(), {"input_ids": ids})
