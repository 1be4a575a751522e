"""Small models with their data (and fitted factors) that several test files share.

Plain functions, imported with ``from cases import ...`` (``tests/`` is on ``sys.path``); the
LoRA cases, which need ``peft``, are in ``lora_cases.py``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import IndexedDataset, select_layers
from lightning_influence.data import lm_collate, qa_collate
from lightning_influence.demos import CausalLMModule, MLPClassifier, digits_dataset, synthetic_token_dataset, tiny_causal_lm
from lightning_influence.ekfac.fit import fit_factors
from lightning_influence.task import CausalLMTask

from scaffold import indexed

STAGES_VOCAB = 16  # vocabulary of :func:`lm_stages` and :func:`qa_items`


def mlp_case(n=40, seed=0, dtype=torch.float64):
    """``(model, factors, train, query)``: a 5-6-3 ``MLPClassifier`` in ``dtype``, ``n`` random
    training examples (ids 0..n-1), 5 queries (ids 1000..1004) and its factors fitted on ``train``."""
    torch.manual_seed(seed)
    model = MLPClassifier(d_in=5, hidden=6, n_classes=3).to(dtype)
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 5, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)
    train = IndexedDataset(TensorDataset(x, y))
    query = IndexedDataset(TensorDataset(torch.randn(5, 5, generator=g, dtype=dtype), torch.randint(0, 3, (5,), generator=g)), offset=1000)
    factors = fit_factors(model, DataLoader(train, batch_size=8))
    return model, factors, train, query


def lm_case(n=10, seed=0):
    """``(model, factors, train, query)``: a one-layer float64 GPT-NeoX, ``n`` distinct token
    sequences (ids 0..n-1), 3 queries (ids 500..502) and its factors (every layer but ``lm_head``)."""
    model = CausalLMModule(tiny_causal_lm("gpt_neox", vocab_size=16, hidden=8, layers=1, heads=2, seed=seed)).double()
    seqs, seen = [], set()
    for s in synthetic_token_dataset(3 * n + 9, vocab_size=16, min_len=3, max_len=7, seed=seed):  # distinct sequences: no ties
        if tuple(s["input_ids"].tolist()) not in seen:
            seen.add(tuple(s["input_ids"].tolist()))
            seqs.append(s)
    seqs = seqs[: n + 3]
    train, query = IndexedDataset(seqs[:n]), IndexedDataset(seqs[n:], offset=500)
    layers = select_layers(model, exclude="*lm_head*")
    factors = fit_factors(model, DataLoader(train, batch_size=4, collate_fn=lm_collate), layers, CausalLMTask())
    return model, factors, train, query


def tanh_mlp_problem(seed=0, n=48, hid=5, d_in=6, n_classes=3):
    """``(model, TensorDataset(x, y), x, y)``: a float64 ``Linear(d_in, hid)``-``Tanh``-``Linear(hid, n_classes)``
    initialised with ``seed`` and ``n`` random examples (``x`` float64 ``[n, d_in]``, ``y`` long ``[n]``)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    y = torch.randint(0, n_classes, (n,), generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, hid), nn.Tanh(), nn.Linear(hid, n_classes)).double()
    return model, TensorDataset(x, y), x, y


def digits_loader(n=160, batch_size=32, dtype=torch.float64):
    """An unshuffled loader over the first ``n`` digits training examples (ids 0..n-1) in ``dtype``."""
    train, _, _ = digits_dataset(dtype=dtype)
    return DataLoader(indexed(train, n), batch_size=batch_size, shuffle=False)


def qa_items(n, seed):
    """``n`` random ``{"prompt_ids", "answer_ids"}`` items over :data:`STAGES_VOCAB` (token 0 unused)."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        p = torch.randint(1, STAGES_VOCAB, (int(torch.randint(2, 5, (1,), generator=g)),), generator=g)
        a = torch.randint(1, STAGES_VOCAB, (int(torch.randint(1, 3, (1,), generator=g)),), generator=g)
        items.append({"prompt_ids": p, "answer_ids": a})
    return items


def lm_stages(seed=0):
    """Pre-trained LM + factors on token sequences; a perturbed copy ("fine-tuned") + factors on QA batches.

    Returns ``(pt, pt_factors, ft, ft_factors, train, queries, layers, task)``; the perturbation
    is drawn in the default dtype (tests run it under the ``float64_default`` fixture).
    """
    pt = CausalLMModule(tiny_causal_lm("gpt_neox", vocab_size=STAGES_VOCAB, hidden=8, layers=1, heads=2, seed=seed)).double()
    train = IndexedDataset(synthetic_token_dataset(8, vocab_size=STAGES_VOCAB, min_len=3, max_len=7, seed=seed))
    layers = select_layers(pt, exclude="*lm_head*")
    task = CausalLMTask()
    pt_factors = fit_factors(pt, DataLoader(train, batch_size=4, collate_fn=lm_collate), layers, task)
    ft = copy.deepcopy(pt)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for p in ft.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    queries = IndexedDataset(qa_items(6, seed + 2))
    ft_factors = fit_factors(ft, DataLoader(queries, batch_size=3, collate_fn=qa_collate), select_layers(ft, exclude="*lm_head*"), task)
    return pt, pt_factors, ft, ft_factors, train, queries, layers, task


def brute_top(dense, k, largest=True):
    """Per row of ``dense`` ``[Q, N]``, the ``k`` column positions ranked by a plain Python sort
    (no ``torch.topk``): ``LongTensor[Q, k]``."""
    return torch.tensor([sorted(range(len(r)), key=lambda j: -r[j] if largest else r[j])[:k] for r in dense.tolist()])
