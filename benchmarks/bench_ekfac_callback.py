"""EKFACInfluence callback benchmark (issue 3): training overhead, time to factors, LDS quality.

Three comparisons, each run side by side in this one process (warm-up first, then the
variants interleaved in rotating order, ``time.perf_counter``, medians):

1. **Overhead** — ``trainer.fit`` wall time with ``EKFACInfluence`` (defaults and other settings)
   divided by the time without any callback, on

   * ``mlp``: ``MLPClassifier(64, hidden=128, 10)``, SGD lr 0.05, the 1,437 digits training
     examples, batch 64, 10 epochs (230 steps);
   * ``gpt_neox``: a 2-layer GPT-NeoX (hidden 128, 4 heads, vocab 128), AdamW lr 3e-3, 320
     generated bigram-chain sequences of 24-40 tokens, batch 16, 3 epochs (60 steps).

   The callback's own clocks split its cost into per-step hook time (``cb.hook_seconds``) and
   the one-time fit-end cost (``cb.fit_seconds``: eigendecomposition, correction, saving).
2. **Time to factors on disk** — ``trainer.fit`` with the callback (factors written at the end)
   versus ``trainer.fit`` without it followed by kronfluence 1.0.1's ``fit_all_factors`` on the
   same trained model, the same training data and the same tracked layers (EK-FAC, empirical
   Fisher, float32 covariances, float64 eigendecomposition; kronfluence writes safetensors).
3. **Quality (LDS)** on digits: a ``MLPClassifier(hidden=32)`` trained with Lightning (SGD,
   batch 64) on the 1,437 training examples; ``--lds-models`` random 50 % subsets, each
   retrained from the same initial weights with the same recipe (a plain PyTorch loop that
   reproduces the Lightning run exactly, checked on the full set); 100 test queries. For each
   query the Spearman correlation over subsets between the subset's summed scores and the
   retrained model's **negative** query loss (scores are positive when a training example
   lowers the query loss), averaged over queries. Scores from: callback factors (several
   settings), ``fit_factors`` at the final weights, and kronfluence at the final weights; all
   with the heuristic damping 0.1 × mean(Λ) per layer.

Run: ``.venv/bin/python benchmarks/bench_ekfac_callback.py`` (``make bench`` runs it after
installing kronfluence). ``--quick`` (or ``LI_BENCH_QUICK=1``) runs a shorter version (fewer
repeats and LDS models). ``--profile`` prints where the callback's time goes instead.
The full run (not ``--quick``, default sections, cases and settings) rewrites the generated part
of ``docs/benchmarks_ekfac_callback.md`` (between the ``results`` markers); ``--no-doc`` leaves
it alone. Runs with one torch thread by default (``--threads``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from common import (
    LDS_BATCH, LDS_EPOCHS, LDS_HIDDEN, LDS_LR, LDS_QUERIES, Case, MLPCase, lds, make_trainer, md_table, quiet,
    retrained_query_losses, run_meta, silence_loggers, train_plain, write_results,
)
from kronfluence_tasks import KronfluenceEKFAC

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks_ekfac_callback.md"

warnings.filterwarnings("ignore")


# overhead / time-to-factors cases
LM_VOCAB, LM_HIDDEN, LM_LAYERS, LM_HEADS = 128, 128, 2, 4
LM_N, LM_MIN_LEN, LM_MAX_LEN, LM_BATCH, LM_EPOCHS, LM_LR = 320, 24, 40, 16, 3, 3e-3
# widths x run lengths (issue 13): the gpt_neox case with sequences of exactly 32 tokens
WIDTHS, RUN_LENGTHS, WIDTH_SEQ_LEN = (128, 256, 512), (3, 10, 30), 32


# ------------------------------------------------------------------------------------------
# Cases (the MLP case is common.MLPCase)
# ------------------------------------------------------------------------------------------
class LMCase(Case):
    def __init__(self, n=LM_N, epochs=LM_EPOCHS, name="gpt_neox", hidden=LM_HIDDEN, min_len=LM_MIN_LEN, max_len=LM_MAX_LEN):
        from lightning_influence.demos import synthetic_token_dataset
        from lightning_influence.data import lm_collate

        self.train = synthetic_token_dataset(n, vocab_size=LM_VOCAB, min_len=min_len, max_len=max_len, seed=0)
        self.collate = lm_collate
        self.epochs, self.name, self.hidden = epochs, name, hidden
        n_tok = sum(len(d["input_ids"]) for d in self.train)
        lengths = f"{min_len}-{max_len}" if min_len != max_len else f"{min_len}"
        self.note = (f"GPT-NeoX {LM_LAYERS} layers, hidden {hidden}, {LM_HEADS} heads, vocab {LM_VOCAB}, AdamW lr {LM_LR}, "
                     f"{n} generated sequences of {lengths} tokens ({n_tok:,} tokens), batch {LM_BATCH}, "
                     f"{epochs} epochs ({epochs * -(-n // LM_BATCH)} steps); all 9 Linear layers tracked (incl. the output layer)")

    def model(self):
        from lightning_influence.demos import CausalLMModule, tiny_causal_lm

        lm = tiny_causal_lm("gpt_neox", vocab_size=LM_VOCAB, hidden=self.hidden, layers=LM_LAYERS, heads=LM_HEADS, max_len=64, seed=0)
        return CausalLMModule(lm, lr=LM_LR)

    def loader(self, dataset=None):
        return DataLoader(dataset if dataset is not None else self.train, batch_size=LM_BATCH, shuffle=True,
                          collate_fn=self.collate, generator=torch.Generator().manual_seed(0))


class WidthCase(LMCase):
    """The issue-13 run: GPT-NeoX, 320 sequences of exactly 32 tokens, batch 16, at a given width and length."""

    def __init__(self, hidden: int, epochs: int):
        super().__init__(epochs=epochs, name=f"h{hidden}/{epochs}ep", hidden=hidden, min_len=WIDTH_SEQ_LEN, max_len=WIDTH_SEQ_LEN)


class Clock:
    """A callback placed after the one measured: its ``on_train_end`` runs right after
    ``EKFACInfluence`` wrote its factors (before ``on_fit_end``'s examples and HTML report)."""

    def __new__(cls):
        import lightning as L

        class _Clock(L.Callback):
            wall = cpu = None

            def on_train_end(self, trainer, pl_module):
                self.wall, self.cpu = time.perf_counter(), time.process_time()

        return _Clock()


def run_fit(case: Case, make_cb: Optional[Callable[[str], Any]], workdir: str, epochs: Optional[int] = None):
    """Build a fresh model, fit it (optionally with a callback); returns (seconds, cb, model).

    Also sets ``run_fit.last_cpu`` (CPU seconds of the whole fit) and ``run_fit.last_to_factors``
    / ``run_fit.last_to_factors_cpu`` (wall / CPU seconds from the start of ``fit`` to the end of
    ``on_train_end``, where the factors are on disk; without a callback, the end of training).
    """
    model = case.model()
    loader = case.loader()
    d = tempfile.mkdtemp(dir=workdir)
    cb = make_cb(os.path.join(d, "ekfac")) if make_cb is not None else None
    clock = Clock()
    trainer = make_trainer(epochs or case.epochs, ([cb] if cb is not None else []) + [clock], d)
    with quiet():
        c0, t0 = time.process_time(), time.perf_counter()
        trainer.fit(model, loader)
        seconds = time.perf_counter() - t0
    run_fit.last_cpu = time.process_time() - c0  # CPU seconds of this process (less sensitive to other jobs)
    run_fit.last_to_factors = clock.wall - t0
    run_fit.last_to_factors_cpu = clock.cpu - c0
    return seconds, cb, model


def ekfac(**kw) -> Callable[[str], Any]:
    from lightning_influence import EKFACInfluence

    return lambda path: EKFACInfluence(dirpath=path, **kw)


EVERY_STEP = {"update_every_n_steps": 1, "correction_max_examples": None}
OVERHEAD_VARIANTS: dict[str, dict] = {
    "defaults (= update_every_n_steps=8, correction='pass' capped at 1,024 examples)": {},
    "every step, full correction pass": dict(EVERY_STEP),
    "update_every_n_steps=4": {"update_every_n_steps": 4},
    "epochs=1": {"epochs": 1},
    "correction='online'": {"correction": "online"},
    "correction='online', every step": {"correction": "online", "update_every_n_steps": 1},
    "correction='none'": {"correction": "none"},
}
# the 'widths' section (issue 13)
WIDTH_VARIANTS: dict[str, dict] = {
    "defaults": {},
}
# issue 13: settings behind the defaults (overhead and LDS); "0.2.0 defaults" spells out the old ones
V020 = {"eigh_dtype": "float64", "correction_tol": None, "correction_max_examples": 1024, "update_every_n_steps": 8}
ISSUE13_VARIANTS: dict[str, dict] = {
    "0.2.0 defaults": dict(V020),
    "eigh float32": {**V020, "eigh_dtype": "float32"},
    "correction_max_examples=256": {**V020, "eigh_dtype": "float32", "correction_max_examples": 256},
    "correction_max_examples=512": {**V020, "eigh_dtype": "float32", "correction_max_examples": 512},
    "correction_tol=0.2": {**V020, "eigh_dtype": "float32", "correction_tol": 0.2},
    "correction_tol=0.25": {**V020, "eigh_dtype": "float32", "correction_tol": 0.25},
    "correction_tol=0.3": {**V020, "eigh_dtype": "float32", "correction_tol": 0.3},
    "correction_tol=0.4": {**V020, "eigh_dtype": "float32", "correction_tol": 0.4},
    "update_every_n_steps=16": {**V020, "eigh_dtype": "float32", "update_every_n_steps": 16},
    "update_every_n_steps=16, correction_tol=0.25": {**V020, "eigh_dtype": "float32", "update_every_n_steps": 16,
                                                      "correction_tol": 0.25},
    "update_every_n_steps=4": {**V020, "eigh_dtype": "float32", "update_every_n_steps": 4},
    "update_every_n_steps=32": {**V020, "eigh_dtype": "float32", "update_every_n_steps": 32},
    "ema_decay=0.5": {**V020, "eigh_dtype": "float32", "ema_decay": 0.5},
    "update_every_n_steps=16, ema_decay=0.5": {**V020, "eigh_dtype": "float32", "update_every_n_steps": 16, "ema_decay": 0.5},
    "correction_tol=0.2, correction_max_examples=None": {**V020, "eigh_dtype": "float32", "correction_tol": 0.2,
                                                          "correction_max_examples": None},
    "update_every_n_steps=16, correction_tol=0.2": {**V020, "eigh_dtype": "float32", "update_every_n_steps": 16,
                                                     "correction_tol": 0.2},
}
# further settings, measured on request (``--variants``)
EXTRA_VARIANTS: dict[str, dict] = {
    "update_every_n_steps=8": {"update_every_n_steps": 8},
    "correction='online', update_every_n_steps=8": {"correction": "online", "update_every_n_steps": 8},
    "update_every_n_steps=4, correction_max_batches=5": {"update_every_n_steps": 4, "correction_max_batches": 5},
    "update_every_n_steps=8, correction_max_batches=5": {"update_every_n_steps": 8, "correction_max_batches": 5},
    "max_examples_per_update=4": {"max_examples_per_update": 4},
    "epochs=1, update_every_n_steps=4": {"epochs": 1, "update_every_n_steps": 4},
}


# ------------------------------------------------------------------------------------------
# 1. overhead
# ------------------------------------------------------------------------------------------
def bench_overhead(case: Case, variants: dict[str, dict], repeats: int, workdir: str) -> dict:
    names = ["no callback"] + list(variants)
    makers = {"no callback": None, **{k: ekfac(**v) for k, v in variants.items()}}
    # warm-up: one short fit per variant (imports, allocator, autograd graph caches)
    for n in names:
        run_fit(case, makers[n], workdir, epochs=1)
    times = {n: [] for n in names}
    cpu = {n: [] for n in names}
    hook = {n: [] for n in names}
    fit_end = {n: [] for n in names}
    eigh = {n: [] for n in names}
    corr = {n: [] for n in names}
    loads: list[float] = []
    to_factors = {n: [] for n in names}
    to_factors_cpu = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        for n in names[k:] + names[:k]:  # rotate the order between repeats
            t, cb, _ = run_fit(case, makers[n], workdir)
            times[n].append(t)
            cpu[n].append(run_fit.last_cpu)
            to_factors[n].append(run_fit.last_to_factors)
            to_factors_cpu[n].append(run_fit.last_to_factors_cpu)
            if cb is not None:
                hook[n].append(cb.hook_seconds)
                fit_end[n].append(cb.fit_seconds)
                split = getattr(cb.state, "seconds", {}) if cb.state is not None else {}
                eigh[n].append(split.get("eigh", float("nan")))
                corr[n].append(split.get("correction", float("nan")))
        loads.append(os.getloadavg()[0])
        print(f"   [{case.name}] repeat {r + 1}/{repeats} (load {loads[-1]:.1f}): "
              + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names), flush=True)
    base = statistics.median(times["no callback"])
    base_cpu = statistics.median(cpu["no callback"])
    base_tf, base_tf_cpu = statistics.median(to_factors["no callback"]), statistics.median(to_factors_cpu["no callback"])
    rows = []
    for n in names:
        t = statistics.median(times[n])
        row = {"variant": n, "fit_s": t, "ratio": t / base, "all_s": times[n], "cpu_s": statistics.median(cpu[n]),
               "cpu_ratio": statistics.median(cpu[n]) / base_cpu, "to_factors_s": statistics.median(to_factors[n]),
               "to_factors_ratio": statistics.median(to_factors[n]) / base_tf,
               "to_factors_cpu_ratio": statistics.median(to_factors_cpu[n]) / base_tf_cpu, "all_to_factors_s": to_factors[n]}
        if n != "no callback":
            h, f = statistics.median(hook[n]), statistics.median(fit_end[n])
            row.update(hook_s=h, fit_end_s=f, ratio_without_fit_end=(t - f) / base,
                       per_step_ratio=(t - f - base) / base, eigh_s=statistics.median(eigh[n]),
                       correction_s=statistics.median(corr[n]), all_cpu_s=cpu[n])
        rows.append(row)
    return {"case": case.name, "note": case.note, "repeats": repeats, "rows": rows, "load": loads,
            "hidden": getattr(case, "hidden", None), "epochs": case.epochs}


