"""``surgery compare``'s data: every input format read the same, text pairs, the columns found or named,
the task found from the labels, the splits (stratified, k folds, given), and each bad input one error."""

from __future__ import annotations

from collections import Counter

import pytest

from compare_helpers import rows, write
from surgery.compare.labels import encode_labels
from surgery.compare.reading import read_tables
from surgery.compare.settings import CompareError, Settings
from surgery.compare.splits import make_folds


def _text(folder, name, content):
    (folder / name).write_text(content, encoding="utf-8")
    return folder / name


def settings(data, **kw) -> Settings:
    return Settings(model="unused", data=str(data), **kw)


@pytest.mark.parametrize("name, fmt", [("d.csv", None), ("d.tsv", None), ("d.jsonl", None), ("d.parquet", None),
                                       ("d.txt", "tsv"), ("saved", "disk")])
@pytest.mark.parametrize("pairs", [False, True])
def test_every_format_reads_the_same_rows(tmp_path, name, fmt, pairs):
    data = rows(40, pairs=pairs)
    path = write(tmp_path / name, data, fmt if fmt == "disk" else ("tsv" if name.endswith(".txt") else None))
    train, val, info = read_tables(settings(path, format=fmt if name.endswith(".txt") else None))
    if fmt == "disk":  # a DatasetDict: its 'validation' split is the validation data
        assert val is not None and val.texts == [r["text"] for r in data[::5]]
        data = [r for i, r in enumerate(data) if i % 5]
    else:
        assert val is None
    assert train.texts == [r["text"] for r in data] and train.labels == [r["label"] for r in data]
    assert train.pairs == ([r["text_pair"] for r in data] if pairs else None)
    assert info["columns"] == {"text": "text", "pair": "text_pair" if pairs else None, "label": "label"}


def test_a_tsv_without_header_cells_taken_as_written(tmp_path):
    """AFINN-style: no header (--columns), a quote and words pandas would read as missing are text."""
    path = tmp_path / "words.txt"
    path.write_text('can\'t stand\t-3\n"quoted\t2\nNA\t1\nnull\t0\nnan\t-1\n', encoding="utf-8")
    train, _, _ = read_tables(settings(path, format="tsv", columns=("text", "label")))
    assert train.texts == ["can't stand", '"quoted', "NA", "null", "nan"] and train.labels == [-3, 2, 1, 0, -1]


def test_columns_by_name_and_numbers_as_text(tmp_path):
    path = write(tmp_path / "d.csv", [{"id": i, "premise": 100 + i, "hypothesis": f"w{i}", "gold": "ab"[i % 2]}
                                      for i in range(6)])
    train, _, info = read_tables(settings(path, label_column="gold"))
    assert info["columns"] == {"text": "premise", "pair": "hypothesis", "label": "gold"}  # the pair found by name
    assert train.texts[:2] == ["100", "101"] and train.labels[:2] == ["a", "b"]
    train, _, info = read_tables(settings(path, label_column="gold", text_column="hypothesis"))
    assert info["columns"]["pair"] is None and train.texts[0] == "w0"


def test_a_validation_file_is_the_validation_data(tmp_path):
    tr = write(tmp_path / "train.csv", rows(30))
    va = write(tmp_path / "dev.jsonl", rows(10, seed=1))
    train, val, info = read_tables(settings(tr, validation=str(va)))
    assert len(train) == 30 and len(val) == 10 and info["validation"] == str(va)


@pytest.mark.parametrize("values, task, reason", [
    (["pos", "neg", "pos"], "classification", "text labels"),
    ([True, False, True], "classification", "true/false labels"),
    ([0, 1, 2, 1], "classification", "the class ids 0..2"),
    ([-1, 1, 1], "classification", "two label values (-1, 1)"),
    ([0.0, 1.0, 0.0], "classification", "two label values (0, 1)"),
    ([-5, -2, 0, 3, 5], "regression", "5 integers from -5 to 5, not the class ids 0..K-1"),
    ([1, 2, 3, 4, 5], "regression", "not the class ids"),
    ([0.5, 1.25, -2.0], "regression", "numbers with fractions"),
])
def test_the_task_is_found_from_the_labels(values, task, reason):
    lab = encode_labels(values, None, "auto", "d.csv")
    assert lab.task == task and reason in lab.reason
    if task == "classification":
        assert lab.names == sorted(set(values)) and lab.train == [lab.names.index(v) for v in values]
        assert lab.num_labels == len(set(values))
    else:
        assert lab.names is None and lab.train == [float(v) for v in values] and lab.num_labels == 1


