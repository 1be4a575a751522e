"""The evaluation matrix (issue 21): EK-FAC damping rules on tasks that differ in optimizer,
training length, architecture and data, several seeds, chosen on half the tasks, reported on the
other half.

Tasks (``TASKS``; small sizes so that the whole matrix runs in minutes on two CPU cores):

========================  ============  ========  ==========================  ================
task                      architecture  data      optimizer                   training length
========================  ============  ========  ==========================  ================
``mlp_digits_sgd_short``  MLP           digits    SGD + momentum              under-fitted
``mlp_digits_adamw_long`` MLP           digits    AdamW, weight decay 0.1     losses ≈ 0
``cnn_digits_sgd_long``   CNN           digits    SGD + momentum              losses ≈ 0
``cnn_images_adamw``      CNN           generated AdamW, weight decay 0.05    medium
                                        images
``gpt_neox_text``         GPT-NeoX      generated AdamW                       short
                                        text
``bert_textcls_adamw``    BERT          generated AdamW, weight decay 0.1     losses ≈ 0
                          classifier    text cls.
========================  ============  ========  ==========================  ================

Metrics per (task, seed), each for every candidate damping rule of
:data:`lightning_influence.ekfac.damping.DAMPING_RULES`:

* ``AP`` (classification tasks, 10% of the training labels flipped): average precision of
  EK-FAC self-influence at finding the flipped labels, against the baseline **final training
  loss** of each example;
* ``LDS``: linear datamodeling score of the pairwise scores (queries: held-out examples) against
  ``--subsets`` models retrained on random halves of the training set
  (:func:`lightning_influence.evaluate.retrain_subsets`, cached under ``benchmarks/out/matrix``:
  a rerun retrains nothing), against the baseline **gradient dot product** (``damping="identity"``).

Self-influence for mislabel ranking (classification tasks): every estimator of ``SI_ESTIMATORS``
(EK-FAC self-influence at several dampings, the gradient norm, a Rayleigh quotient, the
loss-weighted self-influence and the first-order leave-one-out loss ``ℓ(z) + gᵀ(G + λI)⁻¹g / n``) by AP against the final loss, chosen
the same way (the incumbent ``InfluenceScorer.self_influence`` first); and LiSSA's default
self-influence (:func:`lightning_influence.lissa.self_influence` with ``LiSSAOptions()``): AP
against the final loss and the smallest score seen. The per-example vectors are cached next to
the cell (``SI_FILE``). LiSSA's settings (``LISSA_CANDIDATES``: curvature, the auto damping's
factor, depth, the auto scale's safety factor, sampler, sample size), each varied alone, by AP
against the final loss averaged over ``--lissa-draws`` sampler seeds, chosen the same way (cached
in ``LISSA_FILE``; ``--lissa-reduced-*`` limits the slow BERT task to some seeds and candidates).

Also per (task, seed): the LDS of each score variant (``raw``, ``cosine``, ``relative``) at the
default damping and at the identity, and :func:`lightning_influence.calibrate.calibrate` with an
LDS check on the first half of the retrained subsets, scored on the other half.

Fact-tracing MRR against kronfluence is not part of this matrix (see ``bench_fact_tracing.py``).

Selection (:func:`lightning_influence.evaluate.select`): tasks are split by
:func:`~lightning_influence.evaluate.split_tasks` with one stratum per architecture family
(MLP, CNN, transformer), so each half has one task of each family; every (task, metric) of the
choose half is a unit, and the rule with the best **worst margin over the baseline** on those
units is chosen (the incumbent default first: it is kept unless beaten). The table reports all
rules on both halves, marked.

Run: ``make bench-matrix`` or ``nice -n 10 .venv/bin/python benchmarks/bench_matrix.py``
(``--help``: tasks, seeds, subsets; ``--no-doc`` to leave ``docs/benchmarks_matrix.md`` alone).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
import types
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils.data import Subset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, md_table, mean_sd, utc_now  # noqa: E402  (the reports)
from matrix_tasks import OUT, ROOT, Task, build_tasks, prepare, train  # noqa: E402  (the six tasks, shared)

from lightning_influence.calibrate import calibrate, candidate_dampings  # noqa: E402
from lightning_influence.ekfac.damping import DAMPING_RULES, DEFAULT_DAMPING_RULE  # noqa: E402
from lightning_influence.ekfac.scorer import InfluenceScorer  # noqa: E402
from lightning_influence.evaluate import (  # noqa: E402
    ResultMatrix,
    linear_datamodeling_score,
    mislabel_detection,
    query_losses,
    retrain_subsets,
    select,
    split_tasks,
)

DOC = ROOT / "docs" / "benchmarks_matrix.md"
MULTIPLIERS = (10.0, 100.0)
CANDIDATES = [DEFAULT_DAMPING_RULE] + [r for r in DAMPING_RULES if r != DEFAULT_DAMPING_RULE] + [
    f"{DEFAULT_DAMPING_RULE}×{m:g}" for m in MULTIPLIERS]
"""Every rule (the default first: it keeps exact ties) and the default rule's λ times 10 and 100
(:func:`lightning_influence.calibrate.candidate_dampings`), which show whether much more damping
than any rule gives would help."""

warnings.filterwarnings("ignore")
logging.getLogger("lightning").setLevel(logging.ERROR)


def run_cell(task: Task, seed: int, n_train: int, n_query: int, n_subsets: int, candidates: list[str]) -> dict:
    key = task.key(seed, n_train, n_query)
    cell_file = OUT / key / f"cell-m{n_subsets}.json"
    if cell_file.exists():
        cached = json.loads(cell_file.read_text())
        if all(c in cached["lds"] for c in candidates) and "calibrate" in cached:
            if "variants" not in cached:  # added later: only the variants are computed (training is deterministic)
                _, _, _, model, tl, ql, factors = prepare(task, seed)
                sub = retrain_subsets(n_train, _no_retrain, n_subsets=n_subsets, seed=seed, workdir=OUT / key / "retrain", progress=False)
                cached["variants"] = variants_cell(model, factors, tl, ql, sub)
                write_json(cell_file, cached)
            cached["cached"] = True
            return cached
    t0 = time.perf_counter()
    train_set, query_set, flipped, model, tl, ql, factors = prepare(task, seed)
    train_loss = query_losses(model, tl)
    pooled = torch.cat([f.lambdas.reshape(-1) for f in factors.layers.values()]).double()
    out: dict[str, Any] = {"task": task.name, "seed": seed, "key": key, "final_train_loss_mean": float(train_loss.mean()),
                           "share_loss_below_0.01": float((train_loss < 0.01).double().mean()),
                           "query_loss_mean": float(query_losses(model, ql).mean()),
                           "lambda_max": float(pooled.max()), "lambda_mean": float(pooled.mean()),
                           "lambda_median": float(pooled.median()), "damping": {}, "ap": {}, "lds": {}, "lds_se": {}}

    def retrain(j: int, idx: torch.Tensor) -> torch.Tensor:
        m = train(task, task.make_model(seed * 1000 + j + 1), Subset(train_set, idx.tolist()), seed * 1000 + j + 1)
        return query_losses(m, ql)

    sub = retrain_subsets(n_train, retrain, n_subsets=n_subsets, seed=seed, workdir=OUT / key / "retrain", progress=False)
    dampings = {"identity": "identity", **candidate_dampings(factors, multipliers=MULTIPLIERS)}
    pairwise = {}
    for c in ["identity"] + candidates:
        scorer = InfluenceScorer(model, factors, damping=dampings[c])
        if c != "identity":
            out["damping"][c] = next(iter(scorer.damping.values()))
        pairwise[c] = scorer.pairwise(ql, tl).pairwise
        r = linear_datamodeling_score(pairwise[c], sub.masks, sub.losses)
        out["lds"][c], out["lds_se"][c] = r.lds, r.se
        if flipped is not None:
            out["ap"][c] = mislabel_detection(scorer.self_influence(tl).self_influence, flipped).average_precision
    if flipped is not None:
        out["ap"]["final_loss"] = mislabel_detection(train_loss, flipped).average_precision
    out["calibrate"] = calibrate_cell(model, factors, tl, ql, sub, {c: dampings[c] for c in candidates}, pairwise)
    out["variants"] = variants_cell(model, factors, tl, ql, sub)
    out["seconds"] = time.perf_counter() - t0
    out["retrain_seconds"] = float(sub.seconds.sum())
    write_json(cell_file, out)
    return out


SNAPSHOTS = 20


def trajectory_vectors(task: Task, seed: int, n_train: int, n_query: int) -> dict:
    """Training-trajectory self-influence of one (task, seed), for reference (these need the
    training run, so they are not candidates for ``InfluenceScorer.self_influence``): the task's
    training repeated step for step (same optimizer, shuffling and seeds as :func:`train`) with
    about ``SNAPSHOTS`` snapshots, evenly spaced in steps (the last one the final model), and at
    each snapshot every training example's loss and squared gradient norm on the tracked
    layers. ``mean_loss``: the mean loss over snapshots (Z0's default self-influence);
    ``tracin``: ``Σ_snapshots lr · ‖g‖²`` (TracIn's self-influence over checkpoints, constant lr).
    ``final_loss_check``: the largest difference between the last snapshot's losses and the
    cached final losses (0 when the repeated training is the same)."""
    key = task.key(seed, n_train, n_query)
    path = OUT / key / SI_FILE
    out = json.loads(path.read_text()) if path.exists() else {}
    if "trajectory" in out:
        return out
    train_set, _, _, final_model, tl, _, factors = prepare(task, seed)
    r = task.recipe
    losses, norms, steps = [], [], {}

    def snapshot(model: torch.nn.Module, step: int, total: int) -> None:
        steps["total"] = total
        if step % max(1, total // SNAPSHOTS) and step != total:
            return
        model.eval()
        losses.append(query_losses(model, tl))
        res = InfluenceScorer(model, factors, damping="identity").self_influence(tl)
        norms.append(res.self_influence[torch.argsort(res.train_ids)].double())
        model.train()

    t0 = time.perf_counter()
    train(task, task.make_model(seed), train_set, seed, on_step=snapshot)  # the same run as prepare's, step for step
    total = steps["total"]
    cached = torch.tensor(out["loss"], dtype=torch.float64) if "loss" in out else query_losses(final_model, tl)
    out["trajectory"] = {"mean_loss": torch.stack(losses).mean(0).tolist(),
                         "tracin": (r.lr * torch.stack(norms).sum(0)).tolist(),
                         "snapshots": len(losses), "steps": total,
                         "final_loss_check": float((losses[-1] - cached).abs().max()),
                         "seconds": time.perf_counter() - t0}
    write_json(path, out)
    return out


SI_FILE = "selfinf-v1.json"
SI_MULTIPLIERS = (10.0, 100.0, 1000.0)


def self_influence_vectors(task: Task, seed: int, n_train: int, n_query: int, lissa: bool = True) -> dict:
    """Per-example scores of one (task, seed) from which every self-influence estimator of the
    page is formed (cached in ``SI_FILE`` next to the cell: a rerun only recomputes what is
    missing): the final training loss, EK-FAC self-influence ``gᵀ(G + λI)⁻¹g`` at the default
    rule's λ, at its multiples and at each layer's mean eigenvalue, the squared gradient norm
    (``damping="identity"``), and LiSSA's default (:func:`lightning_influence.lissa.self_influence`
    with ``LiSSAOptions()``, probe = pool = the training set)."""
    key = task.key(seed, n_train, n_query)
    path = OUT / key / SI_FILE
    out = json.loads(path.read_text()) if path.exists() else {}
    need_ekfac = "ekfac" not in out
    need_lissa = lissa and "lissa" not in out
    if not (need_ekfac or need_lissa):
        return out
    train_set, _, flipped, model, tl, _, factors = prepare(task, seed)
    n = int(factors.n_examples)
    if need_ekfac:
        t0 = time.perf_counter()
        base = factors.dampings(DEFAULT_DAMPING_RULE)
        dampings: dict[str, Any] = {"default": base, **{f"λ×{m:g}": {k: v * m for k, v in base.items()} for m in SI_MULTIPLIERS},
                                    "layer_mean": {k: float(f.lambdas.double().mean()) for k, f in factors.layers.items()},
                                    "identity": "identity"}
        vecs = {}
        for name, d in dampings.items():
            r = InfluenceScorer(model, factors, damping=d).self_influence(tl)
            order = torch.argsort(r.train_ids)
            vecs[name] = r.self_influence[order].double().tolist()
        out["ekfac"] = vecs
        out["loss"] = query_losses(model, tl).tolist()
        out["flipped"] = flipped.tolist()
        out["n"] = n
        out["ekfac_seconds"] = time.perf_counter() - t0
    if need_lissa:
        from lightning_influence.lissa import LiSSAOptions, SamplePool
        from lightning_influence.lissa import self_influence as lissa_self_influence

        t0 = time.perf_counter()
        torch.manual_seed(seed)
        r = lissa_self_influence(model, tl, SamplePool(train_set, collate_fn=task.collate), LiSSAOptions(), progress=False)
        order = torch.argsort(r.train_ids)
        meta = {k: r.meta.get(k) for k in ("damping", "scale", "depth", "steps", "vector_steps", "negative_curvature", "budget_limited",
                                             "sample_size", "seconds")}
        out["lissa"] = {"scores": r.self_influence[order].double().tolist(), "meta": meta, "seconds": time.perf_counter() - t0}
    write_json(path, out)
    return out


LISSA_FILE = "lissa-v1.json"
LISSA_BASE = {"AUTO_DAMPING": 0.1, "AUTO_SAFETY": 1.5}
"""The ``"auto"`` rules' constants of the defaults the candidates were measured against (every
candidate runs with these, updated by its own), so the cache stays valid when the library's
defaults change."""
LISSA_CANDIDATES: dict[str, tuple[str, dict, dict]] = {
    "default": ("`LiSSAOptions()`: `curvature=\"hessian\"`, random sampler of 32 redrawn every step, depth 20, `tol=3e-3`, "
                "`damping=\"auto\"` (0.1 × the mean top eigenvalue of 3 sampled mini-batches), `scale=\"auto\"` "
                "(1.5 × (largest top eigenvalue + λ)), seed 0 (the incumbent)", {}, {}),
    "ggn": ("`curvature=\"ggn\"` (generalised Gauss-Newton, positive semi-definite)", {"curvature": "ggn"}, {}),
    "damping×0.1": ("`damping=\"auto\"` at 0.01 × the mean top eigenvalue (the auto rule's factor `AUTO_DAMPING` 0.1 → 0.01)",
                    {}, {"AUTO_DAMPING": 0.01}),
    "damping×10": ("`damping=\"auto\"` at 1 × the mean top eigenvalue (`AUTO_DAMPING` 0.1 → 1)", {}, {"AUTO_DAMPING": 1.0}),
    "damping×100": ("`damping=\"auto\"` at 10 × the mean top eigenvalue (`AUTO_DAMPING` 0.1 → 10)", {}, {"AUTO_DAMPING": 10.0}),
    "depth 10": ("`depth=10`", {"depth": 10}, {}),
    "depth 40": ("`depth=40`", {"depth": 40}, {}),
    "scale×0.73": ("`scale=\"auto\"` with safety factor 1.1 instead of 1.5 (`AUTO_SAFETY`; diverged runs restart with a larger "
                   "scale as the default's do)", {}, {"AUTO_SAFETY": 1.1}),
    "scale×2": ("`scale=\"auto\"` with safety factor 3 (`AUTO_SAFETY` 1.5 → 3)", {}, {"AUTO_SAFETY": 3.0}),
    "logit": ("`sampler=\"logit\"` (mini-batches stratified by predicted class)", {"sampler": "logit"}, {}),
    "k-means top-k": ("`sampler=\"feature\"` (k-means on penultimate features, 10 clusters, the examples nearest each centroid)",
                      {"sampler": "feature"}, {}),
    "k-means weighted": ("`sampler=\"feature_weighted\"` (k-means, 10 clusters, drawn in proportion to cluster size)",
                         {"sampler": "feature_weighted"}, {}),
    "sample 16": ("`sample_size=16`", {"sample_size": 16}, {}),
    "sample 64": ("`sample_size=64`", {"sample_size": 64}, {}),
    "sample 128": ("`sample_size=128`", {"sample_size": 128}, {}),
}
"""LiSSA self-influence candidates for mislabel ranking, each one setting away from the default
(``default`` first: the incumbent keeps exact ties): name → (description, ``LiSSAOptions`` keyword
arguments, constants of :mod:`lightning_influence.lissa.self_influence` set for the run). The
``"auto"`` damping and scale rules are varied through their constants (``AUTO_DAMPING``,
``AUTO_SAFETY``), so a candidate is exactly the library with that constant changed."""
LISSA_META = ("damping", "scale", "depth", "steps", "vector_steps", "negative_curvature", "budget_limited", "sample_size",
              "scale_retries", "seconds")


def draw_key(name: str, draw: int) -> str:
    """The cache key of ``name``'s run with the sampler seeded by ``draw`` (``LiSSAOptions.seed``)."""
    return name if draw == 0 else f"{name} @draw {draw}"


