"""Training-gradient index benchmark (issue 16; scorer memory of issue 13), side by side in one run.

Parts (``--parts``, default all):

* ``quality``: accuracy against size on digits, real data. ``MLPClassifier(64, hidden=32, 10)``
  trained as in ``bench_ekfac_callback.py`` (SGD, 20 epochs, the 1,437 training examples),
  factors from ``fit_factors``, 100 test queries. For exact, ``"sjlt"`` and ``"kronecker"``
  indexes at several sizes and storage dtypes: bytes per example, recall of the exact top-10,
  mean per-query Spearman against the exact scores, and LDS (``--lds-models`` models retrained
  on random halves; the LDS code of ``bench_ekfac_callback.py``) with its paired difference to
  exact scoring. Projections are averaged over ``--seeds`` projection seeds. Also: the split of
  ``W = 1/(Λ+λ)`` between the two sides (ablation on the exact vectors) and exact re-ranking
  of compressed candidates.
* ``quality_lm``: the same (without LDS) on the GPT-NeoX case of ``index_cases.py`` with 3,000
  training sequences.
* ``mlp`` / ``lm``: scale (``index_cases.py``): for each training-set size, the build (time,
  CPU time, size on disk, peak memory) against one pass of per-example gradients over the same
  examples; ``search`` of 1,000 queries (top-10); ``InfluenceScorer.pairwise``,
  ``InfluenceScorer.self_influence``, ``MultiStageScorer.pairwise`` and kronfluence 1.0.1's
  pairwise scores on the same queries, where they finish in reasonable time (the others are
  reported as not run, with the reason); recall of the exact top-10.

Every timed phase runs in a fresh process (``index_cases.run_phase``: wall and CPU time, peak
resident memory above the process's baseline). Run alone:
``.venv/bin/python benchmarks/bench_index.py`` (``--help``); the full run rewrites
``docs/benchmarks_index.md`` from the JSON it saves (``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]
DOC = ROOT / "docs" / "benchmarks_index.md"
warnings.filterwarnings("ignore")

from common import machine, md_table, utc_now  # noqa: E402
from index_cases import phase, prepare_case, run_phase  # noqa: E402


# ------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------
def recall_at(a: torch.Tensor, ref: torch.Tensor, k: int = 10) -> float:
    """Mean over rows of |top-k(a) ∩ top-k(ref)| / k (dense score matrices, same columns)."""
    ta, tr = torch.topk(a.float(), k, dim=1).indices, torch.topk(ref.float(), k, dim=1).indices
    return sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(ta, tr)) / (k * a.shape[0])


def recall_lists(ids: list[list[int]], ref: list[list[int]]) -> float:
    k = len(ref[0])
    return sum(len(set(a[:k]) & set(b)) for a, b in zip(ids, ref)) / (k * len(ref))


def spearman_rows(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    return statistics.fmean(float(spearmanr(x.double().numpy(), y.double().numpy()).statistic) for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------
# quality: digits (LDS) and the LM (recall)
# ------------------------------------------------------------------------------------------
QUALITY_VARIANTS = [
    ("auto", 1024, "float16"),  # the default (issue 21): exact on this model (2,410 entries ≤ the 49,152 budget)
    ("exact", None, "float32"), ("exact", None, "float16"), ("exact", None, "bfloat16"),
    ("sjlt", 64, "float16"), ("sjlt", 256, "float16"), ("sjlt", 1024, "float16"),
    ("sjlt", 256, "float32"), ("sjlt", 256, "bfloat16"),
    ("kronecker", 64, "float16"), ("kronecker", 256, "float16"), ("kronecker", 1024, "float16"),
]


def _variant_rows(model, factors, train_loader, query_loader, exact, n_train, variants, seeds, workdir, lds_fn=None, rerank=None):
    from lightning_influence.index import build_index

    rows = []
    for comp, dim, dt in variants:
        per_seed = []
        for seed in range(1 if comp == "exact" else seeds):
            path = Path(workdir) / f"{comp}-{dim}-{dt}-{seed}"
            idx = build_index(model, factors, train_loader, path, compression=comp, dim=dim or 1, dtype=dt, seed=seed)
            s = idx.scores(query_loader).pairwise.float()
            r = {"recall": recall_at(s, exact), "spearman": spearman_rows(s, exact), "bytes_per_example": idx.nbytes / n_train,
                 "dims": sum(idx.dims.values())}
            if lds_fn is not None:
                r.update(lds_fn(s))
            if rerank is not None and comp != "exact":
                r.update(rerank(idx))
            per_seed.append(r)
        row = {"compression": comp, "dim": dim, "dtype": dt, "seeds": len(per_seed)}
        for key in per_seed[0]:
            vals = [p[key] for p in per_seed]
            row[key] = statistics.fmean(vals)
            if len(vals) > 1 and key in ("recall", "spearman", "lds"):
                row[key + "_sd"] = statistics.stdev(vals)
        rows.append(row)
        print(f"   {comp:9s} dim={dim} {dt:8s} recall {row['recall']:.3f} spearman {row['spearman']:.3f}"
              + (f" LDS {row['lds']:.4f} (Δ {row['lds_diff']:+.4f} ± {row['lds_diff_se']:.4f})" if "lds" in row else "")
              + (f" rerank@100 recall {row['rerank_recall']:.3f}" if "rerank_recall" in row else "")
              + f" {row['bytes_per_example']:.0f} B/ex", flush=True)
    return rows


def _split_ablation(idx, query_loader, exact, factors, dims=(256, 1024)):
    """Recall and Spearman of a CountSketch of the exact vectors when W is split as
    S_t = W^α (training side), S_q = W^(1-α) (query side)."""
    names = idx.layer_names
    qv = idx.query_vectors(query_loader).vectors
    q = torch.cat([qv[n].float() for n in names], 1)
    t = torch.cat([torch.cat([b.vectors[n] for b in idx.blocks()]).float() for n in names], 1)
    sw = torch.cat([factors.layers[n].inverse_scale(None, power=0.5).reshape(-1) for n in names]).float()
    out = []
    for k in dims:
        for alpha in (0.0, 0.5, 1.0):
            recs, sps = [], []
            for seed in range(3):
                g = torch.Generator().manual_seed(seed)
                h = torch.randint(0, k, (q.shape[1],), generator=g)
                sg = (torch.randint(0, 2, (q.shape[1],), generator=g) * 2 - 1).float()
                sk = lambda x: torch.zeros(x.shape[0], k).index_add_(1, h, x * sg)  # noqa: E731
                s = sk(q * sw.pow(1 - 2 * alpha)) @ sk(t * sw.pow(2 * alpha - 1)).T
                recs.append(recall_at(s, exact))
                sps.append(spearman_rows(s, exact))
            out.append({"dim": k, "alpha": alpha, "recall": statistics.fmean(recs), "spearman": statistics.fmean(sps)})
            print(f"   split α={alpha} K={k}: recall {out[-1]['recall']:.3f} spearman {out[-1]['spearman']:.3f}", flush=True)
    return out


def _digits_lds_case(n_models: int) -> types.SimpleNamespace:
    """The digits LDS case (MLP 64-32-10 of ``common``'s LDS set-up): the trained model, its
    factors, exact pairwise scores, and ``n_models`` models retrained on random halves
    (``masks``, ``losses``), the same for every section that scores it."""
    from torch.utils.data import DataLoader, TensorDataset

    from common import LDS_BATCH, LDS_EPOCHS, LDS_HIDDEN, LDS_LR, LDS_QUERIES, MLPCase, query_losses, train_plain
    from lightning_influence.ekfac.fit import fit_factors
    from lightning_influence.ekfac.scorer import InfluenceScorer

    case = MLPCase(hidden=LDS_HIDDEN, lr=LDS_LR, batch=LDS_BATCH, epochs=LDS_EPOCHS, name="lds")
    model = train_plain(case, case.train)
    query = TensorDataset(*(t[:LDS_QUERIES] for t in case.test.tensors))
    train_loader = DataLoader(case.train, batch_size=256, shuffle=False)
    query_loader = DataLoader(query, batch_size=LDS_QUERIES, shuffle=False)
    factors = fit_factors(model, DataLoader(case.train, batch_size=LDS_BATCH, shuffle=False))
    n = len(case.train)
    exact = InfluenceScorer(model, factors).pairwise(query_loader, train_loader).pairwise.float()
    g = torch.Generator().manual_seed(1234)
    masks = torch.zeros(n_models, n, dtype=torch.bool)
    losses = torch.zeros(n_models, LDS_QUERIES)
    t1 = time.perf_counter()
    for j in range(n_models):
        idx = torch.randperm(n, generator=g)[: n // 2].sort().values
        masks[j, idx] = True
        losses[j] = query_losses(train_plain(case, torch.utils.data.Subset(case.train, idx.tolist())), query)
    return types.SimpleNamespace(case=case, model=model, query=query, train_loader=train_loader, query_loader=query_loader,
                                 factors=factors, n=n, exact=exact, masks=masks, losses=losses,
                                 retrain_s=time.perf_counter() - t1)


def quality_digits(args, workdir: Path) -> dict:
    from common import LDS_QUERIES, lds
    from lightning_influence.index import build_index

    t0 = time.perf_counter()
    c = _digits_lds_case(args.lds_models)
    case, model, query_loader, train_loader, factors, n, exact = c.case, c.model, c.query_loader, c.train_loader, c.factors, c.n, c.exact
    masks, losses, retrain_s = c.masks, c.losses, c.retrain_s
    exact_idx = build_index(model, factors, train_loader, workdir / "q-exact", compression="exact", dtype="float32")
    from_index = exact_idx.scores(query_loader).pairwise.float()
    index_vs_scorer = float((from_index - exact).abs().max() / exact.abs().max())
    ref = lds(exact, masks, losses)
    ref_q = torch.tensor(ref["per_query"], dtype=torch.float64)
    print(f"   exact: LDS {ref['lds']:.4f} ± {ref['se']:.4f} ({args.lds_models} models, retrained in {retrain_s:.0f} s); index vs scorer {index_vs_scorer:.1e}", flush=True)

    def lds_fn(s):
        r = lds(s, masks, losses)
        d = torch.tensor(r["per_query"], dtype=torch.float64) - ref_q
        return {"lds": r["lds"], "lds_se": r["se"], "lds_diff": float(d.mean()), "lds_diff_se": float(d.std() / len(d) ** 0.5)}

    def rerank(idx):
        cand = idx.search(query_loader, k=100)
        top = idx.rerank(query_loader, cand, _Indexed(case.train), k=10, batch_size=256)
        return {"rerank_recall": recall_lists(top.ids.tolist(), torch.topk(exact, 10, dim=1).indices.tolist())}

    rows = _variant_rows(model, factors, train_loader, query_loader, exact, n, QUALITY_VARIANTS, args.seeds, workdir, lds_fn, rerank)
    ablation = _split_ablation(exact_idx, query_loader, exact, factors)
    return {"note": case.note, "n_train": n, "n_query": LDS_QUERIES, "lds_models": args.lds_models, "exact_lds": ref["lds"],
            "exact_lds_se": ref["se"], "index_vs_scorer": index_vs_scorer, "rows": rows, "split": ablation,
            "grad_entries": sum(f.lambdas.numel() for f in factors.layers.values()), "seconds": time.perf_counter() - t0}


class _Indexed(torch.utils.data.Dataset):
    """Items of a dataset whose ids are their positions (batches then carry no ids)."""

    def __init__(self, ds) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[i]


LM_VARIANTS = [("auto", 1024, "float16"), ("sjlt", 256, "float16"), ("sjlt", 1024, "float16"), ("sjlt", 4096, "float16"),
               ("kronecker", 256, "float16"), ("kronecker", 1024, "float16"), ("kronecker", 4096, "float16")]


def quality_lm(args, workdir: Path) -> dict:
    from torch.utils.data import DataLoader

    from index_cases import LM_BATCH, N_FACTOR_LM, lm_layers, lm_sequences, train_lm
    from lightning_influence import select_layers
    from lightning_influence.data import lm_collate
    from lightning_influence.ekfac.fit import fit_factors
    from lightning_influence.ekfac.scorer import InfluenceScorer

    t0 = time.perf_counter()
    seqs = lm_sequences(N_FACTOR_LM + 100, seed=0)
    train, query = seqs[:N_FACTOR_LM], seqs[N_FACTOR_LM:]
    model = train_lm(train)
    factors = fit_factors(model, DataLoader(train, batch_size=LM_BATCH, collate_fn=lm_collate), select_layers(model, lm_layers(model)))
    tl = DataLoader(train, batch_size=LM_BATCH, collate_fn=lm_collate)
    ql = DataLoader(query, batch_size=100, collate_fn=lm_collate)
    exact = InfluenceScorer(model, factors).pairwise(ql, tl).pairwise.float()

    def rerank(idx):
        cand = idx.search(ql, k=100)
        top = idx.rerank(ql, cand, train, k=10, collate_fn=lm_collate)
        return {"rerank_recall": recall_lists(top.ids.tolist(), torch.topk(exact, 10, dim=1).indices.tolist())}

    rows = _variant_rows(model, factors, tl, ql, exact, len(train), LM_VARIANTS, args.seeds, workdir, None, rerank)
    return {"n_train": len(train), "n_query": 100, "rows": rows, "grad_entries": sum(f.lambdas.numel() for f in factors.layers.values()),
            "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------
# the default compression rule (issue 21)
# ------------------------------------------------------------------------------------------
def _rule_rows(model, factors, tl, ql, n_train, exact, lds_fn, workdir: Path, proj_seeds) -> dict:
    """Every candidate rule of ``index_cases.candidate_rules`` on one trained model: recall@10 of
    the exact top-10, LDS (``lds_fn``) and bytes per example, averaged over ``proj_seeds``."""
    from index_cases import build_with_dims, candidate_rules, numbers_per_example

    shapes = [(n, tuple(factors.layers[n].grad_shape)) for n in factors.layer_names]
    out = {}
    for name, rule in candidate_rules().items():
        dims = rule(shapes)
        seeds = proj_seeds if any(d is not None for d in dims.values()) else proj_seeds[:1]
        per = []
        for ps in seeds:
            idx = build_with_dims(model, factors, tl, workdir / f"rule-{ps}", dims, seed=ps)
            s = idx.scores(ql).pairwise.float()
            per.append({"recall": recall_at(s, exact), "bytes": idx.nbytes / n_train, **lds_fn(s)})
        out[name] = {k: statistics.fmean(p[k] for p in per) for k in per[0]}
        out[name].update(numbers=numbers_per_example(shapes, dims), exact_layers=sum(d is None for d in dims.values()),
                         layers=len(dims), dims=dims)
    return out


def rules_part(args, workdir: Path) -> dict:
    """Candidate default rules (``index_cases.candidate_rules``) on: the digits case of ``quality``
    (100 retrained models), the six tasks of the evaluation matrix (``matrix_tasks``; bench_matrix's cached retrained subsets) and
    two wider GPT-NeoX tasks where the budget binds (retrained here, cached under
    ``benchmarks/out/index_rules``); bytes per example of each rule on GPT-2 small (from shapes)."""
    import matrix_tasks as bm
    from lightning_influence.evaluate import query_losses
    from index_cases import GPT2_SMALL_SHAPES, candidate_rules, lm_rule_tasks, numbers_per_example

    from lightning_influence.ekfac.scorer import InfluenceScorer
    from lightning_influence.evaluate import linear_datamodeling_score, retrain_subsets

    workdir.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"gpt2": {}, "tasks": {}, "seeds": args.rule_seeds, "proj_seeds": args.seeds}
    for name, rule in candidate_rules().items():
        d = rule(GPT2_SMALL_SHAPES)
        res["gpt2"][name] = {"numbers": numbers_per_example(GPT2_SMALL_SHAPES, d), "exact_layers": sum(v is None for v in d.values())}
    tasks = bm.build_tasks(args.rule_n_train, args.rule_n_query)
    wide = lm_rule_tasks(args.rule_n_train, args.rule_n_query)
    out_dir = bm.ROOT / "benchmarks" / "out" / "index_rules"
    for tname in [*args.rule_tasks]:
        task = tasks.get(tname) or wide[tname]
        for seed in args.rule_seeds:
            t0 = time.perf_counter()
            key = task.key(seed, args.rule_n_train, args.rule_n_query)
            train_set, query_set, _, model, tl, ql, factors = bm.prepare(task, seed)

            def retrain(j: int, idx: torch.Tensor, task=task, seed=seed, train_set=train_set, ql=ql) -> torch.Tensor:
                m = bm.train(task, task.make_model(seed * 1000 + j + 1), torch.utils.data.Subset(train_set, idx.tolist()), seed * 1000 + j + 1)
                return query_losses(m, ql)

            cache = (bm.OUT if tname in tasks else out_dir) / key / "retrain"
            sub = retrain_subsets(args.rule_n_train, retrain, n_subsets=args.rule_subsets, seed=seed, workdir=cache, progress=False)
            exact = InfluenceScorer(model, factors).pairwise(ql, tl).pairwise.float()
            ref = linear_datamodeling_score(exact, sub.masks, sub.losses)

            def lds_fn(s, ref=ref, sub=sub):
                r = linear_datamodeling_score(s, sub.masks, sub.losses)
                return {"lds": r.lds, "lds_diff": float(torch.nan_to_num(r.per_query - ref.per_query).mean())}

            rows = _rule_rows(model, factors, tl, ql, len(train_set), exact, lds_fn, workdir / f"{tname}-{seed}", [seed])
            res["tasks"].setdefault(tname, {"note": task.note, "entries": sum(f.lambdas.numel() for f in factors.layers.values()),
                                            "cells": []})["cells"].append({"seed": seed, "exact_lds": ref.lds, "rules": rows})
            print(f"   {tname} seed {seed}: exact LDS {ref.lds:.3f} ({time.perf_counter() - t0:.0f} s); "
                  + "; ".join(f"{k.split(' (')[0]}: {v['lds_diff']:+.3f}/{v['recall']:.2f}" for k, v in rows.items()), flush=True)
            _save_partial(args, "rules", res)
    if args.rule_digits:
        res["tasks"]["digits_quality"] = _rules_digits(args, workdir / "digits")
        _save_partial(args, "rules", res)
    return res


def _rules_digits(args, workdir: Path) -> dict:
    """The ``quality`` digits case (MLP 64-32-10, 100 retrained halves) under every candidate rule."""
    from lightning_influence.evaluate import linear_datamodeling_score

    c = _digits_lds_case(args.lds_models)
    case, model, tl, ql, factors, n, exact, masks, losses = (c.case, c.model, c.train_loader, c.query_loader, c.factors, c.n,
                                                             c.exact, c.masks, c.losses)
    ref = linear_datamodeling_score(exact, masks, losses)

    def lds_fn(s):
        r = linear_datamodeling_score(s, masks, losses)
        return {"lds": r.lds, "lds_diff": float(torch.nan_to_num(r.per_query - ref.per_query).mean())}

    rows = _rule_rows(model, factors, tl, ql, n, exact, lds_fn, workdir, list(range(args.seeds)))
    print("   digits_quality: exact LDS %.3f; " % ref.lds + "; ".join(f"{k.split(' (')[0]}: {v['lds_diff']:+.3f}/{v['recall']:.2f}"
                                                                  for k, v in rows.items()), flush=True)
    return {"note": case.note, "entries": sum(f.lambdas.numel() for f in factors.layers.values()),
            "cells": [{"seed": 0, "exact_lds": ref.lds, "rules": rows}]}


# ------------------------------------------------------------------------------------------
# scale
# ------------------------------------------------------------------------------------------
def _spec(workdir: Path, **kw) -> dict:
    return {"workdir": str(workdir), "threads": 1, **kw}


def scale(kind: str, sizes: list[int], args, workdir: Path) -> dict:
    from lightning_influence.index import DEFAULT_COMPRESSION, DEFAULT_DIM, DEFAULT_STORAGE_DTYPE

    n_query = args.queries
    if args.remeasure:
        return remeasure(kind, sizes, args, workdir)
    print(f"== scale {kind}: preparing {max(sizes):,} examples", flush=True)
    info = prepare_case(kind, sizes, n_query, workdir)
    default = {"compression": DEFAULT_COMPRESSION, "dim": DEFAULT_DIM, "dtype": str(DEFAULT_STORAGE_DTYPE).replace("torch.", "")}
    results: dict[str, Any] = {"kind": kind, "sizes": sizes, "n_query": n_query, "default": default, "prepare": info, "rows": []}
    kron_dir = workdir / "kron"
    kron_fit = run_phase(_spec(workdir, phase="kron_fit", kron_dir=str(kron_dir)))
    results["kron_fit"] = kron_fit
    limits = args.limits[kind]
    for n in sizes:
        row: dict[str, Any] = {"n": n, "skipped": {}}
        path = workdir / f"index-{n}"
        order = ["grad_pass", "build"] if n % 2 == 0 else ["build", "grad_pass"]
        for ph in order:
            spec = _spec(workdir, phase=ph, n=n, path=str(path), options=default)
            row[ph] = run_phase(spec)
            print(f"   N={n:,} {ph}: {row[ph]['wall']:.1f} s wall, {row[ph]['cpu']:.1f} s CPU, peak {row[ph]['peak_mib']:.0f} MiB", flush=True)
        row["search"] = run_phase(_spec(workdir, phase="search", n=n, n_query=n_query, path=str(path)))
        print(f"   N={n:,} search {n_query} queries: {row['search']['wall']:.1f} s, peak {row['search']['peak_mib']:.0f} MiB", flush=True)
        # exact references and the other scorers
        for name, ph, q, cap in (("scorer", "scorer_pairwise", n_query, limits["scorer"]),
                                 ("kron", "kron_pairwise", n_query, limits["kron"]),
                                 ("scorer_small", "scorer_pairwise", args.small_queries, limits["scorer_small"]),
                                 ("kron_small", "kron_pairwise", args.small_queries, limits["kron_small"]),
                                 ("self", "scorer_self", 0, limits["self"]),
                                 ("multistage", "multistage_pairwise", args.small_queries, limits["multistage"])):
            if n > cap:
                row["skipped"][name] = f"N > {cap:,}"
                continue
            row[name] = run_phase(_spec(workdir, phase=ph, n=n, n_query=q, kron_dir=str(kron_dir), query_batch=min(q, 1000) if q else 1000))
            print(f"   N={n:,} {name} ({q} queries): {row[name]['wall']:.1f} s wall, {row[name]['cpu']:.1f} s CPU, "
                  f"peak {row[name]['peak_mib']:.0f} MiB (output {row[name].get('output_mib', 0):.0f} MiB)", flush=True)
        ref = row.get("scorer", {}).get("top10") or row.get("scorer_small", {}).get("top10")
        if ref is None and n <= limits["recall_search"]:
            row["scorer_search"] = run_phase(_spec(workdir, phase="scorer_search", n=n, n_query=args.recall_queries, query_batch=args.recall_queries))
            ref = row["scorer_search"]["top10"]
            print(f"   N={n:,} exact top-10 by streaming scorer search ({args.recall_queries} queries): {row['scorer_search']['wall']:.1f} s", flush=True)
        if ref is not None:
            got = row["search"]["top10"]["ids"][: len(ref["ids"])]
            row["recall"] = recall_lists(got, ref["ids"])
            row["recall_queries"] = len(ref["ids"])
            if "kron" in row:
                row["kron_recall_vs_scorer"] = recall_lists(row["kron"]["top10"]["ids"], ref["ids"])
            print(f"   N={n:,} recall of the exact top-10: {row['recall']:.3f} ({row['recall_queries']} queries)", flush=True)
        if n == args.variants_at:  # the size/accuracy/speed trade-off at one size
            row["variants"] = []
            for dim in args.variant_dims:
                opts = dict(default, dim=dim)
                vpath = workdir / f"index-{n}-{dim}"
                b = run_phase(_spec(workdir, phase="build", n=n, path=str(vpath), options=opts))
                se = run_phase(_spec(workdir, phase="search", n=n, n_query=n_query, path=str(vpath)))
                v = {"dim": dim, "build": b, "search": {k: se[k] for k in ("wall", "cpu", "peak_mib")}}
                if ref is not None:
                    v["recall"] = recall_lists(se["top10"]["ids"][: len(ref["ids"])], ref["ids"])
                row["variants"].append(v)
                print(f"   N={n:,} dim={dim}: {b['bytes'] / 2**20:.0f} MiB, build {b['cpu']:.1f} s CPU, search {se['cpu']:.2f} s CPU, "
                      f"recall {v.get('recall', float('nan')):.3f}", flush=True)
                import shutil

                shutil.rmtree(vpath, ignore_errors=True)
        if n == args.variants_at and ref is not None:
            rr = run_phase(_spec(workdir, phase="search_rerank", n=n, n_query=len(ref["ids"]), path=str(path), candidates=100,
                                 query_batch=len(ref["ids"])))
            row["rerank"] = {"queries": len(ref["ids"]), "wall": rr["wall"], "cpu": rr["cpu"], "peak_mib": rr["peak_mib"],
                             "recall": recall_lists(rr["top10"]["ids"], ref["ids"])}
            print(f"   N={n:,} search top-100 + exact re-ranking ({len(ref['ids'])} queries): {rr['cpu']:.1f} s CPU, "
                  f"recall {row['rerank']['recall']:.3f}", flush=True)
        if args.faiss and kind == "mlp" and n == args.variants_at:
            fb = run_phase(_spec(workdir, phase="faiss_build", n=n, path=str(path), faiss={"method": "ivf"}))
            fs = run_phase(_spec(workdir, phase="faiss_search", n=n, n_query=n_query, path=str(path)))
            row["faiss"] = {"build": fb, "search": fs, "recall_vs_streaming": recall_lists(fs["top10"]["ids"], row["search"]["top10"]["ids"])}
            print(f"   N={n:,} FAISS ivf: build {fb['wall']:.1f} s, search {fs['wall']:.2f} s, recall vs streaming "
                  f"{row['faiss']['recall_vs_streaming']:.3f}, peak {fs['peak_mib']:.0f} MiB", flush=True)
        for big in ("search", "scorer", "kron", "scorer_small", "kron_small", "scorer_search"):
            if big in row:
                row[big].pop("top10", None)
        results["rows"].append(row)
        _save_partial(args, kind, results)
        import shutil

        shutil.rmtree(path, ignore_errors=True)
    return results


SCORER_PHASES = {"scorer": "scorer_pairwise", "kron": "kron_pairwise", "scorer_small": "scorer_pairwise",
                 "kron_small": "kron_pairwise", "self": "scorer_self", "multistage": "multistage_pairwise"}


def remeasure(kind: str, sizes: list[int], args, workdir: Path) -> dict:
    """Run again only the scorer phases named by ``--remeasure`` (after a fix), replacing their
    entries in the saved rows of the same sizes."""
    saved = json.loads(Path(args.json).read_text())[kind]
    print(f"== re-measuring {args.remeasure} for {kind}: preparing {max(sizes):,} examples", flush=True)
    prepare_case(kind, sizes, args.queries, workdir)
    kron_dir = workdir / "kron"
    if any(p.startswith("kron") for p in args.remeasure):
        run_phase(_spec(workdir, phase="kron_fit", kron_dir=str(kron_dir)))
    for row in saved["rows"]:
        n = row["n"]
        if n not in sizes:
            continue
        for name in args.remeasure:
            if name not in row:
                continue
            q = {"scorer": args.queries, "kron": args.queries, "self": 0}.get(name, args.small_queries)
            row[name] = run_phase(_spec(workdir, phase=SCORER_PHASES[name], n=n, n_query=q, kron_dir=str(kron_dir),
                                        query_batch=min(q, 1000) if q else 1000))
            row[name].pop("top10", None)
            row.setdefault("remeasured", []).append(name)
            print(f"   N={n:,} {name}: {row[name]['wall']:.1f} s wall, {row[name]['cpu']:.1f} s CPU, peak {row[name]['peak_mib']:.0f} MiB", flush=True)
    return saved


def _save_partial(args, key, value) -> None:
    if args.json:
        path = Path(args.json)
        data = json.loads(path.read_text()) if path.exists() else {}
        data[key] = value
        path.write_text(json.dumps(data, indent=1))


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------
def _f(v, fmt=".2f", none="—"):
    return none if v is None else format(v, fmt)


def quality_table(q: dict, with_lds: bool) -> str:
    head = ["compression", "dim / layer", "storage", "numbers / example", "bytes / example", "recall@10", "Spearman",
            *(["LDS", "LDS − exact (± se)"] if with_lds else []), "recall after re-ranking 100"]
    rows = []
    for r in q["rows"]:
        row = [r["compression"], r["dim"] or "—", r["dtype"], f"{r['dims']:,.0f}", f"{r['bytes_per_example']:,.0f}",
               f"{r['recall']:.3f}{' ± %.3f' % r['recall_sd'] if 'recall_sd' in r else ''}", f"{r['spearman']:.3f}"]
        if with_lds:
            row += [f"{r['lds']:.4f}", f"{r['lds_diff']:+.4f} ± {r['lds_diff_se']:.4f}"]
        rows.append([*row, _f(r.get("rerank_recall"), ".3f")])
    return md_table(head, rows)


def scale_table(s: dict) -> str:
    q = s["n_query"]
    rows = []
    for r in s["rows"]:
        b, g, se = r["build"], r["grad_pass"], r["search"]
        sc, kr = r.get("scorer"), r.get("kron")
        ratio = f"{kr['cpu'] / se['cpu']:.0f}×" if kr else "—"
        rows.append([
            f"{r['n']:,}", f"{b['wall']:.1f} / {b['cpu']:.1f}", f"{g['wall']:.1f} / {g['cpu']:.1f}", f"{b['cpu'] / g['cpu']:.2f}",
            f"{b['bytes'] / 2**20:,.1f} MiB", f"{se['wall']:.2f} / {se['cpu']:.2f}", f"{se['peak_mib']:.0f}",
            _f(sc and sc["cpu"], ".1f", "not run"), _f(kr and kr["cpu"], ".1f", "not run"), ratio,
            f"{_f(r.get('recall'), '.3f')} ({r.get('recall_queries', 0)} q)"])
    return md_table(["N", "build (s, wall / CPU)", "one gradient pass (s, wall / CPU)", "build / pass (CPU)", "index on disk",
                     f"search {q} queries (s, wall / CPU)", "search peak (MiB)", f"InfluenceScorer.pairwise {q} q (s, CPU)",
                     f"kronfluence pairwise {q} q (s, CPU)", "throughput vs kronfluence (CPU)", "recall@10"], rows)


def memory_table(s: dict) -> str:
    qs = s.get("small_queries", 100)
    nq = s["n_query"]
    head = ["N", f"search {nq} q: peak", f"InfluenceScorer.pairwise {nq} q: peak − output", f"pairwise {qs} q: peak − output",
            "self_influence: peak − output", f"MultiStageScorer.pairwise {qs} q: peak − output", f"kronfluence {nq} q: peak − output",
            f"kronfluence {qs} q: peak − output", f"time vs kronfluence ({qs} q, CPU)"]

    def m(r, key):
        x = r.get(key)
        if x is None:
            return "not run"
        return f"{x['peak_mib'] - x.get('output_mib', 0):.0f} (out {x.get('output_mib', 0):.0f})" if "output_mib" in x else f"{x['peak_mib']:.0f}"

    rows = []
    for r in s["rows"]:
        t = r.get("scorer_small"), r.get("kron_small")
        ratio = f"{t[0]['cpu'] / t[1]['cpu']:.2f}" if t[0] and t[1] else "—"
        rows.append([f"{r['n']:,}", *(m(r, k) for k in ("search", "scorer", "scorer_small", "self", "multistage", "kron", "kron_small")), ratio])
    return md_table(head, rows)


def variants_table(s: dict) -> str:
    head = ["dim / layer", "index on disk", "build (s CPU)", "search (s CPU)", "throughput vs kronfluence (CPU)", "recall@10"]
    blocks = []  # one table per N that has variants, each followed by its N
    for r in s["rows"]:
        kr = r.get("kron")
        rows = [{"dim": s["default"]["dim"], "build": r["build"], "search": r["search"], "recall": r.get("recall"), "default": True}]
        rows += r.get("variants", [])
        if len(rows) == 1:
            continue
        cells = [[f"{v['dim']:,}{' (default)' if v.get('default') else ''}", f"{v['build']['bytes'] / 2**20:,.0f} MiB",
                  f"{v['build']['cpu']:.1f}", f"{v['search']['cpu']:.2f}", f"{kr['cpu'] / v['search']['cpu']:.1f}×" if kr else "—",
                  _f(v.get("recall"), ".3f")] for v in sorted(rows, key=lambda v: v["dim"])]
        blocks.append(f"{md_table(head, cells)}\n\n(N = {r['n']:,}; {s['n_query']:,} queries.)")
    return "\n\n".join(blocks) or md_table(head, [])


def extras(s: dict) -> str:
    out = []
    for r in s["rows"]:
        if "rerank" in r:
            rr = r["rerank"]
            out.append(f"- N = {r['n']:,}: default index, top-100 candidates re-ranked exactly (`InfluenceIndex.rerank`, "
                       f"{rr['queries']:,} queries): recall {rr['recall']:.3f} in {rr['cpu']:.1f} s CPU (search alone "
                       f"{r['search']['cpu']:.1f} s); peak {rr['peak_mib']:.0f} MiB.")
        if "faiss" in r:
            f = r["faiss"]
            out.append(f"- N = {r['n']:,}: FAISS `ivf` (nlist = √N, nprobe = nlist/8) over the default index: built in "
                       f"{f['build']['cpu']:.1f} s CPU, {s['n_query']:,} queries in {f['search']['cpu']:.2f} s CPU (streaming: "
                       f"{r['search']['cpu']:.2f} s), recall of the streaming top-10 {f['recall_vs_streaming']:.3f}.")
        for name, why in r.get("skipped", {}).items():
            out.append(f"- N = {r['n']:,}: `{name}` not run ({why}; see below).")
    return "\n".join(out)


GPT2_BYTES_LIMIT = 98_304 * 1.05  # "≈ the old default's ~98 KB per example" on GPT-2 small (float16)


def rules_markdown(r: dict) -> str:
    """The rules part as Markdown: per task and rule LDS − exact (mean ± sd over seeds) and
    recall@10; worst case over tasks; bytes per example on the tasks and on GPT-2 small; the
    rule chosen (best worst-case LDS difference among those within the GPT-2 size limit)."""
    tasks = list(r["tasks"])
    rules = list(r["gpt2"])

    def cells(t, rule, key):
        return [c["rules"][rule][key] for c in r["tasks"][t]["cells"]]

    def ms(xs, fmt):
        return format(statistics.fmean(xs), fmt) + (f" ± {statistics.stdev(xs):{fmt[1:]}}" if len(xs) > 1 else "")

    head = ["rule", *[f"{t}: LDS − exact / recall@10" for t in tasks], "worst LDS − exact", "worst recall@10",
            "bytes / example (these tasks)", "GPT-2 small bytes / example (float16)"]
    rows, worst = [], {}
    for rule in rules:
        diffs = {t: statistics.fmean(cells(t, rule, "lds_diff")) for t in tasks}
        recs = {t: statistics.fmean(cells(t, rule, "recall")) for t in tasks}
        worst[rule] = min(diffs.values())
        b = [x for t in tasks for x in cells(t, rule, "bytes")]
        g = r["gpt2"][rule]["numbers"] * 2
        rows.append([rule, *[f"{ms(cells(t, rule, 'lds_diff'), '+.3f')} / {statistics.fmean(cells(t, rule, 'recall')):.2f}" for t in tasks],
                     f"{worst[rule]:+.3f} ({min(diffs, key=diffs.get)})", f"{min(recs.values()):.2f}",
                     f"{min(b):,.0f}–{max(b):,.0f}", f"{g:,}{'' if g <= GPT2_BYTES_LIMIT else ' (over the limit)'}"])
    ok = [k for k in rules if r["gpt2"][k]["numbers"] * 2 <= GPT2_BYTES_LIMIT]
    best = max(ok, key=lambda k: worst[k])
    info = md_table(["task", "gradient entries / example", "exact LDS (mean over seeds)", "seeds"],
                    [[t, f"{r['tasks'][t]['entries']:,}", f"{statistics.fmean(c['exact_lds'] for c in r['tasks'][t]['cells']):.3f}",
                      str(len(r["tasks"][t]["cells"]))] for t in tasks])
    return (f"{md_table(head, rows)}\n\nChosen by the worst LDS difference over the tasks among the rules whose GPT-2 small "
            f"index stays within 5 % of 98,304 bytes per example: **{best}** (worst {worst[best]:+.3f}).\n\n{info}")


def write_doc(data: dict, meta: dict) -> None:
    from doc_index import render

    DOC.write_text(render(data, meta, sys.modules[__name__]))


# ------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", nargs="+", default=["quality", "quality_lm", "rules", "mlp", "lm"],
                   choices=["quality", "quality_lm", "rules", "mlp", "lm"])
    p.add_argument("--rule-tasks", nargs="+", default=["mlp_digits_sgd_short", "mlp_digits_adamw_long", "cnn_digits_sgd_long",
                                                       "cnn_images_adamw", "gpt_neox_text", "bert_textcls_adamw", "gpt_neox_h64_text",
                                                       "gpt_neox_h128_text"],
                   help="tasks of the rules part (bench_matrix's six and two wider GPT-NeoX)")
    p.add_argument("--rule-seeds", type=int, nargs="+", default=[0, 1, 2], help="task seeds of the rules part")
    p.add_argument("--rule-n-train", type=int, default=256)
    p.add_argument("--rule-n-query", type=int, default=32)
    p.add_argument("--rule-subsets", type=int, default=32, help="retrained subsets per task and seed (bench_matrix's cache)")
    p.add_argument("--no-rule-digits", dest="rule_digits", action="store_false", help="skip the digits quality case in the rules part")
    p.add_argument("--mlp-sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--lm-sizes", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--queries", type=int, default=1000, help="queries for throughput (default 1,000)")
    p.add_argument("--small-queries", type=int, default=100, help="queries for the memory runs of the scorers (default 100)")
    p.add_argument("--recall-queries", type=int, default=100, help="queries whose exact top-10 a streaming scorer search finds where pairwise is not run")
    p.add_argument("--lds-models", type=int, default=100)
    p.add_argument("--seeds", type=int, default=3, help="projection seeds averaged in the quality parts")
    p.add_argument("--no-faiss", dest="faiss", action="store_false")
    p.add_argument("--variants-at", type=int, default=100_000, help="size at which other dims are measured too")
    p.add_argument("--variant-dims", type=int, nargs="+", default=[256, 4096])
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results_index.json"), help="results file (updated after each part)")
    p.add_argument("--workdir", default=None, help="where indexes are written (default: a temporary folder)")
    p.add_argument("--remeasure", nargs="+", default=None, choices=sorted(SCORER_PHASES),
                   help="only run these scorer phases again and replace them in --json (after a fix)")
    p.add_argument("--no-doc", action="store_true")
    p.add_argument("--doc-only", action="store_true", help="rewrite the doc from --json without running anything")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(phase(json.loads(args.worker))))
        return 0
    # where each comparison stops (examples): beyond, a run takes too long on 2 cores (see the doc)
    args.limits = {
        "mlp": {"scorer": 100_000, "kron": 100_000, "scorer_small": 100_000, "kron_small": 100_000, "self": 1_000_000,
                "multistage": 100_000, "recall_search": 1_000_000},
        "lm": {"scorer": 10_000, "kron": 10_000, "scorer_small": 100_000, "kron_small": 100_000, "self": 100_000,
               "multistage": 100_000, "recall_search": 100_000},
    }
    torch.set_num_threads(1)
    meta = {"date": utc_now(),
            "machine": machine(),
            "load_start": os.getloadavg()}
    if not args.doc_only:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="bench_index_", dir=args.workdir) as tmp:
            work = Path(tmp)
            if "quality" in args.parts:
                print("== quality: digits MLP (LDS)", flush=True)
                _save_partial(args, "quality", quality_digits(args, work / "quality"))
            if "quality_lm" in args.parts:
                print("== quality: GPT-NeoX (recall)", flush=True)
                _save_partial(args, "quality_lm", quality_lm(args, work / "quality_lm"))
            if "rules" in args.parts:
                print("== the default compression rule (issue 21)", flush=True)
                _save_partial(args, "rules", rules_part(args, work / "rules"))
            for kind, sizes in (("mlp", args.mlp_sizes), ("lm", args.lm_sizes)):
                if kind in args.parts:
                    res = scale(kind, sizes, args, work / kind)
                    res["small_queries"] = args.small_queries
                    res["load_end" if not args.remeasure else "load_end_remeasure"] = os.getloadavg()
                    _save_partial(args, kind, res)
        meta.update(total_s=time.perf_counter() - t0, load_end=os.getloadavg())
        _save_partial(args, "meta_" + "_".join(args.parts) + ("_remeasure_" + "_".join(args.remeasure) if args.remeasure else ""), meta)
    if not args.no_doc:
        write_doc(json.loads(Path(args.json).read_text()), meta)
        print(f"wrote {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
