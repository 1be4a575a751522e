"""Mislabel detection on digits with 10% flipped labels: every self-influence method at its default, one table.

Run: ``.venv/bin/python benchmarks/bench_mislabel.py`` (``make bench`` runs every ``bench_*.py``;
about 5-8 minutes on 2 shared CPU cores, single-threaded torch).

Set-up: ``benchmarks/bench_z0.py``'s (from ``benchmarks/common.py``, not copied): digits with 10% of the training labels
flipped (``digits_dataset(flip_fraction=0.1, seed=s)``), the ``MLPClassifier`` 64-128-10, 30 epochs
of SGD (lr 0.05, batch 32, shuffled), one Lightning ``fit`` per seed with every callback attached
at its defaults, each scoring the whole training set (``probe=train``):

* ``EKFACInfluence(probe=train)``: EK-FAC self-influence at the end of fit;
* ``Z0Influence(probe=train, every_n_epochs=1)``: the callback's self-influence artifact (its
  default estimator, the mean loss over the epochs), the recording's loss variance (the paper's
  estimator, the callback's default before 0.2), plus TracIn-style self-influence ``Σ_ckpt lr·‖∇ℓ(z)‖²`` from
  the same snapshots (``common.tracin_self_influence``);
* ``LiSSASelfInfluence(probe=train, name=..., options=LiSSAOptions(sampler=s))`` for each sampler
  ``s`` (everything else at its default, including ``max_probe``);
* the final-loss baseline (the last recorded per-example loss);
* for comparison, ``LiSSASelfInfluence`` with the defaults it had before this benchmark
  (``max_probe=64``, ``depth=100``), and the same scoring every example (``--no-previous`` skips both).

Metrics: average precision and AUROC of finding the flipped labels
(:func:`lightning_influence.evaluate.mislabel_detection`, torchmetrics; unscored examples rank
last), mean ± standard deviation over the seeds. Time: wall and CPU seconds spent in each
callback's hooks (every hook, timed by wrapping the instance's methods), beside the plain
training time (the same fit without callbacks, measured in the same process before it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import fit_time, md_row, md_table, mean_sd, reference, silence_loggers, tracin_self_influence  # noqa: E402  (the Z0 set-up, TracIn, the Hessian)
from lightning_influence import (  # noqa: E402
    EKFACInfluence,
    IndexedDataset,
    LiSSAOptions,
    LiSSASelfInfluence,
    Z0Influence,
    load_scores,
    load_z0,
)
from lightning_influence.demos import digits_dataset  # noqa: E402
from lightning_influence.evaluate import mislabel_detection  # noqa: E402

warnings.filterwarnings("ignore")
SAMPLERS = ("random", "logit", "feature", "feature_weighted")
PREVIOUS = "LiSSASelfInfluence, previous defaults (max_probe=64, depth=100)"
PREVIOUS_ALL = "LiSSASelfInfluence, previous defaults but every example (max_probe=None, depth=100)"


class HookClock:
    """Wall and CPU seconds spent in one callback instance's hooks (its ``on_*``, ``setup`` and
    ``teardown`` methods, wrapped on the instance)."""

    def __init__(self, callback) -> None:
        self.wall = 0.0
        self.cpu = 0.0
        for name in dir(type(callback)):
            if name.startswith("on_") or name in ("setup", "teardown"):
                method = getattr(callback, name)
                if callable(method):
                    setattr(callback, name, self._timed(method))

    def _timed(self, fn):
        def wrapper(*args, **kwargs):
            w, c = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.wall += time.perf_counter() - w
                self.cpu += time.process_time() - c

        return wrapper


def scores_over(ids: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """``Tensor[n]`` float64 with ``values`` at ``ids`` and NaN (ranked last) where unscored."""
    out = torch.full((n,), float("nan"), dtype=torch.float64)
    out[ids.long()] = values.double()
    return out


def one_seed(args, seed: int) -> dict:
    """Train once with every callback; the AP/AUROC and time of every method."""
    run_args = argparse.Namespace(seed=seed, hidden=args.hidden, lr=args.lr, epochs=args.epochs, batch_size=args.batch_size)
    train_raw, _, flipped = digits_dataset(flip_fraction=0.1, seed=seed)
    train = IndexedDataset(train_raw)
    n = len(train)
    x, y = train_raw.tensors
    w0, c0 = time.perf_counter(), time.process_time()
    fit_time(run_args, train, [])
    plain = (time.perf_counter() - w0, time.process_time() - c0)
    callbacks = {
        "EKFACInfluence": EKFACInfluence(probe=train),
        "Z0Influence": Z0Influence(probe=train, every_n_epochs=1, keep_snapshots=True),
    }
    for s in args.samplers:
        callbacks[f"LiSSASelfInfluence(sampler={s!r})"] = LiSSASelfInfluence(probe=train, name=f"lissa-{s}",
                                                                            options=LiSSAOptions(sampler=s))
    if args.previous:  # the defaults before this benchmark (0.2.x after issue 13): what changed and why
        callbacks[PREVIOUS] = LiSSASelfInfluence(probe=train, name="lissa-prev", max_probe=64, options=LiSSAOptions(depth=100))
        callbacks[PREVIOUS_ALL] = LiSSASelfInfluence(probe=train, name="lissa-prev-all", max_probe=None,
                                                     options=LiSSAOptions(depth=100))
    clocks = {k: HookClock(cb) for k, cb in callbacks.items()}
    _, model, root, _ = fit_time(run_args, train, list(callbacks.values()))
    rows = {}

    def add(name, scores, wall, cpu, scored=None):
        q = mislabel_detection(scores, flipped)
        rows[name] = dict(ap=q.average_precision, auroc=q.auroc, wall_s=wall, cpu_s=cpu,
                          scored=int(torch.isfinite(scores).sum()) if scored is None else scored)

    z0 = load_z0(Path(root) / "influence" / "z0" / "recording")
    per_epoch = (clocks["Z0Influence"].wall / args.epochs, clocks["Z0Influence"].cpu / args.epochs)
    add("final loss (baseline)", scores_over(z0.probe_ids, z0.probe_losses[-1], n), *per_epoch)
    ek = load_scores(callbacks["EKFACInfluence"].artifact_path("self_influence"))
    add("EKFACInfluence self-influence", scores_over(ek.train_ids, ek.self_influence, n),
        clocks["EKFACInfluence"].wall, clocks["EKFACInfluence"].cpu)
    zs = load_scores(callbacks["Z0Influence"].artifact_path("self_influence"))
    add(f"Z0Influence self-influence (default: {zs.options['estimator']})", scores_over(zs.train_ids, zs.self_influence, n),
        clocks["Z0Influence"].wall, clocks["Z0Influence"].cpu)
    add("Z0 loss variance (self_influence='variance')", scores_over(z0.probe_ids, z0.self_influence("variance"), n),
        clocks["Z0Influence"].wall, clocks["Z0Influence"].cpu)
    snaps = [z0.snapshot(r) for r in range(z0.num_checkpoints)]
    w, c = time.perf_counter(), time.process_time()
    tracin = tracin_self_influence(model, snaps, x, y, args.lr)
    add(f"TracIn self-influence ({len(snaps)} Z0 snapshots)", tracin,
        clocks["Z0Influence"].wall + time.perf_counter() - w, clocks["Z0Influence"].cpu + time.process_time() - c)
    for key in [f"LiSSASelfInfluence(sampler={s!r})" for s in args.samplers] + ([PREVIOUS, PREVIOUS_ALL] if args.previous else []):
        res = callbacks[key].scores
        add(key, scores_over(res.train_ids, res.self_influence, n), clocks[key].wall, clocks[key].cpu)
        rows[key]["damping"] = float(res.meta["metrics"]["damping"])
        rows[key]["vector_steps"] = float(res.meta["metrics"]["vector_steps"])
    return {"seed": seed, "plain_wall_s": plain[0], "plain_cpu_s": plain[1], "load": os.getloadavg()[0], "rows": rows}


def table(results: list[dict]) -> str:
    names = list(results[0]["rows"])
    base = [r["rows"]["final loss (baseline)"]["ap"] for r in results]
    rows = []
    for name in names:
        rs = [r["rows"][name] for r in results]
        diff = [x["ap"] - b for x, b in zip(rs, base)]
        rows.append([name, rs[0]["scored"], mean_sd([x["ap"] for x in rs]), mean_sd([x["auroc"] for x in rs]),
                     "—" if name.startswith("final loss") else mean_sd(diff, "+.3f"), mean_sd([x["wall_s"] for x in rs], ".2f"),
                     mean_sd([x["cpu_s"] for x in rs], ".2f")])
    rows.append([f"plain training, no callback ({results[0]['rows'][names[0]]['scored']} examples)", "—", "—", "—", "—",
                 mean_sd([r["plain_wall_s"] for r in results], ".2f"), mean_sd([r["plain_cpu_s"] for r in results], ".2f")])
    return md_table(["method (default settings)", "scored", "average precision", "AUROC", "AP − baseline AP", "wall s", "CPU s"], rows)


# ------------------------------------------------------------------------ why (--diagnose)
DIAG_DAMPINGS = (1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0)  # times the largest eigenvalue of the full-data curvature
DIAG_VARIANTS = {
    "defaults (depth 20, sample 32, random, Hessian)": {},
    "depth 100 (the previous default)": dict(depth=100),
    "depth 10, tol=None": dict(depth=10, tol=None),
    "depth 20, 4 repeats": dict(repeats=4),
    "sample_size 128, depth 100": dict(sample_size=128, depth=100),
    "curvature='ggn'": dict(curvature="ggn"),
    "sampler='logit'": dict(sampler="logit"),
    "damping 10x larger (1.0 x mean top eigenvalue), depth 30": "big",
}


def exact_spectra(model, x, y):
    """Full-data mean-loss Hessian (``common.reference``) and GGN of ``model`` (all
    parameters, float64, dense), their eigendecompositions, and the per-example gradients ``G``
    (``[n, P]``)."""
    from torch.func import functional_call, jacrev, vmap

    H, G, theta, unflat, m64 = reference(model, x, y, torch.arange(len(y)))
    x64 = x.double()
    J = vmap(jacrev(lambda t, xi: functional_call(m64, unflat(t), (xi[None],))[0]), in_dims=(None, 0))(theta, x64)
    with torch.no_grad():
        p = torch.softmax(m64(x64), -1)
    GGN = torch.einsum("nkp,nkl,nlq->pq", J, torch.diag_embed(p) - p[:, :, None] * p[:, None, :], J) / len(y)
    del J
    mu, U = torch.linalg.eigh(H)
    nu, V = torch.linalg.eigh((GGN + GGN.T) / 2)
    return G, mu, U, nu.clamp_min(0), V


def diagnose(args) -> str:
    """One seed: exact self-influence (dense eigendecomposition) across dampings for the Hessian
    and the GGN, and LiSSA variants against it, each scoring every training example."""
    import dataclasses

    from torch.utils.data import DataLoader

    from lightning_influence.evaluate import spearman
    from lightning_influence.lissa import self_influence

    seed = args.seeds[0]
    run_args = argparse.Namespace(seed=seed, hidden=args.hidden, lr=args.lr, epochs=args.epochs, batch_size=args.batch_size)
    train_raw, _, flipped = digits_dataset(flip_fraction=0.1, seed=seed)
    train = IndexedDataset(train_raw)
    x, y = train_raw.tensors
    _, model, _, _ = fit_time(run_args, train, [])
    model.eval()
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
    t0 = time.perf_counter()
    G, mu, U, nu, V = exact_spectra(model, x, y)
    t_exact = time.perf_counter() - t0
    PH, PG = (G @ U) ** 2, (G @ V) ** 2

    def exact(lam: float, curvature: str) -> torch.Tensor:
        if curvature == "hessian":
            return (PH / (mu + lam)).sum(1) if float(mu.min()) + lam > 0 else None
        return (PG / (nu + lam)).sum(1)

    def ap(s) -> str:
        return "indefinite" if s is None else f"{mislabel_detection(s, flipped).average_precision:.3f}"

    top = float(mu.max())
    lines = [f"## Why: one seed ({seed}), MLP 64-{args.hidden}-10 ({mu.numel()} parameters), {args.epochs} epochs; "
             f"exact spectra in {t_exact:.0f} s", "",
             f"Final-loss baseline AP {ap(loss)}; squared gradient norm ‖∇ℓ(z)‖² AP {ap(G.pow(2).sum(1))}. "
             f"Hessian eigenvalues in [{float(mu.min()):.3g}, {top:.3g}] ({int((mu < 0).sum())} negative), GGN in [0, {float(nu.max()):.3g}].",
             "", "Exact self-influence `gᵀ(C + λI)⁻¹g` (dense float64), average precision:", "",
             md_table(["λ / λ_max(H)", "λ", "Hessian", "GGN"],
                      [[f"{rel:g}", f"{rel * top:.3g}", ap(exact(rel * top, "hessian")), ap(exact(rel * top, "ggn"))] for rel in DIAG_DAMPINGS])]
    lines += ["", "LiSSA, every training example scored (`lightning_influence.lissa.self_influence`), against the exact "
              "value at the damping each run used:", "",
              md_table(["LiSSA options", "AP", "exact AP at its λ", "Spearman vs exact", "median rel. error", "λ used",
                        "steps per example", "CPU s"], [])]
    base = LiSSAOptions()
    for name, kw in DIAG_VARIANTS.items():
        if kw == "big":  # ten times the automatic damping, from a default run's value
            kw = dict(damping=10 * auto_damping, depth=30)
        o = dataclasses.replace(base, **kw)
        c0 = time.process_time()
        r = self_influence(model, DataLoader(train, batch_size=256), train, o)
        cpu = time.process_time() - c0
        if not kw:
            auto_damping = float(r.meta["damping"])
        est = scores_over(r.train_ids, r.self_influence, len(y))
        ex = exact(float(r.meta["damping"]), o.curvature)
        ok = ex is not None
        lines.append(md_row([name, ap(est), ap(ex), f"{spearman(est, ex) if ok else float('nan'):.4f}",
                             f"{float(((est - ex).abs() / ex.abs()).median()) if ok else float('nan'):.3f}",
                             f"{float(r.meta['damping']):.3g}", f"{float(r.meta['vector_steps']):.1f}", f"{cpu:.1f}"]))
        print(lines[-1], flush=True)
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    p.add_argument("--no-previous", dest="previous", action="store_false",
                   help="skip the two rows with the LiSSA defaults before this benchmark")
    p.add_argument("--diagnose", action="store_true",
                   help="instead of the table: exact self-influence across dampings and LiSSA variants on the first seed "
                        "(dense Hessian: use --hidden 64)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="also write every figure here")
    p.add_argument("--table-from", default=None, help="print the table of an earlier --json file and stop")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    silence_loggers()
    if args.table_from:
        print(table(json.loads(Path(args.table_from).read_text())["results"]))
        return
    if args.diagnose:
        print(diagnose(args))
        return
    t0 = time.perf_counter()
    results = []
    for seed in args.seeds:
        results.append(one_seed(args, seed))
        r = results[-1]
        print(f"  seed {seed} (load {r['load']:.1f}): " + ", ".join(f"{k} AP {v['ap']:.3f}" for k, v in r["rows"].items()), flush=True)
    print(f"\n# Mislabel detection: digits, 10% flipped, MLP 64-{args.hidden}-10, {args.epochs} epochs, seeds {args.seeds}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); total {time.perf_counter() - t0:.0f} s; "
          f"load average {min(r['load'] for r in results):.1f}–{max(r['load'] for r in results):.1f}\n")
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
