"""The EK-FAC comparison against kronfluence 1.0.1 (benchmarks only): cases (model, data,
layers), the two libraries behind one ``fit`` / ``pairwise`` interface, timing, peak memory in a
fresh subprocess (this file run as a script: ``--memory-worker``), profiling and the result
tables. ``bench_ekfac.py`` (MLP, GPT-NeoX), ``bench_cnn.py`` (CNN) and ``bench_fact_tracing.py``
run it.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import accuracy, md_table, train_classifier  # noqa: E402
from kronfluence_tasks import analyzer, ekfac_arguments, kronfluence_task  # noqa: E402

from lightning_influence.memory import PeakMemory, release_free_memory, resident_bytes  # noqa: E402

N_TRAIN = 1_000
N_QUERY = 100
BATCH = 64  # fitting and training-side scoring batch size, both libraries
QUERY_BATCH = 100  # all queries in one batch, both libraries
WARMUP_TRAIN, WARMUP_QUERY = 64, 8

LM_VOCAB, LM_HIDDEN, LM_LAYERS, LM_HEADS, LM_MIN_LEN, LM_MAX_LEN = 128, 128, 2, 4, 24, 40
LM_EPOCHS = 1

warnings.filterwarnings("ignore")
logging.getLogger("kronfluence").setLevel(logging.WARNING)


# ------------------------------------------------------------------------------------------
# Cases: model, data, layers
# ------------------------------------------------------------------------------------------
class Case:
    name: str
    model: nn.Module
    train: Any  # dataset of N_TRAIN examples (scored and used for fitting)
    query: Any  # dataset of N_QUERY examples
    layers: list[str]
    collate: Callable | None
    note: str


def _train_mlp(seed: int = 0):
    from lightning_influence.demos import MLPClassifier, digits_dataset

    torch.manual_seed(seed)
    train_full, test, _ = digits_dataset(seed=seed)
    model = MLPClassifier(d_in=64, hidden=128, n_classes=10, lr=0.1)
    train_classifier(model, train_full, lr=0.1, seed=seed)
    return model, train_full, test, accuracy(model, test)


def build_mlp(seed: int = 0) -> Case:
    model, train_full, test, acc = _train_mlp(seed)
    c = Case()
    c.name = "mlp"
    c.model = model
    c.train = TensorDataset(*(t[:N_TRAIN] for t in train_full.tensors))
    c.query = TensorDataset(*(t[:N_QUERY] for t in test.tensors))
    c.layers = ["net.0", "net.2"]
    c.collate = None
    n_params = sum(p.numel() for p in model.parameters())
    c.note = f"MLP 64-128-10 (Tanh), {n_params:,} parameters, 5 epochs SGD on digits, test accuracy {acc:.3f}"
    return c


def build_lm(seed: int = 0) -> Case:
    from lightning_influence.demos import synthetic_token_dataset, tiny_causal_lm
    from lightning_influence.data import lm_collate

    model = tiny_causal_lm("gpt_neox", vocab_size=LM_VOCAB, hidden=LM_HIDDEN, layers=LM_LAYERS, heads=LM_HEADS, max_len=64, seed=seed)
    data = synthetic_token_dataset(N_TRAIN + N_QUERY, vocab_size=LM_VOCAB, min_len=LM_MIN_LEN, max_len=LM_MAX_LEN, seed=seed)
    train, query = data[:N_TRAIN], data[N_TRAIN:]
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(train, batch_size=32, shuffle=True, collate_fn=lm_collate, generator=g)
    model.train()
    for _ in range(LM_EPOCHS):
        for b in loader:
            opt.zero_grad()
            loss = model(**b).loss
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        qb = lm_collate(query)
        qloss = float(model(**qb).loss)
    c = Case()
    c.name = "gpt_neox"
    c.model = model
    c.train, c.query = train, query
    c.layers = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and re.search(r"\.(attention\.(query_key_value|dense)|mlp\.(dense_h_to_4h|dense_4h_to_h))$", n)
    ]
    c.collate = lm_collate
    n_params = sum(p.numel() for p in model.parameters())
    tracked = sum(m.weight.numel() + m.bias.numel() for n, m in model.named_modules() if n in c.layers)
    c.note = (
        f"GPT-NeoX 2 layers, hidden {LM_HIDDEN}, {LM_HEADS} heads, vocab {LM_VOCAB}, {n_params:,} parameters "
        f"({tracked:,} in the {len(c.layers)} tracked Linear layers), sequences of {LM_MIN_LEN}-{LM_MAX_LEN} tokens, "
        f"{LM_EPOCHS} epoch(s) AdamW (lr 3e-3, batch 32), held-out mean token loss {qloss:.3f} (uniform: {math.log(LM_VOCAB):.3f})"
    )
    return c


BUILDERS = {"mlp": build_mlp, "gpt_neox": build_lm}


# ------------------------------------------------------------------------------------------
# The two libraries
# ------------------------------------------------------------------------------------------
class Ours:
    label = "lightning-influence"

    def __init__(self, case: Case) -> None:
        self.case = case
        self.model = case.model
        self.factors = None

    def _loader(self, ds, bs):
        return DataLoader(ds, batch_size=bs, shuffle=False, collate_fn=self.case.collate)

    def fit(self, train) -> None:
        from lightning_influence.ekfac.fit import fit_factors

        self.factors = fit_factors(self.model, self._loader(train, BATCH), layers=self.case.layers, fisher="empirical")

    def pairwise(self, query, train) -> torch.Tensor:
        from lightning_influence.ekfac.scorer import InfluenceScorer

        scorer = InfluenceScorer(self.model, self.factors, damping="mean", dtype=torch.float32)  # kronfluence's heuristic
        return scorer.pairwise(self._loader(query, QUERY_BATCH), self._loader(train, BATCH)).pairwise


class Kron:
    label = "kronfluence 1.0.1"

    def __init__(self, case: Case, workdir: str) -> None:
        from kronfluence.analyzer import prepare_model

        self.task = kronfluence_task("causal_lm" if case.collate is not None else "classification", list(case.layers))
        # prepare_model wraps modules in place and freezes parameters: work on a copy with the
        # same weights.
        self.model = prepare_model(copy.deepcopy(case.model), self.task)
        self.analyzer = analyzer(self.model, self.task, f"bench_{case.name}", workdir, case.collate)
        self.factor_args, self.score_args = ekfac_arguments()  # damping: heuristic 0.1 × mean(Λ), as ours with damping="mean"
        self._n = 0
        self.factors_name = None

    def fit(self, train) -> None:
        self._n += 1
        self.factors_name = f"ekfac_{self._n}"
        self.analyzer.fit_all_factors(
            factors_name=self.factors_name,
            dataset=train,
            per_device_batch_size=BATCH,
            factor_args=self.factor_args,
            overwrite_output_dir=True,
        )

    def pairwise(self, query, train) -> torch.Tensor:
        self._n += 1
        name = f"pairwise_{self._n}"
        self.analyzer.compute_pairwise_scores(
            scores_name=name,
            factors_name=self.factors_name,
            query_dataset=query,
            train_dataset=train,
            per_device_query_batch_size=QUERY_BATCH,
            per_device_train_batch_size=BATCH,
            score_args=self.score_args,
            overwrite_output_dir=True,
        )
        return self.analyzer.load_pairwise_scores(name)["all_modules"]


class _GcTimer:
    """Stands in for the ``gc`` module inside ``kronfluence.utils.state`` to time the
    ``gc.collect()`` calls of its ``release_memory()`` (instrumentation only; behaviour unchanged)."""

    def __init__(self, real) -> None:
        self.real, self.seconds, self.calls = real, 0.0, 0

    def collect(self, *a, **k):
        t0 = time.perf_counter()
        try:
            return self.real.collect(*a, **k)
        finally:
            self.seconds += time.perf_counter() - t0
            self.calls += 1

    def __getattr__(self, name):
        return getattr(self.real, name)


def _install_gc_timer() -> _GcTimer:
    import gc

    import kronfluence.utils.state as kstate

    if not isinstance(kstate.gc, _GcTimer):
        kstate.gc = _GcTimer(gc)
    return kstate.gc


# ------------------------------------------------------------------------------------------
# Measurements
# ------------------------------------------------------------------------------------------
def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _warm_subsets(case: Case):
    return Subset(case.train, range(WARMUP_TRAIN)), Subset(case.query, range(WARMUP_QUERY))


def warm_up(lib) -> None:
    tr, q = _warm_subsets(lib.case if isinstance(lib, Ours) else lib._case)
    lib.fit(tr)
    lib.pairwise(q, tr)


def spearman(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """(flattened Spearman, mean per-query Spearman, min per-query Spearman)."""
    from scipy.stats import spearmanr

    a = a.double().numpy()
    b = b.double().numpy()
    flat = float(spearmanr(a.ravel(), b.ravel()).statistic)
    rows = [float(spearmanr(a[i], b[i]).statistic) for i in range(a.shape[0])]
    return flat, statistics.fmean(rows), min(rows)


def make_lib(which: str, case: Case, workdir: str):
    if which == "ours":
        return Ours(case)
    lib = Kron(case, workdir)
    lib._case = case
    return lib


def time_case(case: Case, repeats: int, workdir: str, memory: str = "inprocess") -> dict:
    libs = {"ours": make_lib("ours", case, workdir), "kron": make_lib("kron", case, workdir)}
    for lib in libs.values():
        warm_up(lib)
    times = {phase: {k: [] for k in libs} for phase in ("fit", "pairwise")}
    gc_t = {"fit": [], "pairwise": []}
    gct = _install_gc_timer()
    scores = {}
    mem: dict[str, dict[str, float]] = {k: {} for k in libs}

    def timed(phase: str, k: str, fn: Callable[[], Any], track: bool) -> Any:
        """``fn()``, its time under ``times[phase][k]``, its memory (``track``), kronfluence's gc time."""
        g0 = gct.seconds
        t, out, mib = _measure(fn, track)
        times[phase][k].append(t)
        if track:
            mem[k][f"{phase}_mib"] = mib
        if k == "kron":
            gc_t[phase].append(gct.seconds - g0)
        return out

    for r in range(repeats):
        # alternate the order between repeats so that neither library always runs first
        order = ["ours", "kron"] if r % 2 == 0 else ["kron", "ours"]
        track = memory == "inprocess" and r == 0
        for k in order:
            timed("fit", k, lambda: libs[k].fit(case.train), track)
        for k in order:
            scores[k] = timed("pairwise", k, lambda: libs[k].pairwise(case.query, case.train), track).detach().float().cpu()
    fit_t, pair_t = times["fit"], times["pairwise"]
    ours, kron = scores["ours"], scores["kron"]
    assert ours.shape == kron.shape == (N_QUERY, N_TRAIN), (ours.shape, kron.shape)
    flat, row_mean, row_min = spearman(ours, kron)
    scale = float((ours * kron).sum() / (kron * kron).sum())
    rel = float((ours - kron).norm() / kron.norm())
    return {
        "case": case.name,
        "note": case.note,
        "layers": case.layers,
        "fit_s": {k: statistics.median(v) for k, v in fit_t.items()},
        "pairwise_s": {k: statistics.median(v) for k, v in pair_t.items()},
        "kron_gc_s": {k: statistics.median(v) for k, v in gc_t.items()},
        **({"memory": {k: dict(v, method=_MEM_METHOD[0]) for k, v in mem.items()}} if memory == "inprocess" else {}),
        "fit_all_s": fit_t,
        "pairwise_all_s": pair_t,
        "spearman_flat": flat,
        "spearman_row_mean": row_mean,
        "spearman_row_min": row_min,
        "ls_scale": scale,
        "rel_diff": rel,
        "sign_agreement": float(((ours > 0) == (kron > 0)).float().mean()),
    }