def kron_layers(case: Case, model: nn.Module) -> tuple[nn.Module, list[str]]:
    """The module kronfluence sees and the names of the layers our default tracks, in it."""
    from lightning_influence.layers import select_layers

    names = [l.name for l in select_layers(model, None)]
    if isinstance(case, LMCase):  # the inner transformers model (batches are dicts of tensors)
        return model.model, [n.removeprefix("model.") for n in names]
    return model, names


# ------------------------------------------------------------------------------------------
# 2. time to factors on disk
# ------------------------------------------------------------------------------------------
def bench_time_to_factors(case: Case, variants: dict[str, dict], repeats: int, workdir: str) -> dict:
    batch = LM_BATCH if isinstance(case, LMCase) else case.batch
    kind = "lm" if isinstance(case, LMCase) else "mlp"

    def kron_path() -> tuple[float, float, float]:
        t0 = time.perf_counter()
        t_train, _, model = run_fit(case, None, workdir)
        t1 = time.perf_counter()
        inner, modules = kron_layers(case, model)
        k = KronfluenceEKFAC(inner, kind, modules, case.collate, tempfile.mkdtemp(dir=workdir))
        k.fit(case.train, batch)
        t2 = time.perf_counter()
        return t2 - t0, t_train, t2 - t1

    def ours_path(kw) -> tuple[float, float]:
        t0 = time.perf_counter()
        t_train, cb, _ = run_fit(case, ekfac(**kw), workdir)
        assert cb.factors_path.exists()
        return time.perf_counter() - t0, cb.fit_seconds

    # warm-up (short fits; kronfluence on a small subset)
    _, _, m = run_fit(case, None, workdir, epochs=1)
    inner, modules = kron_layers(case, m)
    KronfluenceEKFAC(inner, kind, modules, case.collate, tempfile.mkdtemp(dir=workdir)).fit(Subset(case.train, range(4 * batch)), batch)
    for kw in variants.values():
        run_fit(case, ekfac(**kw), workdir, epochs=1)

    names = ["kronfluence"] + list(variants)
    res = {n: [] for n in names}
    kron_parts = []
    for r in range(repeats):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            if n == "kronfluence":
                total, t_train, t_kron = kron_path()
                res[n].append(total)
                kron_parts.append((t_train, t_kron))
            else:
                total, _ = ours_path(variants[n])
                res[n].append(total)
        print(f"   [{case.name}] repeat {r + 1}/{repeats}: " + ", ".join(f"{n} {res[n][-1]:.2f}s" for n in names), flush=True)
    kron_t = statistics.median(res["kronfluence"])
    rows = [{"variant": "train, then kronfluence fit_all_factors", "total_s": kron_t, "ratio": 1.0, "all_s": res["kronfluence"],
             "train_s": statistics.median(p[0] for p in kron_parts), "kron_fit_s": statistics.median(p[1] for p in kron_parts)}]
    for n in variants:
        t = statistics.median(res[n])
        rows.append({"variant": f"train with EKFACInfluence({n})", "total_s": t, "ratio": t / kron_t, "all_s": res[n]})
    return {"case": case.name, "note": case.note, "repeats": repeats, "rows": rows}


