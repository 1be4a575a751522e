"""Sampled-LiSSA benchmark on digits: samplers at equal budgets against the exact self-influence.

Run: ``.venv/bin/python benchmarks/bench_lissa.py`` (``make bench`` runs every ``bench_*.py``;
about 4-6 minutes on 2 CPU cores, single-threaded torch).

Models (trained here with full-batch gradient descent, then frozen, float32):
  * ``mlp``: the library's digits ``MLPClassifier`` (64-32-10, tanh; all 2,410 parameters);
  * ``softmax``: multinomial logistic regression on the same features (650 parameters, convex).

Reference: the explicit float64 Hessian of the **mean** training loss over all 1,437 training
examples, for **all** parameters (built column by column with an independent functional forward
pass and ``torch.func`` HVPs), and exact self-influence ``g_i^T (H + λI)^{-1} g_i`` for a fixed
probe of training examples by a dense solve.

For each sampler (``random``, ``logit``, ``feature_topk``, ``feature_weighted``), budget
(examples per LiSSA step) and seed: self-influence of the probe with
:func:`lightning_influence.lissa.self_influence` (curvature = exact Hessian, redraw every step),
Spearman (lightning_influence.evaluate, torchmetrics) and median relative error against the exact values, wall time, and
peak memory. Peak memory is the rise of the process's peak resident set size during the call
(Linux ``VmHWM`` reset through ``/proc/self/clear_refs``; PyTorch CPU tensors bypass Python's
allocator, so ``tracemalloc`` cannot see them); the script re-executes itself with
``MALLOC_MMAP_THRESHOLD_=65536`` so that freed tensors go back to the OS and each measurement
starts from the same baseline.

Class removal (as in arXiv 2510.26776): remove class ``c`` with the influence update
``θ' = θ + (α/n) (H + λI)^{-1} Σ_{z in class c} ∇ℓ(z)``; on the test set, forgetting is
``1 - accuracy on c`` and keeping is the accuracy on the other classes; F1 is their harmonic
mean. ``α = 1`` is the first-order theory; ``α*`` is the best multiplier for the *exact* inverse
(chosen on the test set, then applied unchanged to every sampler).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

def _demo_only(argv: list[str]) -> bool:
    return "--sections" in argv and "samplers" not in argv[argv.index("--sections") + 1:]


# the sampler sweep measures per-call memory with freed tensors returned to the OS; the demo
# section times a normal process (it runs in a child without this setting when both run)
if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and __name__ == "__main__" and not _demo_only(sys.argv):
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable] + sys.argv)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call, grad, vmap  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_influence import IndexedDataset  # noqa: E402
from lightning_influence.evaluate import spearman  # noqa: E402
from lightning_influence.lissa import (  # noqa: E402
    FeatureSampler,
    LiSSADivergenceError,
    LiSSAOptions,
    LogitSampler,
    PeakMemory,
    RandomSampler,
    SamplePool,
    lissa_inverse_hvp,
    self_influence,
)
from lightning_influence.task import ClassificationTask  # noqa: E402
from lightning_influence.demos import MLPClassifier, digits_dataset  # noqa: E402

from common import machine, make_trainer, md_table, mean_sd, reference, silence_loggers  # noqa: E402

warnings.filterwarnings("ignore")
SAMPLERS = ("random", "logit", "feature_topk", "feature_weighted")


def build_sampler(name: str, budget: int):
    if name == "random":
        return RandomSampler(budget)
    if name == "logit":
        return LogitSampler(budget)
    return FeatureSampler(budget, n_clusters=10, selection=name.split("_")[1])


def make_model(kind: str, hidden: int) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        return MLPClassifier(d_in=64, hidden=hidden, n_classes=10)
    return nn.Sequential(nn.Linear(64, 10))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, wd: float) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=wd)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()


# ------------------------------------------------------------------------- exact reference
# ------------------------------------------------------------------------- experiments
def sweep(args, kind: str) -> dict:
    train_ds, test_ds, _ = digits_dataset(seed=0)
    x, y = train_ds.tensors
    xt, yt = test_ds.tensors
    model = make_model(kind, args.hidden)
    train(model, x, y, steps=args.train_steps, lr=0.5, wd=1e-3)
    with torch.no_grad():
        acc_train = float((model(x).argmax(-1) == y).float().mean())
        acc_test = float((model(xt).argmax(-1) == yt).float().mean())
    probe = torch.randperm(len(y), generator=torch.Generator().manual_seed(123))[: args.probe]
    t0 = time.perf_counter()
    H, G, theta, unflat, m64 = reference(model, x, y, probe)
    evals = torch.linalg.eigvalsh(H)
    lam_min, lam_max = float(evals.min()), float(evals.max())
    damping = args.damping_frac * lam_max + max(0.0, -lam_min)
    scale = args.scale_mult * (lam_max + damping)
    A = H + damping * torch.eye(H.shape[0], dtype=H.dtype)
    chol = torch.linalg.cholesky(A)
    exact = (G * torch.cholesky_solve(G.T, chol).T).sum(1)
    ref_seconds = time.perf_counter() - t0
    print(f"[{kind}] P={theta.numel()} train acc {acc_train:.3f} test acc {acc_test:.3f}; "
          f"H eigenvalues [{lam_min:.3g}, {lam_max:.3g}]; damping {damping:.3g}; scale {scale:.3g}; "
          f"reference {ref_seconds:.1f}s", flush=True)

    pool = IndexedDataset(train_ds)
    probe_ds = torch.utils.data.Subset(pool, probe.tolist())
    rows = []
    for name in SAMPLERS:
        for budget in args.budgets:
            for seed in range(args.seeds):
                loader = DataLoader(probe_ds, batch_size=len(probe_ds))
                try:
                    with PeakMemory(reset_peak=True) as mem:
                        t1, c1 = time.perf_counter(), time.process_time()
                        opts = LiSSAOptions(sampler=build_sampler(name, budget), damping=damping, scale=scale,
                                            depth=args.depth, tol=None, chunk_size=len(probe_ds), seed=seed)
                        res = self_influence(model, loader, SamplePool(pool), opts, task=ClassificationTask())
                        secs, cpu = time.perf_counter() - t1, time.process_time() - c1
                except LiSSADivergenceError:
                    rows.append(dict(sampler=name, budget=budget, seed=seed, diverged=True))
                    continue
                order = torch.argsort(res.train_ids)
                est = res.self_influence[order].double()
                ex = exact[torch.argsort(probe)]
                rho = spearman(est, ex)
                rel = float(((est - ex).abs() / ex.abs()).median())
                rows.append(dict(sampler=name, budget=budget, seed=seed, diverged=False, spearman=rho, rel_err=rel,
                                 seconds=secs, cpu_seconds=cpu, peak_mb=mem.peak_bytes / 2**20))
            s = _summary([r for r in rows if r["sampler"] == name and r["budget"] == budget])
            print(f"  {name:17s} budget {budget:4d}: spearman {s['spearman']}  rel.err {s['rel_err']}  "
                  f"wall {s['seconds']}s  cpu {s['cpu_seconds']}s  peak {s['peak_mb']} MB  diverged {s['diverged']}", flush=True)
    out = dict(kind=kind, num_params=theta.numel(), acc_train=acc_train, acc_test=acc_test, lam_min=lam_min,
               lam_max=lam_max, damping=damping, scale=scale, rows=rows)
    if kind == "mlp" and args.removal:
        out["removal"] = class_removal(args, model, pool, x, y, xt, yt, A, damping, scale, unflat, m64)
    return out


def class_removal(args, model, pool, x, y, xt, yt, A, damping, scale, unflat, m64) -> dict:
    n = len(y)
    theta32 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    names = [n_ for n_, _ in model.named_parameters()]

    def evaluate(delta: torch.Tensor, c: int) -> float:
        t = theta32 + delta.float()
        params, i = {}, 0
        for nm, p in model.named_parameters():
            params[nm] = t[i : i + p.numel()].reshape(p.shape)
            i += p.numel()
        with torch.no_grad():
            pred = functional_call(model, params, (xt,)).argmax(-1)
        forget = 1.0 - float((pred[yt == c] == c).float().mean())
        keep = float((pred[yt != c] == yt[yt != c]).float().mean())
        return 0.0 if forget + keep == 0 else 2 * forget * keep / (forget + keep)

    assert names  # parameters exist
    per_ex = vmap(grad(lambda t, xi, yi: F.cross_entropy(functional_call(m64, unflat(t), (xi[None],)), yi[None])),
                  in_dims=(None, 0, 0))
    theta64 = torch.cat([p.detach().reshape(-1) for p in m64.parameters()])
    alphas = [1.0, 3.0, 10.0, 30.0, 100.0, 300.0]
    result = {"classes": args.removal_classes, "alphas": alphas, "exact": {}, "samplers": {}}
    vs, exact_dirs = {}, {}
    for c in args.removal_classes:
        v = per_ex(theta64, x.double()[y == c], y[y == c]).sum(0)
        vs[c] = v
        exact_dirs[c] = torch.linalg.solve(A, v) / n
        result["exact"][c] = {a: evaluate(a * exact_dirs[c], c) for a in alphas}
    best = max(alphas, key=lambda a: statistics.mean(result["exact"][c][a] for c in args.removal_classes))
    result["alpha_star"] = best
    for name in SAMPLERS:
        f1 = {1.0: [], best: []}
        diverged = 0
        for c in args.removal_classes:
            for seed in range(args.seeds):
                try:
                    opts = LiSSAOptions(sampler=build_sampler(name, args.removal_budget), damping=damping, scale=scale,
                                        depth=args.depth, seed=seed)
                    res = lissa_inverse_hvp(model, vs[c].float()[None], SamplePool(pool), opts, task=ClassificationTask())
                except LiSSADivergenceError:
                    diverged += 1
                    continue
                d = res.estimate[0].double() / n
                for a in f1:
                    f1[a].append(evaluate(a * d, c))
        result["samplers"][name] = {**{str(a): _ms(v) for a, v in f1.items()}, "diverged": diverged}
        print(f"  removal {name:17s}: F1 alpha=1 {_ms(f1[1.0])}  alpha*={best:g} {_ms(f1[best])}  "
              f"diverged {diverged}/{len(args.removal_classes) * args.seeds}", flush=True)
    ex1 = statistics.mean(result["exact"][c][1.0] for c in args.removal_classes)
    exb = statistics.mean(result["exact"][c][best] for c in args.removal_classes)
    print(f"  removal exact inverse          : F1 alpha=1 {ex1:.3f}  alpha*={best:g} {exb:.3f}", flush=True)
    result["exact_mean"] = {"1.0": ex1, str(best): exb}
    return result


def _ms(values: list[float]) -> str:
    return mean_sd(values, empty="n/a")


def _summary(rows: list[dict]) -> dict:
    ok = [r for r in rows if not r["diverged"]]
    out = {k: _ms([r[k] for r in ok]) for k in ("spearman", "rel_err", "seconds", "cpu_seconds", "peak_mb")}
    out["diverged"] = f"{len(rows) - len(ok)}/{len(rows)}"
    return out


def equal_accuracy(result: dict) -> list[str]:
    """Smallest budget at which each sampler's accuracy reaches the random sampler's at its largest
    budget (mean Spearman >= and mean median-relative-error <=), with CPU time and memory there."""
    rows = [r for r in result["rows"] if not r["diverged"]]

    def mean(name: str, b: int, k: str) -> float:
        vals = [r[k] for r in rows if r["sampler"] == name and r["budget"] == b]
        return statistics.mean(vals) if vals else float("nan")

    budgets = sorted({r["budget"] for r in result["rows"]})
    top = budgets[-1]
    rho_t, err_t = mean("random", top, "spearman"), mean("random", top, "rel_err")
    t_ref, m_ref = mean("random", top, "cpu_seconds"), mean("random", top, "peak_mb")
    lines = [f"equal accuracy target: random sampler at budget {top}: Spearman {rho_t:.4f}, median rel. error {err_t:.4f}"]
    for name in SAMPLERS:
        hit = [b for b in budgets if mean(name, b, "spearman") >= rho_t and mean(name, b, "rel_err") <= err_t
               and not any(r["diverged"] for r in result["rows"] if r["sampler"] == name and r["budget"] == b)]
        if not hit:
            lines.append(f"  {name}: does not reach the target at any budget tried")
            continue
        b = hit[0]
        t, m = mean(name, b, "cpu_seconds"), mean(name, b, "peak_mb")
        lines.append(f"  {name}: budget {b}: CPU time {t:.2f}s ({100 * (t / t_ref - 1):+.0f}% vs random@{top}), "
                     f"peak memory {m:.1f} MB ({100 * (m / m_ref - 1):+.0f}%)")
    return lines


# ------------------------------------------------------------------------- the demo's cost (issue 13)
DEMO_EPOCHS, DEMO_HIDDEN, DEMO_LR, DEMO_BATCH = 12, 64, 0.1, 64  # examples/quickstart.py
V020 = {"options": dict(damping=1e-3, scale=10.0, depth=100, tol=None), "max_probe": None}
ISSUE13 = {"options": dict(depth=100), "max_probe": 64}
DEMO_VARIANTS: dict[str, dict] = {
    "defaults (every example, depth 20)": {},
    "issue-13 defaults (max_probe 64, depth 100)": ISSUE13,
}
DEMO_EXTRA: dict[str, dict] = {
    "0.2.0 defaults (damping 1e-3, scale 10, depth 100, no tol, whole probe)": V020,
    "issue-13 defaults, every example (depth 100)": {"options": dict(depth=100), "max_probe": None},
    "defaults, max_probe=128": {"max_probe": 128},
    "defaults, sample_size=100": {"options": dict(sample_size=100)},
    "defaults, depth=10": {"options": dict(depth=10)},
    "defaults, depth=50": {"options": dict(depth=50)},
    "defaults, tol=None": {"options": dict(tol=None)},
}


def demo_fit(variant, ids, workdir):
    """The quickstart's training (digits, 10% flipped labels, MLP 64-64-10, 12 epochs), with
    ``LiSSASelfInfluence(probe=<all training examples>, ...)`` of ``variant`` (``None``: without).
    Returns (wall s, CPU s, callback, model, (wall s, CPU s) until the end of ``on_train_end``:
    the scores on disk, before ``on_fit_end``'s rendered examples and HTML report)."""
    import lightning as L

    from lightning_influence import LiSSASelfInfluence

    class Clock(L.Callback):
        at = (0.0, 0.0)

        def on_train_end(self, trainer, pl_module):
            self.at = (time.perf_counter(), time.process_time())

    cb = None
    if variant is not None:
        kw = {"max_probe": variant["max_probe"]} if "max_probe" in variant else {}
        opts = LiSSAOptions(**variant["options"]) if "options" in variant else None
        cb = LiSSASelfInfluence(probe=ids, options=opts, dirpath=os.path.join(workdir, f"lissa{time.perf_counter_ns()}"), **kw)
    L.seed_everything(0, verbose=False)
    model = MLPClassifier(hidden=DEMO_HIDDEN, lr=DEMO_LR)
    clock = Clock()
    trainer = make_trainer(DEMO_EPOCHS, ([cb] if cb else []) + [clock], workdir)
    c0, t0 = time.process_time(), time.perf_counter()
    # its own generator: the callbacks' set-up checks draw from the global one (a DataLoader iterator takes a seed)
    trainer.fit(model, DataLoader(ids, batch_size=DEMO_BATCH, shuffle=True, generator=torch.Generator().manual_seed(0)))
    return time.perf_counter() - t0, time.process_time() - c0, cb, model.eval(), (clock.at[0] - t0, clock.at[1] - c0)


def demo(args) -> dict:
    """Cost of ``LiSSASelfInfluence`` on the quickstart demo, side by side with plain training
    (interleaved, rotating order, medians), and the accuracy of its scores against exact
    self-influence at the damping each run used (explicit float64 Hessian at the final weights)."""
    import tempfile

    silence_loggers()
    from lightning_influence.evaluate import mislabel_detection

    train_ds, _, flipped = digits_dataset(flip_fraction=0.1, seed=0)
    ids = IndexedDataset(train_ds)
    known = {**DEMO_VARIANTS, **DEMO_EXTRA}
    variants = {k: known[k] for k in (args.demo_variants or DEMO_VARIANTS)}
    names = ["plain training"] + list(variants)
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    scored = {n: [] for n in names}
    scored_cpu = {n: [] for n in names}
    last = {}
    loads = []
    with tempfile.TemporaryDirectory() as workdir:
        for n in names:  # warm-up
            demo_fit(None if n == "plain training" else variants[n], ids, workdir)
        for r in range(args.demo_repeats):
            k = r % len(names)
            for n in names[k:] + names[:k]:
                w, c, cb, model, (ws, cs) = demo_fit(None if n == "plain training" else variants[n], ids, workdir)
                wall[n].append(w)
                cpu[n].append(c)
                scored[n].append(ws)
                scored_cpu[n].append(cs)
                last[n] = (cb, model)
            loads.append(os.getloadavg()[0])
            print(f"  [demo] repeat {r + 1}/{args.demo_repeats} (load {loads[-1]:.1f}): "
                  + ", ".join(f"{n} {wall[n][-1]:.2f}s" for n in names), flush=True)
    base_w, base_c = statistics.median(wall["plain training"]), statistics.median(cpu["plain training"])
    base_s, base_sc = statistics.median(scored["plain training"]), statistics.median(scored_cpu["plain training"])
    model = last["plain training"][1]
    x, y = train_ds.tensors
    t0 = time.perf_counter()
    H, G, *_ = reference(model, x, y, torch.arange(len(y)))
    ref_s = time.perf_counter() - t0
    evals = torch.linalg.eigvalsh(H)
    rows = []
    for n in variants:
        cb, m = last[n]
        assert all(torch.equal(p, q) for p, q in zip(m.parameters(), model.parameters())), "the callback changed training"
        res = cb.scores
        damping = float(res.meta["metrics"]["damping"])
        sel = res.train_ids.long()
        A = H + damping * torch.eye(H.shape[0], dtype=H.dtype)
        exact = (G[sel] * torch.linalg.solve(A, G[sel].T).T).sum(1)
        est = res.self_influence.double()
        finite = torch.isfinite(est)
        rel = ((est - exact).abs() / exact.abs())[finite]
        metrics = res.meta["metrics"]
        rows.append(dict(
            variant=n, wall_s=statistics.median(wall[n]), cpu_s=statistics.median(cpu[n]),
            ratio=statistics.median(wall[n]) / base_w, cpu_ratio=statistics.median(cpu[n]) / base_c,
            to_scores_ratio=statistics.median(scored[n]) / base_s, to_scores_cpu_ratio=statistics.median(scored_cpu[n]) / base_sc,
            n_probe=int(sel.numel()), damping=damping, scale=float(metrics["scale"]), vector_steps=float(metrics["vector_steps"]),
            steps=float(metrics["steps"]), lissa_s=float(metrics["seconds"]), peak_mem_mb=float(metrics["peak_mem_mb"]),
            peak_method=res.meta["peak_memory_method"], spearman=spearman(est, exact),
            rel_err_median=float(rel.median()), rel_err_p90=float(rel.quantile(0.9)),
            exact_min=float(exact.min()), auroc=mislabel_detection(est, flipped[sel]).auroc,
            auroc_exact=mislabel_detection(exact, flipped[sel]).auroc, all_wall=wall[n], all_cpu=cpu[n]))
    out = dict(plain_wall_s=base_w, plain_cpu_s=base_c, plain_to_end_s=base_s, all_plain=wall["plain training"], loads=loads,
               h_eigen_range=[float(evals.min()), float(evals.max())], reference_s=ref_s, rows=rows)
    print(fmt_demo(out), flush=True)
    return out


def demo_in_child(args) -> dict:
    """The demo section in a child process with the allocator's default settings."""
    import subprocess
    import tempfile

    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "demo.json")
        cmd = [sys.executable, __file__, "--sections", "demo", "--demo-repeats", str(args.demo_repeats), "--json", out,
               "--threads", str(args.threads)]
        if args.demo_variants:
            cmd += ["--demo-variants", *args.demo_variants]
        subprocess.run(cmd, env=env, check=True)
        return json.loads(Path(out).read_text())[0]["demo"]