# -- memory (fresh subprocess per case and library) -----------------------------------------
_MEM_METHOD = ["not measured"]


def _measure(fn: Callable[[], Any], track_memory: bool) -> tuple[float, Any, float]:
    """``(seconds, result, peak ΔRSS MiB or nan)``; the memory bookkeeping is outside the timer."""
    if not track_memory:
        t, out = _timed(fn)
        return t, out, float("nan")
    release_free_memory()
    box = {}

    def run():
        box["t"], box["out"] = _timed(fn)

    mib, method = _peak_delta_mib(run)
    _MEM_METHOD[0] = method
    return box["t"], box["out"], mib


def _peak_delta_mib(fn: Callable[[], Any]) -> tuple[float, str]:
    """``(peak MiB above the resident size at entry, how it was measured)`` of ``fn()``."""
    with PeakMemory() as m:
        fn()
    return m.peak_bytes / 2**20, m.method


def memory_worker(case_name: str, which: str, state_path: str, workdir: str) -> dict:
    case = BUILDERS[case_name](seed=0) if not state_path else None
    if state_path:
        case = torch.load(state_path, weights_only=False)
    lib = make_lib(which, case, workdir)
    warm_up(lib)
    release_free_memory()
    fit_mib, method = _peak_delta_mib(lambda: lib.fit(case.train))
    release_free_memory()
    pair_mib, _ = _peak_delta_mib(lambda: lib.pairwise(case.query, case.train))
    return {"fit_mib": fit_mib, "pairwise_mib": pair_mib, "method": method, "rss_mib": (resident_bytes() or 0) / 2**20}


