"""What the benchmark scripts share (benchmarks only; no ``bench_*.py`` imports another).

- Lightning plumbing: :func:`silence_loggers`, :func:`quiet`, :func:`make_trainer`.
- Training recipes: :func:`train_classifier` (SGD with momentum, the kronfluence comparisons),
  :class:`MLPCase` with :func:`train_plain` (the Lightning recipe as a plain loop), the Z0 runs'
  :func:`seeded_mlp` / :func:`fit_time`.
- References: :func:`tracin_self_influence`, :func:`reference` (explicit float64 Hessian).
- LDS: the ``LDS_*`` set-up, :func:`query_losses`, :func:`retrained_query_losses`, :func:`lds`.
- Measuring: :func:`measured` (wall, CPU and peak memory of one call), :func:`cpu_seconds_so_far`.
- Reports: :func:`utc_now` (when), :func:`machine` (one description of the machine),
  :func:`write_results` (a page's generated block), :func:`md_table` / :func:`md_row`
  (one markdown table formatter), :func:`mean_sd` (``mean ± sd`` over seeds).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vmap
from torch.utils.data import DataLoader, Subset, TensorDataset

# the MLP of the callback-overhead cases
MLP_HIDDEN, MLP_LR, MLP_BATCH, MLP_EPOCHS = 128, 0.05, 64, 10
# the LDS set-up (bench_ekfac_callback's LDS section, reused by bench_index, bench_trajectory, bench_fact_tracing)
LDS_HIDDEN, LDS_LR, LDS_BATCH, LDS_EPOCHS, LDS_QUERIES = 32, 0.1, 64, 20, 100


# ------------------------------------------------------------------------------------------
# Lightning plumbing
# ------------------------------------------------------------------------------------------
def silence_loggers() -> None:
    """Lightning sets its loggers to INFO when imported: lower them afterwards."""
    import lightning  # noqa: F401

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "kronfluence"):
        logging.getLogger(name).setLevel(logging.ERROR)
        for h in logging.getLogger(name).handlers:
            h.setLevel(logging.ERROR)


def make_trainer(max_epochs: Optional[int] = None, callbacks: Iterable = (), root: Optional[str] = None, **kw: Any):
    """A one-device CPU ``L.Trainer`` under ``root`` (``None``: Lightning's default, the working
    directory) with no logger, progress bar, summary, checkpoint or sanity check; ``kw``
    (``max_steps``, ``precision``, ``accelerator``, ``devices``, ``strategy``, ...) overrides these."""
    import lightning as L

    opts: dict[str, Any] = dict(
        accelerator="cpu", devices=1, max_epochs=max_epochs, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0, callbacks=list(callbacks),
    )
    if root is not None:
        opts["default_root_dir"] = root
    return L.Trainer(**{**opts, **kw})


@contextlib.contextmanager
def quiet():
    """Silence Lightning's stdout/stderr chatter (GPU/TPU availability lines)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        yield


class Case:
    """A training set-up: fresh model with fixed initial weights + a seeded loader."""

    name: str
    epochs: int
    layers: Optional[list[str]] = None  # None: the callback's default (every Linear)
    note: str = ""

    def model(self) -> nn.Module:  # pragma: no cover - overridden
        raise NotImplementedError

    def loader(self) -> DataLoader:  # pragma: no cover - overridden
        raise NotImplementedError