# ------------------------------------------------------------------------------------------
# 3. LDS
# ------------------------------------------------------------------------------------------
def bench_lds(n_models: int, workdir: str, variants: dict[str, dict]) -> dict:
    from lightning_influence.ekfac.fit import fit_factors
    from lightning_influence.ekfac.scorer import InfluenceScorer

    case = MLPCase(hidden=LDS_HIDDEN, lr=LDS_LR, batch=LDS_BATCH, epochs=LDS_EPOCHS, name="lds")
    query = TensorDataset(*(t[:LDS_QUERIES] for t in case.test.tensors))
    train_unshuffled = DataLoader(case.train, batch_size=256, shuffle=False)
    query_loader = DataLoader(query, batch_size=LDS_QUERIES, shuffle=False)
    n = len(case.train)

    t0 = time.perf_counter()
    # the model(s) explained: Lightning with the callback (one fit per callback setting)
    trained = {}
    for name, kw in variants.items():
        _, cb, model = run_fit(case, ekfac(**kw), workdir)
        trained[name] = (cb.factors, model.eval())
    final = next(iter(trained.values()))[1]
    same_weights = max(
        max(float((p - q).abs().max()) for p, q in zip(final.parameters(), m.parameters())) for _, m in trained.values()
    )
    plain_full = train_plain(case, case.train)
    plain_vs_lightning = max(float((p - q).abs().max()) for p, q in zip(final.parameters(), plain_full.parameters()))
    x, y = case.test.tensors
    with torch.no_grad():
        test_acc = float((final(x).argmax(-1) == y).float().mean())
        train_acc = float((final(case.train.tensors[0]).argmax(-1) == case.train.tensors[1]).float().mean())

    def scores_for(factors) -> torch.Tensor:
        return InfluenceScorer(final, factors, damping=None).pairwise(query_loader, train_unshuffled).pairwise.detach().float()

    scores = {f"callback: {name}": scores_for(f) for name, (f, _) in trained.items()}
    offline = fit_factors(final, DataLoader(case.train, batch_size=LDS_BATCH, shuffle=False), fisher="empirical")
    scores["offline fit_factors (final weights)"] = scores_for(offline)
    try:
        k = KronfluenceEKFAC(final, "mlp", ["net.0", "net.2"], None, tempfile.mkdtemp(dir=workdir), name="lds")
        k.fit(case.train, LDS_BATCH)
        scores["kronfluence 1.0.1 (final weights)"] = k.pairwise(query, case.train, LDS_QUERIES, 256).detach().float()
    except ImportError as e:  # kronfluence not installed: skip that row
        print(f"   kronfluence unavailable ({e}); skipping its LDS row", flush=True)
    t_scores = time.perf_counter() - t0

    # retrained models on random halves
    t1 = time.perf_counter()
    masks, losses = retrained_query_losses(case, query, n_models)
    t_retrain = time.perf_counter() - t1

    results = {name: lds(s, masks, losses) for name, s in scores.items()}
    ref = results["offline fit_factors (final weights)"]["per_query"]
    n_lambda = {f"callback: {name}": f.n_lambda_examples for name, (f, _) in trained.items()}
    n_lambda["offline fit_factors (final weights)"] = offline.n_lambda_examples
    for name, r in results.items():
        r["correction_examples"] = n_lambda.get(name)
        d = torch.tensor(r["per_query"], dtype=torch.float64) - torch.tensor(ref, dtype=torch.float64)
        r["diff_vs_offline"] = float(d.mean())
        r["diff_se"] = float(d.std() / len(d) ** 0.5)
        r["spearman_vs_offline_scores"] = _flat_spearman(scores[name], scores["offline fit_factors (final weights)"])
    return {
        "note": case.note, "n_models": n_models, "n_train": n, "n_query": LDS_QUERIES, "test_acc": test_acc, "train_acc": train_acc,
        "same_weights_across_callback_settings": same_weights, "plain_vs_lightning_max_abs": plain_vs_lightning,
        "scores_s": t_scores, "retrain_s": t_retrain,
        "rows": [{"scores": name, **{k: v for k, v in r.items() if k != "per_query"}} for name, r in results.items()],
    }


