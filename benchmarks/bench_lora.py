"""LoRA adapters: which representation of an adapter gives the better EK-FAC influence (issue 24).

A LoRA-adapted linear layer computes ``y = W₀ x + s·B A x`` with ``W₀`` frozen. Two ways to
track it, both at the same factor size:

* **two linears** (the default): ``lora_A`` (``d_in → r``) and ``lora_B`` (``r → d_out``) as two
  plain ``nn.Linear`` layers, each with its own Kronecker factors; scores live in the adapters'
  parameter space;
* **one layer**: the adapted layer as one layer of the base's shape (``LoRALinearLayer``, named
  with ``layers=["*q_proj", ...]``), whose gradient is that of the effective weight ``W₀ + s·B·A``.

Reference: the exact float64 influence in the adapters' parameter space,
``g_qᵀ (F + λI)⁻¹ g_t`` with the dense empirical Fisher ``F = (1/N) Σ g gᵀ`` of every adapter
parameter (per-example gradients by autograd, one example at a time) and ``λ = 0.1 · mean(eig F)``.
Each representation's pairwise scores (``InfluenceScorer`` at its default damping) are compared
with it: Spearman correlation per query row (mean over queries) and Pearson over the whole matrix;
plain gradient dot products for context.

Model: a 1-layer Llama (hidden 16, 2 heads, SwiGLU 32, vocabulary 32) from a config, LoRA
``r = 2``, ``alpha = 4`` on ``q_proj``, ``v_proj``, ``up_proj``, ``down_proj`` with random ``A`` and
``B`` (``init_lora_weights=False``: a trained adapter, not the ``B = 0`` start), float64;
``--n`` training sequences and 8 queries of generated bigram-chain tokens per seed.

Run: ``.venv/bin/python benchmarks/bench_lora.py [--seeds 3] [--n 400]`` (about 3 CPU-minutes per
seed at ``--n 400``). Results: ``docs/lora.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from scipy.stats import pearsonr, spearmanr
from torch.utils.data import DataLoader, Subset

from lightning_influence import IndexedDataset, InfluenceScorer
from lightning_influence.data import lm_collate
from lightning_influence.demos import CausalLMModule, synthetic_token_dataset, tiny_causal_lm
from lightning_influence.ekfac.fit import fit_factors
from lightning_influence.layers import select_layers
from lightning_influence.task import CausalLMTask

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def lora_model(seed: int, r: int = 2) -> CausalLMModule:
    import peft

    base = tiny_causal_lm("llama", vocab_size=32, hidden=16, layers=1, heads=2, seed=seed)
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, lora_dropout=0.0, init_lora_weights=False)
    return CausalLMModule(peft.get_peft_model(base, cfg)).double()


def adapter_gradients(model, task, dataset) -> torch.Tensor:
    """``Tensor[N, P]``: each example's loss gradient w.r.t. every adapter parameter (autograd)."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(len(dataset)):
        loss = task.per_example_loss(model, lm_collate([dataset[i]])).sum()
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def compare(scores: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    s, r = scores.double(), ref.double()
    rho = sum(spearmanr(s[i].numpy(), r[i].numpy())[0] for i in range(len(r))) / len(r)
    return float(rho), float(pearsonr(s.reshape(-1).numpy(), r.reshape(-1).numpy())[0])


def run(seed: int, n: int, n_queries: int = 8) -> dict:
    model = lora_model(seed)
    data = IndexedDataset(synthetic_token_dataset(n + n_queries, vocab_size=32, min_len=4, max_len=9, seed=seed))
    train, queries = Subset(data, range(n)), Subset(data, range(n, n + n_queries))
    train_loader = DataLoader(train, batch_size=8, collate_fn=lm_collate)
    query_loader = DataLoader(queries, batch_size=8, collate_fn=lm_collate)
    task = CausalLMTask()
    g_train, g_query = adapter_gradients(model, task, train), adapter_gradients(model, task, queries)
    fisher = g_train.T @ g_train / n
    lam = 0.1 * float(torch.linalg.eigvalsh(fisher).mean())
    ref = g_query @ torch.linalg.solve(fisher + lam * torch.eye(len(fisher), dtype=fisher.dtype), g_train.T)

    out: dict = {"seed": seed, "n_train": n, "adapter_params": int(g_train.shape[1])}
    layers = {
        # what the default tracks on a LoRA model (lora_A / lora_B), named here because this tiny model's
        # SwiGLU width equals its vocabulary (32), which the default would leave out
        "two linears": select_layers(model, ["*lora_A.default", "*lora_B.default"]),
        "one layer": select_layers(model, [f"*{t}" for t in TARGETS]),  # LoRALinearLayer
    }
    for name, tracked in layers.items():
        t0 = time.perf_counter()
        factors = fit_factors(model, train_loader, tracked, task)
        scores = InfluenceScorer(model, factors).pairwise(query_loader, train_loader).pairwise
        rho, r = compare(scores, ref)
        out[name] = {"spearman": rho, "pearson": r, "factor_entries": sum(l.d_out ** 2 + l.a_dim ** 2 for l in tracked),
                     "layers": [l.name for l in tracked], "seconds": time.perf_counter() - t0}
    rho, r = compare(g_query @ g_train.T, ref)
    out["gradient dot"] = {"spearman": rho, "pearson": r}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--n", type=int, default=400, help="training sequences per seed")
    ap.add_argument("--out", default="benchmarks/out/bench_lora.json")
    args = ap.parse_args()
    logging.getLogger("lightning_influence").setLevel(logging.ERROR)  # the default-selection notice, once per fit
    torch.set_num_threads(1)
    runs = []
    for seed in range(args.seeds):
        res = run(seed, args.n)
        runs.append(res)
        print(f"seed {seed}: " + ", ".join(f"{k} ρ={res[k]['spearman']:.3f} r={res[k]['pearson']:.3f}"
                                           for k in ("two linears", "one layer", "gradient dot")), flush=True)
    summary = {k: {m: sum(r[k][m] for r in runs) / len(runs) for m in ("spearman", "pearson")}
               for k in ("two linears", "one layer", "gradient dot")}
    print(f"\nmean over {len(runs)} seeds, n_train={args.n}, {runs[0]['adapter_params']} adapter parameters")
    print("| representation | Spearman (per query) | Pearson (matrix) | factor entries |")
    print("|---|---|---|---|")
    for k, v in summary.items():
        entries = runs[0][k].get("factor_entries", "—")
        print(f"| {k} | {v['spearman']:.3f} | {v['pearson']:.3f} | {entries} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"runs": runs, "summary": summary, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
