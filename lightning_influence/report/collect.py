"""Read a run's ``influence/`` artifacts into :class:`MethodReport` objects.

:func:`collect_report` reads every artifact below a run's ``influence/`` folder, choosing each
reader by the manifest's ``kind`` (``"ekfac"`` factors, ``"scores"``, ``"z0"`` recordings), never
by folder name; per-epoch artifacts (``epoch=NNNN/...``) are summarised by the latest one.
Rendered examples (kind ``"examples"``) are not reports: :func:`collect_views` reads them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional
import weakref

import torch
from torch import Tensor

from .views import EXAMPLES_KIND, ExampleViews, load_views
from ..storage import ArtifactError, list_artifacts, read_manifest
from .methods import method_info, robust_scale

__all__ = ["MethodReport", "find_influence_dir", "collect_report", "read_report", "READERS", "collect_views"]

_EPOCH = re.compile(r"^epoch=(\d+)$")
AUXILIARY_KINDS = frozenset({EXAMPLES_KIND, "calibration"})  # lightning_influence.calibrate.CALIBRATION_KIND
"""Artifact kinds that accompany reports rather than being one (read by :func:`collect_views`)."""


@dataclass
class MethodReport:
    """What one artifact says.

    Attributes:
        method: ``"ekfac factors"``, ``"z0 recording"``, or the method of saved scores
            (``"ekfac"``, ``"z0"``, ``"lissa"``, ...).
        artifact: path of the artifact directory.
        label: the name of the callback that wrote it (its ``name``), else the method; names
            figures, so two callbacks of one method keep apart.
        summary: small facts (counts, options, epochs).
        self_top: most self-influential ``(id, score)``, highest first.
        pairwise_top: per query, ``{"query_id", "proponents": [(id, score)...], "opponents":
            [...], "n": training examples ranked, "scale": median |score| of the query's row}``.
        self_scores: ``(ids, scores)`` for plots, when the artifact has self-influence.
        self_scale: median absolute self-influence (what normalised scores divide by).
        spectra: layer → sorted corrected eigenvalues (EK-FAC factors only; see
            :func:`sorted_spectrum`: at most :data:`SPECTRUM_POINTS` values per layer).
        damping: layer → the default damping (:mod:`lightning_influence.ekfac.damping`; EK-FAC factors only).
        estimator: the scores' estimator where the method has several (Z0's self-influence).
        explanations: what the summary's numbers mean for this run (sentences).
        notes: things the user should know (e.g. why pairwise scores are missing).
        warnings: things that contradict what the scores are supposed to be (e.g. negative
            self-influence), with the settings that produced them; shown beside the scores.
    """

    method: str
    artifact: Path
    label: str = ""
    summary: dict[str, Any] = field(default_factory=dict)
    self_top: list[tuple[int, float]] = field(default_factory=list)
    pairwise_top: list[dict[str, Any]] = field(default_factory=list)
    self_scores: Optional[tuple[Tensor, Tensor]] = None
    self_scale: Optional[float] = None
    spectra: dict[str, Tensor] = field(default_factory=dict)
    damping: dict[str, float] = field(default_factory=dict)
    estimator: Optional[str] = None
    explanations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.label = self.label or self.method.split()[0]

    @property
    def method_key(self) -> str:
        """The method without the artifact's qualifier (``"ekfac factors"`` → ``"ekfac"``)."""
        return self.method.split()[0]

    @property
    def title(self) -> str:
        """What this report shows, in the words used everywhere (``"EK-FAC self-influence"``)."""
        name = method_info(self.method_key, self.estimator).title
        if self.spectra or self.method.endswith("factors"):
            return f"{name} factors"
        parts = (["self-influence"] if self.self_scores is not None else []) + (["train-test influence"] if self.pairwise_top else [])
        return f"{name} {' and '.join(parts) or 'recording'}"

    @property
    def n_ranked(self) -> int:
        """How many training examples the self-influence ranking covers."""
        return 0 if self.self_scores is None else int(self.self_scores[1].numel())


def find_influence_dir(run_dir: str | os.PathLike) -> Path:
    """The ``influence/`` directory of a run: ``run_dir`` itself when it is named ``influence``
    or directly holds artifacts (a callback's ``dirpath``), else ``run_dir/influence``, else the
    single ``influence`` folder below ``run_dir``.

    Raises:
        FileNotFoundError: nothing found, or several runs found (the message lists them).
    """
    d = Path(run_dir)
    if not d.exists():
        raise FileNotFoundError(f"{d} does not exist")
    if d.name == "influence" and d.is_dir():
        return d
    if (d / "influence").is_dir():
        return d / "influence"
    found = sorted(p for p in d.rglob("influence") if p.is_dir())
    if len(found) == 1:
        return found[0]
    if not found:
        if d.is_dir() and any(i.kind in READERS for i in list_artifacts(d)):
            return d
        raise FileNotFoundError(
            f"no influence/ folder under {d}: train with an influence callback (EKFACInfluence, Z0Influence, "
            "LiSSASelfInfluence) and point this at the run's log directory"
        )
    listing = "\n  ".join(str(p.parent) for p in found)
    raise FileNotFoundError(f"several runs under {d}; pass one of:\n  {listing}")


