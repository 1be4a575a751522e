"""Trajectory-aware influence benchmark (issue 14, part B): digits LDS of EK-FAC influence
combined over training segments vs. the callback's default factors and kronfluence.

Set-up (reused from ``bench_ekfac_callback.py``'s LDS section): ``MLPClassifier(64, hidden=32, 10)``,
SGD lr 0.1, batch 64, 20 epochs on the 1,437 digits training examples, 100 test queries; the
seed sets the initial weights and the shuffling order. One Lightning fit per seed carries every
callback at once (so every row explains the same final weights):

* ``callback default``: ``EKFACInfluence()`` (whole-run factors, ``InfluenceScorer`` at the final weights);
* ``trajectory S=2/3/5/10``: ``EKFACInfluence(segments=S)`` + ``TrajectoryScorer`` (segments weighted
  by mean learning rate × steps; SGD at a constant rate makes that the segment's length);
* ``trajectory S=5, last segment only``: the last segment's term alone (weights 0,…,0,1);
* ``trajectory S=5, uniform weights`` (equal to lr × steps here: constant lr, equal segments);
* ``checkpoints of S=5, whole-run factors (control)``: the five segment-end weights, each scored
  with the whole run's factors instead of its segment's (is it the checkpoints or the factors?);
* ``trajectory S=5/10, curvature='unrolled'``: SOURCE's stationary-segment response
  ``(1 − exp(−η̄K·Λ))/Λ`` in place of ``1/(Λ + λ)``, segments summed uniformly;
* ``trajectory S=5, update_every_n_steps=1``: every training batch feeds the segments' factors;
* ``kronfluence 1.0.1``: offline EK-FAC fit at the final weights (heuristic damping, empirical Fisher).

All with each method's default damping. LDS: ``--models`` random 50 % subsets (per seed), each
retrained with the same recipe as a plain loop (checked equal to the Lightning run on the full
set), scored with ``lightning_influence.evaluate.linear_datamodeling_score``. Retrained query
losses are cached under ``--cache`` (``retrain_subsets``' workdir), so reruns only rescore.

Run: ``.venv/bin/python benchmarks/bench_trajectory.py`` (``--seeds 0 1 2 --models 100``;
``--quick``: 1 seed, 30 models). Writes the results block of docs/benchmarks_trajectory.md
unless ``--no-doc``. One torch thread.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402  (the LDS recipe, reused)
    LDS_BATCH, LDS_EPOCHS, LDS_HIDDEN, LDS_LR, LDS_QUERIES, MLPCase, machine, make_trainer, md_table, query_losses, quiet,
    silence_loggers, train_plain, utc_now, write_results,
)
from kronfluence_tasks import KronfluenceEKFAC  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks_trajectory.md"
SEGMENTS = (2, 3, 5, 10)
TARGET = 0.03


class SeededCase(MLPCase):
    """The LDS recipe with the initial weights and shuffling order drawn from ``seed``."""

    def __init__(self, seed: int) -> None:
        super().__init__(hidden=LDS_HIDDEN, lr=LDS_LR, batch=LDS_BATCH, epochs=LDS_EPOCHS, name=f"lds-seed{seed}")
        self.seed = seed

    def model(self):
        from lightning_influence.demos import MLPClassifier

        torch.manual_seed(self.seed)
        return MLPClassifier(d_in=64, hidden=self.hidden, n_classes=10, lr=self.lr)

    def loader(self, dataset=None):
        return DataLoader(dataset if dataset is not None else self.train, batch_size=self.batch, shuffle=True,
                          generator=torch.Generator().manual_seed(self.seed))


def fit_with_callbacks(case: SeededCase, workdir: str, extra: dict) -> tuple[torch.nn.Module, dict, float]:
    """One Lightning fit with the default callback and one ``segments=S`` callback per S."""
    from lightning_influence import EKFACInfluence

    cbs = {"default": EKFACInfluence(name="default", dirpath=os.path.join(workdir, "default"))}
    for s in SEGMENTS:
        cbs[f"s{s}"] = EKFACInfluence(name=f"s{s}", dirpath=os.path.join(workdir, f"s{s}"), segments=s)
    for name, kw in extra.items():
        cbs[name] = EKFACInfluence(name=name, dirpath=os.path.join(workdir, name), **kw)
    model = case.model()
    t0 = time.perf_counter()
    with quiet():
        make_trainer(case.epochs, list(cbs.values()), workdir).fit(model, case.loader())
    return model.eval(), cbs, time.perf_counter() - t0


EXTRA = {"s5_every_step": {"segments": 5, "update_every_n_steps": 1}}


def run_seed(seed: int, n_models: int, cache: Path, workdir: str) -> dict:
    from lightning_influence.ekfac.scorer import InfluenceScorer
    from lightning_influence.evaluate import linear_datamodeling_score, retrain_subsets
    from lightning_influence.trajectory import TrajectoryScorer

    case = SeededCase(seed)
    query = TensorDataset(*(t[:LDS_QUERIES] for t in case.test.tensors))
    train_loader = DataLoader(case.train, batch_size=256, shuffle=False)
    query_loader = DataLoader(query, batch_size=LDS_QUERIES, shuffle=False)
    d = tempfile.mkdtemp(dir=workdir)
    final, cbs, fit_s = fit_with_callbacks(case, d, EXTRA)
    plain = train_plain(case, case.train)
    same = max(float((p - q).abs().max()) for p, q in zip(final.parameters(), plain.parameters()))

    t0 = time.perf_counter()
    scores = {"callback default (whole run, final weights)": InfluenceScorer(final, cbs["default"].factors).pairwise(
        query_loader, train_loader).pairwise}
    for s in SEGMENTS:
        ts = TrajectoryScorer(final, os.path.join(d, f"s{s}"))
        res = ts.pairwise(query_loader, train_loader)
        scores[f"trajectory S={s}"] = res.pairwise
        if s == 5:
            scores[f"trajectory S={s}, uniform weights"] = TrajectoryScorer(
                final, ts.segments, weighting="uniform").pairwise(query_loader, train_loader).pairwise
            last = [0.0] * (s - 1) + [1.0]
            scores[f"trajectory S={s}, last segment only"] = TrajectoryScorer(
                final, ts.segments, weighting=last).pairwise(query_loader, train_loader).pairwise
        if s in (5, 10):
            scores[f"trajectory S={s}, curvature='unrolled'"] = TrajectoryScorer(
                final, ts.segments, curvature="unrolled").pairwise(query_loader, train_loader).pairwise
        if s == 5:  # control: the same checkpoints, every one with the whole run's factors
            whole = [dataclasses.replace(seg, factors=cbs["default"].factors) for seg in ts.segments]
            scores[f"checkpoints of S={s}, whole-run factors (control)"] = TrajectoryScorer(final, whole).pairwise(
                query_loader, train_loader).pairwise
    ts = TrajectoryScorer(final, os.path.join(d, "s5_every_step"))
    scores["trajectory S=5, update_every_n_steps=1"] = ts.pairwise(query_loader, train_loader).pairwise
    k = KronfluenceEKFAC(final, "mlp", ["net.0", "net.2"], None, tempfile.mkdtemp(dir=workdir), name=f"traj{seed}")
    k.fit(case.train, LDS_BATCH)
    scores["kronfluence 1.0.1 (final weights)"] = k.pairwise(query, case.train, LDS_QUERIES, 256)
    score_s = time.perf_counter() - t0

    n = len(case.train)

    def retrain(j, idx):
        return query_losses(train_plain(case, Subset(case.train, idx.tolist())), query)

    t1 = time.perf_counter()
    sub = retrain_subsets(n, retrain, n_subsets=n_models, seed=1000 + seed, workdir=cache / f"seed={seed}", progress=False)
    retrain_s = time.perf_counter() - t1
    rows = {}
    for name, sc in scores.items():
        r = linear_datamodeling_score(sc.detach().float(), sub.masks, sub.losses, constant="zero")
        rows[name] = {"lds": r.lds, "se": r.se, "per_query": r.per_query.tolist()}
    return {"seed": seed, "rows": rows, "fit_s": fit_s, "score_s": score_s, "retrain_s": retrain_s, "resumed": sub.resumed,
            "plain_vs_lightning_max_abs": same, "n_models": n_models}


TIMING_VARIANTS = {"EKFACInfluence() (segments=1)": {}, "EKFACInfluence(segments=5)": {"segments": 5},
                   "EKFACInfluence(segments=10)": {"segments": 10}}


def timing(repeats: int, workdir: str) -> list[dict]:
    """Cost of segments: ``trainer.fit`` with one callback of each setting (wall and CPU time,
    interleaved in rotating order, medians over ``repeats``), and scoring 100 × 1,437 pairs
    (``InfluenceScorer`` on the whole-run factors vs ``TrajectoryScorer`` over the segments)."""
    from lightning_influence import EKFACInfluence
    from lightning_influence.ekfac.scorer import InfluenceScorer
    from lightning_influence.trajectory import TrajectoryScorer

    case = SeededCase(0)
    query = DataLoader(TensorDataset(*(t[:LDS_QUERIES] for t in case.test.tensors)), batch_size=LDS_QUERIES)
    train = DataLoader(case.train, batch_size=256)
    names = list(TIMING_VARIANTS)
    fit_t = {n: [] for n in names}
    fit_c = {n: [] for n in names}
    score_t = {n: [] for n in names}
    for r in range(repeats + 1):  # the first round warms up and is not kept
        for n in names[r % len(names):] + names[:r % len(names)]:
            d = tempfile.mkdtemp(dir=workdir)
            cb = EKFACInfluence(dirpath=os.path.join(d, "cb"), **TIMING_VARIANTS[n])
            model = case.model()
            with quiet():
                c0, t0 = time.process_time(), time.perf_counter()
                make_trainer(case.epochs, [cb], d).fit(model, case.loader())
                t1, c1 = time.perf_counter(), time.process_time()
            s0 = time.perf_counter()
            if cb.segments == 1:
                InfluenceScorer(model.eval(), cb.factors).pairwise(query, train)
            else:
                TrajectoryScorer(model.eval(), os.path.join(d, "cb")).pairwise(query, train)
            s1 = time.perf_counter()
            if r:
                fit_t[n].append(t1 - t0)
                fit_c[n].append(c1 - c0)
                score_t[n].append(s1 - s0)
    base = statistics.median(fit_t[names[0]])
    return [{"variant": n, "fit_s": statistics.median(fit_t[n]), "fit_cpu_s": statistics.median(fit_c[n]),
             "fit_ratio": statistics.median(fit_t[n]) / base, "score_s": statistics.median(score_t[n])} for n in names]


def timing_table(rows: list[dict], repeats: int) -> str:
    return "\n".join([f"Cost (seed 0 recipe, medians of {repeats} interleaved repeats after a warm-up round):", "", md_table(
        ["callback", "trainer.fit wall s", "CPU s", "× segments=1", "pairwise scoring 100 × 1,437, wall s"],
        [[r["variant"], f"{r['fit_s']:.2f}", f"{r['fit_cpu_s']:.2f}", f"{r['fit_ratio']:.2f}", f"{r['score_s']:.2f}"] for r in rows])])


def summarise(runs: list[dict]) -> list[dict]:
    names = list(runs[0]["rows"])
    kron = "kronfluence 1.0.1 (final weights)"
    out = []
    for name in names:
        vals = [r["rows"][name]["lds"] for r in runs]
        diffs = [r["rows"][name]["lds"] - r["rows"][kron]["lds"] for r in runs]
        out.append({"scores": name, "per_seed": vals, "mean": statistics.mean(vals),
                    "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                    "diff_mean": statistics.mean(diffs), "diff_std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0})
    return out


def table(summary: list[dict], seeds: list[int]) -> str:
    return md_table(["scores from", *(f"seed {s}" for s in seeds), "LDS mean ± std", "− kronfluence (mean ± std)"],
                    [[r["scores"], *(f"{v:.4f}" for v in r["per_seed"]), f"{r['mean']:.4f} ± {r['std']:.4f}",
                      f"{r['diff_mean']:+.4f} ± {r['diff_std']:.4f}"] for r in summary])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--models", type=int, default=100, help="retrained subsets per seed")
    p.add_argument("--cache", default=str(ROOT / "benchmarks" / "out" / "trajectory_cache"), help="retrained-subset cache folder")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="1 seed, 30 models")
    p.add_argument("--no-doc", action="store_true")
    p.add_argument("--timing-repeats", type=int, default=3, help="repeats of the cost section (0: skip it)")
    p.add_argument("--json", default=None, help="also write the raw results here")
    a = p.parse_args(argv)
    if a.quick or os.environ.get("LI_BENCH_QUICK"):
        a.seeds, a.models, a.no_doc, a.timing_repeats = a.seeds[:1], 30, True, 1
    torch.set_num_threads(a.threads)
    silence_loggers()
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory() as workdir:
        for seed in a.seeds:
            r = run_seed(seed, a.models, Path(a.cache), workdir)
            runs.append(r)
            print(f"seed {seed}: " + ", ".join(f"{n}: {v['lds']:.4f}" for n, v in r["rows"].items())
                  + f" (fit {r['fit_s']:.1f}s, scores {r['score_s']:.1f}s, retrain {r['retrain_s']:.1f}s, "
                  f"{r['resumed']} cached; plain vs Lightning max |Δθ| {r['plain_vs_lightning_max_abs']:.2e})", flush=True)
        cost = timing(a.timing_repeats, workdir) if a.timing_repeats else []
    summary = summarise(runs)
    load1 = os.getloadavg()
    tab = table(summary, a.seeds)
    print(tab)
    best = max((r for r in summary if r["scores"].startswith("trajectory")), key=lambda r: r["diff_mean"])
    met = best["diff_mean"] >= TARGET
    verdict = (f"Target (+{TARGET} LDS over kronfluence): {'met' if met else 'missed'}; best trajectory row "
               f"'{best['scores']}' {best['diff_mean']:+.4f} ± {best['diff_std']:.4f} (mean ± std over {len(a.seeds)} seeds).")
    print(verdict)
    cost_tab = timing_table(cost, a.timing_repeats) if cost else ""
    print(cost_tab)
    if a.json:
        Path(a.json).write_text(json.dumps({"runs": runs, "summary": summary, "cost": cost}, indent=1))
    if not a.no_doc:
        meta = (f"Run {utc_now()}, {machine()}, seeds {a.seeds}, {a.models} retrained subsets per seed, "
                f"{LDS_QUERIES} queries; load average {load0[0]:.1f} at start, {load1[0]:.1f} at end; "
                f"total {time.perf_counter() - t0:.0f} s. Lightning vs plain-loop retrain on the full set: max |Δθ| "
                f"{max(r['plain_vs_lightning_max_abs'] for r in runs):.1e}.")
        write_results(DOC, f"{meta}\n\n{tab}\n\n{verdict}\n\n{cost_tab}", "Trajectory-aware influence benchmark")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
