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

``--tracing``: fact tracing through a LoRA fine-tune (``examples/lora_finetune.py``, quick size
unless ``--full``) per seed: MRR and recall@10 of multi-stage influence and of the same with an
identity fine-tuning preconditioner. ``--step-cost``: per-training-step cost of ``EKFACInfluence()``
(fixed costs cancelled, see :func:`step_cost`). ``--cost``: wall time of the fine-tune with and without
``EKFACInfluence()`` at its defaults (whole ``fit``, end-of-fit work included), LoRA vs a full
fine-tune of the same pre-trained model, and factor bytes on disk against the trained parameters'
float32 bytes.
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

from common import make_trainer, md_table

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


def _example():
    import importlib.util
    import sys

    here = Path(__file__).resolve().parents[1] / "examples"
    sys.path.insert(0, str(here))
    spec = importlib.util.spec_from_file_location("lora_finetune", here / "lora_finetune.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["lora_finetune"] = mod
    spec.loader.exec_module(mod)
    return mod


def tracing(seeds: int, full: bool) -> dict:
    ex = _example()
    runs = [ex.main(quick=not full, seed=seed) for seed in range(seeds)]
    return {"runs": runs, "multi-stage ≥ identity on every seed":
            all(r["multi-stage"]["mrr"] >= r["identity fine-tuning preconditioner"]["mrr"] for r in runs)}


def cost(seed: int, full: bool) -> dict:
    import tempfile

    from lightning_influence import EKFACInfluence

    ex = _example()
    config = ex.Config() if full else ex.Config.quick()
    config.seed = seed
    world = ex.make_world(config.n_subjects, seed=seed)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pt, _ = ex.pretrain(config, world, work, callbacks=[])
        for kind, lora in (("lora", True), ("full", False)):
            model, plain = ex.lora_finetune(config, world, pt, work / f"{kind}_plain", [], lora=lora)
            cb = EKFACInfluence(dirpath=str(work / f"{kind}_ekfac"))
            model, with_cb = ex.lora_finetune(config, world, pt, work / f"{kind}_cb", [cb], lora=lora)
            factor_bytes = sum(f.stat().st_size for f in Path(cb.factors_path).rglob("*") if f.is_file())
            trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
            out[kind] = {"plain_s": plain, "ekfac_s": with_cb, "ratio": with_cb / plain, "factor_bytes": factor_bytes,
                         "trained_params": trained, "factor_bytes_over_trained_fp32": factor_bytes / (4 * trained),
                         "layers": len(cb.state.layers) if hasattr(cb.state, "layers") else None}
            print(f"seed {seed} {kind}: fit {plain:.1f} s plain, {with_cb:.1f} s with EKFACInfluence() ({with_cb / plain:.2f}x); "
                  f"factors {factor_bytes / 1e6:.2f} MB = {factor_bytes / (4 * trained):.1f}x the trained parameters in float32", flush=True)
    return out


def step_cost(seed: int, steps: tuple[int, int] = (20, 100), repeats: int = 3, batch: int = 8) -> dict:
    """Per-training-step cost of ``EKFACInfluence()`` at its defaults, LoRA vs full fine-tune.

    The slope ``(T(n₂) − T(n₁)) / (n₂ − n₁)`` of the process CPU time of ``fit(max_steps=n)``
    (median of ``repeats``; one torch thread) cancels the fixed costs (set-up, end-of-fit
    eigendecomposition and correction). CPU time, not wall time: on a shared machine the wall
    time of the same run varied by 2× between runs.
    Model: a 2-layer Llama (hidden 128, 4 heads, vocabulary 512, sequences of 24-48 tokens,
    batch 8); LoRA ``r = 8`` on ``q_proj``, ``v_proj``, ``up_proj``, ``down_proj``.
    """
    import statistics
    import tempfile

    import peft

    from lightning_influence import EKFACInfluence

    data = IndexedDataset(synthetic_token_dataset(steps[1] * batch, vocab_size=512, min_len=24, max_len=48, seed=seed))

    def build(lora: bool) -> CausalLMModule:
        base = tiny_causal_lm("llama", vocab_size=512, hidden=128, layers=2, heads=4, max_len=64, seed=seed)
        if lora:
            cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0)
            return CausalLMModule(peft.get_peft_model(base, cfg), lr=1e-3)
        return CausalLMModule(base, lr=1e-4)

    def fit_seconds(lora: bool, ekfac: bool, n: int) -> float:
        times = []
        for _ in range(repeats):
            model = build(lora)
            with tempfile.TemporaryDirectory() as tmp:
                cbs = [EKFACInfluence(dirpath=tmp)] if ekfac else []
                trainer = make_trainer(callbacks=cbs, max_steps=n)
                t0 = time.process_time()
                trainer.fit(model, DataLoader(data, batch_size=batch, shuffle=True, collate_fn=lm_collate))
                times.append(time.process_time() - t0)
        return statistics.median(times)

    out = {}
    for kind, lora in (("lora", True), ("full", False)):
        per_step = {}
        for ekfac in (False, True):
            t1, t2 = fit_seconds(lora, ekfac, steps[0]), fit_seconds(lora, ekfac, steps[1])
            per_step["ekfac" if ekfac else "plain"] = (t2 - t1) / (steps[1] - steps[0])
            per_step[("ekfac" if ekfac else "plain") + "_fit_s"] = t2
        per_step["ratio"] = per_step["ekfac"] / per_step["plain"]
        out[kind] = per_step
        print(f"seed {seed} {kind}: {1e3 * per_step['plain']:.1f} CPU-ms/step plain, {1e3 * per_step['ekfac']:.1f} CPU-ms/step with "
              f"EKFACInfluence() ({per_step['ratio']:.2f}x); fit of {steps[1]} steps {per_step['plain_fit_s']:.1f} CPU-s vs "
              f"{per_step['ekfac_fit_s']:.1f} CPU-s", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--n", type=int, default=400, help="training sequences per seed")
    ap.add_argument("--out", default="benchmarks/out/bench_lora.json")
    ap.add_argument("--tracing", action="store_true", help="fact tracing through a LoRA fine-tune, per seed")
    ap.add_argument("--cost", action="store_true", help="EKFACInfluence() cost and factor size, LoRA vs full fine-tune")
    ap.add_argument("--step-cost", action="store_true", help="per-step EKFACInfluence() cost, LoRA vs full fine-tune")
    ap.add_argument("--full", action="store_true", help="--tracing/--cost at the example's full size (default: quick)")
    args = ap.parse_args()
    if args.tracing or args.cost or args.step_cost:
        logging.getLogger("lightning_influence").setLevel(logging.ERROR)
        torch.set_num_threads(1)
        res = {}
        if args.tracing:
            res["tracing"] = tracing(args.seeds, args.full)
            print(json.dumps(res["tracing"], indent=1))
        if args.cost:
            res["cost"] = [cost(seed, args.full) for seed in range(args.seeds)]
        if args.step_cost:
            res["step_cost"] = [step_cost(seed) for seed in range(args.seeds)]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), **res}, indent=2))
        return
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
    print(md_table(["representation", "Spearman (per query)", "Pearson (matrix)", "factor entries"],
                   [[k, f"{v['spearman']:.3f}", f"{v['pearson']:.3f}", runs[0][k].get("factor_entries", "—")] for k, v in summary.items()]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"runs": runs, "summary": summary, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