def _flat_spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from lightning_influence.evaluate import spearman

    return spearman(a, b)


LDS_VARIANTS: dict[str, dict] = {
    "defaults": {},
    "every step, full correction pass": dict(EVERY_STEP),
    "correction='online'": {"correction": "online"},
    "epochs=1, every step": {"epochs": 1, **EVERY_STEP},
    "epochs=5, every step": {"epochs": 5, **EVERY_STEP},
    "ema_decay=0.5, every step": {"ema_decay": 0.5, **EVERY_STEP},
    "correction='none'": {"correction": "none"},
}


# ------------------------------------------------------------------------------------------
# profiling
# ------------------------------------------------------------------------------------------
def profile(case: Case, workdir: str, rows: int = 25) -> None:
    import cProfile
    import pstats

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    run_fit(case, ekfac(), workdir, epochs=1)
    pr = cProfile.Profile()
    pr.enable()
    t, cb, _ = run_fit(case, ekfac(), workdir)
    pr.disable()
    print(f"\n==== {case.name}: fit with EKFACInfluence() {t:.2f}s (hook {cb.hook_seconds:.2f}s, fit-end {cb.fit_seconds:.2f}s)")
    s = io.StringIO()
    st = pstats.Stats(pr, stream=s).sort_stats("cumulative")
    st.print_stats("lightning_influence", rows)
    print(s.getvalue())
    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        run_fit(case, ekfac(), workdir)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=50))
    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        run_fit(case, None, workdir)
    print("---- without callback ----")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=50))


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------
def fmt_overhead(res: list[dict]) -> str:
    rows = []
    for r in res:
        for row in r["rows"]:
            if row["variant"] == "no callback":
                base = row["fit_s"]
                rows.append([r["case"], "no callback", f"{row['fit_s']:.2f}", "1.00", "1.00", "–", "–", "–", "–"])
            else:
                rows.append([r["case"], f"`{row['variant']}`", f"{row['fit_s']:.2f}", f"**{row['ratio']:.2f}**", f"{row['cpu_ratio']:.2f}",
                             f"{row['hook_s']:.2f}", f"{row['fit_end_s']:.2f}", f"{row['fit_s'] - base - row['hook_s'] - row['fit_end_s']:.2f}",
                             f"{row['ratio_without_fit_end']:.2f}"])
    return md_table(["case", "setting", "fit wall (s)", "**ratio** (wall)", "ratio (CPU time)", "hook time `cb.hook_seconds` (s)",
                     "fit-end `cb.fit_seconds` (s)", "other extra time (s)", "ratio without fit-end"], rows)


