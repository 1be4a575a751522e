"""Choosing a default by its worst case on half of the tasks (lightning_influence.evaluate.selection)
on synthetic matrices built so that the right answer is known by construction, with numpy as
the reference for the reported means and standard deviations."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from lightning_influence.evaluate import ResultMatrix, select, split_tasks

TASKS = ["a", "b", "c", "d", "e", "f"]
SEEDS = [0, 1, 2]
NOISE = [-0.01, 0.0, 0.01]  # zero-mean over the seeds: the seed mean is exactly base + offset
BASE = {"a": 0.50, "b": 0.60, "c": 0.70, "d": 0.80, "e": 0.55, "f": 0.65}
# offsets over the baseline per task. "spiky" has the best mean over every half but collapses on
# task "c" (choose half) and "f" (report half); "steady" is never the best but never below +0.02.
OFFSETS = {
    "incumbent": {"a": 0.00, "b": -0.05, "c": 0.01, "d": 0.02, "e": -0.03, "f": 0.00},
    "steady": {"a": 0.03, "b": 0.02, "c": 0.04, "d": 0.03, "e": 0.02, "f": 0.05},
    "spiky": {"a": 0.20, "b": 0.15, "c": -0.10, "d": 0.25, "e": 0.18, "f": -0.08},
}
CHOOSE, REPORT = ["a", "b", "c"], ["d", "e", "f"]


def synthetic(offsets=OFFSETS, higher_is_better: bool = True) -> ResultMatrix:
    m = ResultMatrix(higher_is_better=higher_is_better, metric="AP")
    sign = 1.0 if higher_is_better else -1.0
    for t, (i, s) in itertools.product(TASKS, enumerate(SEEDS)):
        m.add_baseline(t, s, BASE[t] + NOISE[(i + 1) % 3])
        for c, off in offsets.items():
            m.add(t, s, c, BASE[t] + sign * off[t] + NOISE[i])
    return m


def test_split_is_deterministic_disjoint_balanced_and_order_free():
    choose, report = split_tasks(TASKS)
    assert sorted(choose + report) == TASKS and not set(choose) & set(report)
    assert len(choose) == len(report) == 3
    assert split_tasks(list(reversed(TASKS))) == (choose, report) == split_tasks(TASKS + ["a"])
    # another salt gives another split for some salt (the split is not the name order)
    assert any(split_tasks(TASKS, salt=str(k)) != (choose, report) for k in range(20))
    with pytest.raises(ValueError, match="two tasks"):
        split_tasks(["only"])


def test_split_by_strata_puts_every_stratum_in_both_halves():
    strata = {"a": "sgd", "b": "sgd", "c": "adamw", "d": "adamw", "e": "cnn", "f": "cnn", "g": "lm"}
    choose, report = split_tasks(strata, strata)
    for s in ("sgd", "adamw", "cnn"):
        members = {t for t, v in strata.items() if v == s}
        assert len(members & set(choose)) == 1 and len(members & set(report)) == 1
    assert abs(len(choose) - len(report)) <= 1 and sorted(choose + report) == sorted(strata)


def test_worst_margin_picks_the_steady_candidate_not_the_best_mean():
    m = synthetic()
    sel = select(m, "margin", choose_tasks=CHOOSE, report_tasks=REPORT)
    # by construction the worst margins over a, b, c are the minimum offsets there
    for c, off in OFFSETS.items():
        assert sel.worst[c] == pytest.approx(min(off[t] for t in CHOOSE), abs=1e-12)
        assert sel.worst_report[c] == pytest.approx(min(off[t] for t in REPORT), abs=1e-12)
    best_mean = max(OFFSETS, key=lambda c: np.mean([OFFSETS[c][t] for t in CHOOSE]))
    assert best_mean == "spiky" and sel.chosen == "steady"
    # reported on the report half only, mean ± sample std over seeds against numpy
    rows = sel.report_rows(["incumbent"])
    assert [(r.task, r.candidate) for r in rows] == [(t, c) for t in REPORT for c in ("steady", "incumbent")]
    for r in rows:
        xs = np.array([m.values[(r.task, s, r.candidate)] for s in SEEDS])
        base = np.array([m.baselines[(r.task, s)] for s in SEEDS])
        assert r.mean == pytest.approx(xs.mean(), abs=1e-12) and r.std == pytest.approx(xs.std(ddof=1), abs=1e-12)
        assert r.margin == pytest.approx(xs.mean() - base.mean(), abs=1e-12) and r.n_seeds == 3
    table = sel.markdown()
    assert "**steady**" in table and table.count("| choose |") == 4 and table.count("| report |") == 4  # 3 tasks + worst case
    assert "worst margin over the baseline (choose half)" in table


def test_the_report_half_never_changes_the_choice():
    changed = {c: dict(off) for c, off in OFFSETS.items()}
    for t in REPORT:
        changed["steady"][t] = -1.0  # disastrous on the report half
        changed["spiky"][t] = 1.0
    sel = select(synthetic(changed), "margin", choose_tasks=CHOOSE, report_tasks=REPORT)
    assert sel.chosen == "steady" and sel.worst_report["steady"] == pytest.approx(-1.0)


def test_regret_and_rank_criteria():
    m = synthetic()
    # regret: per task, offset minus the best offset there; worst over a, b, c
    sel = select(m, "regret", choose_tasks=CHOOSE, report_tasks=REPORT)
    want = {c: min(OFFSETS[c][t] - max(o[t] for o in OFFSETS.values()) for t in CHOOSE) for c in OFFSETS}
    assert sel.worst == pytest.approx(want, abs=1e-12)
    # regret rewards staying near the best: spiky's worst (-0.14 on c) beats steady's (-0.17 on a)
    assert sel.chosen == max(want, key=want.get) == "spiky"
    # ranks on a, b, c: a: spiky 1, steady 2, incumbent 3; b: spiky, steady, incumbent; c: steady 1, incumbent 2, spiky 3
    sel = select(m, "rank", choose_tasks=CHOOSE, report_tasks=REPORT)
    assert sel.worst == {"incumbent": 3.0, "steady": 2.0, "spiky": 3.0} and sel.chosen == "steady"


def test_lower_is_better_metrics_are_oriented():
    sel = select(synthetic(higher_is_better=False), "margin", choose_tasks=CHOOSE, report_tasks=REPORT)
    assert sel.chosen == "steady" and sel.worst["spiky"] == pytest.approx(-0.10, abs=1e-12)
    assert sel.summary("d", "steady").margin == pytest.approx(0.03, abs=1e-12)


def test_ties_go_to_the_incumbent_and_missing_results_are_the_worst_case():
    offsets = {"incumbent": {t: 0.02 for t in TASKS}, "rival": {t: 0.021 for t in TASKS}}
    m = synthetic(offsets)
    assert select(m, choose_tasks=CHOOSE, report_tasks=REPORT).chosen == "rival"
    assert select(m, choose_tasks=CHOOSE, report_tasks=REPORT, tolerance=0.005).chosen == "incumbent"
    del m.values[("b", 1, "rival")]  # one seed missing: the mean of the other two still counts
    assert select(m, choose_tasks=CHOOSE, report_tasks=REPORT).chosen == "rival"
    for s in SEEDS:
        m.values[("b", s, "rival")] = math.nan  # no result on a choose task at all
    sel = select(m, choose_tasks=CHOOSE, report_tasks=REPORT)
    assert sel.chosen == "incumbent" and sel.worst["rival"] == -math.inf and m.missing == 3


def test_default_split_and_bad_input():
    m = synthetic()
    sel = select(m, "margin")
    assert (sel.choose_tasks, sel.report_tasks) == split_tasks(TASKS)
    with pytest.raises(ValueError, match="criterion"):
        select(m, "median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bad split"):
        select(m, choose_tasks=["a", "b"], report_tasks=["b", "c"])
    with pytest.raises(ValueError, match="bad split"):
        select(m, choose_tasks=["a", "zzz"])
    no_base = ResultMatrix()
    no_base.add("a", 0, "x", 1.0)
    no_base.add("b", 0, "x", 1.0)
    with pytest.raises(ValueError, match="baseline"):
        select(no_base, "margin")
    assert select(no_base, "regret").chosen == "x"
    with pytest.raises(ValueError, match="empty"):
        select(ResultMatrix())