def test_the_task_given_wins():
    lab = encode_labels([1, 2, 3, 4, 5], [5, 1], "classification", "d.csv")
    assert lab.task == "classification" and lab.names == [1, 2, 3, 4, 5] and lab.validation == [4, 0]
    assert encode_labels([0, 1, 1], [1], "regression", "d.csv").train == [0.0, 1.0, 1.0]


def test_a_stratified_split_keeps_the_class_shares_and_is_the_same_every_time(tmp_path):
    labels = encode_labels(["a"] * 80 + ["b"] * 20, None, "auto", "d")
    s = settings(tmp_path / "x.csv", validation_fraction=0.25, split_seed=3)
    (f,) = make_folds(100, labels, s)
    assert len(f.validation) == 25 and not set(f.train) & set(f.validation)
    assert Counter(labels.train[i] for i in f.validation) == {0: 20, 1: 5}
    assert make_folds(100, labels, s)[0].train == f.train
    other = settings(tmp_path / "x.csv", validation_fraction=0.25, split_seed=4)
    assert make_folds(100, labels, other)[0].train != f.train


def test_k_folds_cover_every_row_once_stratified(tmp_path):
    labels = encode_labels(["a"] * 30 + ["b"] * 15, None, "auto", "d")
    folds = make_folds(45, labels, settings(tmp_path / "x.csv", folds=3))
    assert sorted(i for f in folds for i in f.validation) == list(range(45))
    for f in folds:
        assert Counter(labels.train[i] for i in f.validation) == {0: 10, 1: 5}
        assert sorted(f.train + f.validation) == list(range(45))
    reg = encode_labels([0.5 * i for i in range(20)], None, "auto", "d")
    assert len(make_folds(20, reg, settings(tmp_path / "x.csv", folds=4))) == 4


def test_train_size_and_max_validation_cut_the_parts(tmp_path):
    labels = encode_labels(["a", "b"] * 50, ["a", "b"] * 10, "auto", "d")
    (f,) = make_folds(100, labels, settings(tmp_path / "x.csv", train_size=30, max_validation=7), n_validation=20)
    assert len(f.train) == 30 and len(f.validation) == 7 and f.separate


