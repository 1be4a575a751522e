"""peft LoRA adapters on a frozen base: what the default tracks, and adapter gradients, factors
and scores against float64 references (autograd one example at a time, dense preconditioners)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch.utils.data import DataLoader, Subset

from lightning_influence import EKFACInfluence, InfluenceScorer, load_factors
from lightning_influence.data import lm_collate
from lightning_influence.demos import CausalLMModule, tiny_causal_lm
from lightning_influence.ekfac.fit import fit_factors
from lightning_influence.layers import LinearLayer, LoRALinearLayer, select_layers
from lightning_influence.task import CausalLMTask

from ekfac_reference import dense_preconditioner, per_example_param_grads
from lora_cases import N, TARGETS, VOCAB, lora_module, token_data, peft
from scaffold import exact, quiet_trainer


def adapter_names(module, arch: str = "llama") -> list[str]:
    targets = TARGETS if arch != "gpt2" else ["c_attn", "c_fc"]
    return [n for n, _ in module.named_modules() if n.endswith(("lora_A.default", "lora_B.default")) and any(f".{t}." in n for t in targets)]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_default_tracks_the_adapters_and_names_the_frozen_base(arch, caplog):
    module = lora_module(arch)
    with caplog.at_level(logging.INFO, logger="lightning_influence.layers.selection"):
        layers = select_layers(module)
    assert [l.name for l in layers] == adapter_names(module, arch)
    assert all(type(l) is LinearLayer for l in layers)
    (msg,) = [r.getMessage() for r in caplog.records if r.name == "lightning_influence.layers.selection"]
    # the frozen layers are named as in the model (the adapted ones under their own names, never as .base_layer)
    wrapped = "self_attn.q_proj" if arch == "llama" else "attn.c_attn"
    assert "frozen layer(s)" in msg and f"layers.0.{wrapped}," in msg.replace("h.0", "layers.0") and "base_layer" not in msg
    assert "lm_head" in msg  # and the vocabulary-sized head


def test_named_adapted_layer_is_one_layer_of_the_base_shape():
    module = lora_module()
    (q,) = select_layers(module, "*q_proj")
    base = module.model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q) is LoRALinearLayer and q.module is base and (q.d_in, q.d_out) == (16, 16)
    assert q.parameters() == [base.base_layer.weight]
    # the wrapped base layer is never a layer of its own, even when a pattern matches it
    names = [l.name for l in select_layers(module, "*self_attn.*")]
    assert not any("base_layer" in n for n in names) and q.name in names


def test_adapter_gradients_factors_and_scores_equal_float64_references(tmp_path):
    """The callback's factors on a LoRA model equal the offline fit; per-example adapter
    gradients equal autograd over lora_A / lora_B one example at a time; corrected eigenvalues are
    the mean squared rotated autograd gradients; scores equal dense Kronecker products."""
    module, data = lora_module(), token_data()
    loader = DataLoader(data, batch_size=4, collate_fn=lm_collate)
    cb = exact(dirpath=str(tmp_path / "ekfac"))
    quiet_trainer(tmp_path, [cb], max_epochs=1, precision="64-true").fit(module, loader)
    saved = load_factors(tmp_path / "ekfac" / "factors", model=module)
    layers = select_layers(module)
    assert saved.layer_names == [l.name for l in layers] == adapter_names(module)
    offline = fit_factors(module, loader, layers, CausalLMTask())
    for n in saved.layer_names:
        # transformers computes the loss from float32-upcast logits even in a float64 model
        lam = offline.layers[n].lambdas
        torch.testing.assert_close(saved.layers[n].lambdas, lam, rtol=1e-5, atol=1e-7 * float(lam.max()))

    examples = [lm_collate([data[i]]) for i in range(N)]
    task = CausalLMTask()
    ref = per_example_param_grads(module, task, [b[1] for b in examples], layers)
    ids, grads = InfluenceScorer(module, offline).gradients(DataLoader(data, batch_size=5, collate_fn=lm_collate))
    assert ids.tolist() == list(range(N))
    for l in layers:
        g = ref[l.name]
        assert float(g.abs().max()) > 0  # random B: lora_A's gradient is not trivially zero
        torch.testing.assert_close(grads[l.name], g, rtol=1e-9, atol=1e-12)
        f = offline.layers[l.name]
        rot = f.q_s.T.double() @ g @ f.q_a.double()
        torch.testing.assert_close(f.lambdas.double(), (rot ** 2).mean(0), rtol=1e-9, atol=1e-14)
    scorer = InfluenceScorer(module, offline)
    pairwise = scorer.pairwise(DataLoader(Subset(data, [0, 5]), batch_size=2, collate_fn=lm_collate), loader).pairwise
    damp = offline.dampings()
    dense = sum(ref[l.name][[0, 5]].reshape(2, -1) @ dense_preconditioner(offline.layers[l.name], damp[l.name])
                @ ref[l.name].reshape(N, -1).T for l in layers)
    torch.testing.assert_close(pairwise, dense, rtol=1e-7, atol=1e-10 * float(dense.abs().max()))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merged_adapter_has_the_factors_and_scores_of_the_unmerged_adapted_layers(arch):
    """An adapted layer tracked as one layer (its effective weight W0 + s·B·A) and the same
    layer after merge_and_unload are the same function: same factors, same scores (GPT-2: the
    base is transformers' Conv1D, weight stored transposed, peft's fan_in_fan_out)."""
    module, data = lora_module(arch), token_data()
    loader = DataLoader(data, batch_size=4, collate_fn=lm_collate)
    pats = ["*q_proj", "*v_proj", "*up_proj", "*down_proj"] if arch == "llama" else ["*c_attn", "*c_fc"]
    unmerged_layers = select_layers(module, pats)
    assert {type(l) for l in unmerged_layers} == {LoRALinearLayer}
    unmerged = fit_factors(module, loader, unmerged_layers, CausalLMTask())
    merged_module = CausalLMModule(copy.deepcopy(module.model).merge_and_unload(), lr=0.0)
    merged_module.requires_grad_(True)  # merge_and_unload keeps the base frozen; the passes differentiate layer outputs
    merged_layers = select_layers(merged_module, pats)
    assert {type(l).__name__ for l in merged_layers} == {"LinearLayer" if arch == "llama" else "TransformersConv1DLayer"}
    assert [(l.d_in, l.d_out) for l in merged_layers] == [(l.d_in, l.d_out) for l in unmerged_layers]
    for lu, lm in zip(unmerged_layers, merged_layers):  # the same weight orientation as the merged layer's type
        w = lm.module.weight
        torch.testing.assert_close(lu.weight_matrix(w), lm.weight_matrix(w), rtol=0, atol=0)
        assert lu.weight_matrix(w).shape == (lu.d_out, lu.d_in)
    merged = fit_factors(merged_module, loader, merged_layers, CausalLMTask())
    pairs = list(zip([l.name for l in unmerged_layers], [l.name for l in merged_layers]))
    for un, me in pairs:
        assert un.replace("base_model.model.", "", 1) == me  # same layer, peft's prefix aside
        for attr in ("q_a", "q_s", "lambdas"):
            a, b = getattr(unmerged.layers[un], attr), getattr(merged.layers[me], attr)
            if attr != "lambdas":  # eigenvectors up to sign
                a, b = a.abs(), b.abs()
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    q = DataLoader(Subset(data, [1, 2]), batch_size=2, collate_fn=lm_collate)
    s_un = InfluenceScorer(module, unmerged).pairwise(q, loader).pairwise
    s_me = InfluenceScorer(merged_module, merged).pairwise(q, loader).pairwise
    torch.testing.assert_close(s_un, s_me, rtol=1e-6, atol=1e-9 * float(s_me.abs().max()))


def test_saved_adapter_factors_load_only_onto_the_same_adapters(tmp_path):
    """Factors saved from a LoRA model are checked against the adapters of the model they are
    loaded with: another rank or another adapter name is refused, naming the layers."""
    from lightning_influence.ekfac.factors import FactorMismatchError

    module, data = lora_module(), token_data(8)
    loader = DataLoader(data, batch_size=4, collate_fn=lm_collate)
    cb = EKFACInfluence(update_every_n_steps=1, dirpath=str(tmp_path / "ekfac"))
    quiet_trainer(tmp_path, [cb], max_epochs=1, precision="64-true").fit(module, loader)
    path = tmp_path / "ekfac" / "factors"
    assert load_factors(path, model=module).layer_names == adapter_names(module)
    same_shape = lora_module(seed=1)  # the same adapters with other weights: loads when the caller says so
    assert load_factors(path, model=same_shape, allow_other_weights=True).layer_names == adapter_names(module)
    with pytest.raises(FactorMismatchError, match=r"q_proj\.lora_A\.default"):
        load_factors(path, model=lora_module(r=4), allow_other_weights=True)
    base = tiny_causal_lm("llama", vocab_size=VOCAB, hidden=16, layers=1, heads=2, max_len=16, seed=0)
    other = CausalLMModule(peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=TARGETS), adapter_name="other")).double()
    with pytest.raises(FactorMismatchError, match=r"lora_A\.default"):
        load_factors(path, model=other, allow_other_weights=True)


def test_lissa_differentiates_the_adapters_only():
    """LiSSA on a LoRA model works on the trainable parameters, the adapters: its operator holds
    exactly the ``lora_A``/``lora_B`` tensors (none of the frozen base), and its per-example
    gradients equal float64 autograd over those tensors, one example at a time."""
    from lightning_influence.lissa.curvature import CurvatureOperator

    model = lora_module("llama", init=False)
    task = CausalLMTask()
    batch = lm_collate([token_data(4)[i] for i in range(4)])
    op = CurvatureOperator(model, task, curvature="hessian")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(op.names) == trainable and all(".lora_A." in n or ".lora_B." in n for n in op.names)
    assert op.num_params == sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    grads = op.per_example_grads(batch)
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    ids, fields = batch
    for b in range(4):
        one = (ids[b:b + 1], {k: v[b:b + 1] for k, v in fields.items()})
        loss = task.per_example_loss(model, one).sum()
        ref = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
        torch.testing.assert_close(grads[b], ref, rtol=1e-9, atol=1e-12)
