"""Cases and measured phases for ``bench_index.py`` (benchmarks only).

Every timed phase runs in a fresh Python process (:func:`run_phase`) that loads the case from
disk, warms up on a tiny input, collects garbage, returns free heap pages to the OS, resets the
kernel's resident-set high-water mark and then runs the phase once, reporting wall time
(``time.perf_counter``), CPU time (``time.process_time``) and the peak resident memory above
what the process held before the phase (``VmHWM`` after − ``VmRSS`` before). Fresh processes keep
one phase's heap from flattering or penalising the next.

Cases:

* ``mlp``: ``MLPClassifier(64, hidden=128, 10)`` (Tanh, 9,610 parameters, both Linear layers
  tracked) trained 5 epochs with SGD on the 1,437 digits training examples. Training sets of
  any size are **generated**: a digits training example plus Gaussian noise (σ = 0.5 in
  standardised units) with its label (5 % replaced at random); queries likewise from the 360
  test examples. EK-FAC factors from 10,000 generated examples.
* ``lm``: a 2-layer GPT-NeoX (hidden 64, 4 heads, vocab 128; ``demos.tiny_causal_lm``) trained
  one epoch (AdamW) on 3,000 generated bigram-chain sequences of 8-16 tokens; training sets of
  any size are more sequences from the same chain; every Linear layer but the head tracked
  (8 layers, 99,456 gradient entries per example). Factors from 3,000 sequences.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from common import measured as _measured

HERE = Path(__file__).resolve().parent
MLP_HIDDEN, MLP_BATCH = 128, 1024
LM_HIDDEN, LM_HEADS, LM_VOCAB, LM_MIN, LM_MAX, LM_BATCH = 64, 4, 128, 8, 16, 64
N_FACTOR_MLP, N_FACTOR_LM = 10_000, 3_000


# ------------------------------------------------------------------------------------------
# data and models
# ------------------------------------------------------------------------------------------
def generated_digits(n: int, split: str, seed: int) -> TensorDataset:
    """``n`` noisy copies of digits examples (see the module docstring)."""
    from lightning_influence.demos import digits_dataset

    train, test, _ = digits_dataset(seed=0)
    base = train if split == "train" else test
    x0, y0 = base.tensors
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, x0.shape[0], (n,), generator=g)
    x = x0[idx] + 0.5 * torch.randn(n, x0.shape[1], generator=g)
    y = y0[idx].clone()
    flip = torch.rand(n, generator=g) < 0.05
    y[flip] = torch.randint(0, 10, (int(flip.sum()),), generator=g)
    return TensorDataset(x, y)


def train_mlp():
    from lightning_influence.demos import MLPClassifier, digits_dataset

    torch.manual_seed(0)
    train, _, _ = digits_dataset(seed=0)
    model = MLPClassifier(d_in=64, hidden=MLP_HIDDEN, n_classes=10, lr=0.1)
    from common import train_classifier

    return train_classifier(model, train, lr=0.1, seed=0)


def lm_sequences(n: int, seed: int) -> list:
    from lightning_influence.demos import synthetic_token_dataset

    # one bigram chain for every set (the transition matrix depends on the seed): split one draw
    return synthetic_token_dataset(n, vocab_size=LM_VOCAB, min_len=LM_MIN, max_len=LM_MAX, seed=seed)


def train_lm(train: list):
    from lightning_influence.data import lm_collate
    from lightning_influence.demos import CausalLMModule, tiny_causal_lm

    model = CausalLMModule(tiny_causal_lm("gpt_neox", vocab_size=LM_VOCAB, hidden=LM_HIDDEN, layers=2, heads=LM_HEADS, max_len=64, seed=0))
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for b in DataLoader(train, batch_size=32, shuffle=True, collate_fn=lm_collate, generator=torch.Generator().manual_seed(0)):
        opt.zero_grad()
        model.model(**b).loss.backward()
        opt.step()
    return model.model.eval()  # the transformers model itself (what kronfluence's task calls)


def lm_layers(model) -> list[str]:
    from lightning_influence import select_layers

    return [t.name for t in select_layers(model, exclude="*lm_head*")]


# ------------------------------------------------------------------------------------------
# the case on disk
# ------------------------------------------------------------------------------------------
def prepare_case(kind: str, sizes: list[int], n_query: int, workdir: Path) -> dict[str, Any]:
    """Train the model, fit factors, generate data; save everything under ``workdir``."""
    from lightning_influence.data import lm_collate
    from lightning_influence.ekfac.fit import fit_factors
    from lightning_influence.ekfac.factors import save_factors

    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if kind == "mlp":
        model = train_mlp()
        biggest = generated_digits(max(sizes), "train", seed=1)
        query = generated_digits(n_query, "test", seed=2)
        factors = fit_factors(model, DataLoader(TensorDataset(*(t[:N_FACTOR_MLP] for t in biggest.tensors)), batch_size=MLP_BATCH))
        data = {"x": biggest.tensors[0], "y": biggest.tensors[1], "qx": query.tensors[0], "qy": query.tensors[1]}
        layers = ["net.0", "net.2"]
    else:
        seqs = lm_sequences(N_FACTOR_LM + max(sizes) + n_query, seed=0)
        model = train_lm(seqs[:N_FACTOR_LM])
        layers = lm_layers(model)
        from lightning_influence import select_layers

        factors = fit_factors(model, DataLoader(seqs[:N_FACTOR_LM], batch_size=LM_BATCH, collate_fn=lm_collate),
                              select_layers(model, layers))
        data = {"train": seqs[N_FACTOR_LM : N_FACTOR_LM + max(sizes)], "query": seqs[N_FACTOR_LM + max(sizes):]}
    save_factors(factors, workdir / "factors")
    torch.save({"model": model, "data": data, "layers": layers, "kind": kind}, workdir / "case.pt")
    return {"seconds": time.perf_counter() - t0, "layers": layers, "grad_entries": sum(f.lambdas.numel() for f in factors.layers.values())}


class Loaded:
    """A case read back from disk inside a worker."""

    def __init__(self, workdir: Path) -> None:
        from lightning_influence.ekfac.factors import load_factors

        state = torch.load(workdir / "case.pt", weights_only=False)
        self.kind, self.model, self.data, self.layers = state["kind"], state["model"].eval(), state["data"], state["layers"]
        self.factors = load_factors(workdir / "factors")
        self.workdir = workdir

    @property
    def collate(self):
        from lightning_influence.data import lm_collate

        return None if self.kind == "mlp" else lm_collate

    @property
    def batch(self) -> int:
        return MLP_BATCH if self.kind == "mlp" else LM_BATCH

    def train_set(self, n: int):
        if self.kind == "mlp":
            return TensorDataset(self.data["x"][:n], self.data["y"][:n])
        return self.data["train"][:n]

    def query_set(self, n: int):
        if self.kind == "mlp":
            return TensorDataset(self.data["qx"][:n], self.data["qy"][:n])
        return self.data["query"][:n]

    def loader(self, ds, batch: int | None = None):
        return DataLoader(ds, batch_size=batch or self.batch, shuffle=False, collate_fn=self.collate)


# ------------------------------------------------------------------------------------------
# memory
# ------------------------------------------------------------------------------------------
def measured(fn):
    """``(result, wall s, CPU s, peak ΔRSS MiB)`` of ``fn()`` (:func:`common.measured`; see the module docstring)."""
    out, t = _measured(fn)
    return out, t["wall"], t["cpu"], t["peak_bytes"] / 2**20


# ------------------------------------------------------------------------------------------
# phases (run inside a worker)
# ------------------------------------------------------------------------------------------
def _kron(case: Loaded, workdir: Path):
    import copy
    import logging

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    from kronfluence_tasks import kronfluence_task

    logging.getLogger("kronfluence").setLevel(logging.ERROR)
    task = kronfluence_task("classification" if case.kind == "mlp" else "causal_lm", case.layers)
    model = prepare_model(copy.deepcopy(case.model).eval(), task)
    an = Analyzer(analysis_name="bench_index", model=model, task=task, cpu=True, disable_tqdm=True, output_dir=str(workdir),
                  disable_model_save=True, log_level=logging.ERROR)
    if case.collate is not None:
        an.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=case.collate))
    f32 = torch.float32
    fargs = FactorArguments(strategy="ekfac", use_empirical_fisher=True, covariance_max_examples=None, lambda_max_examples=None,
                            activation_covariance_dtype=f32, gradient_covariance_dtype=f32, eigendecomposition_dtype=torch.float64,
                            per_sample_gradient_dtype=f32, lambda_dtype=f32)
    sargs = ScoreArguments(damping_factor=None, per_sample_gradient_dtype=f32, precondition_dtype=f32, score_dtype=f32)
    return an, fargs, sargs


def _top10(scores: torch.Tensor, ids: torch.Tensor | None = None) -> dict:
    t = torch.topk(scores.float(), min(10, scores.shape[1]), dim=1)
    i = t.indices if ids is None else ids[t.indices]
    return {"ids": i.tolist(), "scores": t.values.tolist()}


def phase(spec: dict) -> dict:
    """Run one phase described by ``spec`` (see ``bench_index.py``) and measure it."""
    from lightning_influence.ekfac.capture import per_example_gradients
    from lightning_influence.ekfac.layer_data import iter_layer_data
    from lightning_influence.ekfac.scorer import InfluenceScorer
    from lightning_influence.index import build_index, load_index

    torch.set_num_threads(spec.get("threads", 1))
    workdir = Path(spec["workdir"])
    case = Loaded(workdir)
    n, nq, what = spec.get("n", 0), spec.get("n_query", 0), spec["phase"]
    train = case.train_set(n) if n else None
    small_train, small_query = case.train_set(256), case.query_set(4)
    opts = spec.get("options", {})
    out: dict[str, Any] = {}

    if what == "grad_pass":
        scorer = InfluenceScorer(case.model, case.factors)

        def run(ds):
            for _, data in iter_layer_data(case.model, case.loader(ds), scorer.tracked, scorer.task, "loss"):
                for k in data:
                    per_example_gradients(data[k].a, data[k].ds)

        run(small_train)
        _, wall, cpu, peak = measured(lambda: run(train))
    elif what == "build":
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            build_index(case.model, case.factors, case.loader(small_train), Path(tmp) / "warm", **opts)
        idx, wall, cpu, peak = measured(lambda: build_index(case.model, case.factors, case.loader(train), spec["path"], if_exists="overwrite", **opts))
        out.update(bytes=idx.nbytes, shards=len(idx.shards), dims=sum(idx.dims.values()))
    elif what in ("search", "faiss_search"):
        idx = load_index(spec["path"], model=case.model)
        approx = None
        if what == "faiss_search":
            from lightning_influence.index.approximate import FaissSearch

            approx = FaissSearch.load(idx)
        q = case.loader(case.query_set(nq), batch=spec.get("query_batch", 1000))
        idx.search(case.loader(small_query), k=10, approximate=approx)
        top, wall, cpu, peak = measured(lambda: idx.search(q, k=10, approximate=approx))
        out["top10"] = {"ids": top.ids.tolist(), "scores": top.scores.tolist()}
    elif what == "search_rerank":
        idx = load_index(spec["path"], model=case.model)
        q = case.loader(case.query_set(nq), batch=spec.get("query_batch", 1000))
        c = spec.get("candidates", 100)

        def run(qs, tr):
            cand = idx.search(qs, k=c)
            return idx.rerank(qs, cand, tr, k=10, collate_fn=case.collate, batch_size=case.batch)

        run(case.loader(small_query), train)
        top, wall, cpu, peak = measured(lambda: run(q, train))
        out["top10"] = {"ids": top.ids.tolist(), "scores": top.scores.tolist()}
    elif what == "faiss_build":
        from lightning_influence.index.approximate import FaissSearch

        idx = load_index(spec["path"], model=case.model)
        _, wall, cpu, peak = measured(lambda: FaissSearch.build(idx, **spec.get("faiss", {})))
    elif what == "scorer_pairwise":
        scorer = InfluenceScorer(case.model, case.factors)
        q = case.loader(case.query_set(nq), batch=spec.get("query_batch", 1000))
        scorer.pairwise(case.loader(small_query), case.loader(small_train))
        res, wall, cpu, peak = measured(lambda: scorer.pairwise(q, case.loader(train)))
        out["output_mib"] = res.pairwise.numel() * res.pairwise.element_size() / 2**20
        out["top10"] = _top10(res.pairwise, res.train_ids)
    elif what == "scorer_search":
        scorer = InfluenceScorer(case.model, case.factors)
        q = case.loader(case.query_set(nq), batch=spec.get("query_batch", 1000))
        scorer.search(case.loader(small_query), case.loader(small_train), k=10)
        top, wall, cpu, peak = measured(lambda: scorer.search(q, case.loader(train), k=10))
        out["top10"] = {"ids": top.ids.tolist(), "scores": top.scores.tolist()}
    elif what == "scorer_self":
        scorer = InfluenceScorer(case.model, case.factors)
        scorer.self_influence(case.loader(small_train))
        res, wall, cpu, peak = measured(lambda: scorer.self_influence(case.loader(train)))
        out["output_mib"] = res.self_influence.numel() * (res.self_influence.element_size() + 8) / 2**20
    elif what == "multistage_pairwise":
        import copy

        from lightning_influence.multistage import MultiStageScorer

        ft = copy.deepcopy(case.model)
        with torch.no_grad():
            g = torch.Generator().manual_seed(1)
            for p in ft.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=g))
        ms = MultiStageScorer(case.model, case.factors, ft, case.factors)
        q = case.loader(case.query_set(nq), batch=spec.get("query_batch", 1000))
        ms.pairwise(case.loader(small_query), case.loader(small_train))
        res, wall, cpu, peak = measured(lambda: ms.pairwise(q, case.loader(train)))
        out["output_mib"] = res.pairwise.numel() * res.pairwise.element_size() / 2**20
    elif what == "kron_fit":
        an, fargs, _ = _kron(case, Path(spec["kron_dir"]))
        fit_set = case.train_set(N_FACTOR_MLP) if case.kind == "mlp" else case.train_set(N_FACTOR_LM)
        _, wall, cpu, peak = measured(lambda: an.fit_all_factors(factors_name="ekfac", dataset=fit_set, per_device_batch_size=case.batch,
                                                                   factor_args=fargs, overwrite_output_dir=True))
    elif what == "kron_pairwise":
        an, _, sargs = _kron(case, Path(spec["kron_dir"]))
        qset = case.query_set(nq)

        def run(qs, tr, name):
            an.compute_pairwise_scores(scores_name=name, factors_name="ekfac", query_dataset=qs, train_dataset=tr,
                                       per_device_query_batch_size=spec.get("query_batch", 1000), per_device_train_batch_size=case.batch,
                                       score_args=sargs, overwrite_output_dir=True)
            return an.load_pairwise_scores(name)["all_modules"]

        run(small_query, small_train, "warm")
        res, wall, cpu, peak = measured(lambda: run(qset, train, "pairwise"))
        out["output_mib"] = res.numel() * res.element_size() / 2**20
        out["top10"] = _top10(res)
    else:
        raise ValueError(what)
    out.update(wall=wall, cpu=cpu, peak_mib=peak)
    return out


def run_phase(spec: dict) -> dict:
    """Run :func:`phase` in a fresh process; returns its measurements (raises with its output on failure)."""
    cmd = [sys.executable, str(HERE / "bench_index.py"), "--worker", json.dumps(spec)]
    env = dict(os.environ, OMP_NUM_THREADS=str(spec.get("threads", 1)), MKL_NUM_THREADS=str(spec.get("threads", 1)),
               PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"phase {spec['phase']} failed:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------
# the default compression rule (issue 21): candidate rules and the tasks they are measured on
# ------------------------------------------------------------------------------------------
GPT2_SMALL_SHAPES = [(f"transformer.h.{i}.{n}", s) for i in range(12) for n, s in (
    ("attn.c_attn", (2304, 769)), ("attn.c_proj", (768, 769)), ("mlp.c_fc", (3072, 769)), ("mlp.c_proj", (768, 3073)))]
"""GPT-2 small's 48 tracked layers as ``(d_out, a_dim)`` with the bias column (Conv1D weights
768×2304, 768×768, 768×3072, 3072×768): 0.59M-2.36M gradient entries each."""


def threshold_rule(k: int, dim: int = 1024):
    """Candidate (b): a layer exact when its entries are at most ``k · dim``, else SJLT to ``dim``."""
    def dims(shapes):
        return {n: None if s[0] * s[1] <= k * dim else dim for n, s in shapes}
    return dims


def candidate_rules() -> dict[str, Any]:
    """Rule name → ``shapes -> {layer: None (exact) | sketch length}``; the first is the old default."""
    from lightning_influence.index.projection import layer_dims

    return {
        "sjlt 1,024 / layer (old default)": lambda s: layer_dims(s, "sjlt", 1024),
        "exact if ≤ 4·dim, else sjlt 1,024": threshold_rule(4),
        "exact if ≤ 8·dim, else sjlt 1,024": threshold_rule(8),
        "exact if ≤ 16·dim, else sjlt 1,024": threshold_rule(16),
        "auto, budget 24,576": lambda s: layer_dims(s, "auto", 1024, 24_576),
        "auto, budget 49,152 (new default)": lambda s: layer_dims(s, "auto", 1024, 49_152),
        "auto, budget 98,304": lambda s: layer_dims(s, "auto", 1024, 98_304),
    }


def numbers_per_example(shapes, dims: dict) -> int:
    """Stored numbers per example of a per-layer choice (``None``: all the layer's entries)."""
    return sum(s[0] * s[1] if dims[n] is None else dims[n] for n, s in shapes)


def build_with_dims(model, factors, loader, path, dims: dict, dtype: str = "float16", seed: int = 0):
    """An index whose layers store what ``dims`` says (the rule under test), through the library's
    own build (``build_index_from_preconditioner`` with a transform of these per-layer lengths)."""
    from lightning_influence.ekfac.preconditioner import Preconditioner
    from lightning_influence.index.builder import IndexOptions, build_index_from_preconditioner
    from lightning_influence.index.transform import IndexTransform

    names = factors.layer_names
    tracked = factors.check_model(model)
    pre = Preconditioner(factors, names, None, torch.float64)
    t = IndexTransform.from_preconditioner(pre, tracked, "auto", None, seed, dims=dims)
    return build_index_from_preconditioner(model, pre, tracked, loader, path, IndexOptions("auto", None, dtype, seed), transform=t,
                                           if_exists="overwrite")


def lm_rule_tasks(n_train: int, n_query: int) -> dict:
    """GPT-NeoX tasks of the evaluation matrix's shape (``matrix_tasks``) but wider, so that the budget binds: hidden 64
    (99,456 gradient entries per example) and hidden 128 (395,520)."""
    from matrix_tasks import Recipe, Task, lm_data

    from lightning_influence.data import lm_collate
    from lightning_influence.demos import tiny_causal_lm

    vocab = 48
    out = {}
    for hidden, heads in ((64, 4), (128, 4)):
        def make(seed: int, h=hidden, hd=heads):
            torch.manual_seed(seed)
            return tiny_causal_lm("gpt_neox", vocab_size=vocab, hidden=h, layers=2, heads=hd, max_len=32, seed=seed)
        name = f"gpt_neox_h{hidden}_text"
        out[name] = Task(name, "transformer", f"GPT-NeoX 2 layers hidden {hidden} on generated bigram text (vocab {vocab}, 8-16 tokens), "
                         "AdamW lr 3e-3, 5 epochs", Recipe("adamw", 3e-3, 5, 0.0, 16), make, lm_data(n_train, n_query, vocab),
                         collate=lm_collate, loss="hf", config={"vocab": vocab, "hidden": hidden})
    return out
