"""Independent float64 references for the EK-FAC tests: per-example gradients by plain autograd
(one example at a time, no hooks), dense Kronecker preconditioners, the dense two-stage score, and
a comparison of two sets of factors."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_influence.ekfac.factors import EKFACFactors
from lightning_influence.layers import TrackedLayer, select_layers


def per_example_param_grads(model, task, examples, layers: list[TrackedLayer], which: str = "loss") -> dict[str, Tensor]:
    """``{layer: Tensor[N, d_out, a_dim]}`` by autograd over parameters, one example per call."""
    out = {l.name: [] for l in layers}
    for batch in examples:
        model.zero_grad(set_to_none=True)
        loss = task.per_example_loss(model, batch) if which == "loss" else task.measurement(model, batch)
        assert loss.shape == (1,)
        params = [p for l in layers for p in l.parameters()]
        grads = torch.autograd.grad(loss.sum(), params)
        i = 0
        for l in layers:
            k = len(l.parameters())
            out[l.name].append(l.flatten_param_grads(grads[i : i + k]))
            i += k
    return {n: torch.stack(g) for n, g in out.items()}


def dense_preconditioner(f, damping: float) -> Tensor:
    """``(Q_S ⊗ Q_A) diag(1/(Λ+λ)) (Q_S ⊗ Q_A)ᵀ`` acting on row-major ``vec(G)``."""
    q = torch.kron(f.q_s.double(), f.q_a.double())
    return q @ torch.diag(1.0 / (f.lambdas.double().reshape(-1) + damping)) @ q.T


def dense_multistage(pt, pt_factors, ft, ft_factors, layers, task, q_examples, t_examples, damping_pt, damping_ft):
    """Σ_l ∇m_lᵀ P_ft,l P_pt,l ∇ℓ_l with dense float64 matrices and autograd per-example gradients."""
    ft_layers = [select_layers(ft, l.name)[0] for l in layers]
    gq = per_example_param_grads(ft, task, q_examples, ft_layers, which="measurement")
    gt = per_example_param_grads(pt, task, t_examples, layers, which="loss")
    total = 0.0
    # default rules pool the used layers' eigenvalues only
    lam_pt = EKFACFactors({l.name: pt_factors.layers[l.name] for l in layers}).dampings(damping_pt)
    lam_ft = EKFACFactors({l.name: ft_factors.layers[l.name] for l in layers}).dampings(damping_ft)
    for l in layers:
        fp, ff = pt_factors.layers[l.name], ft_factors.layers[l.name]
        p_pt = dense_preconditioner(fp, lam_pt[l.name])
        p_ft = torch.eye(p_pt.shape[0]) if ff is None else dense_preconditioner(ff, lam_ft[l.name])
        total = total + gq[l.name].reshape(len(q_examples), -1) @ p_ft @ p_pt @ gt[l.name].reshape(len(t_examples), -1).T
    return total


def assert_same_factors(fa, fb, rtol=1e-9):
    """``fa`` and ``fb`` have the same layers, eigenvalues and preconditioners (within ``rtol``)."""
    assert fa.layer_names == fb.layer_names
    for n in fa.layer_names:
        a, b = fa.layers[n], fb.layers[n]
        # absolute tolerance relative to the spectrum's scale (tiny eigenvalues carry rounding)
        torch.testing.assert_close(a.eig_a, b.eig_a, rtol=rtol, atol=rtol * float(b.eig_a.abs().max()))
        torch.testing.assert_close(a.eig_s, b.eig_s, rtol=rtol, atol=rtol * float(b.eig_s.abs().max()))
        g = torch.randn(3, *a.grad_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        # eigenvectors are defined up to sign: compare the preconditioners they define
        pa, pb = a.precondition(g, b.damping()), b.precondition(g, b.damping())
        assert float((pa - pb).norm() / pb.norm()) < rtol * 100
