"""LiSSA on a tiny causal LM (transformers GPT-2): summed token losses, a parameter subset."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.utils.data import DataLoader

from lightning_influence import IndexedDataset
from lightning_influence.lissa import LiSSAOptions, SamplePool, self_influence
from lightning_influence.lissa.samplers import RandomSampler
from lightning_influence.demos import synthetic_token_dataset, tiny_causal_lm
from lightning_influence.data import lm_collate

SUBSET = "transformer.h.0.mlp.c_proj.bias"  # 16 parameters: explicit Hessian is cheap


def test_self_influence_on_causal_lm_matches_explicit_subset_hessian():
    model = tiny_causal_lm("gpt2", vocab_size=32, hidden=16, layers=1, heads=2, seed=0).double().eval()
    data = IndexedDataset(synthetic_token_dataset(n=12, vocab_size=32, seed=1))
    full = lm_collate([data[i] for i in range(len(data))])[1]
    base = dict(model.named_parameters())[SUBSET].detach().clone()

    def losses(b, idx):  # independent reference: summed token cross-entropy per example
        logits = functional_call(model, {SUBSET: b}, (), {"input_ids": full["input_ids"][idx], "attention_mask": full["attention_mask"][idx]}).logits
        labels = full["labels"][idx][:, 1:]
        tok = F.cross_entropy(logits[:, :-1].reshape(-1, 32), labels.reshape(-1), ignore_index=-100, reduction="none")
        return tok.view(labels.shape).sum(1)

    everyone = torch.arange(12)
    H = torch.autograd.functional.hessian(lambda b: losses(b, everyone).mean(), base)
    G = torch.stack([torch.autograd.grad(losses(base.requires_grad_(True), torch.tensor([i])).sum(), base)[0] for i in range(12)])
    base.requires_grad_(False)
    evals = torch.linalg.eigvalsh(H)
    damping = float(max(0.0, -evals.min()) + 0.3 * evals.max())
    exact = (G * torch.linalg.solve(H + damping * torch.eye(16, dtype=H.dtype), G.T).T).sum(1)

    opts = LiSSAOptions(
        sampler=RandomSampler(sample_size=12),  # the whole pool: H_t = H, deterministic
        params=SUBSET,
        damping=damping,
        scale=1.05 * float(evals.max() + damping),
        depth=400,
        tol=1e-5,
        chunk_size=12,
    )
    res = self_influence(model, DataLoader(data, batch_size=5, collate_fn=lm_collate), SamplePool(data, collate_fn=lm_collate), opts)
    assert res.meta["num_params"] == 16
    assert res.train_ids.tolist() == list(range(12))
    assert res.meta["converged"] == [True] and res.meta["steps"][0] < 400
    torch.testing.assert_close(res.self_influence, exact, rtol=0.02, atol=0)


def test_curvature_products_through_fused_attention_equal_eager_attention():
    """Hessian- and GGN-vector products of a float32 GPT-2 with PyTorch's fused attention
    (``attn_implementation="sdpa"``, whose CPU kernel has no double backward) equal those of the
    same weights with eager attention."""
    from lightning_influence.lissa.curvature import CurvatureOperator
    from lightning_influence.task import CausalLMTask

    data = IndexedDataset(synthetic_token_dataset(n=6, vocab_size=32, seed=2))
    batch = lm_collate([data[i] for i in range(6)])
    sdpa = tiny_causal_lm("gpt2", vocab_size=32, hidden=16, layers=1, heads=2, seed=0, attn_implementation="sdpa").eval()
    eager = tiny_causal_lm("gpt2", vocab_size=32, hidden=16, layers=1, heads=2, seed=0, attn_implementation="eager").eval()
    eager.load_state_dict(sdpa.state_dict())
    params = "transformer.h.0.attn.c_attn.*"
    v = torch.randn(3, sum(p.numel() for n, p in sdpa.named_parameters() if n.startswith("transformer.h.0.attn.c_attn")),
                    generator=torch.Generator().manual_seed(0))
    for curvature in ("hessian", "ggn"):
        got = CurvatureOperator(sdpa, CausalLMTask(), params=params, curvature=curvature).matvec(batch, v)
        ref = CurvatureOperator(eager, CausalLMTask(), params=params, curvature=curvature).matvec(batch, v)
        assert ref.abs().max() > 0
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
