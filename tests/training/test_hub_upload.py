"""SurgeryTrainer and the Hugging Face Hub, with the hub client replaced by a fake (no network):
the model a repo shows is plain; the checkpoints uploaded for resuming stay surgered."""

from __future__ import annotations

import fnmatch
import json
import os
from concurrent.futures import Future

import pytest
import torch
from conftest import tiny_bert
from huggingface_hub import HfApi
from safetensors.torch import load
from transformers import AutoModelForSequenceClassification, TrainingArguments

import surgery

SURGERY = dict(mixout=0.3, msd=4, dropout=0.0)


class FakeHub:
    """Stands in for the Hub: records every upload as {path in repo: bytes} at the moment it is made."""

    def __init__(self):
        self.repos: list[str] = []
        self.uploads: list[dict] = []

    def create_repo(self, api, repo_id, *args, **kwargs):
        self.repos.append(repo_id)

        class Url(str):
            pass

        url = Url(f"https://hub.invalid/{repo_id}")
        url.repo_id = f"user/{repo_id.rsplit('/', 1)[-1]}"
        return url

    def upload_folder(self, api, *, repo_id, folder_path, path_in_repo=None, commit_message=None,
                      ignore_patterns=None, run_as_future=False, **kwargs):
        files = {}
        for dirpath, _, names in os.walk(folder_path):
            for n in names:
                rel = os.path.relpath(os.path.join(dirpath, n), folder_path).replace(os.sep, "/")
                if any(fnmatch.fnmatch(rel, p) for p in ignore_patterns or []):
                    continue
                with open(os.path.join(dirpath, n), "rb") as f:
                    files[f"{path_in_repo}/{rel}" if path_in_repo else rel] = f.read()
        self.uploads.append({"repo_id": repo_id, "message": commit_message, "files": files})
        if run_as_future:
            fut = Future()
            fut.set_result(None)
            return fut
        return f"https://hub.invalid/{repo_id}/commit/{len(self.uploads)}"


@pytest.fixture
def hub(monkeypatch):
    fake = FakeHub()
    monkeypatch.setattr(HfApi, "create_repo", lambda api, *a, **k: fake.create_repo(api, *a, **k))
    monkeypatch.setattr(HfApi, "upload_folder", lambda api, *a, **k: fake.upload_folder(api, *a, **k))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return fake


def _dataset(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(5, 50, (8,), generator=g), "labels": int(torch.randint(0, 3, (1,), generator=g))}
            for _ in range(n)]


def _trainer(out, steps, **kw):
    torch.manual_seed(0)
    model = surgery.apply(tiny_bert(), **SURGERY)
    args = TrainingArguments(str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2, seed=1,
                             report_to=[], use_cpu=True, disable_tqdm=True, **kw)
    return surgery.SurgeryTrainer(model=model, args=args, train_dataset=_dataset(), msd_loss=True)


def _check_plain(files: dict, prefix: str, model) -> None:
    """The uploaded model is what surgery.export writes: no targets, no record, original dropout, trained weights."""
    cfg = json.loads(files[f"{prefix}config.json"])
    assert "surgery" not in cfg
    assert cfg["hidden_dropout_prob"] == 0.1 and cfg["attention_probs_dropout_prob"] == 0.1
    sd = load(files[f"{prefix}model.safetensors"])
    assert not any(k.endswith("mixout_target") for k in sd)
    live = {k: v for k, v in model.state_dict().items() if not k.endswith("mixout_target")}
    assert sd.keys() == live.keys()
    assert all(torch.equal(sd[k], live[k]) for k in sd)


def _check_surgered(files: dict, prefix: str) -> None:
    cfg = json.loads(files[f"{prefix}config.json"])
    assert cfg["surgery"]["args"]["mixout"] == 0.3 and cfg["hidden_dropout_prob"] == 0.0
    sd = load(files[f"{prefix}model.safetensors"])
    assert "classifier.mixout_target" in sd
    assert any(n.startswith(prefix) and n.endswith("optimizer.pt") for n in files)