def memory_case(case: Case, workdir: str) -> dict:
    state_path = os.path.join(workdir, f"{case.name}_case.pt")
    torch.save(case, state_path)
    out = {}
    for which in ("ours", "kron"):
        wd = tempfile.mkdtemp(dir=workdir)
        cmd = [sys.executable, __file__, "--threads", str(torch.get_num_threads()), "--memory-worker", case.name, which, state_path, wd]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"memory worker {case.name}/{which} failed:\n{res.stdout}\n{res.stderr}")
        out[which] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


# -- profiling (optional) -------------------------------------------------------------------
def profile_case(case: Case, workdir: str, rows: int = 18) -> None:
    from torch.profiler import ProfilerActivity, profile

    for which in ("ours", "kron"):
        lib = make_lib(which, case, workdir)
        warm_up(lib)
        for phase, fn in (("fit", lambda: lib.fit(case.train)), ("pairwise", lambda: lib.pairwise(case.query, case.train))):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            print(f"\n---- {case.name} / {lib.label} / {phase} (self CPU time) ----")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60))


# ------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------
def results_table(results: list[dict]) -> str:
    timing = []
    for r in results:
        for phase, key, mkey, gkey in (("fit factors", "fit_s", "fit_mib", "fit"), ("pairwise 100×1,000", "pairwise_s", "pairwise_mib", "pairwise")):
            o, k = r[key]["ours"], r[key]["kron"]
            gc_s = r["kron_gc_s"][gkey]
            mem = r.get("memory")
            mo = f"{mem['ours'][mkey]:.0f}" if mem else "n/a"
            mk = f"{mem['kron'][mkey]:.0f}" if mem else "n/a"
            timing.append([r["case"], phase, f"{o:.2f}", f"{k:.2f}", f"{gc_s:.2f}", f"{o / k:.2f}", f"{o / max(k - gc_s, 1e-9):.2f}", mo, mk])
    agreement = [[r["case"], f"{r['spearman_flat']:.5f}", f"{r['spearman_row_mean']:.5f}", f"{r['spearman_row_min']:.5f}",
                  f"{r['ls_scale']:.4f}", f"{r['rel_diff']:.2e}", f"{r['sign_agreement']:.4f}"] for r in results]
    return "\n\n".join([
        md_table(["case", "phase", "lightning-influence (s)", "kronfluence (s)", "of which kronfluence gc.collect (s)", "ratio ours/kron",
                  "ratio ours/(kron − gc)", "peak ΔRSS ours (MiB)", "peak ΔRSS kron (MiB)"], timing),
        md_table(["case", "Spearman (flattened 100k)", "mean per-query Spearman", "min per-query Spearman", "scale ours/kron",
                  "‖ours−kron‖/‖kron‖", "sign agreement"], agreement)])


