"""Choose a default by its worst case on half of the tasks, report it on the other half.

A default chosen on the tasks it is then reported on is a guess that looks like a result. This
module turns a matrix of results (task × seed × candidate → metric, plus an optional baseline
per task and seed) into an honest choice:

1. :func:`split_tasks` splits the tasks, deterministically, into a *choose* half and a *report*
   half (stratified, so that e.g. both optimizers appear in both halves);
2. :func:`select` scores each candidate on every task of the choose half by its mean over
   seeds, takes its **worst case** over those tasks (the worst margin over the baseline, the
   worst regret against the best candidate, or the worst rank) and chooses the candidate whose
   worst case is best;
3. the chosen candidate is reported, mean ± standard deviation over seeds, on the report half
   only (:meth:`Selection.report_rows`, :meth:`Selection.markdown`).

No Lightning and no torch: plain Python over floats, so that a benchmark, a test or a user's
notebook can build the matrix however it likes (:class:`ResultMatrix`).
"""

from __future__ import annotations

import hashlib
import math
import statistics
from dataclasses import dataclass, field
from typing import Iterable, Literal, Mapping, Optional, Sequence

__all__ = ["ResultMatrix", "Selection", "TaskSummary", "split_tasks", "select", "CRITERIA"]

Criterion = Literal["margin", "regret", "rank"]
CRITERIA: tuple[str, ...] = ("margin", "regret", "rank")
"""Worst-case criteria of :func:`select`:

* ``"margin"``: per task, ``mean_seeds(value) − mean_seeds(baseline)`` (needs baselines);
  a candidate's worst case is its smallest margin;
* ``"regret"``: per task, ``mean_seeds(value) − max over candidates of mean_seeds(value)``
  (``≤ 0``); worst case: its most negative regret;
* ``"rank"``: per task, the candidate's rank by ``mean_seeds(value)`` (1 = best; ties share the
  lowest rank); worst case: its largest rank.

Where lower values are better (``higher_is_better=False``) margins and regrets are negated
first, so that a larger worst case is always the better one (ranks: a smaller worst rank)."""