def fmt_widths(res: list[dict]) -> str:
    rows = []
    for r in res:
        base = next(row for row in r["rows"] if row["variant"] == "no callback")
        load = f"{min(r['load']):.1f}–{max(r['load']):.1f}" if r.get("load") else "?"
        for row in r["rows"]:
            if row["variant"] == "no callback":
                continue
            rows.append([r["hidden"], r["epochs"], f"`{row['variant']}`", f"{base['to_factors_s']:.1f}",
                         f"**{row['to_factors_ratio']:.2f}**", f"{row['to_factors_cpu_ratio']:.2f}", f"{row['ratio']:.2f}",
                         f"{row['hook_s']:.2f}", f"{row['eigh_s']:.2f}", f"{row['correction_s']:.2f}", f"{row['fit_end_s']:.2f}",
                         f"{(row['to_factors_s'] - row['fit_end_s']) / base['to_factors_s']:.2f}", load])
    return md_table(["hidden", "epochs", "setting", "training (s)", "**to factors on disk** (wall)", "to factors (CPU)",
                     "whole fit (wall)", "per-step hook (s)", "eigh (s)", "correction (s)", "fit end (s)",
                     "to factors without fit end", "load"], rows)


def fmt_ttf(res: list[dict]) -> str:
    rows = []
    for r in res:
        for row in r["rows"]:
            extra = ""
            if "kron_fit_s" in row:
                extra = f" (training {row['train_s']:.2f} s + kronfluence {row['kron_fit_s']:.2f} s)"
            rows.append([r["case"], f"{row['variant']}{extra}", f"{row['total_s']:.2f}", f"**{row['ratio']:.2f}**"])
    return md_table(["case", "path", "start of training → factors on disk (s)", "ratio vs kronfluence path"], rows)