def verdict(results: list[dict]) -> str:
    out = []
    for r in results:
        ok_s = r["spearman_flat"] >= 0.99 and r["spearman_row_mean"] >= 0.99
        o, k, g = r["pairwise_s"]["ours"], r["pairwise_s"]["kron"], r["kron_gc_s"]["pairwise"]
        ok_t = o <= k
        out.append(
            f"- {r['case']}: Spearman ≥ 0.99 {'met' if ok_s else 'NOT met'} ({r['spearman_flat']:.5f}); "
            f"pairwise scoring at least as fast as kronfluence {'met' if ok_t else 'NOT met'} "
            f"(ratio {o / k:.2f}; {o / max(k - g, 1e-9):.2f} against kronfluence without its gc.collect calls)."
        )
    return "\n".join(out)


def _memory_worker_main(argv=None) -> int:
    """``kronfluence_compare.py --threads N --memory-worker CASE LIB STATE WORKDIR``: one library's
    peak memory on a saved case, printed as a JSON line (see :func:`memory_case`)."""
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--memory-worker", nargs=4, metavar=("CASE", "LIB", "STATE", "WORKDIR"), required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(json.dumps(memory_worker(*args.memory_worker)))
    return 0


if __name__ == "__main__":
    sys.exit(_memory_worker_main())
