"""Activation (gradient) checkpointing: hooks count each training pass once, never the
recomputation, so factors with checkpointing equal factors without it (float64, fixed weights).

Two ways users turn it on: transformers' ``model.gradient_checkpointing_enable()`` (reentrant and
non-reentrant ``torch.utils.checkpoint``; here on a LoRA model with a frozen base, the usual
fine-tuning set-up), and ``torch.utils.checkpoint.checkpoint`` inside a user's own module.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import IndexedDataset, load_factors
from lightning_influence.data import lm_collate
from lightning_influence.demos import CausalLMModule, MLPClassifier
from scaffold import exact, quiet_trainer

from lora_cases import lora_module, token_data

peft = pytest.importorskip("peft")


def run(tmp_path, name, module, loader):
    cb = exact(dirpath=str(tmp_path / name))
    quiet_trainer(tmp_path, [cb], max_epochs=2, precision="64-true").fit(module, loader)
    return cb, load_factors(tmp_path / name / "factors", model=module)


def assert_same(cb_ref, ref, cb, got):
    assert got.layer_names == ref.layer_names and got.n_examples == ref.n_examples
    for n, acc in cb.state.running.items():
        r = cb_ref.state.running[n]
        assert (acc.a_tokens, acc.s_tokens, acc.examples) == (r.a_tokens, r.s_tokens, r.examples)  # counted once
        torch.testing.assert_close(acc.a_sum, r.a_sum, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(acc.s_sum, r.s_sum, rtol=1e-10, atol=1e-14)
    for n in ref.layer_names:
        torch.testing.assert_close(got.layers[n].lambdas, ref.layers[n].lambdas, rtol=1e-8, atol=1e-14)


@pytest.mark.parametrize("reentrant", [True, False])
def test_transformers_gradient_checkpointing_on_a_lora_model_counts_each_pass_once(tmp_path, reentrant):
    data = token_data(16)
    loader = DataLoader(data, batch_size=4, collate_fn=lm_collate)
    cb_ref, ref = run(tmp_path, "plain", lora_module(), loader)
    module = lora_module()
    hf = module.model
    hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        hf.enable_input_require_grads()  # peft's recipe: a frozen base's embeddings give no grad to a reentrant checkpoint
    assert hf.base_model.model.model.gradient_checkpointing
    calls = []
    tracked = hf.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"]
    tracked.register_forward_hook(lambda *a: calls.append(torch.is_grad_enabled()))
    cb, got = run(tmp_path, "ckpt", module, loader)
    # a tracked layer inside the checkpointed block really ran twice per training step (forward,
    # then recomputed in backward): 2 epochs × 4 steps × 2, plus the correction pass's 4 (eval: no checkpointing)
    assert len(calls) == 2 * len(loader) * 2 + len(loader)
    assert_same(cb_ref, ref, cb, got)


class CheckpointedMLP(MLPClassifier):
    """The demo MLP whose hidden block runs under ``torch.utils.checkpoint`` in training."""

    def __init__(self, reentrant: bool, **kw) -> None:
        super().__init__(**kw)
        self.reentrant = reentrant

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        if self.reentrant:  # a reentrant checkpoint passes gradients only to inputs that require them
            x = x.detach().requires_grad_(True)
        h = checkpoint(lambda t: torch.tanh(self.net[0](t)), x, use_reentrant=self.reentrant)
        return self.net[2](h)


@pytest.mark.parametrize("reentrant", [True, False])
def test_torch_checkpoint_in_a_user_module_counts_each_pass_once(tmp_path, reentrant):
    torch.manual_seed(0)
    x, y = torch.randn(48, 6, dtype=torch.float64), torch.randint(0, 3, (48,))
    loader = DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=8)
    torch.manual_seed(1)
    plain = MLPClassifier(d_in=6, hidden=5, n_classes=3, lr=0.0).double()
    ckpt = CheckpointedMLP(reentrant, d_in=6, hidden=5, n_classes=3, lr=0.0).double()
    ckpt.load_state_dict(plain.state_dict())
    cb_ref, ref = run(tmp_path, "plain", plain, loader)
    calls = []
    ckpt.net[0].register_forward_hook(lambda *a: calls.append(1))
    cb, got = run(tmp_path, "ckpt", ckpt, loader)
    assert len(calls) == 2 * len(loader) * 2 + len(loader)  # recomputed in every training backward
    assert_same(cb_ref, ref, cb, got)


class AlwaysCheckpointedMLP(CheckpointedMLP):
    """Checkpoints in eval mode too, so the post-hoc passes run under it."""

    def forward(self, x):
        if self.reentrant:
            x = x.detach().requires_grad_(True)
        return self.net[2](checkpoint(lambda t: torch.tanh(self.net[0](t)), x, use_reentrant=self.reentrant))


def test_posthoc_passes_under_checkpointing():
    """Offline fit and scorer (which differentiate the outputs they collect): non-reentrant
    checkpointing gives the factors and scores of the plain model; a reentrant one active during
    the pass cannot be collected and says how to fix it."""
    from lightning_influence import InfluenceScorer
    from lightning_influence.ekfac.fit import fit_factors

    torch.manual_seed(0)
    x, y = torch.randn(24, 6, dtype=torch.float64), torch.randint(0, 3, (24,))
    loader = DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=8)
    torch.manual_seed(1)
    plain = MLPClassifier(d_in=6, hidden=5, n_classes=3).double()
    ref = fit_factors(plain, loader)
    ref_scores = InfluenceScorer(plain, ref).pairwise(loader, loader).pairwise
    model = AlwaysCheckpointedMLP(False, d_in=6, hidden=5, n_classes=3).double()
    model.load_state_dict(plain.state_dict())
    got = fit_factors(model, loader)
    for n in ref.layer_names:
        torch.testing.assert_close(got.layers[n].lambdas, ref.layers[n].lambdas, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(InfluenceScorer(model, got).pairwise(loader, loader).pairwise, ref_scores, rtol=1e-12, atol=1e-12)
    reentrant = AlwaysCheckpointedMLP(True, d_in=6, hidden=5, n_classes=3).double()
    reentrant.load_state_dict(plain.state_dict())
    with pytest.raises(RuntimeError, match=r"'net\.0' ran, but its output did not require grad.*use_reentrant=False"):
        fit_factors(reentrant, loader)