@pytest.mark.parametrize("make, kw, message", [
    (lambda p: p / "missing.csv", {}, "--data {p}/missing.csv: no such file or folder"),
    (lambda p: _text(p, "e.csv", ""), {}, "{p}/e.csv is empty"),
    (lambda p: _text(p, "h.csv", "text,label\n"), {}, "{p}/h.csv holds no rows"),
    (lambda p: write(p / "d.csv", [{"sentence": "w1", "y": 1}] * 3), {}, "has no label column (looked for label, "
     "labels, score, target; its columns: sentence, y); name it with --label-column"),
    (lambda p: write(p / "d.csv", [{"words": "w1", "label": 1}] * 3), {}, "has no text column (looked for text, "
     "sentence, sentence1, premise, question, query; its columns: words, label); name it with --text-column"),
    (lambda p: write(p / "d.csv", rows(5)), {"label_column": "gold"}, "has no column 'gold' (its columns: text, "
     "label); fix --label-column"),
    (lambda p: write(p / "d.csv", rows(5)), {"pair_column": "other"}, "has no column 'other'"),
    (lambda p: write(p / "d.xlsx", rows(5), "csv"), {}, "cannot tell its format from the name; pass --format"),
    (lambda p: write(p / "d.jsonl", rows(5)), {"columns": ("text", "label")}, "--columns names the columns of a "
     "CSV/TSV file without a header row"),
    (lambda p: _text(p, "bad.jsonl", '{"text": "a", "label": 1}\n{oops\n'), {},
     "bad.jsonl: cannot be read as JSONL"),
    (lambda p: _text(p, "m.csv", "text,label\nw1,1\nw2,\n"), {}, "row 2 has no label"),
    (lambda p: _text(p, "m.csv", "text,label\nw1,1\n,2\n"), {}, "row 2 has no text"),
    (lambda p: write(p / "d.jsonl", [{"text": "a", "label": [1, 0]}]), {}, "multi-label data is not supported"),
    (lambda p: p, {"format": "disk"}, "not a folder written by Dataset.save_to_disk"),
])
def test_bad_data_is_one_clear_error(tmp_path, make, kw, message):
    path = make(tmp_path)
    with pytest.raises(CompareError) as e:
        read_tables(settings(path, **kw))
    assert message.format(p=tmp_path) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("train, val, task, message", [
    (["pos"] * 5, None, "auto", "the label column holds one value ('pos') in all 5 rows: there is nothing to learn"),
    ([3.0] * 4, None, "auto", "holds one value (3) in all 4 rows"),
    (["a", "b", "c"], ["a", "d"], "auto", "the validation data has the class 'd', which no training row has"),
    (["a", "b", "c"], None, "regression", "row 1 has the label 'a', not a number; regression needs numeric labels"),
    ([1.0, float("inf")], None, "auto", "row 2 has the label inf, not a finite number"),
])
def test_bad_labels_are_one_clear_error(train, val, task, message):
    with pytest.raises(CompareError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        encode_labels(train, val, task, "d.csv")


@pytest.mark.parametrize("labels, kw, message", [
    (["a"] * 10 + ["b"], {}, "class 'b' has 1 row; a stratified validation split needs at least 2 of each class"),
    (["a"] * 10 + ["b"] * 2, {"folds": 3}, "class 'b' has 2 rows; a stratified 3-fold split needs at least 3"),
    (["a", "b"] * 2, {"folds": 5}, "--folds 5 needs at least 10 rows, the data has 4"),
    (["a", "b"] * 3, {"validation_fraction": 0.05}, "--validation-fraction 0.05 of 6 rows leaves 0 for validation"),
    (["a", "b"] * 10, {"train_size": 50}, "--train-size 50 is more than the 16 training rows"),
])
def test_a_split_that_cannot_be_made_is_one_clear_error(tmp_path, labels, kw, message):
    lab = encode_labels(labels, None, "auto", "d")
    with pytest.raises(CompareError) as e:
        make_folds(len(labels), lab, settings(tmp_path / "x.csv", **kw))
    assert message in str(e.value)


@pytest.mark.parametrize("kw, message", [
    ({"seeds": 0}, "--seeds 0: must be a whole number >= 1"),
    ({"folds": 1}, "--folds 1: k-fold needs at least 2 folds"),
    ({"validation_fraction": 1.0}, "--validation-fraction 1.0: must be a number in (0, 1)"),
    ({"lr": -1.0}, "--lr -1.0: must be a number > 0"),
    ({"epochs": 0}, "--epochs 0: must be a number > 0"),
    ({"warmup": 1.0}, "--warmup 1.0: must be a fraction of the steps in [0, 1)"),
    ({"task": "ranking"}, "--task ranking: use one of auto, classification, regression"),
    ({"folds": 3, "validation": "dev.csv"}, "--folds and --validation exclude each other"),
    ({"columns": ("text", "text")}, "--columns text,text: must name each column once"),
])
def test_bad_settings_are_one_clear_error(kw, message):
    with pytest.raises(CompareError) as e:
        Settings(model="m", data="d.csv", **kw)
    assert message in str(e.value)


def test_quick_fills_only_what_was_not_given():
    q = Settings(model="m", data="d.csv", quick=True)
    assert (q.seeds, q.epochs, q.max_steps, q.evals, q.max_validation) == (1, 1.0, 100, 3, 1000)
    q = Settings(model="m", data="d.csv", quick=True, seeds=3, max_steps=20)
    assert (q.seeds, q.max_steps) == (3, 20)
    d = Settings(model="m", data="d.csv")
    assert (d.seeds, d.epochs, d.max_steps, d.evals, d.max_validation) == (5, 3.0, None, 5, None)