def current_lissa_default() -> Optional[str]:
    """The candidate of :data:`LISSA_CANDIDATES` that is the library's ``LiSSAOptions()`` now (no
    options changed, the ``"auto"`` constants equal :mod:`lightning_influence.lissa.self_influence`'s),
    or ``None``."""
    import lightning_influence.lissa  # noqa: F401  (loads the module)

    mod = sys.modules["lightning_influence.lissa.self_influence"]
    for k, (_, kwargs, constants) in LISSA_CANDIDATES.items():
        if not kwargs and all(getattr(mod, n) == v for n, v in {**LISSA_BASE, **constants}.items()):
            return k
    return None


def lissa_candidate_vectors(task: Task, seed: int, n_train: int, n_query: int, names: list[str], draws: int = 1) -> dict:
    """LiSSA self-influence of every training example of one (task, seed) for each candidate of
    ``names`` (:data:`LISSA_CANDIDATES`; probe = pool = the training set, the same trained model)
    and each sampler seed ``0 … draws − 1`` (``LiSSAOptions(seed=draw)``: other mini-batches;
    keys :func:`draw_key`), cached in ``LISSA_FILE`` next to the cell and written after each candidate (a rerun computes
    only what is missing). Every run has ``time_budget=None``: the default budget (600 s) shrinks
    the random sampler's mini-batch when one timed single-example product, extrapolated, looks too
    slow, and on a loaded machine that happened to runs that take seconds (mini-batches of 20–27
    instead of 32), which made the candidates depend on the load. ``default`` is taken from
    ``SI_FILE``'s ``lissa`` when that run kept 32 examples per step and its depth (the same
    numbers). A run that raises is recorded as ``{"error": message}``."""
    from lightning_influence.lissa import LiSSAOptions, SamplePool
    from lightning_influence.lissa import self_influence as lissa_self_influence

    mod = sys.modules["lightning_influence.lissa.self_influence"]
    key = task.key(seed, n_train, n_query)
    path = OUT / key / LISSA_FILE
    out = json.loads(path.read_text()) if path.exists() else {}
    si_path = OUT / key / SI_FILE
    if "default" not in out and si_path.exists():  # the same run when its time budget changed nothing
        si = json.loads(si_path.read_text())
        meta = si.get("lissa", {}).get("meta", {})
        if meta.get("sample_size") == 32 and meta.get("budget_limited") is False:
            out["default"] = {**si["lissa"], "from": SI_FILE}
    missing = [(c, d) for d in range(draws) for c in names if draw_key(c, d) not in out]
    if not missing:
        return out
    train_set, _, _, model, tl, _, _ = prepare(task, seed, factors=False)
    pool = SamplePool(train_set, collate_fn=task.collate)
    for c, d in missing:
        _, kwargs, constants = LISSA_CANDIDATES[c]
        constants = {**LISSA_BASE, **constants}
        kwargs = {**kwargs, "seed": d} if d else kwargs
        c = draw_key(c, d)
        saved = {k: getattr(mod, k) for k in constants}
        t0 = time.perf_counter()
        try:
            for k, v in constants.items():
                setattr(mod, k, v)
            torch.manual_seed(seed)
            r = lissa_self_influence(model, tl, pool, LiSSAOptions(**{"time_budget": None, **kwargs}), progress=False)
            order = torch.argsort(r.train_ids)
            out[c] = {"scores": r.self_influence[order].double().tolist(), "meta": {k: r.meta.get(k) for k in LISSA_META},
                      "seconds": time.perf_counter() - t0}
        except Exception as e:  # noqa: BLE001 - a candidate that fails is a result (it cannot be the default)
            out[c] = {"error": f"{type(e).__name__}: {e}"[:500], "seconds": time.perf_counter() - t0}
        finally:
            for k, v in saved.items():
                setattr(mod, k, v)
        write_json(path, out)
        print(f"  {task.name} seed {seed} LiSSA {c}: {out[c]['seconds']:.1f} s{' ' + out[c]['error'] if 'error' in out[c] else ''}",
              flush=True)
    return out


