"""What each callback costs at its defaults, against the same training without it.

Two runs a user meets first, each timed side by side in this one process (one torch thread,
warm-up first, then the settings interleaved in rotating order, ``--repeats`` rounds, medians
of ``time.process_time`` CPU seconds, wall seconds beside them):

* ``demo``: the quickstart's training (examples/quickstart.py: digits with 10% flipped labels,
  ``MLPClassifier`` 64-64-10, SGD, batch 64, 12 epochs, 1,437 examples);
* ``transformer``: the Hugging Face example's training (examples/huggingface_lm.py: a tiny
  GPT-2, hidden 64, 2 layers, 100 ``"a + b = c"`` sentences, batch 20, 60 epochs).

Settings: no callback; each callback alone with only its required arguments
(``EKFACInfluence()``, ``Z0Influence(probe=train)``, ``LiSSASelfInfluence(probe=train)``); and
the three together. Everything until the callbacks' artifacts are on disk is inside the timed
``trainer.fit`` (end-of-fit factors, scores, the examples artifact and the HTML report). Each fit
starts after a ``gc.collect()`` (outside the timing), so no setting pays for the garbage of the one
before it. Beside the totals, the CPU seconds of two end-of-fit parts: the callbacks'
``on_train_end`` (the method's own end-of-fit work: eigendecompositions, LiSSA's scoring, Z0's
last recording) and ``publish_outputs`` (the rendered top examples and the HTML report with its
plots); the rest of the difference to plain training is spent during the training steps.

Run: ``.venv/bin/python benchmarks/bench_defaults_cost.py`` (about 10 minutes on 2 cores;
``--quick`` for a shorter run). Writes ``docs/benchmarks_defaults.md`` (``--no-doc`` leaves it).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from itertools import product
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))
from common import make_trainer, md_table, silence_loggers, utc_now  # noqa: E402

DOC = ROOT / "docs" / "benchmarks_defaults.md"

SETTINGS = ("plain", "EKFACInfluence()", "Z0Influence(probe=train)", "LiSSASelfInfluence(probe=train)", "all three")
EXTRA = ("Z0Influence(probe=train, losses_from='probe')",)  # only with --settings: Z0's exact mode, for comparison


def quiet() -> None:
    silence_loggers()
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()


def callbacks_for(setting: str, train, out: str) -> list:
    from lightning_influence import EKFACInfluence, LiSSASelfInfluence, Z0Influence

    make: dict[str, Callable[[], object]] = {
        "EKFACInfluence()": lambda: EKFACInfluence(dirpath=f"{out}/ekfac"),
        "Z0Influence(probe=train)": lambda: Z0Influence(probe=train, dirpath=f"{out}/z0"),
        "Z0Influence(probe=train, losses_from='probe')": lambda: Z0Influence(probe=train, losses_from="probe", dirpath=f"{out}/z0"),
        "LiSSASelfInfluence(probe=train)": lambda: LiSSASelfInfluence(probe=train, dirpath=f"{out}/lissa"),
    }
    if setting == "plain":
        return []
    if setting == "all three":
        return [make[s]() for s in SETTINGS[1:4]]
    return [make[setting]()]


def demo_case(quick: bool):
    """(model factory, loader, train dataset, epochs) of the quickstart's training."""
    from lightning_influence import IndexedDataset
    from lightning_influence.demos import MLPClassifier, digits_dataset

    train, _, _ = digits_dataset(flip_fraction=0.1, seed=0)
    train = IndexedDataset(train)
    loader = DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    return (lambda: MLPClassifier()), loader, train, 4 if quick else 12


def transformer_case(quick: bool):
    """(model factory, loader, train dataset, epochs) of examples/huggingface_lm.py's training."""
    from huggingface_lm import WORDS, encode

    from lightning_influence import IndexedDataset, lm_collate
    from lightning_influence.demos import CausalLMModule, tiny_causal_lm

    sentences = [f"{a} + {b} = {(a + b) % 10}" for a, b in product(range(10), range(10))]
    train = IndexedDataset([{"input_ids": encode(s)} for s in sentences])
    loader = DataLoader(train, batch_size=20, shuffle=True, collate_fn=lm_collate, generator=torch.Generator().manual_seed(0))

    def model():
        return CausalLMModule(tiny_causal_lm("gpt2", vocab_size=len(WORDS), hidden=64, layers=2, heads=2, max_len=16), lr=3e-3)

    return model, loader, train, 15 if quick else 60


PARTS = {"end": 0.0, "outputs": 0.0}  # CPU s of the parts timed inside the current fit (see _timed)


def _timed(part: str, fn: Callable) -> Callable:
    def run(*args, **kwargs):
        c0 = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            PARTS[part] += time.process_time() - c0

    return run


def _time_outputs() -> None:
    """Count the CPU time of ``publish_outputs`` (examples, HTML report) in PARTS['outputs']."""
    import lightning_influence.callbacks.base as base

    if not getattr(base.publish_outputs, "_bench_timed", False):
        base.publish_outputs = _timed("outputs", base.publish_outputs)
        base.publish_outputs._bench_timed = True