def fmt_demo(out: dict) -> str:
    lines = [f"plain training: {out['plain_wall_s']:.2f} s wall, {out['plain_cpu_s']:.2f} s CPU (median); load "
             f"{min(out['loads']):.1f}–{max(out['loads']):.1f}; H eigenvalues in [{out['h_eigen_range'][0]:.3g}, "
             f"{out['h_eigen_range'][1]:.3g}]",
             "",
             md_table(["setting", "scored", "**to scores on disk** / training (wall)", "(CPU)", "whole fit / training (wall)",
                       "LiSSA s", "damping", "scale", "steps per example", "Spearman vs exact", "median rel. error",
                       "p90 rel. error", "AUROC flipped (exact)", "peak_mem_mb"],
                      [[r["variant"], r["n_probe"], f"**{r['to_scores_ratio']:.2f}**", f"{r['to_scores_cpu_ratio']:.2f}",
                        f"{r['ratio']:.2f}", f"{r['lissa_s']:.2f}", f"{r['damping']:.3g}", f"{r['scale']:.3g}",
                        f"{r['vector_steps']:.1f}", f"{r['spearman']:.4f}", f"{r['rel_err_median']:.3f}", f"{r['rel_err_p90']:.3f}",
                        f"{r['auroc']:.3f} ({r['auroc_exact']:.3f})", f"{r['peak_mem_mb']:.1f} ({r['peak_method']})"]
                       for r in out["rows"]])]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", nargs="+", default=["demo", "samplers"], choices=["demo", "samplers"],
                   help="'demo': LiSSASelfInfluence's cost on the quickstart and its accuracy (issue 13); "
                        "'samplers': the sampler comparison")
    p.add_argument("--demo-variants", nargs="+", default=None, metavar="NAME",
                   help="settings of the demo section (names in DEMO_VARIANTS / DEMO_EXTRA)")
    p.add_argument("--demo-repeats", type=int, default=3)
    p.add_argument("--models", default="mlp,softmax")
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--train-steps", type=int, default=200)
    p.add_argument("--probe", type=int, default=50)
    p.add_argument("--budgets", default="25,50,100")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--depth", type=int, default=150)
    p.add_argument("--damping-frac", type=float, default=0.05, help="damping = frac * lambda_max + max(0, -lambda_min)")
    p.add_argument("--scale-mult", type=float, default=2.0, help="scale = mult * (lambda_max + damping)")
    p.add_argument("--no-removal", dest="removal", action="store_false")
    p.add_argument("--removal-classes", default="0,3,8")
    p.add_argument("--removal-budget", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="write all rows here")
    args = p.parse_args()
    args.budgets = [int(b) for b in args.budgets.split(",")]
    args.removal_classes = [int(c) for c in args.removal_classes.split(",")]
    torch.set_num_threads(args.threads)
    print(f"{machine()}, seeds {args.seeds}, budgets {args.budgets}, depth {args.depth}, probe {args.probe}", flush=True)
    t0, c0 = time.perf_counter(), time.process_time()
    results = []
    if "demo" in args.sections and os.environ.get("MALLOC_MMAP_THRESHOLD_") is not None:
        results.append({"demo": demo_in_child(args)})
    elif "demo" in args.sections:
        results.append({"demo": demo(args)})
    for kind in (args.models.split(",") if "samplers" in args.sections else []):
        r = sweep(args, kind)
        for line in equal_accuracy(r):
            print(f"  [{kind}] {line}", flush=True)
        results.append(r)
    print(f"total wall {time.perf_counter() - t0:.0f}s, CPU {time.process_time() - c0:.0f}s "
          f"(load average at the end: {os.getloadavg()[0]:.1f})", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