def test_push_to_hub_uploads_the_plain_model_and_the_model_stays_surgered(tmp_path, hub):
    trainer = _trainer(tmp_path / "run", 2, hub_model_id="user/run")
    trainer.train()
    trainer.push_to_hub()
    assert len(hub.uploads) == 1
    up = hub.uploads[0]
    assert up["repo_id"] == "user/run" and up["message"] == "End of training"
    _check_plain(up["files"], "", trainer.model)
    assert not any(n.startswith("checkpoint-") for n in up["files"])
    assert surgery.is_surgered(trainer.model)
    # what was uploaded loads with plain transformers and predicts what the reverted model predicts
    plain_dir = tmp_path / "downloaded"
    plain_dir.mkdir()
    for name in ("config.json", "model.safetensors"):
        (plain_dir / name).write_bytes(up["files"][name])
    plain = AutoModelForSequenceClassification.from_pretrained(str(plain_dir)).eval()
    ids = torch.randint(5, 50, (2, 8))
    with torch.no_grad():
        ref = surgery.revert(trainer.model).eval()(ids).logits
        assert torch.equal(plain(ids).logits, ref)


def test_args_push_to_hub_root_is_plain_checkpoints_stay_surgered(tmp_path, hub):
    trainer = _trainer(tmp_path / "run", 4, hub_model_id="user/run", push_to_hub=True, hub_strategy="checkpoint",
                       save_strategy="steps", save_steps=2)
    assert hub.repos == ["user/run"]
    trainer.train()
    # one root upload and one last-checkpoint upload per save
    roots = [u for u in hub.uploads if "config.json" in u["files"]]
    ckpts = [u for u in hub.uploads if "last-checkpoint/config.json" in u["files"]]
    assert [u["message"] for u in roots] == ["Training in progress, step 2", "Training in progress, step 4"]
    assert [u["message"] for u in ckpts] == ["Training in progress, step 2, checkpoint",
                                             "Training in progress, step 4, checkpoint"]
    for u in roots:
        assert not any(n.startswith(("checkpoint-", "_")) for n in u["files"])
        cfg = json.loads(u["files"]["config.json"])
        assert "surgery" not in cfg and cfg["hidden_dropout_prob"] == 0.1
        assert not any(k.endswith("mixout_target") for k in load(u["files"]["model.safetensors"]))
    _check_plain(roots[-1]["files"], "", trainer.model)  # the last save: the final weights
    for u in ckpts:
        _check_surgered(u["files"], "last-checkpoint/")
    # the local checkpoints resume: still surgered on disk
    assert "surgery" in json.loads((tmp_path / "run" / "checkpoint-4" / "config.json").read_text())
    hub.uploads.clear()
    trainer.push_to_hub()
    (final,) = hub.uploads
    _check_plain(final["files"], "", trainer.model)


def test_save_model_with_push_to_hub_uploads_plain(tmp_path, hub):
    trainer = _trainer(tmp_path / "run", 1, hub_model_id="user/run", push_to_hub=True, save_strategy="no")
    trainer.train()
    hub.uploads.clear()
    trainer.save_model()
    (up,) = hub.uploads
    assert up["message"] == "Model save"
    _check_plain(up["files"], "", trainer.model)
    _check_plain({k: (tmp_path / "run" / k).read_bytes() for k in ("config.json", "model.safetensors")}, "",
                 trainer.model)


def test_plain_save_false_uploads_what_transformers_saves(tmp_path, hub):
    torch.manual_seed(0)
    model = surgery.apply(tiny_bert(), **SURGERY)
    args = TrainingArguments(str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, disable_tqdm=True, hub_model_id="user/run")
    trainer = surgery.SurgeryTrainer(model=model, args=args, train_dataset=_dataset(), plain_save=False)
    trainer.train()
    trainer.push_to_hub()
    (up,) = hub.uploads
    assert json.loads(up["files"]["config.json"])["surgery"]["args"]["mixout"] == 0.3