def _no_retrain(j: int, idx: torch.Tensor) -> torch.Tensor:
    raise RuntimeError(f"retrained subset {j} is missing from the cache; delete the cell's json to recompute it")


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


VARIANTS = ("raw", "cosine", "relative")


def variants_cell(model, factors, tl, ql, sub) -> dict:
    """LDS (all subsets) of each score variant at the default damping and at the identity."""
    out = {}
    for damping in (DEFAULT_DAMPING_RULE, "identity"):
        scorer = InfluenceScorer(model, factors, damping=damping)
        for v in VARIANTS:
            out[f"{damping}|{v}"] = linear_datamodeling_score(scorer.pairwise(ql, tl, normalize=v).pairwise, sub.masks, sub.losses).lds
    return out


def calibrate_cell(model, factors, tl, ql, sub, candidates: dict, pairwise: dict) -> dict:
    """:func:`lightning_influence.calibrate.calibrate` with the LDS check on the first half of the
    retrained subsets (damping candidates × score variants ``raw``/``cosine``), then the LDS of its
    choice, of the default rule and of the gradient dot product on the other half (held out)."""
    half = sub.masks.shape[0] // 2
    check = types.SimpleNamespace(masks=sub.masks[:half], losses=sub.losses[:half])
    t0 = time.perf_counter()
    cal = calibrate(model, factors, tl, queries=ql, subsets=check, candidates=candidates, normalize=("raw", "cosine"))
    seconds = time.perf_counter() - t0
    chosen = InfluenceScorer(model, factors, damping=cal.damping).pairwise(ql, tl, normalize=cal.normalize).pairwise

    def held(scores):
        return linear_datamodeling_score(scores, sub.masks[half:], sub.losses[half:]).lds

    return {"choice": cal.choice, "normalize": cal.normalize, "seconds": seconds, "check_subsets": half,
            "lds_heldout": {"calibrated": held(chosen), DEFAULT_DAMPING_RULE: held(pairwise[DEFAULT_DAMPING_RULE]),
                            "identity": held(pairwise["identity"])}}


