"""What the non-finite guard of EKFACInfluence costs (issue 11).

Since issue 11 a training batch's covariance sums go to a per-batch scratch; at the batch end they
are checked (one reduction per sum: NaN and inf propagate) and added to the epoch's sums, or the
whole batch is left out. Before, the hooks added straight into the epoch's sums. Measured side by
side in this one process (the direct path is the old code's two ``addmm_`` calls), one torch
thread, variants interleaved in alternating order, medians of ``--repeats``:

1. **Per update**, for one layer of input width ``a`` and output width ``o`` and ``n`` tokens:
   ``direct`` = ``update_activations`` + ``update_gradients`` into the epoch's accumulator;
   ``guarded`` = the same into the scratch + ``end_batch`` (check, add, clear). Wall and CPU time.
2. **End to end**: ``trainer.fit`` of ``MLPClassifier(64, 128, 10)`` on the 1,437 digits
   (batch 64, 10 epochs, SGD) with ``EKFACInfluence(update_every_n_steps=1, correction="none")``,
   guarded versus the direct path patched back in, versus no callback; plus the callback's own
   clock of its hooks (``hook_seconds``).

Memory: the scratch is one more ``a×a`` and ``o×o`` float32 (float64 for float64 models) matrix
per tracked layer, the size of the factors themselves.

Run: ``.venv/bin/python benchmarks/bench_crash_safety.py`` (``--quick`` for fewer repeats).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import torch


def _time(fn, repeats):
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def per_update(repeats: int) -> list[dict]:
    from lightning_influence.ekfac.covariance import CovarianceAccumulator
    from lightning_influence.ekfac.online import AccumulationOptions, OnlineFactors
    from lightning_influence.layers import select_layers
    from lightning_influence.task import ClassificationTask

    rows = []
    for a_dim, d_out, tokens in [(65, 128, 64), (129, 10, 64), (257, 256, 512), (1025, 1024, 512), (1025, 1024, 4096)]:
        g = torch.Generator().manual_seed(0)
        a = torch.randn(tokens, 1, a_dim, generator=g)
        ds = torch.randn(tokens, 1, d_out, generator=g)
        layer = select_layers(torch.nn.Sequential(torch.nn.Linear(a_dim - 1, d_out)))[0]
        epoch = CovarianceAccumulator(a_dim, d_out)
        state = OnlineFactors([layer], AccumulationOptions(update_every_n_steps=1))
        batch = (torch.arange(tokens), (torch.zeros(tokens, 1), torch.zeros(tokens, dtype=torch.long)))
        task = ClassificationTask()

        def direct():
            epoch.update_activations(a)
            epoch.update_gradients(ds, n_examples=tokens)

        def guarded():
            state.begin_batch(batch, task, 0, 1)
            state.observe(layer, a, ds, None)
            state.end_batch()

        for fn in (direct, guarded, direct, guarded):  # warm-up
            fn()
        reps = max(repeats, 5) if tokens * a_dim < 10**6 else max(repeats // 4, 5)
        times = {"direct": [], "guarded": []}
        for i in range(2 * reps):
            order = ("direct", "guarded") if i % 2 == 0 else ("guarded", "direct")
            for name in order:
                times[name].append(_time(direct if name == "direct" else guarded, 1))
        d = (statistics.median(t[0] for t in times["direct"]), statistics.median(t[1] for t in times["direct"]))
        gt = (statistics.median(t[0] for t in times["guarded"]), statistics.median(t[1] for t in times["guarded"]))
        rows.append({"a": a_dim, "o": d_out, "tokens": tokens, "direct_ms": 1e3 * d[0], "guarded_ms": 1e3 * gt[0],
                     "wall_ratio": gt[0] / d[0], "cpu_ratio": gt[1] / max(d[1], 1e-9)})
    return rows


def end_to_end(repeats: int) -> dict:
    from torch.utils.data import DataLoader

    from common import make_trainer

    from lightning_influence import EKFACInfluence, IndexedDataset
    from lightning_influence.demos import MLPClassifier, digits_dataset
    from lightning_influence.ekfac import online
    from lightning_influence.ekfac.covariance import n_real_examples

    import logging

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    train, _, _ = digits_dataset()
    loader = DataLoader(IndexedDataset(train), batch_size=64)

    def direct_observe(self, layer, a, ds, mask):  # the code before issue 11: straight into the epoch's sums
        acc = self.epoch_accs[layer.name]
        acc.update_activations(a, mask)
        acc.update_gradients(ds, mask, n_examples=n_real_examples(a, mask), scale=self.grad_factor)

    guarded_observe = online.OnlineFactors.observe

    def fit(variant):
        online.OnlineFactors.observe = direct_observe if variant == "direct" else guarded_observe
        cbs = [] if variant == "none" else [EKFACInfluence(update_every_n_steps=1, correction="none", dirpath=f"/tmp/bench_cs_{os.getpid()}")]
        torch.manual_seed(0)
        t = make_trainer(10, cbs)
        w0, c0 = time.perf_counter(), time.process_time()
        t.fit(MLPClassifier(hidden=128), loader)
        out = (time.perf_counter() - w0, time.process_time() - c0, cbs[0].hook_seconds if cbs else 0.0)
        online.OnlineFactors.observe = guarded_observe
        return out

    fit("none")
    times = {"none": [], "direct": [], "guarded": []}
    variants = list(times)
    for i in range(repeats):
        for name in (variants if i % 2 == 0 else variants[::-1]):
            times[name].append(fit(name))
    med = {k: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v), statistics.median(t[2] for t in v))
           for k, v in times.items()}
    return {"none_s": med["none"][0], "direct_s": med["direct"][0], "guarded_s": med["guarded"][0],
            "direct_hook_s": med["direct"][2], "guarded_hook_s": med["guarded"][2],
            "overhead_direct": med["direct"][0] / med["none"][0] - 1, "overhead_guarded": med["guarded"][0] / med["none"][0] - 1}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--fit-repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    if args.quick or os.environ.get("LI_BENCH_QUICK"):
        args.repeats, args.fit_repeats = 10, 2
    torch.set_num_threads(args.threads)
    print(f"load average at start: {os.getloadavg()}")
    print("\n1. per update (one layer): direct = old path, guarded = scratch + check + add")
    print(f"{'a':>6} {'o':>6} {'tokens':>7} {'direct ms':>10} {'guarded ms':>11} {'wall ratio':>11} {'cpu ratio':>10}")
    for r in per_update(args.repeats):
        print(f"{r['a']:>6} {r['o']:>6} {r['tokens']:>7} {r['direct_ms']:>10.3f} {r['guarded_ms']:>11.3f} "
              f"{r['wall_ratio']:>11.2f} {r['cpu_ratio']:>10.2f}")
    e = end_to_end(args.fit_repeats)
    print("\n2. end to end: MLP(64, 128, 10), 1,437 digits, batch 64, 10 epochs, update_every_n_steps=1, correction='none'")
    print(f"no callback {e['none_s']:.2f} s; direct {e['direct_s']:.2f} s (+{100 * e['overhead_direct']:.1f} %, hooks "
          f"{e['direct_hook_s']:.2f} s); guarded {e['guarded_s']:.2f} s (+{100 * e['overhead_guarded']:.1f} %, hooks "
          f"{e['guarded_hook_s']:.2f} s)")
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
