"""sentence-transformers' own trainer through ``surgery.trainer_class``: its saves keep its format (``modules.json``,
the module folders, ``config.json``), plain, so ``SentenceTransformer(path)`` loads the final save and every
``checkpoint-N``; resuming from a checkpoint equals the uninterrupted run."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_bert_config
import sentence_transformers as st
from datasets import Dataset
from sentence_transformers import losses
from sentence_transformers.models import Pooling, Transformer
from training_setup import StopAt
from transformers import BertModel, BertTokenizerFast

import surgery


WORDS = "the a cat dog sat on mat ran far big small red blue and".split()
SURGERY = dict(mixout=0.2, dropout=0.0)
Trainer = surgery.trainer_class(st.SentenceTransformerTrainer)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    d = tmp_path_factory.mktemp("st")
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS))
    torch.manual_seed(0)
    BertModel(tiny_bert_config(vocab_size=len(WORDS) + 5)).save_pretrained(d / "pre")
    BertTokenizerFast(str(d / "vocab.txt")).save_pretrained(d / "pre")
    return str(d / "pre")


def model(path):
    t = Transformer(path)
    return st.SentenceTransformer(modules=[t, Pooling(t.get_word_embedding_dimension())], device="cpu")


def data():
    return Dataset.from_dict({"s1": ["the cat", "a dog ran", "big red mat", "small blue dog"] * 3,
                              "s2": ["a cat", "the dog", "red mat", "blue cat"] * 3, "score": [0.9, 0.8, 0.7, 0.2] * 3})


def train(m, out, steps, callbacks=None, resume=None):
    args = st.SentenceTransformerTrainingArguments(
        str(out), max_steps=steps, per_device_train_batch_size=4, save_strategy="steps", save_steps=2, report_to=[],
        use_cpu=True, disable_tqdm=True, seed=0, learning_rate=1e-2)
    tr = Trainer(model=m, args=args, train_dataset=data(), loss=losses.CosineSimilarityLoss(m), callbacks=callbacks)
    tr.train(resume_from_checkpoint=resume)
    return tr


def test_saves_keep_the_sentence_transformers_format_plain(pretrained, tmp_path):
    m = surgery.apply(model(pretrained), **SURGERY)
    tr = train(m, tmp_path / "run", 2)
    tr.save_model(str(tmp_path / "final"))
    want = surgery.plain_state_dict(m)
    for path in (tmp_path / "final", tmp_path / "run" / "checkpoint-2"):
        assert (path / "modules.json").is_file()
        cfg = json.loads((path / "config.json").read_text())
        assert "surgery" not in cfg and cfg["hidden_dropout_prob"] == 0.1  # the original value, not apply's 0.0
        got = model(str(path)).state_dict()  # sentence-transformers' own loader
        assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert not (tmp_path / "final" / "surgery_targets.safetensors").exists()
    assert surgery.is_surgered(m)


def test_resume_equals_the_uninterrupted_run(pretrained, tmp_path):
    full = surgery.apply(model(pretrained), **SURGERY)
    train(full, tmp_path / "full", 4)
    cut = surgery.apply(model(pretrained), **SURGERY)
    train(cut, tmp_path / "cut", 4, callbacks=[StopAt(2)])
    resumed = surgery.apply(model(pretrained), **SURGERY)
    train(resumed, tmp_path / "cut", 4, resume=str(tmp_path / "cut" / "checkpoint-2"))
    want, got = full.state_dict(), resumed.state_dict()
    assert any(k.endswith("mixout_target") for k in got)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)
    pre = model(pretrained).state_dict()
    for k, v in got.items():  # the targets are the pretrained weights again, not the checkpoint's trained ones
        if k.endswith("mixout_target"):
            assert torch.equal(v, pre[k[: -len("mixout_target")] + "weight"]), k