# ------------------------------------------------------------------------------------------
# Selection and the page
# ------------------------------------------------------------------------------------------
SI_ESTIMATORS = {
    "default": "`gᵀ(G + λI)⁻¹g` at the default rule's λ (`InfluenceScorer.self_influence`, the incumbent)",
    "λ×10": "the same at 10 × λ",
    "λ×100": "the same at 100 × λ",
    "λ×1000": "the same at 1000 × λ",
    "layer_mean": "the same with λ = each layer's mean eigenvalue (1 × mean Λ, per layer)",
    "identity": "`‖g‖²` (`damping=\"identity\"`: TracIn's self-influence at the final weights, one checkpoint)",
    "rayleigh": "`gᵀ(G + λI)⁻¹g / ‖g‖²` (self-influence per unit gradient norm)",
    "loss_weighted": "`ℓ(z) · gᵀ(G + λI)⁻¹g`: self-influence weighted by the example's own loss",
    "loo_loss": "`ℓ(z) + gᵀ(G + λI)⁻¹g / n`: first-order leave-one-out loss of `z` (removing `z` from the mean loss moves "
                "θ by `(G + λI)⁻¹g / n`; Koh & Liang's `I_up,loss(z, z)` with `ε = -1/n`)",
    "loo_loss λ×10": "the same at 10 × λ",
    "loo_loss λ×100": "the same at 100 × λ",
    "loo_loss λ×1000": "the same at 1000 × λ",
}
"""Self-influence estimators for mislabel ranking, formed from :func:`self_influence_vectors`
(``default`` first: the incumbent keeps exact ties)."""


def si_scores(v: dict) -> dict[str, torch.Tensor]:
    """Every estimator of :data:`SI_ESTIMATORS` from one cell's vectors (``Tensor[n]``, float64)."""
    e = {k: torch.tensor(x, dtype=torch.float64) for k, x in v["ekfac"].items()}
    loss, n = torch.tensor(v["loss"], dtype=torch.float64), float(v["n"])
    out = {k: e[k] for k in ("default", "λ×10", "λ×100", "λ×1000", "layer_mean", "identity")}
    out["rayleigh"] = e["default"] / e["identity"].clamp_min(torch.finfo(torch.float64).tiny)
    out["loss_weighted"] = loss * e["default"]
    out["loo_loss"] = loss + e["default"] / n
    for m in ("λ×10", "λ×100", "λ×1000"):
        out[f"loo_loss {m}"] = loss + e[m] / n
    return out


def si_matrix(si_cells: list[dict]) -> ResultMatrix:
    """Units ``task/AP``: each estimator's AP, baseline: the final training loss's AP."""
    m = ResultMatrix(metric="AP")
    for c in si_cells:
        flipped = torch.tensor(c["vectors"]["flipped"])
        for k, x in si_scores(c["vectors"]).items():
            m.add(f"{c['task']}/AP", c["seed"], k, mislabel_detection(x, flipped).average_precision)
        m.add_baseline(f"{c['task']}/AP", c["seed"], mislabel_detection(torch.tensor(c["vectors"]["loss"]), flipped).average_precision)
    return m