def fit_once(case, setting: str, workdir: str) -> tuple[float, float, float, float]:
    """(CPU s, wall s, CPU s in the callbacks' ``on_train_end``, CPU s in ``publish_outputs``) of
    one ``trainer.fit`` with ``setting``."""
    import lightning as L

    make_model, loader, train, epochs = case
    L.seed_everything(0, verbose=False)
    model = make_model()
    out = tempfile.mkdtemp(dir=workdir)
    callbacks = callbacks_for(setting, train, out)
    for cb in callbacks:
        cb.on_train_end = _timed("end", cb.on_train_end)
    trainer = make_trainer(epochs, callbacks, out)
    gc.collect()
    PARTS.update(end=0.0, outputs=0.0)
    c0, w0 = time.process_time(), time.perf_counter()
    trainer.fit(model, loader)
    return time.process_time() - c0, time.perf_counter() - w0, PARTS["end"], PARTS["outputs"]


def bench_case(name: str, case, repeats: int, workdir: str, settings: tuple[str, ...] = SETTINGS) -> dict:
    fit_once(case, "all three" if "all three" in settings else settings[-1], workdir)  # warm-up: imports, allocator, kernels
    runs: dict[str, list[tuple[float, float, float, float]]] = {s: [] for s in settings}
    load0 = os.getloadavg()[0]
    for r in range(repeats):
        order = settings[r % len(settings):] + settings[:r % len(settings)]
        for s in order:
            runs[s].append(fit_once(case, s, workdir))
            print(f"  {name} round {r + 1}: {s}: {runs[s][-1][0]:.2f} s CPU (on_train_end {runs[s][-1][2]:.2f}, outputs {runs[s][-1][3]:.2f})", flush=True)
    med = {s: [statistics.median(r[k] for r in v) for k in range(4)] for s, v in runs.items()}
    base_cpu, base_wall = med["plain"][:2]
    return {
        "case": name, "repeats": repeats, "load": (load0, os.getloadavg()[0]),
        "rows": [{"setting": s, "cpu": c, "wall": w, "ratio_cpu": c / base_cpu, "ratio_wall": w / base_wall,
                  "end_cpu": e, "outputs_cpu": o, "all_cpu": [r[0] for r in runs[s]]} for s, (c, w, e, o) in med.items()],
    }


def render(results: list[dict], command: str) -> str:
    lines = ["# What the callbacks cost at their defaults", "",
             f"Generated by `benchmarks/bench_defaults_cost.py` on {utc_now()}. "
             f"Command: `{command}`.", "",
             "Each setting trains the same model on the same data with the same seed; everything until the "
             "artifacts are on disk is inside the timed `trainer.fit`. Settings interleaved in rotating order, "
             "medians over the rounds, one torch thread, CPU time of this process (wall time beside it), "
             "`gc.collect()` before each fit. Of the CPU time: the callbacks' `on_train_end` (the methods' own "
             "end-of-fit work) and `publish_outputs` (rendered top examples, HTML report and its plots). "
             "Machine: 2 CPU cores shared with other jobs (1-minute load averages below).", ""]
    for res in results:
        lines += [f"## {res['case']} ({res['repeats']} rounds; load {res['load'][0]:.1f} → {res['load'][1]:.1f})", "",
                  md_table(["setting", "CPU s (median)", "× plain (CPU)", "wall s", "× plain (wall)",
                            "of which `on_train_end` s", "of which outputs s", "CPU s, every round"],
                           [[f"`{row['setting']}`", f"{row['cpu']:.2f}", f"**{row['ratio_cpu']:.2f}×**", f"{row['wall']:.2f}",
                             f"{row['ratio_wall']:.2f}×", f"{row['end_cpu']:.2f}", f"{row['outputs_cpu']:.2f}",
                             ", ".join(f"{c:.2f}" for c in row["all_cpu"])] for row in res["rows"]]),
                  ""]
    return "\n".join(lines)


NOTES = "\n## Reading these numbers"


def kept_notes() -> str:
    """The hand-written section of the doc from ``## Reading these numbers`` on (kept across runs;
    its figures are updated by hand)."""
    old = DOC.read_text() if DOC.exists() else ""
    return old[old.index(NOTES):] if NOTES in old else ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=None, help="rounds per case (default 3, quick 1)")
    p.add_argument("--cases", nargs="+", default=["demo", "transformer"], choices=["demo", "transformer"])
    p.add_argument("--settings", nargs="+", default=None, choices=SETTINGS + EXTRA,
                   help="only these settings (plain is always run); implies --no-doc")
    p.add_argument("--without-outputs", action="store_true",
                   help="skip the fit-end outputs every callback shares (rendered examples, HTML report), to show each "
                        "callback's own cost; implies --no-doc")
    p.add_argument("--no-doc", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    quiet()
    if args.without_outputs:
        import lightning_influence.callbacks.base as base

        base.publish_outputs = lambda *a, **k: None
    _time_outputs()
    repeats = args.repeats or (1 if args.quick else 3)
    cases = {"demo": demo_case, "transformer": transformer_case}
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.cases:
            print(f"== {name}", flush=True)
            settings = SETTINGS if args.settings is None else ("plain",) + tuple(s for s in args.settings if s != "plain")
            results.append(bench_case(name, cases[name](args.quick), repeats, workdir, settings))
    command = " ".join([".venv/bin/python benchmarks/bench_defaults_cost.py", *(sys.argv[1:] if argv is None else argv)])
    text = render(results, command)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if not args.no_doc and not args.quick and args.settings is None and not args.without_outputs:
        DOC.write_text(text + "\n" + kept_notes())
    return 0


if __name__ == "__main__":
    sys.exit(main())