class MLPCase(Case):
    def __init__(self, hidden=MLP_HIDDEN, lr=MLP_LR, batch=MLP_BATCH, epochs=MLP_EPOCHS, n_train=None, name="mlp"):
        from lightning_influence.demos import digits_dataset

        train, test, _ = digits_dataset(seed=0)
        if n_train is not None:
            train = TensorDataset(*(t[:n_train] for t in train.tensors))
        self.train, self.test = train, test
        self.hidden, self.lr, self.batch, self.epochs, self.name = hidden, lr, batch, epochs, name
        self.collate = None
        self.note = (f"MLPClassifier 64-{hidden}-10 (Tanh), SGD lr {lr}, {len(train):,} digits examples, "
                     f"batch {batch}, {epochs} epochs ({epochs * -(-len(train) // batch)} steps)")

    def model(self):
        from lightning_influence.demos import MLPClassifier

        torch.manual_seed(0)
        return MLPClassifier(d_in=64, hidden=self.hidden, n_classes=10, lr=self.lr)

    def loader(self, dataset=None):
        return DataLoader(dataset if dataset is not None else self.train, batch_size=self.batch, shuffle=True,
                          generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------
# Training recipes and references
# ------------------------------------------------------------------------------------------
def train_classifier(model: nn.Module, train: TensorDataset, lr: float, seed: int = 0, epochs: int = 5) -> nn.Module:
    """``model`` trained in place (SGD with momentum 0.9, batch 32, shuffled with ``seed``,
    mean cross-entropy) and returned in eval mode: the benchmarks' shared recipe."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loader = DataLoader(train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed))
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


def accuracy(model: nn.Module, test: TensorDataset) -> float:
    """Share of ``test`` the model classifies correctly."""
    with torch.no_grad():
        xt, yt = test.tensors
        return float((model(xt).argmax(-1) == yt).float().mean())


def seeded_mlp(args) -> nn.Module:
    """``MLPClassifier(64, args.hidden, 10, lr=args.lr)`` initialised with ``args.seed``."""
    from lightning_influence.demos import MLPClassifier

    torch.manual_seed(args.seed)
    return MLPClassifier(d_in=64, hidden=args.hidden, n_classes=10, lr=args.lr)


def fit_time(args, train, callbacks) -> tuple[float, nn.Module, str, Any]:
    """``(seconds, model, root, trainer)`` of one fit of :func:`seeded_mlp` on ``train`` (batch
    ``args.batch_size``, seeded shuffle) for ``args.epochs`` epochs with ``callbacks``."""
    model = seeded_mlp(args)
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
    root = tempfile.mkdtemp(prefix="bench_z0_")
    t = make_trainer(args.epochs, callbacks, root)
    t0 = time.perf_counter()
    t.fit(model, loader)
    return time.perf_counter() - t0, model, root, t


def tracin_self_influence(model: nn.Module, snapshots: list[dict], x, y, lr: float) -> torch.Tensor:
    """sum_checkpoints lr * ||grad_theta loss(z)||^2 with torch.func per-example gradients."""
    net = model.net

    def loss_fn(params, xi, yi):
        out = functional_call(net, params, (xi[None],))
        return F.cross_entropy(out, yi[None])

    per_example = vmap(grad(loss_fn), in_dims=(None, 0, 0))
    total = torch.zeros(len(y), dtype=torch.float64)
    for snap in snapshots:
        params = {k.removeprefix("net."): v for k, v in snap.items()}
        for s in range(0, len(y), 512):
            g = per_example(params, x[s : s + 512], y[s : s + 512])
            total[s : s + 512] += lr * sum(t.reshape(t.shape[0], -1).double().pow(2).sum(1) for t in g.values())
    return total


def reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, probe: torch.Tensor):
    """Explicit float64 Hessian of the mean loss (all parameters) and per-example gradients."""
    m64 = _double_copy(model)
    names = [n for n, _ in m64.named_parameters()]
    shapes = [p.shape for _, p in m64.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for _, p in m64.named_parameters()])
    x64 = x.double()

    def unflat(t):
        out, i = {}, 0
        for n, s in zip(names, shapes):
            k = s.numel()
            out[n] = t[i : i + k].reshape(s)
            i += k
        return out

    def loss(t, xb, yb):
        return F.cross_entropy(functional_call(m64, unflat(t), (xb,)), yb)

    g_full = grad(lambda t: loss(t, x64, y))

    def hvp(v):
        return jvp(g_full, (theta,), (v,))[1]

    eye = torch.eye(theta.numel(), dtype=torch.float64)
    H = torch.cat([vmap(hvp)(eye[i : i + 128]) for i in range(0, theta.numel(), 128)])
    H = (H + H.T) / 2
    per_ex = vmap(grad(lambda t, xi, yi: loss(t, xi[None], yi[None])), in_dims=(None, 0, 0))
    G = per_ex(theta, x64[probe], y[probe])
    return H, G, theta, unflat, m64


def _double_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).double().eval()


# ------------------------------------------------------------------------------------------
# LDS
# ------------------------------------------------------------------------------------------
def train_plain(case: MLPCase, dataset) -> nn.Module:
    """The Lightning recipe as a plain loop (same init, optimizer, batches and order)."""
    model = case.model()
    opt = model.configure_optimizers()
    loader = case.loader(dataset)  # one loader for all epochs: its generator advances, as in Lightning
    model.train()
    for _ in range(case.epochs):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def query_losses(model: nn.Module, query: TensorDataset) -> torch.Tensor:
    x, y = query.tensors
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


def retrained_query_losses(case, query: TensorDataset, n_models: int, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    """``(masks BoolTensor[M, N], losses Tensor[M, Q])`` of ``n_models`` models retrained on random
    halves of ``case.train`` with :func:`train_plain` (``lightning_influence.evaluate.retrain_subsets``)."""
    from lightning_influence.evaluate import retrain_subsets

    out = retrain_subsets(len(case.train), lambda j, idx: query_losses(train_plain(case, Subset(case.train, idx.tolist())), query),
                          n_subsets=n_models, seed=seed, progress=False)
    return out.masks, out.losses.float()


def lds(scores: torch.Tensor, masks: torch.Tensor, losses: torch.Tensor) -> dict:
    """scores [Q, N], masks [M, N] (bool), losses [M, Q] → LDS summary
    (:func:`lightning_influence.evaluate.linear_datamodeling_score`; a constant query counts as 0)."""
    from lightning_influence.evaluate import linear_datamodeling_score

    r = linear_datamodeling_score(scores, masks, losses, constant="zero")
    return {"lds": r.lds, "se": r.se, "per_query": r.per_query.tolist()}


# ------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------
def measured(fn: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    """``(fn(), {"wall": s, "cpu": s, "peak_bytes": resident-set high-water mark above the start})``
    after freeing cached memory; ``lightning_influence.memory`` is imported here, from whichever
    library is on the path (``bench_scale_index``'s children measure an older one)."""
    from lightning_influence.memory import PeakMemory, release_free_memory

    release_free_memory()
    with PeakMemory() as peak:
        w0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return result, {"wall": wall, "cpu": cpu, "peak_bytes": peak.peak_bytes}


def cpu_seconds_so_far() -> float:
    """User + system CPU seconds of this process and its finished children."""
    return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))