def collect_report(run_dir: str | os.PathLike, top_k: int = 10, queries: int = 5) -> list[MethodReport]:
    """Read every artifact under a run's ``influence/`` folder.

    Per-epoch artifacts (``<callback>/epoch=NNNN/<artifact>``) are represented by the end-of-fit
    artifact of the same callback when there is one, else by their latest epoch (the summary
    says how many epochs were recorded).

    Args:
        run_dir: the run's log directory (or its ``influence/`` folder).
        top_k: how many examples to list per ranking.
        queries: at most this many queries get a proponent/opponent list.

    Returns:
        One report per artifact, in path order.

    Raises:
        FileNotFoundError: no influence folder, or it holds no complete artifact (the message
            names the incomplete ones).
    """
    root = find_influence_dir(run_dir)
    latest: dict[tuple[str, ...], tuple[int, Path]] = {}
    epochs: dict[tuple[str, ...], int] = {}
    incomplete: list[str] = []
    for info in list_artifacts(root):
        rel = info.path.relative_to(root)
        if info.kind in AUXILIARY_KINDS:
            continue
        if info.kind not in READERS:
            incomplete.append(f"{rel} ({'no readable manifest.json' if info.kind is None else f'unknown kind {info.kind!r}'})")
            continue
        epoch_part = next((p for p in rel.parts if _EPOCH.match(p)), None)
        key = tuple(p for p in rel.parts if p != epoch_part)
        order = 1 << 30 if epoch_part is None else int(_EPOCH.match(epoch_part).group(1))
        epochs[key] = epochs.get(key, 0) + int(epoch_part is not None)
        if key not in latest or order > latest[key][0]:
            latest[key] = (order, info.path)
    reports: list[MethodReport] = []
    for key in sorted(latest):
        path = latest[key][1]
        try:
            rep = read_report(path, top_k, queries)
        except ArtifactError as e:
            incomplete.append(f"{path.relative_to(root)} ({e})")
            continue
        if epochs.get(key):
            rep.summary["epochs_recorded"] = epochs[key]
        reports.append(rep)
    if not reports:
        detail = "; incomplete: " + "; ".join(incomplete) if incomplete else ""
        raise FileNotFoundError(f"{root} holds no complete influence artifact{detail}")
    reports[0].notes += [f"skipped incomplete artifact {i}" for i in incomplete]
    return reports


def collect_views(run_dir: str | os.PathLike) -> ExampleViews:
    """Every rendered example saved under a run's ``influence/`` folder (kind ``"examples"``,
    written by the callbacks at the end of fit), merged; damaged ones are skipped."""
    views = ExampleViews()
    for info in list_artifacts(find_influence_dir(run_dir)):
        if info.kind == EXAMPLES_KIND:
            try:
                views.update(load_views(info.path))
            except ArtifactError:
                continue
    return views


def read_report(path: str | os.PathLike, top_k: int = 10, queries: int = 5) -> MethodReport:
    """The :class:`MethodReport` of one artifact, read by its manifest's ``kind``.

    Args:
        path: the artifact's directory.
        top_k: how many examples to list per ranking.
        queries: at most this many queries get a proponent/opponent list.

    Returns:
        The report.

    Raises:
        ArtifactError: not a readable artifact of a kind the report knows.
    """
    p = Path(path)
    manifest = read_manifest(p)
    kind = None if manifest is None else manifest.get("kind")
    if kind not in READERS:
        raise ArtifactError(f"{p} is not an artifact the report can read (kind {kind!r}; known: {sorted(READERS)})")
    return READERS[kind](p, top_k, queries)


def _every(n: Any) -> str:
    return "every training batch" if n in (None, 1) else f"every {_ordinal(int(n))} training batch"


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


SPECTRUM_POINTS = 65536
"""The most corrected eigenvalues a report keeps per layer (GPT-2's MLP layers have 9.4 million)."""