def fmt_lds(r: dict) -> str:
    rows = [[row["scores"], f"{row['lds']:.4f} ± {row['se']:.4f}", f"{row['diff_vs_offline']:+.4f} ± {row['diff_se']:.4f}",
             f"{row['spearman_vs_offline_scores']:.4f}",
             "–" if row.get("correction_examples") is None else f"{row['correction_examples']:,}"] for row in r["rows"]]
    return md_table(["scores from", "LDS (± s.e. over queries)", "LDS − offline (paired ± s.e.)", "Spearman of scores vs offline",
                     "correction examples"], rows)


def results_markdown(out: dict) -> str:
    m = out["meta"]
    parts = [f"Generated by `benchmarks/bench_ekfac_callback.py{' --quick' if m['quick'] else ''}` on {m['date']} "
             f"({m['machine']}); total {m['total_s']:.0f} s."]
    if out.get("overhead"):
        parts.append("### 1. Training-time overhead (median of "
                     f"{out['overhead'][0]['repeats']} interleaved runs)\n")
        parts.append("\n".join(f"- `{r['case']}`: {r['note']}" for r in out["overhead"]) + "\n")
        parts.append(fmt_overhead(out["overhead"]))
        parts.append("All runs (s): " + "; ".join(f"{r['case']} {row['variant']}: {', '.join(f'{t:.2f}' for t in row['all_s'])}"
                                                   for r in out["overhead"] for row in r["rows"]))
    if out.get("time_to_factors"):
        parts.append(f"### 2. Time from the start of training to factors on disk (median of {out['time_to_factors'][0]['repeats']})\n")
        parts.append(fmt_ttf(out["time_to_factors"]))
        parts.append("All runs (s): " + "; ".join(f"{r['case']} {row['variant']}: {', '.join(f'{t:.2f}' for t in row['all_s'])}"
                                                   for r in out["time_to_factors"] for row in r["rows"]))
    if out.get("lds"):
        r = out["lds"]
        parts.append(f"### 3. Quality: LDS on digits ({r['n_models']} retrained models, {r['n_query']} queries)\n")
        parts.append(f"Model: {r['note']}; final test accuracy {r['test_acc']:.3f}, train accuracy {r['train_acc']:.3f}. "
                     f"Max |Δw| between the Lightning runs with different callback settings: {r['same_weights_across_callback_settings']:.1e}; "
                     f"between the Lightning run and the plain-loop recipe used for retraining: {r['plain_vs_lightning_max_abs']:.1e}. "
                     f"Scoring {r['scores_s']:.0f} s, retraining {r['retrain_s']:.0f} s.\n")
        parts.append(fmt_lds(r))
    if out.get("widths"):
        parts.append("### Widths and run lengths\n")
        parts.append(fmt_widths(out["widths"]))
    return "\n\n".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", default=os.environ.get("LI_BENCH_QUICK") == "1",
                   help="shorter run (also LI_BENCH_QUICK=1): 1 repeat, 2 overhead settings, 50 LDS models")
    p.add_argument("--sections", nargs="+", default=["overhead", "ttf", "lds"], choices=["overhead", "ttf", "lds", "widths"],
                   help="'widths' (issue 13: the defaults on GPT-NeoX at --widths x --run-lengths) runs only when named")
    p.add_argument("--widths", nargs="+", type=int, default=list(WIDTHS), help="hidden sizes of the 'widths' section")
    p.add_argument("--run-lengths", nargs="+", type=int, default=list(RUN_LENGTHS), help="epochs of the 'widths' section")
    p.add_argument("--width-variants", nargs="+", default=None, metavar="NAME",
                   help="settings timed in the 'widths' section (names from WIDTH_VARIANTS / OVERHEAD_VARIANTS / EXTRA_VARIANTS)")
    p.add_argument("--cases", nargs="+", default=["mlp", "gpt_neox"], choices=["mlp", "gpt_neox"])
    p.add_argument("--repeats", type=int, default=None, help="timed runs per setting (median; default 3, quick 1)")
    p.add_argument("--lds-models", type=int, default=None, help="retrained models for LDS (default 100, quick 50)")
    p.add_argument("--profile", action="store_true", help="print cProfile/torch.profiler tables of the callback instead")
    p.add_argument("--no-doc", action="store_true", help=f"do not rewrite the results in {DOC.relative_to(ROOT)}")
    p.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                   help="overhead settings to measure (names from OVERHEAD_VARIANTS / EXTRA_VARIANTS; default: OVERHEAD_VARIANTS)")
    p.add_argument("--lds-variants", nargs="+", default=None, metavar="NAME",
                   help="callback settings scored in the LDS section (names from LDS_VARIANTS / EXTRA_VARIANTS)")
    p.add_argument("--json", default=None, help="also write the raw results to this JSON file")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: on a shared 2-core machine two OpenMP threads that wait "
                        "for each other slow small ops down by up to 50x)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    silence_loggers()
    repeats = args.repeats or (1 if args.quick else 3)
    n_models = args.lds_models or (50 if args.quick else 100)
    overhead_variants = ({k: OVERHEAD_VARIANTS[k] for k in (next(iter(OVERHEAD_VARIANTS)), "correction='online'")} if args.quick else OVERHEAD_VARIANTS)
    if args.variants:
        known = {**OVERHEAD_VARIANTS, **EXTRA_VARIANTS, **ISSUE13_VARIANTS}
        overhead_variants = {k: known[k] for k in args.variants}
    ttf_variants = {"defaults": {}, "every step, full correction pass": dict(EVERY_STEP)}
    if not args.quick:
        ttf_variants["correction='online'"] = {"correction": "online"}
    lds_variants = ({k: LDS_VARIANTS[k] for k in list(LDS_VARIANTS)[:2]} if args.quick else LDS_VARIANTS)
    if args.lds_variants:
        known = {**LDS_VARIANTS, **EXTRA_VARIANTS, **ISSUE13_VARIANTS}
        lds_variants = {k: known[k] for k in args.lds_variants}

    t_start = time.perf_counter()
    cases = {"mlp": MLPCase, "gpt_neox": LMCase}
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench_ekfac_cb_") as workdir:
        if args.profile:
            profiled = ([WidthCase(h, args.run_lengths[0]) for h in args.widths] if "widths" in args.sections
                        else [cases[c]() for c in args.cases])
            for case in profiled:
                profile(case, workdir)
            return 0

        def per_case(title: str, bench: Callable, variants: dict, fmt: Callable) -> list:
            """``bench`` on each case of ``--cases`` (``title`` formatted with ``c``, the case's
            name, and ``note``), the rows printed with ``fmt``."""
            rows = []
            for c in args.cases:
                case = cases[c]()
                print("== " + title.format(c=c, note=case.note), flush=True)
                rows.append(bench(case, variants, repeats, workdir))
            print(fmt(rows), flush=True)
            return rows

        if "overhead" in args.sections:
            out["overhead"] = per_case("overhead {c}: {note}", bench_overhead, overhead_variants, fmt_overhead)
        if "widths" in args.sections:
            known = {**WIDTH_VARIANTS, **OVERHEAD_VARIANTS, **EXTRA_VARIANTS, **ISSUE13_VARIANTS}
            width_variants = {k: known[k] for k in (args.width_variants or WIDTH_VARIANTS)}
            out["widths"] = []
            for h in args.widths:
                for e in args.run_lengths:
                    case = WidthCase(h, e)
                    print(f"== widths {case.name}: {case.note}", flush=True)
                    out["widths"].append(bench_overhead(case, width_variants, repeats, workdir))
                    print(fmt_widths(out["widths"][-1:]), flush=True)
            print(fmt_widths(out["widths"]), flush=True)
        if "ttf" in args.sections:
            out["time_to_factors"] = per_case("time to factors {c}", bench_time_to_factors, ttf_variants, fmt_ttf)
        if "lds" in args.sections:
            print(f"== LDS ({n_models} models)", flush=True)
            out["lds"] = bench_lds(n_models, workdir, lds_variants)
            print(fmt_lds(out["lds"]), flush=True)
    total = time.perf_counter() - t_start
    out["meta"] = run_meta(total, quick=args.quick, repeats=repeats, argv=sys.argv[1:])
    print(f"\ntotal {total:.0f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=float))
    full = (not args.quick and not args.variants and not args.lds_variants
            and set(args.sections) == {"overhead", "ttf", "lds"} and set(args.cases) == {"mlp", "gpt_neox"})
    if not args.no_doc and full:
        write_results(DOC, results_markdown(out), "EKFACInfluence callback benchmark")
        print(f"wrote {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