def si_section(si_cells: list[dict], choose_t: list[str], report_t: list[str], args) -> list[str]:
    """The self-influence estimators' and LiSSA's sections of the page."""
    if not si_cells:
        return []
    m = si_matrix(si_cells)
    choose_u = [u for u in m.tasks if u.split("/")[0] in choose_t]
    report_u = [u for u in m.tasks if u.split("/")[0] in report_t]
    sel = select(m, "margin", choose_tasks=choose_u, report_tasks=report_u, tolerance=args.tolerance)
    names = list(SI_ESTIMATORS)
    lines = ["", "## Self-influence estimators for mislabel ranking (AP)", "",
             "Per (task, seed) of the classification tasks, the same trained model and factors as above; every estimator ranks the "
             "training examples (highest = most suspicious) and is scored by the average precision at finding the 10% flipped labels, "
             "against the baseline **final training loss**. Estimators (`g` = ∇ℓ(z) on the tracked layers, `G` the EK-FAC curvature of "
             "the mean loss, `n` the training examples the factors were fitted on):", ""]
    lines += [f"* `{k}`: {d}" for k, d in SI_ESTIMATORS.items()]
    lines += ["", f"Chosen by worst margin over the final loss on the choose half, `default` (the incumbent) kept unless beaten by "
              f"more than {args.tolerance}: **{sel.chosen}** (worst margins choose half "
              + ", ".join(f"`{c}` {w:+.3f}" for c, w in sel.worst.items()) + "; report half "
              + ", ".join(f"`{c}` {w:+.3f}" for c, w in sel.worst_report.items()) + ").", "",
              sel.markdown(names), ""]
    best_report = max(sel.worst_report, key=lambda c: sel.worst_report[c])
    over = [t for t in choose_t if any(c["task"] == t for c in si_cells)]
    lines += [f"The choose half's classification tasks ({', '.join(f'`{t}`' for t in over)}) are trained until the training losses "
              "are ≈ 0: there `ℓ(z)` ≈ 0 and the `loo_loss` family ranks as self-influence does, so the split cannot tell them apart; "
              "the under-fitted classifier is on the report half.", ""]
    under = [u for u in m.tasks if u.startswith("mlp_digits_sgd_short/")]
    if under:
        u = under[0]
        rows = sorted(((sel.summary(u, c).mean, c) for c in names), reverse=True)
        base = sel.summary(u, None).mean
        lines += [f"On the under-fitted `{u}` (report half) the final loss's AP is {base:.3f}; the best estimator there is "
                  f"`{rows[0][1]}` ({rows[0][0]:.3f}, {rows[0][0] - base:+.3f}), the incumbent `default` "
                  f"{sel.summary(u, 'default').mean:.3f} ({sel.summary(u, 'default').mean - base:+.3f}). Best worst margin on the report "
                  f"half (not used to choose): `{best_report}` ({sel.worst_report[best_report]:+.3f}).", "",
                  "Why the loss wins there: after 2 epochs of SGD (tasks table: mean training loss 0.64) many correctly labelled "
                  "examples are not learned yet and have gradients as large as the flipped ones. The gradient's size saturates "
                  "(for softmax cross-entropy the output residual satisfies `‖p − e_y‖² ≤ 2`) while the loss `−log p_y` keeps growing "
                  "with the model's confidence in another class; and the influence function's curvature term assumes weights at a "
                  "minimum of the training loss, which an under-fitted model is not. The estimators that lean on the loss close the "
                  "gap (`loss_weighted`, `loo_loss` at larger λ), and `loo_loss` at 1000 × λ is the loss itself (its `gᵀ(G + λI)⁻¹g / n` "
                  "term is then negligible). On the choose half none beats `default` by more than the tolerance (`loo_loss` at the "
                  "default λ ties it, the others are below it), so none is chosen.", ""]
    current = current_lissa_default() or "default"

    def default_run(c: dict) -> Optional[dict]:
        """``LiSSAOptions()``'s run on one cell: the current default's candidate, draw 0."""
        r = c.get("lissa", {}).get(current) or (c["vectors"].get("lissa") if current == "default" else None)
        return None if r is None or "error" in r else r

    lissa = [c for c in si_cells if default_run(c) is not None]
    if lissa:
        was = (f" Since this selection the default's scale rule is the `{current}` candidate's (`AUTO_SAFETY` "
               f"{LISSA_BASE['AUTO_SAFETY']:g} → {LISSA_CANDIDATES[current][2].get('AUTO_SAFETY', LISSA_BASE['AUTO_SAFETY']):g}); "
               "these are its runs (sampler seed 0), and `default` in the candidates' table below is the previous default."
               if current != "default" else "")
        lines += ["## LiSSA's default self-influence (AP and sign)", "",
                  "`lightning_influence.lissa.self_influence(model, train_loader, SamplePool(train), LiSSAOptions())` (every default: "
                  "`curvature=\"hessian\"`, random sampler of 32, depth 20, `damping=\"auto\"`, `scale=\"auto\"`, seed 0) on "
                  "every training example, the same trained model; AP against the final training loss's, and the smallest self-influence "
                  "over all examples of all seeds (target: ≥ 0)." + was, ""]
        rows = []
        for t in sorted({c["task"] for c in lissa}):
            cs = [c for c in lissa if c["task"] == t]
            ap_l, ap_b, mins, lam, neg, sec = [], [], [], [], [], []
            for c in cs:
                f = torch.tensor(c["vectors"]["flipped"])
                li = default_run(c)
                ap_l.append(mislabel_detection(torch.tensor(li["scores"]), f).average_precision)
                ap_b.append(mislabel_detection(torch.tensor(c["vectors"]["loss"]), f).average_precision)
                mins.append(min(li["scores"]))
                lam.append(li["meta"]["damping"])
                neg.append(li["meta"]["negative_curvature"])
                sec.append(li["seconds"])
            margin = [a - b for a, b in zip(ap_l, ap_b)]
            rows.append([t, "choose" if t in choose_t else "report", ms(ap_b), ms(ap_l), ms(margin, "+.3f"),
                         f"{sum(x < 0 for x in margin)}/{len(margin)}", f"{min(mins):.2e}", ms(lam, ".2e"), str(sum(neg)), ms(sec, ".1f")])
        lines.append(md_table(["task", "half", "final loss AP", "LiSSA default AP", "margin", "seeds below loss", "min self-influence",
                               "λ used", "examples meeting negative curvature", "seconds"], rows))
        lines.append("")
    traj = [c for c in si_cells if "trajectory" in c["vectors"]]
    if traj:
        lines += ["## Trajectory self-influence (reference: needs the training run)", "",
                  f"The same training repeated step for step with about {SNAPSHOTS} snapshots evenly spaced in steps (the last is the "
                  "final model; its losses equal the cached final losses: largest difference "
                  f"{max(c['vectors']['trajectory']['final_loss_check'] for c in traj):.1e}). `mean loss`: each example's loss averaged "
                  "over the snapshots (`Z0Influence`'s default self-influence); `TracIn`: `Σ lr · ‖g‖²` over the snapshots (tracked "
                  "layers). Not candidates for `InfluenceScorer.self_influence`, which sees only the final weights.", ""]
        rows = []
        for t in sorted({c["task"] for c in traj}):
            cs = [c for c in traj if c["task"] == t]
            f = [torch.tensor(c["vectors"]["flipped"]) for c in cs]
            ap = lambda key: [mislabel_detection(torch.tensor(v, dtype=torch.float64), fl).average_precision  # noqa: E731
                              for v, fl in zip(key, f)]
            base = ap([c["vectors"]["loss"] for c in cs])
            ek = ap([c["vectors"]["ekfac"]["default"] for c in cs])
            ml = ap([c["vectors"]["trajectory"]["mean_loss"] for c in cs])
            tr = ap([c["vectors"]["trajectory"]["tracin"] for c in cs])
            rows.append([t, "choose" if t in choose_t else "report", ms(base), ms(ek), ms(ml), ms([a - b for a, b in zip(ml, base)], "+.3f"),
                         ms(tr), ms([a - b for a, b in zip(tr, base)], "+.3f"), str(cs[0]["vectors"]["trajectory"]["snapshots"])])
        lines += [md_table(["task", "half", "final loss AP", "EK-FAC `default` AP", "mean loss AP", "margin", "TracIn AP", "margin",
                            "snapshots"], rows), ""]
    if sel.chosen == "default":
        lines += [f"Self-influence decision: `InfluenceScorer.self_influence` stays `gᵀ(G + λI)⁻¹g` at the default damping: no "
                  f"estimator beat its worst margin on the choose half by more than {args.tolerance}."]
    else:
        lines += [f"Self-influence decision: `{sel.chosen}` beat `default` by worst margin on the choose half "
                  f"({sel.worst[sel.chosen]:+.3f} vs {sel.worst['default']:+.3f}).", ""]
    return lines