def sorted_spectrum(lambdas: Tensor, points: int = SPECTRUM_POINTS) -> Tensor:
    """``lambdas`` flattened and sorted, largest first, in float64. A layer with more than
    ``points`` entries keeps an even (strided) sample of ``points`` of them with its exact
    maximum first: enough for the plotted spectrum and the table's mean (a sample mean), without
    sorting millions of values per layer at the end of a run."""
    flat = lambdas.reshape(-1)
    if flat.numel() > points:
        stride = -(-flat.numel() // points)
        flat = torch.cat([flat.max().reshape(1), flat[::stride]])
    return torch.sort(flat.double(), descending=True).values


_WRITTEN: dict[str, tuple[Any, "weakref.ref[Any]"]] = {}


def remember_written_factors(path: str | os.PathLike, factors: Any) -> None:
    """Record that this process just wrote ``factors`` at ``path``: while they are alive and the
    artifact's tensor checksum is still the one written, the report reads them from memory
    instead of loading the artifact back (GBs for a 124M model at the end of a run)."""
    manifest = read_manifest(Path(path))
    if manifest is not None:
        _WRITTEN[str(Path(path).resolve())] = (manifest.get("tensor_sha256"), weakref.ref(factors))


def _written_factors(path: Path) -> Any:
    entry = _WRITTEN.get(str(path.resolve()))
    if entry is None:
        return None
    digest, ref = entry
    factors, manifest = ref(), read_manifest(path)
    if factors is None or manifest is None or manifest.get("tensor_sha256") != digest:
        _WRITTEN.pop(str(path.resolve()), None)
        return None
    return factors


def _ekfac_report(path: Path, top_k: int, queries: int) -> MethodReport:
    from ..ekfac.factors import load_factors

    f = _written_factors(path) or load_factors(path)
    rep = MethodReport("ekfac factors", path, label=str(f.meta.get("callback", "")))
    rep.summary = {
        "layers": len(f.layers),
        "fisher": f.fisher,
        "examples": f.n_examples,
        "correction_examples": f.n_lambda_examples,
        "epochs_completed": f.meta.get("epochs_completed"),
    }
    opts = f.meta.get("options") or {}
    epochs = opts.get("epochs", "all")
    span = "over all epochs" if epochs in ("all", None) else f"over the last {epochs} epoch{'s' * (epochs != 1)}"
    if "update_every_n_steps" in opts:
        rep.explanations.append(
            f"examples={f.n_examples}: the covariances A and S average over {f.n_examples} example passes, taken from "
            f"{_every(opts.get('update_every_n_steps'))} {span} (update_every_n_steps={opts.get('update_every_n_steps')}, "
            f"epochs={epochs!r}).")
    correction = opts.get("correction_used") or opts.get("correction")
    if correction == "pass":
        cap = opts.get("correction_max_examples")
        rep.explanations.append(
            f"correction_examples={f.n_lambda_examples}: the eigenvalues Λ were corrected in one pass over the training data "
            f"at the final weights{f' (at most correction_max_examples={cap})' if cap else ''}.")
    elif correction:
        rep.explanations.append(f"eigenvalue correction: {correction!r}.")
    rep.spectra = {n: sorted_spectrum(l.lambdas) for n, l in f.layers.items()}
    rep.damping = f.dampings(None)
    return rep


def _pairwise_rows(scores: Any, top_k: int, queries: int) -> list[dict[str, Any]]:
    rows = scores.top_pairwise(top_k).as_rows()[:queries]
    for r, row in enumerate(rows):
        row["n"] = scores.n_train
        row["scale"] = robust_scale(scores.pairwise[r])
    return rows


def _scores_report(path: Path, top_k: int, queries: int) -> MethodReport:
    from ..scores import load_scores

    s = load_scores(path)
    rep = MethodReport(s.method, path, label=str(s.meta.get("callback", "")), estimator=s.options.get("estimator"))
    n_train = s.n_train
    if s.meta.get("sparse"):  # a top-k answer (lightning-influence query): only the listed examples are stored
        top_k = min(top_k, int(s.meta.get("top_k") or top_k))
        n_train = int(s.options.get("n_train") or n_train)
    rep.summary = {"train_examples": n_train}
    if s.epoch is not None:
        rep.summary["epochs_completed"] = s.epoch + 1  # the artifact records the 0-based epoch after which it was made
    if s.self_influence is not None:
        rep.self_top = s.top_self(top_k)
        rep.self_scores = (s.train_ids, s.self_influence)
        rep.self_scale = robust_scale(s.self_influence)
        rep.summary.update(_distribution(s.self_influence))
        rep.warnings += _self_influence_warnings(s)
    if s.pairwise is not None:
        rep.summary["queries"] = int(s.query_ids.shape[0])
        rep.pairwise_top = _pairwise_rows(s, top_k, queries) if queries > 0 else []
        for row in rep.pairwise_top:
            row["n"] = n_train
        rep.explanations.append(_query_sentence(rep.summary["queries"], len(rep.pairwise_top), "the query set scored"))
    return rep


def _curvature_words(s: Any) -> str:
    """The settings that made a self-influence's curvature, in words."""
    o, m = s.options, s.meta
    parts = [f"{k}={o[k]!r}" for k in ("curvature", "fisher") if o.get(k) is not None]
    damping = m.get("damping", o.get("damping"))
    if isinstance(damping, (int, float)):
        parts.append(f"damping={damping:.3g}")
    elif damping is not None:
        parts.append(f"damping={damping!r}")
    return ", ".join(parts) or "the method's default curvature"


def _self_influence_warnings(s: Any) -> list[str]:
    """Negative self-influence (which ``g·(C + λI)⁻¹·g`` with a positive definite ``C + λI``
    never is), and examples whose estimate met negative curvature, with the curvature that made them."""
    out = []
    x = s.self_influence.double()
    x = x[torch.isfinite(x)]
    neg = int((x < 0).sum())
    if neg and s.method != "z0":
        out.append(f"{neg} of {int(x.numel())} self-influence scores are negative (lowest {float(x.min()):.4g}): a quadratic "
                   f"form g·(C + λI)⁻¹·g is ≥ 0 only when C + λI is positive definite, and these were made with "
                   f"{_curvature_words(s)}. They are not 'low influence': the curvature was not positive definite along "
                   "their gradients. Use curvature='ggn' or a larger damping; rank them with care.")
    met = s.meta.get("negative_curvature")
    if isinstance(met, int) and met > 0:
        out.append(f"{met} of {int(x.numel())} examples met negative curvature of C + λI ({_curvature_words(s)}): their "
                   "scores are kept ≥ 0 but are not (C + λI)⁻¹ quadratic forms along those directions. Use curvature='ggn' "
                   "or a larger damping for a positive definite curvature.")
    return out


def _query_sentence(n: int, shown: int, what: str) -> str:
    listed = f"all {shown} are" if shown >= n else f"the first {shown} {'is' if shown == 1 else 'are'}"
    return (f"queries={n}: each query is one example of {what}, named by its id; {listed} listed with the training "
            "examples that help it most (proponents) and hurt it most (opponents).")


def _z0_report(path: Path, top_k: int, queries: int) -> MethodReport:
    """A Z0 recording: checkpoints and, with queries, train-test influence (its self-influence
    is the ``"scores"`` artifact the callback writes beside it)."""
    from ..scores import InfluenceScores
    from ..z0 import load_z0

    z = load_z0(path)
    rep = MethodReport("z0 recording", path)
    rep.summary = {"checkpoints": z.num_checkpoints, "train_examples": int(z.probe_ids.shape[0])}
    rep.explanations.append(f"checkpoints={z.num_checkpoints}: the losses were recorded at {z.num_checkpoints} points of "
                            "training (every_n_epochs / every_n_steps of Z0Influence).")
    if z.num_checkpoints < 2:
        rep.notes.append("fewer than 2 recorded checkpoints: no Z0 estimate yet")
        return rep
    if z.query_losses is not None and queries > 0:
        try:
            # the queries the model gets most wrong at the end: highest loss at the last recorded checkpoint
            final = torch.nan_to_num(z.query_losses[-1].double(), nan=-float("inf"))
            pick = torch.argsort(final, descending=True, stable=True)[:queries]
            shown = replace(z, query_ids=z.query_ids[pick], query_losses=z.query_losses[:, pick])  # only the rows shown
            qs = InfluenceScores("z0", z.probe_ids, query_ids=shown.query_ids, pairwise=shown.pairwise())
            rep.summary["queries"] = int(z.query_ids.shape[0])
            rep.pairwise_top = _pairwise_rows(qs, top_k, queries)
            for row, k in zip(rep.pairwise_top, pick.tolist()):
                row["final_loss"] = float(z.query_losses[-1, k])
            n, shown_n = rep.summary["queries"], len(rep.pairwise_top)
            which = f"all {shown_n} are" if shown_n >= n else f"the {shown_n} with the highest loss at the last checkpoint " \
                "(the ones the model gets most wrong) are"
            rep.explanations.append(
                f"queries={n}: each query is one example of Z0Influence(queries=...), named by its id; {which} listed, "
                "highest loss first, with the training examples whose losses fell most with theirs (proponents) and "
                "rose most as theirs fell (opponents).")
        except (ValueError, RuntimeError) as e:
            rep.notes.append(f"no Z0 train-test influence: {e}")
    return rep


READERS: dict[str, Callable[[Path, int, int], MethodReport]] = {
    "ekfac": _ekfac_report,
    "scores": _scores_report,
    "z0": _z0_report,
}
"""Artifact ``kind`` → reader ``(path, top_k, queries) -> MethodReport``."""


def _distribution(x: Tensor) -> dict[str, float]:
    x = x.double()
    x = x[torch.isfinite(x)]
    if not x.numel():
        return {}
    q = torch.quantile(x, torch.tensor([0.5, 0.9], dtype=torch.float64))
    return {"mean": float(x.mean()), "median": float(q[0]), "p90": float(q[1]), "max": float(x.max())}
