"""The validation metrics of ``surgery compare`` (scikit-learn and scipy compute them) and the score of the
constant predictor: the majority class of the training part, or the mean of its labels.
"""

from __future__ import annotations

from dataclasses import dataclass

from .settings import CompareError

__all__ = ["Metric", "METRICS", "pick_metric"]


@dataclass(frozen=True)
class Metric:
    name: str
    task: str
    higher_is_better: bool
    title: str

    def score(self, predictions, labels) -> float:
        """The metric of ``predictions`` (logits ``(N, C)`` / ``(N, 1)`` or values ``(N,)``) against ``labels``."""
        import numpy as np
        from sklearn import metrics as skm

        p = np.asarray(predictions, dtype=np.float64)
        y = np.asarray(labels)
        if self.task == "classification":
            pred = p.argmax(-1) if p.ndim > 1 else p.astype(int)
            if self.name == "accuracy":
                return float(skm.accuracy_score(y, pred))
            seen = np.unique(np.concatenate([y, pred]))
            return float(skm.f1_score(y, pred, average="macro", labels=seen, zero_division=0))
        p = p.reshape(len(y), -1)[:, 0] if p.ndim > 1 else p
        y = y.astype(np.float64)
        if self.name == "mse":
            return float(skm.mean_squared_error(y, p))
        if self.name == "mae":
            return float(skm.mean_absolute_error(y, p))
        return _correlation(self.name, p, y)

    @property
    def constant_name(self) -> str:
        """What the constant predictor predicts."""
        return "the majority class" if self.task == "classification" else "the training mean"

    def constant(self, train_labels, validation_labels) -> float:
        """The score of always predicting the training part's majority class (or the mean of its labels;
        0 for a correlation, which a constant has none of)."""
        import numpy as np

        y = np.asarray(train_labels)
        if self.task == "classification":
            values, counts = np.unique(y, return_counts=True)
            majority = int(values[counts.argmax()])
            onehot = np.zeros((len(validation_labels), int(max(y.max(), max(validation_labels)) + 1)))
            onehot[:, majority] = 1.0
            return self.score(onehot, validation_labels)
        mean = float(y.astype(np.float64).mean())
        return self.score(np.full(len(validation_labels), mean), validation_labels)


def _correlation(name: str, p, y) -> float:
    import numpy as np
    from scipy import stats

    if np.ptp(p) == 0 or np.ptp(y) == 0:
        return 0.0  # a constant prediction carries no correlation (scipy would return nan)
    r = stats.pearsonr(p, y)[0] if name == "pearson" else stats.spearmanr(p, y)[0]
    return float(r)


METRICS = {m.name: m for m in (
    Metric("accuracy", "classification", True, "accuracy"),
    Metric("macro_f1", "classification", True, "macro F1"),
    Metric("mse", "regression", False, "MSE"),
    Metric("mae", "regression", False, "MAE"),
    Metric("pearson", "regression", True, "Pearson r"),
    Metric("spearman", "regression", True, "Spearman rho"),
)}
DEFAULT = {"classification": "accuracy", "regression": "mse"}


def pick_metric(name: str | None, task: str) -> Metric:
    """The metric ``name`` (default: accuracy for classification, MSE for regression).

    Raises:
        CompareError: an unknown metric, or one of the other task.
    """
    metric = METRICS.get(name or DEFAULT[task])
    if metric is None:
        raise CompareError(f"--metric {name}: unknown; use one of {', '.join(METRICS)}")
    if metric.task != task:
        fits = ", ".join(m for m, v in METRICS.items() if v.task == task)
        raise CompareError(f"--metric {name} is a {metric.task} metric but the task is {task}; use one of {fits}")
    return metric
