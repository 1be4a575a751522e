"""Z0-Inf benchmark: recording overhead and mislabel detection on digits (CPU, a few minutes).

Run: ``.venv/bin/python benchmarks/bench_z0.py`` (``make bench`` runs every ``bench_*.py``).

1. Overhead: the same Lightning training with and without ``Z0Influence`` (probe = the full
   training set every epoch, all parameters snapshotted), and the probe pass against a plain
   no-grad forward + per-example loss over the same DataLoader (target <= 1.2x).
2. Mislabel detection (10% of the digits training labels flipped): average precision and AUROC
   (torchmetrics) of Z0 self-influence variants versus the final-loss baseline and TracIn
   self-influence (sum over the recorded checkpoints of lr * ||grad loss||^2, per-example
   gradients with torch.func over the same parameters), with wall times.
3. Optional (``--lds``): linear datamodeling score of Z0 train-test scores (and EK-FAC's when
   ``lightning_influence.ekfac`` works) on retrained subsets.

Sections 1-3 record with ``losses_from="probe"`` (a pass over the probe at each snapshot).

``--compare-losses``: instead, where the probe's losses come from, on bench_mislabel.py's task
(the same digits with 10% flipped labels, model, optimiser, loader and seeds ``--seeds``): one fit
per seed with ``Z0Influence(probe=train)`` at its default (``losses_from="auto"``: losses read from
the training forward) and ``Z0Influence(probe=train, losses_from="probe")`` side by side (same
weights), average precision / AUROC of the mean loss and the loss variance of each, beside the
final-loss baseline (the exact final losses, from the probe recording); then the CPU time
(``time.process_time``) of the same fit plain, with each alone, interleaved over ``--repeats``
rounds (medians).

``--gpt2``: the cost on a transformers GPT-2 small (``GPT2Config()``: 12 layers, width 768, the
real 50,257-token vocabulary, dropout 0.1; 124M parameters) built from its config, random init,
``--gpt2-sequences`` random 128-token sequences, batch 4, AdamW (``CausalLMModule``), ``--gpt2-epochs``
epochs: CPU seconds of the fit plain, with ``Z0Influence(probe=train)`` at its defaults (one row
per epoch, losses from the training forward) and with ``losses_from="probe"`` (a pass over the
40 sequences at each row, i.e. every 10 steps), one round each in that order.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset, TensorDataset

from common import fit_time, machine, make_trainer, md_table, seeded_mlp, tracin_self_influence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_influence import IndexedDataset, Z0Influence, load_z0  # noqa: E402
from lightning_influence.demos import digits_dataset  # noqa: E402
from lightning_influence.evaluate import linear_datamodeling_score, mislabel_detection  # noqa: E402
from lightning_influence.z0 import spearman_matrix  # noqa: E402

warnings.filterwarnings("ignore")


def quality(scores: torch.Tensor, flipped: torch.Tensor) -> tuple[float, float]:
    r = mislabel_detection(scores, flipped)
    return r.average_precision, r.auroc


def retrain_query_losses(args, train_raw, keep: torch.Tensor, xq, yq) -> torch.Tensor:
    """Retrain from the same initialisation on the kept examples (plain loop, same recipe)."""
    model = seeded_mlp(args)
    x, y = train_raw.tensors
    sub = TensorDataset(x[keep], y[keep])
    loader = DataLoader(sub, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    for _ in range(args.epochs):
        for xb, yb in loader:
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return F.cross_entropy(model(xq), yq, reduction="none")


def lds(args, res, model, train, train_raw, queries) -> dict:
    """Linear datamodeling score: Spearman, over random 50% subsets S, between the actual query
    loss after retraining on S and the prediction -sum_{z in S} score(x, z); mean over queries."""
    n = len(train_raw)
    xq = torch.stack([queries[i][1][0] for i in range(len(queries))])
    yq = torch.stack([queries[i][1][1] for i in range(len(queries))])
    g = torch.Generator().manual_seed(1234)
    masks = torch.stack([torch.randperm(n, generator=g) < n // 2 for _ in range(args.lds_subsets)])  # [M, n]
    t0 = time.perf_counter()
    actual = torch.stack([retrain_query_losses(args, train_raw, m, xq, yq) for m in masks])  # [M, n_q]
    t_retrain = time.perf_counter() - t0
    scorers = {
        f"Z0 least squares (k={args.k})": lambda: res.pairwise(fit="least_squares", k=args.k),
        f"Z0 finite difference (k={args.k})": lambda: res.pairwise(fit="finite_difference", k=args.k),
        f"Z0 released form (finite diff., centred, Spearman-weighted, k={args.k})":
            lambda: res.pairwise(fit="finite_difference", k=args.k, centre=True, spearman_weight=True),
        "Z0 Spearman correlation of trajectories only":
            lambda: spearman_matrix(res.query_losses, res.probe_losses).float(),
    }

    def ekfac_scores():
        from lightning_influence.ekfac.fit import fit_factors
        from lightning_influence.ekfac.scorer import InfluenceScorer

        tl = DataLoader(train, batch_size=256)
        factors = fit_factors(model, tl, fisher="true")
        return InfluenceScorer(model, factors).pairwise(DataLoader(queries, batch_size=256), tl)

    scorers["EK-FAC (all linear layers, final weights, true Fisher)"] = ekfac_scores
    rows = []
    for name, fn in scorers.items():
        t0 = time.perf_counter()
        try:
            scores = fn()  # [n_q, n_train], positive = helps
        except Exception as e:  # the EK-FAC scorer is developed concurrently; report, do not fail
            rows.append({"scorer": name, "error": f"{type(e).__name__}: {e}"})
            continue
        dt = time.perf_counter() - t0
        r = linear_datamodeling_score(getattr(scores, "pairwise", scores), masks, actual)  # constant queries count as 0
        rows.append({"scorer": name, "lds": r.lds, "seconds": dt})
    print(f"\n## Train-test quality: LDS on {args.lds_subsets} retrained 50% subsets x {len(queries)} test queries "
          f"(retraining took {t_retrain:.1f} s)")
    print(md_table(["scorer", "LDS (mean Spearman)", "scoring time"],
                   [[r["scorer"], f"not run: {r['error'][:120]}", ""] if "error" in r else
                    [r["scorer"], f"{r['lds']:.3f}", f"{1000 * r['seconds']:.0f} ms"] for r in rows]))
    return {"retrain_seconds": t_retrain, "rows": rows}


def cpu_fit(args, train, callbacks) -> float:
    """CPU seconds (``time.process_time``) of one fit."""
    c0 = time.process_time()
    fit_time(args, train, callbacks)
    return time.process_time() - c0


def compare_losses(args) -> dict:
    """Mislabel AP of Z0 with losses read from the training forward (the default) vs a probe pass
    at each snapshot, side by side on the same weights, and the CPU cost of each (module docstring)."""
    out: dict = {"seeds": [], "args": vars(args)}
    for seed in args.seeds:
        run_args = argparse.Namespace(**{**vars(args), "seed": seed})
        train_raw, _, flipped = digits_dataset(flip_fraction=0.1, seed=seed)
        train = IndexedDataset(train_raw)
        auto, probe = Z0Influence(probe=train, name="z0-auto"), Z0Influence(probe=train, name="z0-probe", losses_from="probe")
        _, _, root, _ = fit_time(run_args, train, [auto, probe])
        ra = load_z0(Path(root) / "influence" / "z0-auto" / "recording")
        rp = load_z0(Path(root) / "influence" / "z0-probe" / "recording")
        assert set(ra.manifest["probe_losses_at"]) == {"training_step"}, ra.manifest["probe_losses_at"]
        assert set(rp.manifest["probe_losses_at"]) == {"snapshot"}
        rows = {
            "final loss (baseline, exact)": rp.probe_losses[-1].double(),
            "mean loss, losses_from='auto' (training forward; default)": ra.self_influence("mean_loss"),
            "mean loss, losses_from='probe' (at the snapshots)": rp.self_influence("mean_loss"),
            "loss variance, losses_from='auto'": ra.self_influence("variance"),
            "loss variance, losses_from='probe'": rp.self_influence("variance"),
            "last training-step loss (auto's last row)": ra.probe_losses[-1].double(),
        }
        q = {k: quality(v, flipped) for k, v in rows.items()}
        out["seeds"].append({"seed": seed, "ap": {k: v[0] for k, v in q.items()}, "auroc": {k: v[1] for k, v in q.items()}})
        print(f"seed {seed}: " + ", ".join(f"{k}: AP {v[0]:.3f}" for k, v in q.items()), flush=True)
    names = list(out["seeds"][0]["ap"])
    print(f"\n## Where Z0's probe losses come from: mislabel detection ({len(args.seeds)} seeds, {args.epochs} epochs, "
          f"MLP 64-{args.hidden}-10)")
    table = []
    for k in names:
        aps = [s["ap"][k] for s in out["seeds"]]
        aucs = [s["auroc"][k] for s in out["seeds"]]
        sd = statistics.stdev(aps) if len(aps) > 1 else 0.0
        table.append([k, f"{statistics.mean(aps):.3f} ± {sd:.3f}", f"{statistics.mean(aucs):.3f}", ", ".join(f"{a:.3f}" for a in aps)])
    print(md_table(["scorer", "average precision (mean ± sd)", "AUROC", "AP per seed"], table))
    # CPU cost, interleaved in rotating order, medians
    run_args = argparse.Namespace(**{**vars(args), "seed": args.seeds[0]})
    train = IndexedDataset(digits_dataset(flip_fraction=0.1, seed=args.seeds[0])[0])
    settings = {
        "plain": lambda: [],
        "Z0Influence(probe=train) (auto)": lambda: [Z0Influence(probe=train)],
        "Z0Influence(probe=train, losses_from='probe')": lambda: [Z0Influence(probe=train, losses_from="probe")],
    }
    cpu_fit(run_args, train, settings["Z0Influence(probe=train) (auto)"]())  # warm-up
    times: dict[str, list[float]] = {k: [] for k in settings}
    keys = list(settings)
    for r in range(args.repeats):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            times[k].append(cpu_fit(run_args, train, settings[k]()))
    base = statistics.median(times["plain"])
    print(f"\n## CPU time of the fit ({args.repeats} rounds, medians; one torch thread)")
    print(md_table(["setting", "CPU s", "× plain", "every round"],
                   [[k, f"{statistics.median(v):.2f}", f"{statistics.median(v) / base:.2f}×", ", ".join(f"{t:.2f}" for t in v)]
                    for k, v in times.items()]))
    out["cpu"] = times
    return out


def gpt2_cost(args) -> dict:
    """CPU seconds of a GPT-2 small fit with and without Z0 (see the module docstring)."""
    import transformers

    from lightning_influence import lm_collate
    from lightning_influence.demos import CausalLMModule

    transformers.logging.set_verbosity_error()
    g = torch.Generator().manual_seed(0)
    train = IndexedDataset([{"input_ids": torch.randint(0, 50257, (128,), generator=g)} for _ in range(args.gpt2_sequences)])

    def fit(callbacks) -> tuple[float, float]:
        torch.manual_seed(0)
        model = CausalLMModule(transformers.GPT2LMHeadModel(transformers.GPT2Config()), lr=1e-4)
        root = tempfile.mkdtemp(prefix="bench_z0_gpt2_")
        t = make_trainer(args.gpt2_epochs, callbacks, root)
        loader = DataLoader(train, batch_size=4, shuffle=True, collate_fn=lm_collate, generator=torch.Generator().manual_seed(0))
        c0, w0 = time.process_time(), time.perf_counter()
        t.fit(model, loader)
        return time.process_time() - c0, time.perf_counter() - w0

    settings = {
        "plain": lambda: [],
        "Z0Influence(probe=train) (defaults: auto)": lambda: [Z0Influence(probe=train, probe_batch_size=4)],
        "Z0Influence(probe=train, losses_from='probe')": lambda: [Z0Influence(probe=train, probe_batch_size=4,
                                                                              losses_from="probe")],
    }
    steps = args.gpt2_epochs * -(-args.gpt2_sequences // 4)
    out = {}
    for k, make in settings.items():
        out[k] = fit(make())
        print(f"  {k}: {out[k][0]:.1f} s CPU, {out[k][1]:.1f} s wall", flush=True)
    base = out["plain"][0]
    print(f"\n## GPT-2 small (124M, vocabulary 50257), {args.gpt2_sequences} sequences x 128 tokens, batch 4, "
          f"{steps} steps, {torch.get_num_threads()} torch thread(s)")
    print(md_table(["setting", "CPU s", "× plain", "per step, CPU s", "wall s"],
                   [[k, f"{c:.1f}", f"{c / base:.2f}×", f"{c / steps:.2f}", f"{w:.1f}"] for k, (c, w) in out.items()]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--probe-batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--k", type=int, default=4, help="neighbours for the directional Z0 forms")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids oversubscription on shared CPUs)")
    p.add_argument("--n-query", type=int, default=100, help="test examples used as queries for LDS")
    p.add_argument("--lds-subsets", type=int, default=32, help="retrained 50%% subsets for LDS (0 = skip)")
    p.add_argument("--json", type=str, default=None, help="also write the figures to this JSON file")
    p.add_argument("--compare-losses", action="store_true",
                   help="only compare where the probe losses come from (losses_from='auto' vs 'probe'; see above)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of --compare-losses")
    p.add_argument("--gpt2", action="store_true", help="only the GPT-2 small cost (see above)")
    p.add_argument("--gpt2-sequences", type=int, default=40)
    p.add_argument("--gpt2-epochs", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.gpt2:
        out = gpt2_cost(args)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2))
        return
    if args.compare_losses:
        args.repeats = min(args.repeats, 3)
        out = compare_losses(args)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2))
        return

    train_raw, test_raw, flipped = digits_dataset(flip_fraction=0.1, seed=args.seed)
    train = IndexedDataset(train_raw)
    x, y = train_raw.tensors
    n = len(train)
    print(f"# Z0 benchmark: digits, n_train={n}, {int(flipped.sum())} flipped labels, MLP 64-{args.hidden}-10, "
          f"{args.epochs} epochs, batch {args.batch_size}, SGD lr {args.lr}; {machine()}")
    out: dict = {"args": vars(args)}

    # ---- 1. overhead: training alone vs with the callback (interleaved to share machine noise)
    t_plain, t_z0 = [], []
    for rep in range(2):
        t_plain.append(fit_time(args, train, [])[0])
        cb = Z0Influence(probe=train, every_n_epochs=1, probe_batch_size=args.probe_batch_size, losses_from="probe")
        dt, model, root, tr = fit_time(args, train, [cb])
        t_z0.append(dt)
    t_plain_m, t_z0_m = min(t_plain), min(t_z0)

    # probe pass (the callback's own code path) vs a plain no-grad forward over the same loader
    loader = DataLoader(train, batch_size=args.probe_batch_size, shuffle=False)
    model.eval()

    def plain_forward():
        with torch.no_grad():
            for ids, (xb, yb) in loader:
                F.cross_entropy(model(xb), yb, reduction="none")

    def probe_pass():
        with torch.no_grad():
            cb._evaluate(tr, model, cb._probe_loader, "probe")

    plain_forward(), probe_pass()  # warm-up
    fwd_times, probe_times = [], []
    for _ in range(args.repeats):  # interleaved so that both see the same machine load
        for fn, acc in ((plain_forward, fwd_times), (probe_pass, probe_times)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    t_fwd, t_probe = statistics.median(fwd_times), statistics.median(probe_times)
    model.train()
    record_each = (t_z0_m - t_plain_m) / args.epochs
    out["overhead"] = {
        "train_alone_s": t_plain_m, "train_with_z0_s": t_z0_m, "ratio_train": t_z0_m / t_plain_m,
        "plain_forward_s": t_fwd, "probe_pass_s": t_probe, "ratio_probe_vs_forward": t_probe / t_fwd,
        "extra_per_record_s": record_each, "extra_per_record_in_forwards": record_each / t_fwd,
        "num_params": int(sum(p.numel() for p in model.parameters())),
    }
    o = out["overhead"]
    print("\n## Overhead (min of 2 runs each; probe/forward medians of %d)" % args.repeats)
    print(md_table(["measure", "value"], [
        [f"training alone ({args.epochs} epochs)", f"{o['train_alone_s']:.2f} s"],
        [f"training with Z0Influence (probe = all {n} every epoch)", f"{o['train_with_z0_s']:.2f} s"],
        ["ratio with / without", f"{o['ratio_train']:.3f}x"],
        ["plain no-grad forward + per-example CE over the probe", f"{1000 * o['plain_forward_s']:.1f} ms"],
        ["Z0 probe pass over the same loader", f"{1000 * o['probe_pass_s']:.1f} ms"],
        ["probe pass / plain forward (target <= 1.2)", f"{o['ratio_probe_vs_forward']:.3f}x"],
        ["extra time per recording (probe + snapshot + Gram row + artifact)",
         f"{1000 * record_each:.1f} ms = {o['extra_per_record_in_forwards']:.2f} plain forwards"],
    ]))

    # ---- 2. mislabel detection: one more run that also records the queries and keeps snapshots
    queries = IndexedDataset(Subset(test_raw, range(args.n_query)), offset=100_000)
    cb = Z0Influence(probe=train, queries=queries, every_n_epochs=1, probe_batch_size=args.probe_batch_size,
                     keep_snapshots=True, losses_from="probe")
    _, model, root, _ = fit_time(args, train, [cb])
    res = load_z0(Path(root) / "influence" / "z0" / "recording")
    assert res.probe_ids.tolist() == list(range(n))
    rows = []

    def add(name, fn):
        t0 = time.perf_counter()
        s = fn()
        dt = time.perf_counter() - t0
        ap, auc = quality(s, flipped)
        rows.append((name, ap, auc, dt))

    add("final loss (baseline)", lambda: res.probe_losses[-1].double())
    add("Z0 loss variance", lambda: res.self_influence("variance"))
    add("Z0 mean loss", lambda: res.self_influence("mean_loss"))
    add(f"Z0 finite difference (k={args.k})", lambda: res.self_influence("finite_difference", k=args.k))
    add(f"Z0 least squares (k={args.k})", lambda: res.self_influence("least_squares", k=args.k))
    snaps = [res.snapshot(r) for r in range(res.num_checkpoints)]
    add(f"TracIn self-influence ({len(snaps)} ckpts, torch.func)", lambda: tracin_self_influence(model, snaps, x, y, args.lr))
    t_record = args.epochs * t_probe
    print(f"\n## Mislabel detection (10% flipped, {len(snaps)} checkpoints, random AP = {float(flipped.float().mean()):.3f})")
    print(md_table(["scorer", "average precision", "AUROC", "scoring time"],
                   [[name, f"{ap:.3f}", f"{auc:.3f}", f"{1000 * dt:.1f} ms"] for name, ap, auc, dt in rows]))
    print(f"\nZ0 recording cost for these scores: {args.epochs} probe passes = {t_record:.2f} s "
          f"(+ snapshots/Gram: {max(record_each - t_probe, 0) * args.epochs:.2f} s); TracIn needs the same "
          "snapshots plus per-example gradients.")
    out["mislabel"] = [{"scorer": r[0], "ap": r[1], "auroc": r[2], "seconds": r[3]} for r in rows]
    if args.lds_subsets > 0:
        out["lds"] = lds(args, res, model, train, train_raw, queries)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
