"""``surgery compare``: which regularizer helps on your own model and data, at what cost, with honest statistics.

    surgery compare --model my-model --data train.csv --methods no_dropout mixout=0.1,0.3 msd=8 rdrop=1

    from surgery.compare import compare
    results = compare(model="my-model", data="train.csv", methods=["no_dropout", "mixout=0.1,0.3"])

Every method (:mod:`surgery.compare.methods`) is trained from the same pretrained model with
``surgery.SurgeryTrainer`` for the same steps, per seed with the same split, head initialisation and
data order (:mod:`~surgery.compare.running`), and scored on the validation rows at fixed steps. The
report (:mod:`~surgery.compare.stats`, :mod:`~surgery.compare.report`) gives per method the mean and
spread at the best and last evaluation, the paired difference to baseline with its 95% t interval
and a verdict in words, the constant predictor's score, and the costs (time per step relative to
baseline, peak memory, the exported checkpoint's size). Each finished run is saved as it ends
(:mod:`~surgery.compare.store`): the same command resumes, a different one is refused.

Needs the ``compare`` extra: ``pip install "finetune-surgery[compare]"`` (datasets, scikit-learn,
scipy, matplotlib, tqdm).
"""

from __future__ import annotations

from .settings import CompareError, Settings

__all__ = ["compare", "Settings", "CompareError"]


def compare(settings: Settings | None = None, **options) -> dict:
    """Compare regularizers on your model and data; returns what ``results.json`` holds.

    Pass a :class:`Settings` or its fields as keyword arguments: ``model`` (a model folder),
    ``data`` (CSV/TSV/JSON lines/parquet or a saved datasets folder), ``methods`` (specs such as
    ``"no_dropout"``, ``"mixout=0.1,0.3"``, ``"msd=8+dropout=0"``), ``seeds``, ``out`` ...

    Raises:
        CompareError: bad input, found before any training; an output folder holding another comparison.
        KeyboardInterrupt: passed on once the finished runs are saved; the same call resumes.
    """
    from .session import compare as _compare

    return _compare(settings, **options)