def lissa_section(si_cells: list[dict], choose_t: list[str], report_t: list[str], args) -> list[str]:
    """The LiSSA candidates' section: AP against the final loss, chosen by worst margin on the
    choose half, and each candidate's smallest score, settings used and cost."""
    cells = [c for c in si_cells if c.get("lissa")]
    if not cells:
        return []
    names = [c for c in LISSA_CANDIDATES if any(c in x["lissa"] for x in cells)]
    draws = range(args.lissa_draws)
    m = ResultMatrix(metric="AP")
    spread: dict[str, list[float]] = {k: [] for k in names}  # per (task, seed): std of AP over the draws
    n_draws: dict[str, set] = {}
    for c in cells:
        f = torch.tensor(c["vectors"]["flipped"])
        for k in names:
            rs = [c["lissa"][draw_key(k, d)] for d in draws if draw_key(k, d) in c["lissa"]]
            if not rs:
                continue
            aps = [float("nan") if "error" in r else mislabel_detection(torch.tensor(r["scores"]), f).average_precision for r in rs]
            m.add(f"{c['task']}/AP", c["seed"], k, sum(aps) / len(aps))
            n_draws.setdefault(c["task"], set()).add(len(aps))
            if len(aps) > 1 and all(math.isfinite(a) for a in aps):
                spread[k].append(torch.tensor(aps).std().item())
        m.add_baseline(f"{c['task']}/AP", c["seed"], mislabel_detection(torch.tensor(c["vectors"]["loss"]), f).average_precision)
    choose_u = [u for u in m.tasks if u.split("/")[0] in choose_t]
    report_u = [u for u in m.tasks if u.split("/")[0] in report_t]
    if not (choose_u and report_u):
        return ["", "## LiSSA candidates", "", "Not shown: the tasks run leave one half without a classification task."]
    sel = select(m, "margin", choose_tasks=choose_u, report_tasks=report_u, tolerance=args.tolerance)
    seeds_of = {u: len(m.seeds(u)) for u in m.tasks}
    lines = ["", "## LiSSA candidates for mislabel ranking (AP)", "",
             "`lightning_influence.lissa.self_influence(model, train_loader, SamplePool(train), options)` on every training example "
             "of the same trained model, for each candidate below, each one setting away from the default; AP at finding the 10% "
             "flipped labels against the **final training loss**'s AP. The `\"auto\"` damping and scale rules are varied through "
             "their constants in `lightning_influence/lissa/self_influence.py` (`AUTO_DAMPING`, `AUTO_SAFETY`), so each candidate is "
             "exactly the library with that one value changed. Every run has `time_budget=None` (the default 600 s shrank the "
             "random sampler's mini-batch to 20–27 examples on runs that take seconds when the machine was loaded: its cost "
             "model times one single-example product and extrapolates; with the budget off the runs do not depend on the load). "
             "Candidates:", ""]
    lines += [f"* `{k}`: {LISSA_CANDIDATES[k][0]}" for k in names]
    lines += ["", "Each candidate runs with the sampler seeded 0 … " + str(args.lissa_draws - 1)
              + " (`LiSSAOptions(seed=...)`: other mini-batches, the same model) where the task allows, and its AP per (task, "
              "seed) is the mean over those draws (draws per (task, seed): "
              + ", ".join(f"`{t}` {'/'.join(map(str, sorted(v)))}" for t, v in n_draws.items())
              + "); the spread between draws is in the second table."]
    reduced = sorted({u for u in m.tasks if any(len(m.per_seed(u, k)) < seeds_of[u] or not m.per_seed(u, k) for k in names)})
    if reduced:
        lines += ["", "Fewer seeds or candidates where a LiSSA run is slow (report half only; not used to choose): "
                  + "; ".join(f"`{u.split('/')[0]}`: " + ", ".join(f"`{k}` {len(m.per_seed(u, k))} seed{'s' * (len(m.per_seed(u, k)) > 1)}" for k in names
                                                                 if m.per_seed(u, k)) for u in reduced)
                  + " (the extra candidates on two seeds were computed by a run with `--lissa-reduced-seeds 0 1 "
                  "--lissa-reduced-candidates ...` and are read from the cache). A candidate's report-half worst margin is over the "
                  "report tasks it ran on (their count in brackets)."]
    lines += ["", f"Chosen by worst margin over the final loss on the choose half ({', '.join(f'`{t}`' for t in choose_u)}), "
              f"`default` (the incumbent) kept unless beaten by more than {args.tolerance}: **{sel.chosen}**."]
    best = max(sel.worst, key=lambda k: sel.worst[k])
    if best != sel.chosen:
        ties = [k for k in names if sel.worst[k] >= sel.worst[best] - args.tolerance]
        lines[-1] += (f" The best worst margin is `{best}`'s ({sel.worst[best]:+.3f}); within the tolerance of it are "
                      + ", ".join(f"`{k}` ({sel.worst[k]:+.3f})" for k in ties)
                      + f", and `select` keeps the first of those in the candidates' order, `{sel.chosen}` (the incumbent "
                      f"`default`, {sel.worst['default']:+.3f}, is not among them). Costs are in the second table.")
    lines.append("")

    def cell(u: str, k: Optional[str]) -> str:
        xs = m.baseline_per_seed(u) if k is None else m.per_seed(u, k)
        if not xs:
            return "—"
        n = len(xs)
        return f"{sum(xs) / n:.3f}" + (f" ± {torch.tensor(xs).std().item():.3f}" if n > 1 else "") + (
            f" ({n} seeds)" if n < seeds_of[u] else "")

    def worst_over(us: list[str], k: str) -> str:
        xs = [sel.summary(u, k).margin for u in us if m.per_seed(u, k)]
        ran = len(xs)
        if not xs:
            return "—"
        return f"{min(xs):+.3f}" + (f" ({ran})" if ran < len(us) else "")

    units = choose_u + report_u
    head = ["candidate", *(f"{u.split('/')[0]} ({'choose' if u in choose_u else 'report'})" for u in units),
            "worst margin, choose half", "worst margin, report half"]
    rows = [["final loss (baseline)", *(cell(u, None) for u in units), "", ""]]
    for k in names:
        label = f"**{k}**" if k == sel.chosen else k
        rows.append([label, *(cell(u, k) for u in units), worst_over(choose_u, k), worst_over(report_u, k)])
    lines += [md_table(head, rows), ""]
    # settings used, smallest score, cost
    rows = []
    default_meta = {(c["task"], c["seed"], d): c["lissa"][draw_key("default", d)].get("meta", {}) for c in cells for d in draws
                    if draw_key("default", d) in c["lissa"]}
    for k in names:
        runs = [((c["task"], c["seed"], d), c["lissa"][draw_key(k, d)]) for c in cells for d in draws if draw_key(k, d) in c["lissa"]]
        ok = [(c, r) for c, r in runs if "error" not in r]
        errors = len(runs) - len(ok)
        rel = lambda q: [r["meta"][q] / default_meta[c][q] for c, r in ok if default_meta.get(c, {}).get(q)]  # noqa: E731
        small = [r["seconds"] for c, r in ok if c[0] not in args.lissa_reduced_tasks]
        slow = [r["seconds"] for c, r in ok if c[0] in args.lissa_reduced_tasks]
        rows.append([k, ms(spread[k]) if spread[k] else "—", f"{min(min(r['scores']) for _, r in ok):.2e}" if ok else "—",
                     ms(rel("damping"), ".2f"), ms(rel("scale"), ".2f"),
                     ms([r["meta"]["vector_steps"] for _, r in ok], ".1f"), str(sum(r["meta"].get("negative_curvature") or 0 for _, r in ok)),
                     str(sum(r["meta"].get("scale_retries") or 0 for _, r in ok)), f"{errors}/{len(runs)}", ms(small, ".1f"),
                     ms(slow, ".0f") if slow else "—"])
    lines += ["Per candidate over every (task, seed, draw) it ran on: the standard deviation of AP between draws of one (task, "
              "seed), mean ± std over (task, seed); the smallest self-influence of any example (target ≥ 0); λ and "
              "the scale used relative to the default's on the same (task, seed); mean LiSSA steps per example (`tol` stops vectors "
              "before `depth`); examples whose iterates met negative curvature; restarts with a larger scale after a divergence; runs "
              "that raised; seconds per run (niced, 1 thread, on a machine shared with other jobs) on the small tasks and on "
              + ", ".join(f"`{t}`" for t in args.lissa_reduced_tasks) + " (there from separate invocations at different loads, "
              "`default`'s from the earlier self-influence run: not side by side; on the small tasks every candidate of a (task, "
              "seed) ran in one process, one after the other).", "",
              md_table(["candidate", "AP std between draws", "min self-influence", "λ / default's", "scale / default's", "steps per example",
                        "examples meeting negative curvature", "scale restarts", "runs that raised", "seconds (small tasks)",
                        "seconds (" + ", ".join(args.lissa_reduced_tasks) + ")"], rows), ""]
    errs = sorted({r["error"].split(":")[0] + ": " + r["error"][:160] for c in cells for r in c["lissa"].values() if "error" in r})
    if errs:
        lines += ["Errors raised: " + "; ".join(f"`{e}`" for e in errs), ""]
    lines += [f"LiSSA decision: **{sel.chosen}** (worst margins on the choose half: "
              + ", ".join(f"`{c}` {w:+.3f}" for c, w in sel.worst.items()) + ").", ""]
    return lines


def matrix_of(cells: list[dict], candidates: list[str]) -> ResultMatrix:
    """Units ``task/AP`` (baseline: final loss) and ``task/LDS`` (baseline: gradient dot product)."""
    m = ResultMatrix(metric="AP or LDS")
    for cell in cells:
        for c in candidates:
            if cell["ap"]:
                m.add(f"{cell['task']}/AP", cell["seed"], c, cell["ap"][c])
            m.add(f"{cell['task']}/LDS", cell["seed"], c, cell["lds"][c])
        if cell["ap"]:
            m.add_baseline(f"{cell['task']}/AP", cell["seed"], cell["ap"]["final_loss"])
        m.add_baseline(f"{cell['task']}/LDS", cell["seed"], cell["lds"]["identity"])
    return m