def _mean(xs: Sequence[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def _std(xs: Sequence[float]) -> float:
    """Sample standard deviation (``n − 1``); ``nan`` for fewer than two values."""
    return statistics.stdev(xs) if len(xs) > 1 else float("nan")


@dataclass
class ResultMatrix:
    """Results of candidates on tasks over seeds.

    Attributes:
        values: ``(task, seed, candidate) → metric`` (finite floats; a missing or non-finite
            entry is left out of that task's mean and counted in :attr:`missing`).
        baselines: ``(task, seed) → metric`` of the baseline the candidates must beat (e.g. the
            final-loss ranking's AP), or empty.
        higher_is_better: whether a larger metric is better (AP, LDS, MRR: yes).
        metric: the metric's name (for tables).
    """

    values: dict[tuple[str, int, str], float] = field(default_factory=dict)
    baselines: dict[tuple[str, int], float] = field(default_factory=dict)
    higher_is_better: bool = True
    metric: str = "metric"

    def add(self, task: str, seed: int, candidate: str, value: float) -> None:
        """Record one result (overwrites the same key)."""
        self.values[(str(task), int(seed), str(candidate))] = float(value)

    def add_baseline(self, task: str, seed: int, value: float) -> None:
        """Record the baseline of one task and seed."""
        self.baselines[(str(task), int(seed))] = float(value)

    @property
    def tasks(self) -> list[str]:
        """Task names in first-seen order."""
        return list(dict.fromkeys(k[0] for k in self.values))

    @property
    def candidates(self) -> list[str]:
        """Candidate names in first-seen order (the first is the incumbent: it wins exact ties)."""
        return list(dict.fromkeys(k[2] for k in self.values))

    def seeds(self, task: str) -> list[int]:
        """The seeds with at least one result on ``task``, sorted."""
        return sorted({k[1] for k in self.values if k[0] == task})

    def per_seed(self, task: str, candidate: str) -> list[float]:
        """The finite results of ``candidate`` on ``task``, by seed."""
        out = [self.values.get((task, s, candidate), float("nan")) for s in self.seeds(task)]
        return [v for v in out if math.isfinite(v)]

    def baseline_per_seed(self, task: str) -> list[float]:
        """The finite baseline results of ``task``, by seed."""
        out = [self.baselines.get((task, s), float("nan")) for s in self.seeds(task)]
        return [v for v in out if math.isfinite(v)]

    def task_mean(self, task: str, candidate: str) -> float:
        """Mean over seeds (``nan`` when there is none)."""
        return _mean(self.per_seed(task, candidate))

    @property
    def missing(self) -> int:
        """How many (task, seed, candidate) cells are absent or non-finite."""
        cells = sum(len(self.seeds(t)) for t in self.tasks) * len(self.candidates)
        return cells - sum(1 for v in self.values.values() if math.isfinite(v))


def _stable_key(salt: str, name: str) -> str:
    return hashlib.sha256(f"{salt}\x00{name}".encode()).hexdigest()


def split_tasks(
    tasks: Iterable[str],
    strata: Optional[Mapping[str, str]] = None,
    salt: str = "lightning-influence",
) -> tuple[list[str], list[str]]:
    """Split tasks into a choose half and a report half, deterministically.

    Within each stratum (``strata[task]``, e.g. the optimizer or the architecture; one stratum
    when ``None``), tasks are ordered by ``sha256(salt, name)`` and dealt alternately to the two
    halves. The first stratum (by name) deals its first task to the choose half, the next
    stratum to whichever half is then smaller (choose on a tie), and so on, so the halves
    differ in size by at most one. The split depends only on the task names, the strata and the
    salt: not on the order the tasks are given in, and adding a task moves no other task within
    a stratum it does not join.

    Args:
        tasks: task names (duplicates ignored).
        strata: task → stratum name (tasks missing from it form the stratum ``""``).
        salt: changes the split; keep it fixed once a choice has been reported.

    Returns:
        ``(choose, report)``, each sorted by name.

    Raises:
        ValueError: fewer than two tasks.
    """
    names = sorted(set(map(str, tasks)))
    if len(names) < 2:
        raise ValueError(f"need at least two tasks to split into a choose and a report half, got {names}")
    groups: dict[str, list[str]] = {}
    for t in names:
        groups.setdefault((strata or {}).get(t, ""), []).append(t)
    choose, report = [], []
    for g in sorted(groups):
        members = sorted(groups[g], key=lambda t: _stable_key(salt, t))
        first, second = (choose, report) if len(choose) <= len(report) else (report, choose)
        for i, t in enumerate(members):
            (first if i % 2 == 0 else second).append(t)
    return sorted(choose), sorted(report)


@dataclass
class TaskSummary:
    """One task's figures for one candidate (or the baseline).

    Attributes:
        task: the task.
        candidate: the candidate's name (``None`` for the baseline).
        mean: mean over seeds.
        std: sample standard deviation over seeds (``nan`` with one seed).
        n_seeds: how many seeds.
        margin: ``mean − baseline mean`` (signed so that positive is better), or ``nan``.
    """

    task: str
    candidate: Optional[str]
    mean: float
    std: float
    n_seeds: int
    margin: float = float("nan")


@dataclass
class Selection:
    """The outcome of :func:`select`.

    Attributes:
        chosen: the chosen candidate.
        criterion: the worst-case criterion used.
        choose_tasks: the tasks the choice was made on.
        report_tasks: the tasks it is reported on (never used to choose).
        worst: candidate → its worst case over the choose half (larger is better for
            ``"margin"``/``"regret"``, smaller for ``"rank"``).
        worst_report: candidate → the same worst case over the report half (for the record; not
            used to choose).
        matrix: the results.
    """

    chosen: str
    criterion: str
    choose_tasks: list[str]
    report_tasks: list[str]
    worst: dict[str, float]
    worst_report: dict[str, float]
    matrix: ResultMatrix

    def summary(self, task: str, candidate: Optional[str]) -> TaskSummary:
        """Mean ± std over seeds of ``candidate`` (``None``: the baseline) on ``task``."""
        m = self.matrix
        xs = m.baseline_per_seed(task) if candidate is None else m.per_seed(task, candidate)
        base = _mean(m.baseline_per_seed(task))
        sign = 1.0 if m.higher_is_better else -1.0
        margin = sign * (_mean(xs) - base) if candidate is not None and math.isfinite(base) else float("nan")
        return TaskSummary(task, candidate, _mean(xs), _std(xs), len(xs), margin)

    def report_rows(self, candidates: Optional[Sequence[str]] = None) -> list[TaskSummary]:
        """The chosen candidate (and ``candidates``, e.g. the old default) on every report task."""
        names = [self.chosen] + [c for c in (candidates or []) if c != self.chosen]
        return [self.summary(t, c) for t in self.report_tasks for c in names]

    def markdown(self, candidates: Optional[Sequence[str]] = None, fmt: str = ".3f") -> str:
        """A markdown table: every task (choose half first, marked), every candidate (default:
        all), the baseline, mean ± std over seeds; the chosen candidate in bold; a last row with
        each candidate's worst case over each half."""
        m = self.matrix
        names = list(candidates or m.candidates)
        has_base = bool(m.baselines)
        head = ["task", "half"] + ([f"baseline"] if has_base else []) + [f"**{c}**" if c == self.chosen else c for c in names]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

        def cell(s: TaskSummary) -> str:
            if s.n_seeds == 0:
                return "—"
            sd = "" if math.isnan(s.std) else f" ± {s.std:{fmt}}"
            return f"{s.mean:{fmt}}{sd}"

        for half, tasks in (("choose", self.choose_tasks), ("report", self.report_tasks)):
            for t in tasks:
                row = [t, half] + ([cell(self.summary(t, None))] if has_base else []) + [cell(self.summary(t, c)) for c in names]
                lines.append("| " + " | ".join(row) + " |")
        label = {"margin": "worst margin over the baseline", "regret": "worst regret vs the best candidate",
                 "rank": "worst rank"}[self.criterion]
        for half, worst in (("choose", self.worst), ("report", self.worst_report)):
            row = [f"{label} ({half} half)", half] + ([""] if has_base else []) + [
                f"{worst.get(c, float('nan')):{'.0f' if self.criterion == 'rank' else '+' + fmt}}" for c in names]
            lines.append("| " + " | ".join(row) + " |")
        return "\n".join(lines)


def _task_scores(matrix: ResultMatrix, tasks: Sequence[str], criterion: str) -> dict[str, list[float]]:
    """candidate → its per-task score under ``criterion`` (oriented: see :data:`CRITERIA`)."""
    sign = 1.0 if matrix.higher_is_better else -1.0
    cands = matrix.candidates
    out: dict[str, list[float]] = {c: [] for c in cands}
    for t in tasks:
        means = {c: matrix.task_mean(t, c) for c in cands}
        if criterion == "margin":
            base = _mean(matrix.baseline_per_seed(t))
            if not math.isfinite(base):
                raise ValueError(f"criterion 'margin' needs a baseline on every task; task {t!r} has none")
            for c in cands:
                out[c].append(sign * (means[c] - base))
        elif criterion == "regret":
            finite = [sign * v for v in means.values() if math.isfinite(v)]
            best = max(finite) if finite else float("nan")
            for c in cands:
                out[c].append(sign * means[c] - best)
        else:  # rank: 1 + how many candidates are strictly better
            for c in cands:
                v = sign * means[c]
                out[c].append(float("nan") if not math.isfinite(v) else
                              1.0 + sum(1 for d in cands if math.isfinite(means[d]) and sign * means[d] > v))
    return out


def _worst(scores: dict[str, list[float]], criterion: str) -> dict[str, float]:
    """A candidate missing on any task gets the worst possible case (``-inf``; rank ``inf``)."""
    out = {}
    for c, xs in scores.items():
        if not xs:
            out[c] = float("nan")
        elif any(not math.isfinite(x) for x in xs):
            out[c] = math.inf if criterion == "rank" else -math.inf
        else:
            out[c] = max(xs) if criterion == "rank" else min(xs)
    return out


def select(
    matrix: ResultMatrix,
    criterion: Criterion = "margin",
    choose_tasks: Optional[Sequence[str]] = None,
    report_tasks: Optional[Sequence[str]] = None,
    strata: Optional[Mapping[str, str]] = None,
    salt: str = "lightning-influence",
    tolerance: float = 0.0,
) -> Selection:
    """Choose the candidate whose worst case over the choose half is best.

    Each candidate's score on a task is its mean over that task's seeds; its worst case is the
    minimum over the choose half of its margin (``criterion="margin"``) or regret
    (``"regret"``), or the maximum of its rank (``"rank"``). The candidate with the best worst
    case is chosen. Candidates within ``tolerance`` of the best worst case are tied and the tie
    goes to the candidate seen first in the matrix: put the incumbent default first, so that it
    is kept unless beaten by more than ``tolerance``. A candidate without a finite result on some choose task
    has the worst possible worst case.

    Args:
        matrix: the results.
        criterion: one of :data:`CRITERIA`.
        choose_tasks: the choose half (default: :func:`split_tasks` of the matrix's tasks).
        report_tasks: the report half (default: the other tasks).
        strata: task → stratum for the default split.
        salt: salt of the default split.
        tolerance: worst cases closer than this to the best count as ties (``≥ 0``).

    Returns:
        :class:`Selection`.

    Raises:
        ValueError: unknown criterion, an empty matrix or half, a task in both halves or unknown,
            a ``"margin"`` choice without a baseline on some task, or a negative tolerance.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance!r}")
    tasks = matrix.tasks
    if not tasks or not matrix.candidates:
        raise ValueError("the result matrix is empty")
    if choose_tasks is None:
        choose, report = split_tasks(tasks, strata, salt)
    else:
        choose = list(choose_tasks)
        report = list(report_tasks) if report_tasks is not None else [t for t in tasks if t not in set(choose)]
    unknown = sorted((set(choose) | set(report)) - set(tasks))
    both = sorted(set(choose) & set(report))
    if unknown or both or not choose:
        raise ValueError(f"bad split: unknown tasks {unknown}, tasks in both halves {both}, choose half {choose}")
    scores = _task_scores(matrix, choose, criterion)
    worst = _worst(scores, criterion)
    finite = [w for w in worst.values() if not math.isnan(w)]
    best = min(finite) if criterion == "rank" else max(finite)
    tied = [c for c in matrix.candidates if not math.isnan(worst[c]) and abs(worst[c] - best) <= tolerance
            or worst[c] == best]
    chosen = tied[0]
    worst_report = _worst(_task_scores(matrix, report, criterion), criterion) if report else {}
    return Selection(chosen, criterion, sorted(choose), sorted(report), worst, worst_report, matrix)
