"""DeepSpeed ZeRO 1, 2 and 3 with real DeepSpeed on CPU (``DS_ACCELERATOR=cpu``, 2 gloo processes under torchrun).

Two torchrun runs (``tests/deepspeed_run.py``) do the training; each rank writes what it saw, and the tests here
assert it, side by side with the same runs without surgery:

* the own loop (``surgery.apply`` then ``deepspeed.initialize``), ZeRO-1/2/3: Mixout layers at p=0 with dropout off
  train bitwise like no surgery; Mixout + MSD + R-Drop give the same first loss under every stage, and the same
  training to 1e-5; ZeRO-3 partitions the
  targets (each rank holds half), no target is in the optimizer or gets a gradient; the eval forward equals the plain
  model's with the gathered weights; a DeepSpeed checkpoint resumes bitwise; ``export_sharded`` of the engine writes
  the plain model, ``export`` from one rank is refused; the layer-weighted MSD head trains partitioned;
* the HF Trainer with DeepSpeed configs (ZeRO-3: ``zero.Init`` partitions the weights before ``apply``) and
  Accelerate's DeepSpeed plugin: the same comparisons, plain final saves, resume from ``checkpoint-N``, DeepSpeed's
  ``zero_to_fp32`` consolidation then ``surgery convert``, and the refusal of the raw checkpoint folder.

Nothing here imports deepspeed into the test process: it runs in the torchrun workers only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import surgery
from conftest import run_python

TARGET = "mixout_target"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": ROOT}


def _torchrun(mode: str, out) -> list[dict]:
    rc, err = run_python(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          os.path.join(ROOT, "tests", "deepspeed_run.py"), mode, str(out)], timeout=420, env=ENV)
    assert rc == 0, err
    return [json.loads((out / f"{mode}{r}.json").read_text()) for r in range(2)]


def _convert(src, dst) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "surgery", "convert", str(src), str(dst)], capture_output=True,
                          text=True, timeout=300, env=ENV, cwd=ROOT)


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds_loop")
    return out, _torchrun("loop", out)


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds_trainer")
    return out, _torchrun("trainer", out)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_own_loop_trains_exactly_under_each_zero_stage(loop, stage):
    out, ranks = loop
    for rank in ranks:
        r = rank[f"zero{stage}"]
        assert r["p0"] == r["plain"]  # targets present, Mixout at p=0, dropout off: bitwise the run without surgery
        # Mixout + MSD + R-Drop: the same first loss under every stage (the same weights, gathered, the same masks),
        # then the same training up to the optimizer's round-off (ZeRO-3 steps AdamW on flat partitions)
        assert r["mixout"][0] == rank["zero1"]["mixout"][0]
        torch.testing.assert_close(r["mixout"] + r["after"], rank["zero1"]["mixout"] + rank["zero1"]["after"],
                                   rtol=1e-5, atol=0)
        assert r["targets_in_optimizer"] == 0 and r["targets_with_grad"] == 0  # no target byte reduced or stepped
        assert r["optimizer_params"] == r["trainable"]
        # apply on the engine (after deepspeed.initialize) is refused naming the order that works, nothing changed
        assert "DeepSpeed engine" in r["engine_refused"] and "before deepspeed.initialize" in r["engine_refused"]
        assert r["engine_unchanged"]
        assert r["eval_equal"] and r["targets_pretrained"]
        assert r["resumed"] == r["after"] and r["resumed_equal"]  # DeepSpeed checkpoint: resumes bitwise
        if stage == 3:  # each rank holds its partition of the targets (DeepSpeed's own ds_tensor sizes)
            assert r["target_local"] * 2 == r["target_elems"]
            assert "export_sharded" in r["export_refused"] and "partitioned by DeepSpeed ZeRO-3" in r["export_refused"]
            assert "sharded:" in r["describe"] and r["revert_plain"]
        else:  # ZeRO-1/2 keep a full target per rank, as DDP does
            assert r["target_local"] == r["target_elems"] == 1968
    assert ranks[0]["zero1"]["mixout"] != ranks[1]["zero1"]["mixout"]  # each rank its own batch and masks
    full = torch.load(out / f"full{stage}.pt")
    plain = load_file(out / f"export{stage}" / "model.safetensors")  # export_sharded(engine): the plain model
    assert plain.keys() == {k for k in full if not k.endswith(TARGET)} and sum(k.endswith(TARGET) for k in full) == 8
    assert all(torch.equal(plain[k], full[k]) for k in plain)
    assert "surgery" not in json.loads((out / f"export{stage}" / "config.json").read_text())


@pytest.mark.slow
def test_layer_weighted_head_train_noise_and_bf16_low_memory_targets_under_zero(loop):
    _, ranks = loop
    for r in ranks:
        lay = r["layered"]
        assert lay["added"] == 1 and lay["partitioned"] and lay["moved"]  # partitioned like the weights, trained
        assert all(torch.isfinite(torch.tensor(lay["losses"])))
        assert r["train_noise"][0] == r["train_noise"][1]  # what it lists without DeepSpeed
        low = r["bf16_low_memory"]  # target_dtype=bf16 + low_memory: bf16 targets, partitioned, the same training
        assert low["2"]["dtypes"] == low["3"]["dtypes"] == ["torch.bfloat16"]
        assert low["3"]["losses"][0] == low["2"]["losses"][0]
        torch.testing.assert_close(low["3"]["losses"], low["2"]["losses"], rtol=1e-5, atol=0)


@pytest.mark.slow
def test_trainer_and_accelerate_under_zero(trainer):
    out, ranks = trainer
    for r in ranks:
        assert r["zero3"]["partitioned_at_apply"] and not r["zero2"]["partitioned_at_apply"]  # zero.Init, then apply
        assert r["zero3"]["target_local"] == 1968 // 2 and r["zero2"]["target_local"] == r["zero1"]["target_local"] == 1968
        assert r["zero1"]["losses"] == r["zero2"]["losses"]
        assert r["p0"]["losses"] == r["plain"]["losses"]  # Mixout at p=0 + dropout off == no surgery, bitwise
        assert r["resumed"]["losses"] == r["zero3"]["losses"]
        acc = r["accelerate"]
        assert acc["p0"]["losses"] == acc["plain"]["losses"] and acc["mixout"]["engine"] == "DeepSpeedEngine"
        assert acc["mixout"]["target_local"] == 1968 // 2 and acc["mixout"]["targets_whole"] == 0
    # the Trainer's final save is plain under every stage, and resuming from checkpoint-2 gives it bitwise
    finals = {}
    for stage in (1, 2, 3):
        final = out / f"trainer{stage}" / "final"
        assert "surgery" not in json.loads((final / "config.json").read_text())
        finals[stage] = load_file(final / "model.safetensors")
        assert finals[stage] and not any(k.endswith(TARGET) for k in finals[stage])
    resumed = load_file(out / "resumed3" / "final" / "model.safetensors")
    assert resumed.keys() == finals[3].keys() and all(torch.equal(resumed[k], finals[3][k]) for k in resumed)
    assert all(torch.equal(finals[1][k], finals[2][k]) for k in finals[1])
    from transformers import AutoModelForSequenceClassification
    loaded = AutoModelForSequenceClassification.from_pretrained(str(out / "trainer3" / "final"))
    assert torch.equal(loaded.classifier.weight, finals[3]["classifier.weight"])
    assert not surgery.is_surgered(loaded)
    # DeepSpeed's consolidation of a ZeRO-3 checkpoint carries the targets; `surgery convert` makes it plain and
    # equal to the Trainer's own plain save; the raw checkpoint folder is refused in one line naming that route
    ckpt = out / "trainer3" / "checkpoint-4"
    p = _convert(ckpt, out / "refused")
    assert p.returncode == 2 and "a DeepSpeed checkpoint folder" in p.stderr and "zero_to_fp32.py" in p.stderr
    assert not (out / "refused").exists()
    rc, err = run_python([str(ckpt / "zero_to_fp32.py"), str(ckpt), str(out / "fp32"), "--safe_serialization"],
                         timeout=300, env=ENV)
    assert rc == 0, err
    consolidated = load_file(out / "fp32" / "model.safetensors")
    assert sum(k.endswith(TARGET) for k in consolidated) == 8
    p = _convert(out / "fp32" / "model.safetensors", out / "fp32plain.safetensors")
    assert p.returncode == 0, p.stderr
    plain = load_file(out / "fp32plain.safetensors")
    assert plain.keys() == {k for k in consolidated if not k.endswith(TARGET)}
    assert all(torch.equal(plain[k], finals[3][k]) for k in plain)
    # Accelerate: export_sharded of the prepared engine is the gathered model without its targets
    full = torch.load(out / "accelerate.pt")
    acc_plain = load_file(out / "accelerate" / "model.safetensors")
    assert acc_plain.keys() == {k for k in full if not k.endswith(TARGET)}
    assert all(torch.equal(acc_plain[k], full[k]) for k in acc_plain)

