"""``surgery compare``'s statistics: the paired 95% t intervals against ``scipy.stats`` on a fixed table,
the verdicts, the per-method summary (paired by seed, folds averaged, costs relative to baseline), the
metrics and the constant predictor."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from surgery.compare.methods import parse_methods
from surgery.compare.metrics import METRICS, pick_metric
from surgery.compare.settings import CompareError
from surgery.compare.stats import paired_interval, spread, summarize, verdict

# a fixed table: validation MSE of 5 seeds (columns) for baseline and three methods
TABLE = {
    "baseline": [1.031, 0.987, 1.102, 1.045, 0.968],
    "no_dropout": [0.912, 0.901, 0.998, 0.941, 0.880],   # lower on every seed: better
    "mixout=0.1": [1.052, 0.960, 1.151, 1.013, 0.993],   # up and down: no difference
    "rdrop=1": [1.101, 1.040, 1.180, 1.090, 1.031],      # higher on every seed: worse
}


@pytest.mark.parametrize("method", ["no_dropout", "mixout=0.1", "rdrop=1"])
def test_the_paired_interval_is_scipys(method):
    a, b = np.array(TABLE[method]), np.array(TABLE["baseline"])
    iv = paired_interval(a - b)
    ref = sps.ttest_rel(a, b)
    low, high = ref.confidence_interval(confidence_level=0.95)
    assert iv["df"] == ref.df == 4
    assert iv["low"] == pytest.approx(low, rel=1e-12) and iv["high"] == pytest.approx(high, rel=1e-12)
    assert iv["mean"] == pytest.approx(np.mean(a - b), rel=1e-12)
    assert iv["sd"] == pytest.approx(np.std(a - b, ddof=1), rel=1e-12)
    assert iv["t_crit"] == pytest.approx(sps.t.ppf(0.975, 4)) and iv["t_crit"] == pytest.approx(2.776, abs=1e-3)


@pytest.mark.parametrize("n, crit", [(2, 12.706), (3, 4.303), (10, 2.262), (30, 2.045)])
def test_the_interval_widens_with_few_seeds_as_students_t_says(n, crit):
    d = np.linspace(-1, 1, n) + 0.1
    iv = paired_interval(d)
    assert iv["df"] == n - 1 and iv["t_crit"] == pytest.approx(crit, abs=1e-3)
    assert iv["high"] - iv["mean"] == pytest.approx(crit * np.std(d, ddof=1) / math.sqrt(n), rel=1e-3)


def test_one_seed_has_no_interval_and_says_so():
    iv = paired_interval([0.3])
    assert iv["low"] is None and iv["df"] == 0
    assert verdict(iv, higher_is_better=False).startswith("one seed: no interval")


def test_verdicts_in_words_follow_the_metrics_direction():
    base = np.array(TABLE["baseline"])
    lower = paired_interval(np.array(TABLE["no_dropout"]) - base)
    mixed = paired_interval(np.array(TABLE["mixout=0.1"]) - base)
    higher = paired_interval(np.array(TABLE["rdrop=1"]) - base)
    assert verdict(lower, higher_is_better=False) == "better" and verdict(lower, higher_is_better=True) == "worse"
    assert verdict(higher, higher_is_better=False) == "worse" and verdict(higher, higher_is_better=True) == "better"
    assert verdict(mixed, higher_is_better=False) == "no difference measurable with 5 seeds"
    assert spread([1.0, 3.0]) == {"n": 2, "mean": 2.0, "sd": pytest.approx(math.sqrt(2))}


def _runs(folds: int = 1) -> list[dict]:
    runs = []
    for label, values in TABLE.items():
        for seed, v in enumerate(values):
            for fold in range(folds):
                shift = (fold - (folds - 1) / 2) * 0.01  # folds differ; their mean is the table's value
                step = {"baseline": 0.2, "no_dropout": 0.2, "mixout=0.1": 0.22, "rdrop=1": 0.4}[label] * (1 + seed / 10)
                runs.append({"method": label, "seed": seed, "fold": fold, "last": v + shift, "best": v + shift - 0.02,
                             "step_seconds": step, "seconds": 60.0,
                             "peak_memory": 1000 + (50 if "mixout" in label else 0),
                             "memory_kind": "process peak resident memory",
                             **({"export_bytes": 123, "export_form": "plain"} if seed == 0 and fold == 0 else {})})
    return runs


@pytest.mark.parametrize("folds", [1, 3])
def test_the_summary_pairs_by_seed_averages_folds_and_prices_against_baseline(folds):
    methods = parse_methods(list(TABLE)[1:])
    mse = METRICS["mse"]
    summary = summarize(_runs(folds), methods, mse, constant=4.4, folds=folds)
    rows = {r["method"]: r for r in summary}
    assert list(rows) == list(TABLE)
    base = np.array(TABLE["baseline"])
    for label in TABLE:
        r = rows[label]
        assert r["last"]["mean"] == pytest.approx(np.mean(TABLE[label]))
        assert r["last"]["sd"] == pytest.approx(np.std(TABLE[label], ddof=1))
        assert r["best"]["mean"] == pytest.approx(np.mean(TABLE[label]) - 0.02)
        assert r["beats_constant"]
    assert rows["baseline"]["diff_last"] is None
    iv = rows["no_dropout"]["diff_last"]
    low, high = sps.ttest_rel(np.array(TABLE["no_dropout"]), base).confidence_interval()
    assert (iv["low"], iv["high"]) == (pytest.approx(low), pytest.approx(high)) and iv["verdict"] == "better"
    assert iv["relative"] == pytest.approx(np.mean(np.array(TABLE["no_dropout"]) - base) / np.mean(base))
    assert rows["rdrop=1"]["diff_last"]["verdict"] == "worse"
    assert rows["mixout=0.1"]["diff_best"]["verdict"] == "no difference measurable with 5 seeds"
    assert rows["rdrop=1"]["cost"]["step_ratio"] == pytest.approx(2.0)  # each seed's ratio to its own baseline run
    assert rows["mixout=0.1"]["cost"]["step_ratio"] == pytest.approx(1.1)
    assert rows["mixout=0.1"]["cost"]["peak_memory"] == 1050 and rows["baseline"]["cost"]["export_bytes"] == 123


def test_on_a_cpu_the_costs_compare_cpu_time_per_step():
    runs = _runs()
    for r in runs:  # wall times inflated at random by other work; CPU times as the work is
        r["step_cpu_seconds"] = {"rdrop=1": 0.2}.get(r["method"], 0.1)
        r["step_seconds"] *= 1 + 3 * (r["seed"] % 2)
    summary = summarize(runs, parse_methods(list(TABLE)[1:]), METRICS["mse"], constant=4.4, folds=1)
    rows = {r["method"]: r["cost"] for r in summary}
    assert rows["rdrop=1"]["clock"] == "step_cpu_seconds" and rows["rdrop=1"]["step_ratio"] == pytest.approx(2.0)
    assert rows["mixout=0.1"]["step_ratio"] == pytest.approx(1.0) and rows["baseline"]["step_seconds"] == 0.1
    runs[0]["step_cpu_seconds"] = None  # a run without it (a GPU run): wall time for all
    assert summarize(runs, parse_methods(list(TABLE)[1:]), METRICS["mse"], 4.4, 1)[0]["cost"]["clock"] == "step_seconds"


def test_a_method_that_learned_nothing_is_flagged_against_the_constant_predictor():
    summary = summarize(_runs(), parse_methods(list(TABLE)[1:]), METRICS["mse"], constant=1.0, folds=1)
    assert [r["beats_constant"] for r in summary] == [False, True, False, False]


def test_seeds_with_a_fold_missing_are_left_out():
    runs = [r for r in _runs(folds=2) if not (r["seed"] == 4 and r["fold"] == 1)]
    summary = summarize(runs, parse_methods(list(TABLE)[1:]), METRICS["mse"], constant=4.4, folds=2)
    assert all(r["seeds"] == [0, 1, 2, 3] for r in summary) and summary[1]["diff_last"]["df"] == 3


def test_metrics_and_the_constant_predictor():
    y = [0, 0, 0, 1, 2, 2]
    logits = np.eye(3)[[0, 0, 1, 1, 2, 0]]
    assert METRICS["accuracy"].score(logits, y) == pytest.approx(4 / 6)
    from sklearn.metrics import f1_score
    assert METRICS["macro_f1"].score(logits, y) == pytest.approx(f1_score(y, [0, 0, 1, 1, 2, 0], average="macro"))
    # the majority class of the training part (0), scored on the validation part
    assert METRICS["accuracy"].constant([0, 0, 1, 2, 0], y) == pytest.approx(3 / 6)
    reg = np.array([1.0, 2.0, 4.0])
    assert METRICS["mse"].score(np.array([[1.5], [2.0], [3.0]]), reg) == pytest.approx((0.25 + 0 + 1) / 3)
    assert METRICS["mse"].constant([0.0, 2.0], reg) == pytest.approx(np.mean((reg - 1.0) ** 2))
    assert METRICS["mae"].constant([0.0, 2.0], reg) == pytest.approx(np.mean(np.abs(reg - 1.0)))
    assert METRICS["pearson"].score(np.array([1.0, 2.0, 3.5]), reg) == pytest.approx(sps.pearsonr([1, 2, 3.5], reg)[0])
    assert METRICS["spearman"].constant([0.0, 2.0], reg) == 0.0


@pytest.mark.parametrize("name, task, message", [
    ("mse", "classification", "--metric mse is a regression metric but the task is classification; use one of "
                              "accuracy, macro_f1"),
    ("auc", "regression", "--metric auc: unknown"),
])
def test_a_metric_of_the_other_task_is_refused(name, task, message):
    with pytest.raises(CompareError, match=message.replace("(", r"\(").replace(")", r"\)")):
        pick_metric(name, task)
    assert pick_metric(None, task).name == {"classification": "accuracy", "regression": "mse"}[task]
