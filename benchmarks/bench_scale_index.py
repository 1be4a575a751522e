"""Scoring and indexing at a real model's shape, before and after issue 20's changes, side by side.

A transformers ``GPT2LMHeadModel`` built from a config (width 768, 12 heads, ``--layers`` blocks,
vocabulary ``--vocab``, ``--seq`` tokens per sequence, random weights and tokens), the MLP and
attention layers tracked (``lm_head`` left out), EK-FAC factors fitted once on a few batches and
saved (by the *before* code, float64, so both versions read the same artifact). Then, for each
implementation, in a fresh process each:

* ``InfluenceScorer.search`` (``--queries`` queries, top-10), timed from ``load_factors`` to the
  result, over ``--small`` and ``--large`` training sequences: per-sequence cost is the
  difference over the difference in sequences, the fixed cost the rest; peak resident memory
  above the process's baseline (``PeakMemory``). *After*, a search over fewer training
  sequences than it costs to rotate every query back out of the eigenbasis scores in the
  eigenbasis instead (``InfluenceScorer.prepare_queries(n_train=...)``), so its cost is not one
  line through the two sizes: the table gives both totals too;
* ``build_index`` (default sketch: ``"sjlt"``, 1024 numbers per layer, float16), the same two
  sizes: seconds (fixed and per sequence) and bytes on disk, split into the fixed part
  (catalog, transform, rank markers: everything but the shards) and the shards per sequence.
  *Before*, the factors are loaded and passed in memory (the index copies what it needs); *after*,
  the factors' folder is passed and the index references it.

*Before* is the library at ``--before`` (a git revision, extracted with ``git archive``); *after*
is this checkout. Wall and CPU seconds are both reported: on a shared, loaded machine the CPU
time of a process (``--threads 1``) is the steadier figure, and even it varies by ±20 % between
runs, so a two-point fit's per-sequence figure is only as good as the gap between the two sizes.
``--threads`` sets torch's intra-op threads.

Run: ``.venv/bin/python benchmarks/bench_scale_index.py`` (4 layers, vocabulary 8192; a few
minutes on 2 cores), ``--layers 12`` for GPT-2 small's depth. Results: a table on stdout and
JSON in ``--workdir``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tarfile
import io
import time
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_BEFORE = "d8f51e6"  # main before issue 20's scoring / index-storage work


def _args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--queries", type=int, default=8)
    p.add_argument("--small", type=int, default=4, help="training sequences of the smaller run")
    p.add_argument("--large", type=int, default=12, help="training sequences of the larger run")
    p.add_argument("--fit-batches", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--before", default=DEFAULT_BEFORE, help="git revision of the 'before' library")
    p.add_argument("--impls", default="before,after")
    p.add_argument("--parts", default="search,index")
    p.add_argument("--workdir", default=str(HERE / "out" / "scale_index"))
    p.add_argument("--report", action="store_true", help="print the table of the saved results of these arguments, run nothing")
    p.add_argument("--phase", default="main", choices=["main", "fit", "measure"], help=argparse.SUPPRESS)
    p.add_argument("--impl", default="after", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------
# the case (imported in the child processes, from whichever library is on sys.path)
# ------------------------------------------------------------------------------------------
def make_case(a: argparse.Namespace):
    import torch
    import transformers
    from torch.utils.data import DataLoader

    from lightning_influence import IndexedDataset
    from lightning_influence.data import lm_collate
    from lightning_influence.demos import CausalLMModule

    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(vocab_size=a.vocab, n_positions=a.seq, n_embd=768, n_layer=a.layers, n_head=12,
                                  bos_token_id=a.vocab - 1, eos_token_id=a.vocab - 1)
    torch.manual_seed(0)
    lm = transformers.GPT2LMHeadModel(cfg)
    lm.config.use_cache = False
    model = CausalLMModule(lm).eval()
    g = torch.Generator().manual_seed(1)
    n = a.queries + max(a.large, a.fit_batches * a.batch)
    seqs = [{"input_ids": torch.randint(1, a.vocab, (a.seq,), generator=g)} for _ in range(n)]
    queries = IndexedDataset(seqs[: a.queries], offset=100_000)
    train = IndexedDataset(seqs[a.queries:])

    def loader(ds, n=None):
        from torch.utils.data import Subset

        return DataLoader(ds if n is None else Subset(ds, range(n)), batch_size=a.batch, collate_fn=lm_collate)

    return model, queries, train, loader


def _layers(model):
    from lightning_influence.layers import select_layers

    return select_layers(model, "*.h.*")


def _folder_bytes(path: Path, shards: bool) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and (("shards" in p.relative_to(path).parts) == shards))


def phase_fit(a: argparse.Namespace, out: Path) -> None:
    import torch

    from lightning_influence.ekfac.factors import save_factors
    from lightning_influence.ekfac.fit import fit_factors

    torch.set_num_threads(a.threads)
    model, _, train, loader = make_case(a)
    t0 = time.perf_counter()
    factors = fit_factors(model, loader(train, a.fit_batches * a.batch), _layers(model), max_batches=a.fit_batches, progress=False)
    save_factors(factors, out)
    print(json.dumps({"fit_seconds": time.perf_counter() - t0}))


def phase_measure(a: argparse.Namespace, factors_dir: Path, work: Path) -> None:
    import torch

    from common import measured
    from lightning_influence import InfluenceScorer, build_index, load_factors

    warnings.filterwarnings("ignore")
    torch.set_num_threads(a.threads)
    model, queries, train, loader = make_case(a)
    res: dict[str, Any] = {"impl": a.impl}
    parts = a.parts.split(",")
    for n in (a.small, a.large):
        if "search" in parts:
            def search():
                factors = load_factors(factors_dir, model=model)
                return InfluenceScorer(model, factors).search(loader(queries), loader(train, n), k=10)

            _, t = measured(search)
            res[f"search_{n}"] = t
            gc.collect()
        if "index" in parts:
            path = work / f"index_{a.impl}_{n}"
            shutil.rmtree(path, ignore_errors=True)
            if a.impl == "before":
                build = lambda: build_index(model, load_factors(factors_dir, model=model), loader(train, n), path)  # noqa: E731
            else:
                build = lambda: build_index(model, factors_dir, loader(train, n), path)  # noqa: E731
            idx, t = measured(build)
            t["fixed_bytes"] = _folder_bytes(path, shards=False)
            t["shard_bytes"] = _folder_bytes(path, shards=True)
            del idx
            res[f"index_{n}"] = t
            shutil.rmtree(path, ignore_errors=True)
            gc.collect()
    print("RESULT " + json.dumps(res))


# ------------------------------------------------------------------------------------------
# the driver
# ------------------------------------------------------------------------------------------
def _child(a: argparse.Namespace, phase: str, src: Path, extra: list[str]) -> str:
    argv = [sys.executable, str(Path(__file__).resolve()), "--phase", phase] + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items() if k not in ("phase", "report")] + extra
    env = {**os.environ, "PYTHONPATH": str(src)}
    r = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=str(src))
    if r.returncode != 0:
        raise RuntimeError(f"{phase} ({src}) failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    return r.stdout


def _before_source(rev: str, work: Path) -> Path:
    dest = work / f"src_{rev}"
    if not (dest / "lightning_influence" / "__init__.py").exists():
        blob = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "lightning_influence"], check=True, capture_output=True).stdout
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
            tar.extractall(dest)
    return dest


def _split(r: dict, key: str, small: int, large: int, field: str) -> tuple[float, float]:
    """(fixed, per sequence) of ``field`` from the two runs."""
    s, l = r[f"{key}_{small}"][field], r[f"{key}_{large}"][field]
    per = (l - s) / (large - small)
    return s - small * per, per


def _report(a: argparse.Namespace, results: dict[str, dict]) -> str:
    from common import md_table  # here: the parent process of the measured children imports no torch before it reports

    gb = 1e9
    rows = []

    def row(name, fmt, getter):
        rows.append((name, *[fmt(getter(results[i])) if i in results else "—" for i in ("before", "after")]))

    sec = lambda v: f"{v:.1f} s"  # noqa: E731
    per = lambda v: f"{v:.2f} s"  # noqa: E731
    for part, name, unit in (("search", "search", "training sequence"), ("index", "build_index", "sequence")):
        if part not in a.parts:
            continue
        for n in (a.small, a.large):
            row(f"{name}, {n} {unit}s (CPU; wall)", lambda v: v,
                lambda r, n=n, part=part: f"{r[f'{part}_{n}']['cpu']:.1f} s; {r[f'{part}_{n}']['wall']:.1f} s")
        row(f"{name}, fixed (CPU, two-point fit)", sec, lambda r, part=part: _split(r, part, a.small, a.large, "cpu")[0])
        row(f"{name}, per {unit} (CPU, two-point fit)", per, lambda r, part=part: _split(r, part, a.small, a.large, "cpu")[1])
        if part == "index":
            row("index on disk, fixed part", lambda v: f"{v / 1e6:.3f} MB" if v < gb else f"{v / gb:.2f} GB",
                lambda r: r[f"index_{a.large}"]["fixed_bytes"])
            row("index on disk, per sequence", lambda v: f"{v / 1e3:.1f} KB", lambda r: _split(r, "index", a.small, a.large, "shard_bytes")[1])
        row(f"{name}, peak RSS ({a.large} sequences)", lambda v: f"{v / 2**30:.2f} GiB", lambda r, part=part: r[f"{part}_{a.large}"]["peak_bytes"])
    w = max(len(r[0]) for r in rows)  # the first column padded: the table reads aligned on stdout too
    return md_table([" " * w, f"before ({a.before})", "after"], [[f"{n:{w}}", b, c] for n, b, c in rows])


def main() -> None:
    a = _args()
    a.workdir = str(Path(a.workdir).resolve())
    work = Path(a.workdir)
    if a.phase == "fit":
        return phase_fit(a, work / f"factors_l{a.layers}_v{a.vocab}_t{a.seq}")
    if a.phase == "measure":
        return phase_measure(a, work / f"factors_l{a.layers}_v{a.vocab}_t{a.seq}", work)
    if a.report:
        saved = json.loads((work / f"results_l{a.layers}.json").read_text())
        print(_report(argparse.Namespace(**{**saved["args"], "report": True}), saved["results"]))
        return
    work.mkdir(parents=True, exist_ok=True)
    before = _before_source(a.before, work)
    factors = work / f"factors_l{a.layers}_v{a.vocab}_t{a.seq}"
    if not (factors / "manifest.json").exists():
        print(f"fitting factors ({a.layers} layers, vocabulary {a.vocab}, {a.seq} tokens) with {a.before} ...", flush=True)
        print(_child(a, "fit", before, []).strip().splitlines()[-1])
    print(f"factors: {factors} ({_folder_bytes(factors, False) / 1e9:.2f} GB)", flush=True)
    results = {}
    for impl in a.impls.split(","):
        src = before if impl == "before" else ROOT
        t0 = time.perf_counter()
        out = _child(a, "measure", src, [f"--impl={impl}"])
        results[impl] = json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:])
        print(f"{impl}: {time.perf_counter() - t0:.0f} s", flush=True)
    (work / f"results_l{a.layers}.json").write_text(json.dumps({"args": vars(a), "results": results}, indent=2))
    cmd = f"python benchmarks/bench_scale_index.py --layers {a.layers} --vocab {a.vocab} --seq {a.seq} --queries {a.queries} " \
          f"--small {a.small} --large {a.large} --threads {a.threads}"
    print(f"\nGPT-2 config: {a.layers} × 768, vocabulary {a.vocab}, {a.seq} tokens, batch {a.batch}, {a.queries} queries, lm_head left out; "
          f"torch threads {a.threads}\n`{cmd}`\n")
    print(_report(a, results))


if __name__ == "__main__":
    main()
