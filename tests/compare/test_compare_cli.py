"""``surgery compare`` end to end through ``main(argv)``: both tasks, the report files, a fair comparison
(the same data order per seed whatever the method), resume after Ctrl-C, a different command on the same
folder refused, and every bad input one line with exit status 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compare_helpers import rows, save_model, write
from conftest import ROOT
from surgery.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY = ["--max-steps", "4", "--evals", "2", "--batch-size", "8", "--no-progress"]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("compare-cli") / "bert", "bert")


def run(argv, capsys):
    rc = main(["compare", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_classification_of_text_pairs_writes_every_report(tmp_path, bert, capsys):
    data = write(tmp_path / "pairs.csv", rows(40, pairs=True))
    out_dir = tmp_path / "out"
    rc, out, err = run(["--model", str(bert), "--data", str(data), "--methods", "msd=2", "--seeds", "2",
                        "--out", str(out_dir), *TINY], capsys)
    assert rc == 0, err
    assert "task: classification (text labels); 2 classes" in out and "pair column 'text_pair'" in out
    assert "the constant predictor (the majority class) scores 0.5" in out
    assert "run 4/4 msd=2, seed 1: accuracy last" in out
    table = out[out.index("method "):]
    assert "last - baseline [95% t interval, df=1]" in table and table.count("\nmsd=2 ") == 1
    res = json.loads((out_dir / "results.json").read_text())
    assert [r["method"] for r in res["summary"]] == ["baseline", "msd=2"]
    assert len(res["runs"]) == 4 and {(r["method"], r["seed"]) for r in res["runs"]} == {
        (m, s) for m in ("baseline", "msd=2") for s in (0, 1)}
    msd = res["summary"][1]
    assert msd["diff_last"]["df"] == 1 and msd["diff_last"]["verdict"] in (
        "better", "worse", "no difference measurable with 2 seeds")
    assert res["info"]["command"].startswith("surgery compare --model ")
    csv_lines = (out_dir / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("method,seed,fold,last,best") and len(csv_lines) == 5
    md = (out_dir / "report.md").read_text()
    assert "## Results" in md and "## Costs" in md and "SurgeryTrainer(msd_loss=True)" in md and "figure.png" in md
    assert (out_dir / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_regression_with_folds_scores_each_seed_over_its_folds(tmp_path, bert, capsys):
    data = write(tmp_path / "scores.jsonl", rows(30, task="regression"))
    out_dir = tmp_path / "out"
    rc, out, err = run(["--model", str(bert), "--data", str(data), "--methods", "no_dropout", "--seeds", "1",
                        "--folds", "2", "--out", str(out_dir), *TINY], capsys)
    assert rc == 0, err
    assert "task: regression (labels are numbers with fractions)" in out and "2 folds (split seed 0)" in out
    assert "the constant predictor (the training mean) scores" in out and "one seed: no interval" in out
    res = json.loads((out_dir / "results.json").read_text())
    runs = res["runs"]
    assert {(r["method"], r["fold"]) for r in runs} == {(m, f) for m in ("baseline", "no_dropout") for f in (0, 1)}
    base = res["summary"][0]
    assert base["last"]["mean"] == pytest.approx(sum(r["last"] for r in runs if r["method"] == "baseline") / 2)
    assert res["info"]["metric"] == "mse" and res["info"]["higher_is_better"] is False


def test_the_python_function_shows_one_progress_bar_naming_the_run(tmp_path, bert, capsys):
    from surgery.compare import compare

    data = write(tmp_path / "d.csv", rows(30))
    results = compare(model=str(bert), data=str(data), methods=["msd=2"], seeds=1, max_steps=4, evals=1,
                      batch_size=8, out=str(tmp_path / "o"), progress=True)
    out, err = capsys.readouterr()
    assert "run 1/2: baseline, seed 0" in err and "run 2/2: msd=2, seed 0" in err  # one bar: its description moves
    assert "/8 " in err and "/4 " not in err  # one total: the steps of every run
    assert results["summary"][1]["method"] == "msd=2" and "run 2/2 msd=2, seed 0" in out


def test_every_method_of_a_seed_sees_the_same_batches(tmp_path, bert, monkeypatch, capsys):
    import transformers

    seen: list[tuple] = []

    class Recording(transformers.DataCollatorWithPadding):
        def __call__(self, features):
            batch = super().__call__(features)
            seen.append(tuple(map(tuple, batch["input_ids"].tolist())))
            return batch

    monkeypatch.setattr(transformers, "DataCollatorWithPadding", Recording)
    data = write(tmp_path / "d.csv", rows(30))  # 24 training rows: 3 batches of 8 per epoch; 6 validation rows
    rc, _, err = run(["--model", str(bert), "--data", str(data), "--methods", "msd=3", "--seeds", "2", "--epochs", "2",
                      "--batch-size", "8", "--evals", "1", "--out", str(tmp_path / "o"), "--no-progress"], capsys)
    assert rc == 0, err
    train = [b for b in seen if len(b) == 8]  # the evaluation batches hold 6 rows
    assert len(train) == 4 * 6  # 2 methods x 2 seeds, in run order, 6 training batches each
    runs = [train[i * 6:(i + 1) * 6] for i in range(4)]
    assert runs[0] == runs[1]  # seed 0: baseline and msd=3 (which draws 3 times the dropout masks) see one order
    assert runs[2] == runs[3] and runs[2] != runs[0]  # seed 1: another order, the same for both
    assert runs[0][:3] != runs[0][3:]  # each epoch reshuffles


@pytest.mark.slow
def test_ctrl_c_keeps_the_finished_runs_and_the_same_command_resumes(tmp_path, bert, capsys):
    data = write(tmp_path / "d.csv", rows(40))
    argv = ["--model", str(bert), "--data", str(data), "--methods", "rdrop", "--seeds", "2", *TINY]
    interrupted, hook = tmp_path / "interrupted", tmp_path / "hook"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "SURGERY_TEST_HOOK": "compare-saved", "SURGERY_TEST_HOOK_FILE": str(hook)}
    proc = subprocess.Popen([sys.executable, "-m", "surgery", "compare", *argv, "--out", str(interrupted)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        marker = Path(f"{hook}.compare-saved")  # the command waits there once the first run is saved
        deadline = time.monotonic() + 240
        while not marker.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last == "surgery compare: interrupted; the finished runs are saved: the same command resumes"
    assert "Traceback" not in err
    saved = sorted(p.name for p in (interrupted / "runs").glob("*.json"))
    assert saved == ["seed0-fold0-baseline.json"] and not (interrupted / "results.json").exists()
    assert not [p for p in (interrupted / "runs").iterdir() if p.name.startswith(".")]  # no half-written file

    rc, out, err = run([*argv, "--out", str(interrupted)], capsys)
    assert rc == 0, err
    assert f"{len(saved)} already done there, resuming" in out
    assert f"run {len(saved) + 1}/4 " in out and f"run {len(saved)}/4 " not in out
    resumed = json.loads((interrupted / "results.json").read_text())["runs"]
    rc, _, err = run([*argv, "--out", str(tmp_path / "whole")], capsys)
    assert rc == 0, err
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())["runs"]
    assert [(r["method"], r["seed"], r["last"], r["best"]) for r in resumed] == \
        [(r["method"], r["seed"], r["last"], r["best"]) for r in whole]  # as if never interrupted


def test_a_different_command_on_the_same_folder_is_refused_in_one_line(tmp_path, bert, capsys):
    three = [{"text": r["text"], "label": i % 3} for i, r in enumerate(rows(36))]  # multi-class, int labels
    data, dev = write(tmp_path / "d.csv", three[:30]), write(tmp_path / "dev.csv", three[30:])
    argv = ["--model", str(bert), "--data", str(data), "--validation", str(dev), "--methods", "no_dropout",
            "--seeds", "1", "--out", str(tmp_path / "o"), *TINY]
    rc, out, err = run(argv, capsys)
    assert rc == 0, err
    assert "classification (labels are the class ids 0..2); 3 classes" in out
    assert f"30 training rows; 6 validation rows from {dev}" in out
    rc, out, err = run(argv, capsys)  # the same command again: nothing left to run, the report again
    assert rc == 0 and "2 already done there, resuming" in out and "run 1/2" not in out
    rc, out, err = run([*argv, "--seeds", "2", "--lr", "1e-4"], capsys)
    assert rc == 2 and err.count("\n") == 1
    assert err == (f"surgery compare: error: --out {tmp_path / 'o'} holds runs of a different comparison (lr: 5e-05 "
                   "there, 0.0001 here; seeds: 1 there, 2 here); give another --out, or --overwrite to delete those "
                   "runs and start over\n")
    rc, out, err = run([*argv, "--lr", "1e-4", "--overwrite"], capsys)
    assert rc == 0 and "already done" not in out and "run 2/2" in out
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    rc, _, err = run([*argv[:-len(TINY) - 2], "--out", str(tmp_path / "other"), *TINY], capsys)
    assert rc == 2 and "holds other files and no compare.json: not a surgery compare folder" in err
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def _no_tokenizer(p):
    return save_model(p / "notok", "bert", with_tokenizer=False)


@pytest.mark.parametrize("make_data, extra, message", [
    (lambda p: write(p / "d.csv", [{"sentence": "w1", "y": i % 2} for i in range(10)]), [],
     "d.csv has no label column (looked for label, labels, score, target; its columns: sentence, y); name it with "
     "--label-column"),
    (lambda p: (p / "e.csv").write_text("") or p / "e.csv", [], "e.csv is empty"),
    (lambda p: write(p / "d.csv", [{"text": f"w{i}", "label": "pos"} for i in range(10)]), [],
     "the label column holds one value ('pos') in all 10 rows: there is nothing to learn"),
    (lambda p: write(p / "d.csv", rows(20)), ["--methods", "mixot=0.1"],
     "method 'mixot=0.1': unknown knob 'mixot'; did you mean 'mixout'?"),
    (lambda p: write(p / "d.csv", rows(20)), ["--methods", "no_drop_path"],
     "method 'no_drop_path' changes nothing on BertForSequenceClassification: it has no stochastic depth"),
    (lambda p: write(p / "d.csv", rows(20)), ["--head", "pooler.nothing", "--methods", "msd=2"],
     "method 'msd=2' does not fit BertForSequenceClassification: head='pooler.nothing' names no module"),
    (lambda p: write(p / "d.csv", rows(20)), ["--model", "NOTOK"], "no tokenizer in"),
    (lambda p: write(p / "d.csv", rows(20)), ["--seeds", "0"], "--seeds 0: must be a whole number >= 1"),
    (lambda p: write(p / "d.csv", rows(20)), ["--seeds", "two"], "argument --seeds: invalid int value: 'two'"),
    (lambda p: write(p / "d.csv", rows(20)), ["--metric", "mse"], "--metric mse is a regression metric but the "
                                                                  "task is classification"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, bert, capsys, make_data, extra, message):
    data = make_data(tmp_path)
    model = str(_no_tokenizer(tmp_path)) if "NOTOK" in extra else str(bert)
    extra = [model if a == "NOTOK" else a for a in extra]
    rc, out, err = run(["--model", str(bert), "--data", str(data), "--out", str(tmp_path / "o"), *TINY, *extra],
                       capsys)
    assert rc == 2 and message in err and err.count("\n") == 1 and err.startswith("surgery compare: error: ")
    assert "Traceback" not in err and not (tmp_path / "o" / "runs").exists()