# ------------------------------------------------------------------------------------------
# Reports
# ------------------------------------------------------------------------------------------
RESULTS_BEGIN, RESULTS_END = "<!-- results:begin -->", "<!-- results:end -->"


def write_results(doc: "os.PathLike[str]", text: str, title: str) -> None:
    """Put ``text`` between ``doc``'s :data:`RESULTS_BEGIN` and :data:`RESULTS_END` markers, the
    hand-written rest of the page untouched; without the markers, a ``## Results`` section with
    them is appended (to a new page titled ``title`` when ``doc`` does not exist)."""
    from pathlib import Path

    doc = Path(doc)
    block = f"{RESULTS_BEGIN}\n{text}\n{RESULTS_END}"
    if doc.exists():
        page = doc.read_text()
        if RESULTS_BEGIN in page and RESULTS_END in page:
            page = page[: page.index(RESULTS_BEGIN)] + block + page[page.index(RESULTS_END) + len(RESULTS_END):]
        else:
            page = page.rstrip() + "\n\n## Results\n\n" + block + "\n"
    else:
        page = f"# {title}\n\n## Results\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(page)


def utc_now() -> str:
    """The time now as the reports write it: ``YYYY-MM-DD HH:MM UTC``."""
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def machine() -> str:
    """One line describing this machine: cores, torch (its device and intra-op threads now),
    Python, architecture and system."""
    device = f"CUDA {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "CPU-only"
    threads = torch.get_num_threads()
    return (f"{os.cpu_count()} CPU cores, {device} torch {torch.__version__} ({threads} thread{'s' * (threads != 1)}), "
            f"Python {platform.python_version()}, {platform.machine()} {platform.system()}")


def run_meta(total_s: float, **fields: Any) -> dict[str, Any]:
    """A report's description of its run: ``date`` (:func:`utc_now`), ``machine``, the given
    ``fields``, then ``total_s`` (wall seconds) and ``cpu_s`` (:func:`cpu_seconds_so_far`)."""
    return {"date": utc_now(), "machine": machine(), **fields, "total_s": total_s, "cpu_s": cpu_seconds_so_far()}


def md_row(cells: Sequence[Any]) -> str:
    """One markdown table line, ``| c1 | c2 |`` (cells through ``str``: format numbers before)."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table: ``| h1 | h2 |``, ``|---|---|``, then one :func:`md_row` per row,
    lines joined by newlines, no trailing one (``rows`` empty: the header alone, for rows that
    are printed as they are computed)."""
    return "\n".join([md_row(header), "|" + "---|" * len(header), *(md_row(r) for r in rows)])


def mean_sd(values: Sequence[float], fmt: str = ".3f", empty: str = "—") -> str:
    """``"mean ± sd"`` of ``values`` (sample standard deviation, ``fmt`` without its sign for the
    sd); one value alone; ``empty`` for none. Non-finite values are the caller's to drop."""
    if not values:
        return empty
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt.lstrip('+'))}"