NOT_RUN = """\
* Fact-tracing MRR against kronfluence on the same weights: kronfluence is not installed by this target and the fact-tracing
  worlds (`benchmarks/fact_tracing_cache.py`) take longer to train than this matrix; `bench_fact_tracing.py` measures it.
* LiSSA's settings are candidates one at a time (mislabel AP only; LiSSA's pairwise inverse-HVP scores are not measured),
  not in combination; on {reduced} only some candidates and seeds ran (see its section); the index compression is
  measured by `bench_index.py --parts rules`. The EK-FAC damping rule and the EK-FAC self-influence estimator
  are candidates, and the score variant is measured (pairwise LDS, one language-model task) but the default variant is not
  this benchmark's to change.
* Sizes are small (see the command): {n_train} training examples, {n_query} queries and {subsets} retrained subsets per
  (task, seed) give LDS standard errors of a few hundredths per seed (tasks table), so differences between rules below that
  are noise.
* The self-calibrating rule that checks first-order loss-change predictions on the training steps the callback observes was
  not built; users can calibrate on their own check instead (`lightning_influence.calibrate.calibrate`)."""


def ms(xs: list[float], fmt: str = ".3f") -> str:
    """``mean ± sd`` of the finite values of ``xs`` (:func:`common.mean_sd`)."""
    return mean_sd([x for x in xs if math.isfinite(x)], fmt)


def write_doc(tasks: dict[str, Task], cells: list[dict], candidates: list[str], args, meta: dict,
              si_cells: Optional[list[dict]] = None) -> tuple[str, Any]:
    names = sorted({c["task"] for c in cells})
    strata = {t: tasks[t].stratum for t in names}
    choose_t, report_t = split_tasks(names, strata)
    m = matrix_of(cells, candidates)
    units = m.tasks
    choose_u = [u for u in units if u.split("/")[0] in choose_t]
    report_u = [u for u in units if u.split("/")[0] in report_t]
    rules = [c for c in candidates if c in DAMPING_RULES]
    sel = select(matrix_of(cells, rules), "margin", choose_tasks=choose_u, report_tasks=report_u, tolerance=args.tolerance)
    everything = select(m, "margin", choose_tasks=choose_u, report_tasks=report_u)
    rank_sel = select(matrix_of(cells, rules), "rank", choose_tasks=choose_u, report_tasks=report_u)
    seeds = sorted({c["seed"] for c in cells})
    lines = [
        "# Evaluation matrix: damping rules and self-influence estimators chosen by their worst case",
        "",
        "Issue 21: a default chosen on one task is a guess. `benchmarks/bench_matrix.py` scores every EK-FAC damping rule",
        "(`lightning_influence.ekfac.damping.DAMPING_RULES`) on tasks that differ in optimizer, training length, architecture and",
        "data, over several seeds, chooses on half the tasks by the **worst margin over the baseline** and reports on the other",
        "half (`lightning_influence.evaluate.select`; split by `split_tasks` with one stratum per architecture family).",
        "",
        f"Command: `{meta['command']}` (seeds {seeds}, {args.n_train} training examples, {args.n_query} queries, "
        f"{args.subsets} retrained subsets of 50% per (task, seed)); {meta['when']}, {meta['machine']}, "
        f"niced, on a machine shared with other jobs. Wall time of this invocation: {meta['wall_s']:.0f} s "
        f"(cells and retrains found under benchmarks/out/matrix are read back, not rerun). When computed, the cells took {sum(c['seconds'] for c in cells):.0f} s "
        f"(training, factors, scoring, calibrate(), reading cached retrains) and the {args.subsets * len(cells)} retrained "
        f"models {sum(c['retrain_seconds'] for c in cells):.0f} s. The self-influence vectors (EK-FAC estimators, LiSSA's default) "
        f"are cached per (task, seed) in `{SI_FILE}` next to the cell, the LiSSA candidates' in `{LISSA_FILE}`.",
        "",
        "Baselines: **AP** (10% of training labels flipped; average precision of EK-FAC self-influence at finding them) against",
        "the examples' **final training loss**; **LDS** (Spearman over retrained subsets, mean over queries) against the",
        "**gradient dot product** (`damping=\"identity\"`). Cells: mean ± sample std over seeds.",
        "",
        "## Tasks",
        "",
    ]
    half = {t: "choose" if t in choose_t else "report" for t in names}
    of = {t: [c for c in cells if c["task"] == t] for t in names}
    rows = []
    for t, cs in of.items():
        ratio = [c["damping"][DEFAULT_DAMPING_RULE] / c["lambda_max"] for c in cs if c["lambda_max"] > 0]
        rows.append([t, half[t], tasks[t].stratum, tasks[t].note, ms([c["final_train_loss_mean"] for c in cs]),
                     ms([c["share_loss_below_0.01"] for c in cs], ".2f"), ms([c["query_loss_mean"] for c in cs]),
                     ms([c["damping"][DEFAULT_DAMPING_RULE] for c in cs], ".1e"), ms(ratio, ".1e"),
                     ms([c["lds_se"][DEFAULT_DAMPING_RULE] for c in cs])])
    lines.append(md_table(["task", "half", "stratum", "recipe", "final train loss (mean)", "share of train losses < 0.01",
                           "query loss (mean)", "λ of `spectrum`", "λ / max Λ", "LDS s.e. (`spectrum`, per seed)"], rows))
    lines += ["", "## Every rule on every (task, metric), both halves", "",
              f"Among the rules (the candidates for the default), chosen by worst margin on the choose half, the incumbent "
              f"`{DEFAULT_DAMPING_RULE}` kept unless beaten by more than {args.tolerance}: **{sel.chosen}** (worst margins "
              + ", ".join(f"`{c}` {w:+.3f}" for c, w in sel.worst.items()) + f"; by worst rank: `{rank_sel.chosen}`). "
              f"Among all candidates, multiples of the default's λ included, the best worst margin is `{everything.chosen}`'s "
              f"({everything.worst[everything.chosen]:+.3f}). Bold: the chosen rule.",
              "", dataclasses.replace(everything, chosen=sel.chosen).markdown(candidates), "",
              "## The chosen rule on the report half (never used to choose)", ""]
    rows = []
    for u in report_u:
        a, b = sel.summary(u, sel.chosen), sel.summary(u, DEFAULT_DAMPING_RULE)
        rows.append([u, f"{a.mean:.3f} ± {a.std:.3f}", f"{a.margin:+.3f}", f"{b.mean:.3f} ± {b.std:.3f}", f"{b.margin:+.3f}"])
    lines.append(md_table(["unit", "chosen", "margin over baseline", "incumbent default", "margin"], rows))
    d = DEFAULT_DAMPING_RULE
    lines += ["", "## `calibrate()` on a check of the task's own", "",
              "Per (task, seed): `lightning_influence.calibrate.calibrate` chooses among the candidates above × score variants",
              "`raw`/`cosine` by LDS on the first half of the retrained subsets (the user's check); the LDS below is on the other",
              "half (held out). Choices: damping|variant per seed.", ""]
    rows = []
    for t in names:
        cs = [c["calibrate"] for c in of[t]]
        rows.append([t, half[t], ", ".join(f"{c['choice']}\\|{c['normalize']}" for c in cs), ms([c["lds_heldout"][d] for c in cs]),
                     ms([c["lds_heldout"]["calibrated"] for c in cs]), ms([c["lds_heldout"]["identity"] for c in cs]),
                     ms([c["seconds"] for c in cs], ".0f")])
    lines.append(md_table(["task", "half", "choices", f"held-out LDS `{d}` (raw)", "held-out LDS calibrated", "gradient dot product",
                           "calibrate() s"], rows))
    gains = []
    for t in names:
        cs = [c["calibrate"]["lds_heldout"] for c in cells if c["task"] == t]
        gains.append(f"`{t}` {ms([c['calibrated'] - c[d] for c in cs], '+.3f')}")
    lines += ["", f"Held-out LDS of calibrate()'s choice minus `{d}`'s, mean ± std over seeds: " + ", ".join(gains) + "."]
    vm = ResultMatrix(metric="LDS")
    for cell in cells:
        for v in VARIANTS:
            vm.add(f"{cell['task']}/LDS", cell["seed"], v, cell["variants"][f"{d}|{v}"])
        vm.add_baseline(f"{cell['task']}/LDS", cell["seed"], cell["variants"]["identity|raw"])
    vchoose = [u for u in vm.tasks if u.split("/")[0] in choose_t]
    vsel = select(vm, "margin", choose_tasks=vchoose, report_tasks=[u for u in vm.tasks if u not in vchoose], tolerance=args.tolerance)
    lines += ["", "## Score variants (pairwise LDS)", "",
              f"At the default damping `{d}`, each score variant of `InfluenceScorer.pairwise(normalize=...)`; baseline: the raw gradient "
              f"dot product. Chosen by worst margin on the choose half, `raw` (the incumbent) kept unless beaten by more than "
              f"{args.tolerance}: **{vsel.chosen}** (worst margins " + ", ".join(f"`{c}` {w:+.3f}" for c, w in vsel.worst.items())
              + "; report half: " + ", ".join(f"`{c}` {w:+.3f}" for c, w in vsel.worst_report.items()) + ").", "",
              vsel.markdown(list(VARIANTS)), "",
              "Gradient dot product with each variant (`identity|cosine` is TracIn-style cosine similarity):", "",
              md_table(["task", *(f"identity\\|{v}" for v in VARIANTS)],
                       [[t, *(ms([c["variants"][f"identity|{v}"] for c in of[t]]) for v in VARIANTS)] for t in names]),
              "", "## Damping values", "", "λ of each rule divided by the largest eigenvalue of the pooled spectrum, mean over seeds:", "",
              md_table(["task", *candidates],
                       [[t, *(ms([c["damping"][r] / c["lambda_max"] for c in of[t]], ".1e") for r in candidates)] for t in names])]
    if sel.chosen == DEFAULT_DAMPING_RULE:
        decision = (f"The default stays `{DEFAULT_DAMPING_RULE}`: no rule beat its worst margin on the choose half by more than "
                    f"{args.tolerance}.")
    else:
        decision = (f"`{sel.chosen}` beat the default `{DEFAULT_DAMPING_RULE}` by worst margin on the choose half "
                    f"({sel.worst[sel.chosen]:+.3f} vs {sel.worst[DEFAULT_DAMPING_RULE]:+.3f}); make it the default in "
                    "`lightning_influence/ekfac/damping.py` (`DEFAULT_DAMPING_RULE`) and rerun.")
    misses = [(u, sel.summary(u, sel.chosen)) for u in units]
    misses = [f"`{u}` {s.margin:+.3f}" for u, s in misses if s.margin < 0]
    lines += si_section(si_cells or [], choose_t, report_t, args)
    lines += lissa_section(si_cells or [], choose_t, report_t, args)
    lines += ["", "## Decision", "", decision, "",
              f"Where `{sel.chosen}` is below its baseline (mean over seeds, both halves): " + (", ".join(misses) or "nowhere") + ".",
              "", "## Not run", "", NOT_RUN.format(n_train=args.n_train, n_query=args.n_query, subsets=args.subsets,
                                                reduced=", ".join(f"`{t}`" for t in args.lissa_reduced_tasks)), ""]
    text = "\n".join(lines)
    return text, sel


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=None, help="task names (default: all)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--n-train", type=int, default=256)
    p.add_argument("--n-query", type=int, default=32)
    p.add_argument("--subsets", type=int, default=16, help="retrained subsets per (task, seed) for LDS")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tolerance", type=float, default=0.01, help="the incumbent default is kept unless beaten by more than this")
    p.add_argument("--no-self-influence", action="store_true", help="skip the self-influence estimators and LiSSA sections")
    p.add_argument("--no-trajectory", action="store_true", help="skip the trajectory self-influence (mean loss, TracIn)")
    p.add_argument("--no-lissa", action="store_true", help="skip LiSSA's default self-influence")
    p.add_argument("--no-lissa-candidates", action="store_true", help="skip the LiSSA candidates (the page reads those cached)")
    p.add_argument("--lissa-candidates", nargs="+", default=list(LISSA_CANDIDATES), help="LiSSA candidates to compute")
    p.add_argument("--lissa-draws", type=int, default=3,
                   help="sampler seeds per LiSSA candidate (its AP per (task, seed) is the mean over them)")
    p.add_argument("--lissa-reduced-tasks", nargs="*", default=["bert_textcls_adamw"],
                   help="tasks where only --lissa-reduced-seeds × --lissa-reduced-candidates are computed (slow ones)")
    p.add_argument("--lissa-reduced-seeds", nargs="*", type=int, default=[0, 1])
    p.add_argument("--lissa-reduced-candidates", nargs="*", default=["default", "ggn", "damping×10", "depth 10"])
    p.add_argument("--no-doc", action="store_true", help="print the page instead of writing docs/benchmarks_matrix.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    tasks = build_tasks(args.n_train, args.n_query)
    names = args.tasks or list(tasks)
    t0 = time.perf_counter()
    cells = []
    for name in names:
        for seed in args.seeds:
            c = run_cell(tasks[name], seed, args.n_train, args.n_query, args.subsets, CANDIDATES)
            cells.append(c)
            ap = " ".join(f"{k}={v:.3f}" for k, v in c["ap"].items())
            lds = " ".join(f"{k}={v:.3f}" for k, v in c["lds"].items())
            print(f"{name} seed {seed} ({c['seconds']:.0f} s): AP {ap or '-'} | LDS {lds}", flush=True)
    si_cells = []
    if not args.no_self_influence:
        for c in cells:
            if c["ap"]:
                si_cells.append({"task": c["task"], "seed": c["seed"],
                                 "vectors": self_influence_vectors(tasks[c["task"]], c["seed"], args.n_train, args.n_query,
                                                                   lissa=not args.no_lissa)})
                if not args.no_trajectory:
                    si_cells[-1]["vectors"] = trajectory_vectors(tasks[c["task"]], c["seed"], args.n_train, args.n_query)
                print(f"{c['task']} seed {c['seed']}: self-influence vectors ready", flush=True)
        for sc in si_cells:
            t, seed = sc["task"], sc["seed"]
            reduced = t in args.lissa_reduced_tasks
            names_c = [] if args.no_lissa_candidates or (reduced and seed not in args.lissa_reduced_seeds) else [
                c for c in args.lissa_candidates if not reduced or c in args.lissa_reduced_candidates]
            sc["lissa"] = lissa_candidate_vectors(tasks[t], seed, args.n_train, args.n_query, names_c,
                                                  draws=1 if reduced else args.lissa_draws)
    meta = {"command": " ".join(["nice -n 10 .venv/bin/python benchmarks/bench_matrix.py"] + (argv if argv is not None else sys.argv[1:])),
            "when": utc_now(),
            "machine": machine(),
            "wall_s": time.perf_counter() - t0}
    text, sel = write_doc(tasks, cells, CANDIDATES, args, meta, si_cells)
    (OUT / "last_selection.json").write_text(json.dumps({"chosen": sel.chosen, "worst": sel.worst, "worst_report": sel.worst_report,
                                                         "choose": sel.choose_tasks, "report": sel.report_tasks}, indent=1))
    if args.no_doc:
        print(text)
    else:
        DOC.write_text(text)
        print(f"wrote {DOC}")
    print(f"chosen: {sel.chosen}; worst margins (choose half): {sel.worst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
