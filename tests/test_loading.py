"""``surgery.load_pretrained``: a surgered save (``save_pretrained``, a Trainer ``checkpoint-N`` folder) rebuilt
from its record and verified; a layer-weighted head's save is a transformers custom-code checkpoint, so plain
``AutoModel...from_pretrained`` refuses it without ``trust_remote_code`` and loads the right model with it."""

from __future__ import annotations

import json
import os
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (AutoModel, AutoModelForSequenceClassification, BertForSequenceClassification,
                          TrainingArguments)

import surgery
import surgery.remote_code
import zoo
from conftest import ROOT, run_python

LAYERED = dict(msd=5, msd_p=0.5, msd_layers=True)
SETUPS = {
    "bert": ("bert", dict(LAYERED, mixout=0.1, dropout=0.0)),
    "roberta": ("roberta", dict(LAYERED, msd_layer_p=0.1)),  # head found as classifier.out_proj
    "gpt2-last": ("gpt2", dict(LAYERED, msd_pool="last", dropout=0.05)),
    "mixout-msd": ("bert", dict(mixout=0.2, msd=4, target_dtype=torch.bfloat16)),  # no layered head: resume form
}


def _trained(name, kw, seed=5):
    """A surgered zoo model whose weights (layer weights too) moved away from the pretrained ones."""
    model = surgery.apply(zoo.build(name), **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype))
    return model


def _batch(name, model):
    b = zoo.batch(name, model)
    b.pop("labels")
    return b


def _assert_same_model(got, model, batch):
    assert type(got) is type(model)
    assert surgery.get_record(got).to_dict() == surgery.get_record(model).to_dict()
    a, b = got.state_dict(), model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert not got.training
    assert torch.equal(got(**batch).logits, model.eval()(**batch).logits)


@pytest.mark.parametrize("setup", SETUPS, ids=list(SETUPS))
def test_save_pretrained_loads_back_exactly(setup, tmp_path):
    name, kw = SETUPS[setup]
    model = _trained(name, kw)
    model.save_pretrained(tmp_path)
    got = surgery.load_pretrained(AutoModelForSequenceClassification, tmp_path)
    _assert_same_model(got, model, _batch(name, model))
    # the model rebuilt is the pretrained-shaped one: undoing the surgery gives the config apply started from
    surgery.revert(got, drop_layer_weights=True)
    plain, now = zoo.build(name).config.to_dict(), got.config.to_dict()
    assert {k: now.get(k) for k in plain if "drop" in k} == {k: plain[k] for k in plain if "drop" in k}


def test_concrete_class_class_from_architectures_sharded_bin_and_bf16(tmp_path):
    model = _trained("bert", SETUPS["bert"][1])
    batch = _batch("bert", model)
    model.save_pretrained(tmp_path / "one")
    for cls in (BertForSequenceClassification, None):  # None: the class config.json names
        _assert_same_model(surgery.load_pretrained(cls, tmp_path / "one"), model, batch)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    _assert_same_model(surgery.load_pretrained(AutoModelForSequenceClassification, tmp_path / "sharded"), model, batch)
    os.makedirs(tmp_path / "bin")  # a pickle checkpoint (older transformers, torch.save'd state dicts)
    for f in ("config.json", "remote_code.py"):
        (tmp_path / "bin" / f).write_bytes((tmp_path / "one" / f).read_bytes())
    torch.save(load_file(tmp_path / "one" / "model.safetensors"), tmp_path / "bin" / "pytorch_model.bin")
    _assert_same_model(surgery.load_pretrained(AutoModelForSequenceClassification, tmp_path / "bin"), model, batch)
    half = surgery.load_pretrained(AutoModelForSequenceClassification, tmp_path / "one", dtype=torch.bfloat16)
    assert half.bert.embeddings.word_embeddings.weight.dtype == torch.bfloat16
    assert half.layer_pool.layer_weights.dtype == torch.float32  # kept float32: the saved values exactly
    assert torch.equal(half.layer_pool.layer_weights, model.layer_pool.layer_weights)


def test_a_trainer_checkpoint_folder_loads_back(tmp_path):
    from surgery import SurgeryTrainer

    model = surgery.apply(zoo.build("bert"), **LAYERED)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(4, zoo.VOCAB, (7,), generator=g), "labels": i % 3} for i in range(8)]
    args = TrainingArguments(str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="steps", save_steps=2)
    SurgeryTrainer(model=model, args=args, train_dataset=data, msd_loss=True).train()
    ckpt = tmp_path / "checkpoint-2"
    assert (ckpt / "trainer_state.json").is_file() and (ckpt / "remote_code.py").is_file()
    got = surgery.load_pretrained(AutoModelForSequenceClassification, ckpt)
    _assert_same_model(got, model, _batch("bert", model))


# ---- the record is compared, not trusted -------------------------------------------------------------------

def _edit_record(path, fn):
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg["surgery"])
    (path / "config.json").write_text(json.dumps(cfg))


def test_a_hand_rebuild_with_another_pool_matches_every_key_and_predicts_differently(tmp_path):
    """The README's old recipe: apply with msd_pool='last' instead of 'first', load_state_dict: every key matches."""
    model = _trained("bert", dict(LAYERED))
    model.save_pretrained(tmp_path)
    fresh = surgery.apply(zoo.build("bert"), **LAYERED, msd_pool="last")
    fresh.load_state_dict(load_file(tmp_path / "model.safetensors"))  # strict: no complaint
    batch = _batch("bert", model)
    batch["attention_mask"][0, -2:] = 0
    assert not torch.equal(fresh.eval()(**batch).logits, model.eval()(**batch).logits)
    saved = json.loads((tmp_path / "config.json").read_text())["surgery"]
    with pytest.raises(surgery.SurgeryError, match="was trained with surgery"):  # the check a hand rebuild can make
        surgery.check_same_surgery(fresh, saved)


@pytest.mark.parametrize("edit, match", [
    (lambda r: r["args"].update(msd_pool="last"), r"msd\[0\]: saved .*'pool': 'first'.*rebuilt .*'pool': 'last'"),
    (lambda r: r["msd"][0]["layers"].update(pool="last"), r"msd\[0\]: saved .*'pool': 'last'.*rebuilt .*'first'"),
    (lambda r: r["msd"][0].update(k=3), r"msd\[0\]: saved .*'k': 3"),
    (lambda r: r["mixout"].pop(), r"mixout\[\d+\]: saved '<none>'"),
])
def test_a_record_that_does_not_match_the_rebuild_is_refused(edit, match, tmp_path):
    model = _trained("bert", dict(LAYERED, mixout=0.1))
    model.save_pretrained(tmp_path)
    _edit_record(tmp_path, edit)
    with pytest.raises(surgery.SurgeryError, match=r"carries other surgery than the record says \(.*" + match):
        surgery.load_pretrained(AutoModelForSequenceClassification, tmp_path)


def test_layers_the_user_froze_before_apply_are_refused_not_guessed(tmp_path):
    model = zoo.build("bert")
    model.bert.encoder.layer[0].attention.self.query.weight.requires_grad_(False)
    surgery.apply(model, mixout=0.1, **LAYERED)
    model.save_pretrained(tmp_path)
    with pytest.raises(surgery.SurgeryError, match=r"other surgery than the record says \(mixout\[0\]: .*"
                                                   r"frozen before apply .*by hand"):
        surgery.load_pretrained(AutoModelForSequenceClassification, tmp_path)


def _drop_file(path):
    os.remove(path / "model.safetensors")


def _extra_key(path):
    sd = load_file(path / "model.safetensors")
    sd["classifier.extra"] = torch.zeros(1)
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})


def _drop_key(path):
    sd = load_file(path / "model.safetensors")
    del sd["layer_pool.layer_weights"]
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})


def _no_record(path):
    cfg = json.loads((path / "config.json").read_text())
    del cfg["surgery"]
    (path / "config.json").write_text(json.dumps(cfg))


BAD = [
    ("no record", _no_record, AutoModelForSequenceClassification, surgery.SurgeryError,
     r"holds no surgery record, .*load it with from_pretrained"),
    ("newer record", lambda p: _edit_record(p, lambda r: r["args"].update(new_option=1)),
     AutoModelForSequenceClassification, surgery.SurgeryError, r"apply arguments this surgery does not know "
                                                               r"\(new_option\).*upgrade surgery"),
    ("corrupt record", lambda p: _edit_record(p, lambda r: r.update(version=99)), AutoModelForSequenceClassification,
     surgery.SurgeryError, r"version 99 is not supported"),
    ("no weights", _drop_file, AutoModelForSequenceClassification, Exception, r"model.safetensors|no file named"),
    ("extra key", _extra_key, AutoModelForSequenceClassification, surgery.SurgeryError,
     r"does not hold the weights of the rebuilt model: missing \[\], left over \['classifier.extra'\]"),
    ("missing key", _drop_key, AutoModelForSequenceClassification, surgery.SurgeryError,
     r"missing \['layer_pool.layer_weights'\]"),
    ("wrong class", lambda p: None, AutoModel, surgery.HeadError, r"head='classifier' names no module in BertModel"),
    ("not a model class", lambda p: None, nn.Linear, surgery.SurgeryTypeError, r"transformers model class"),
]


@pytest.mark.parametrize("case, edit, cls, err, match", BAD, ids=[b[0] for b in BAD])
def test_bad_checkpoints_are_one_clear_error(case, edit, cls, err, match, tmp_path):
    model = surgery.apply(zoo.build("bert"), **LAYERED)
    model.save_pretrained(tmp_path)
    edit(tmp_path)
    with pytest.raises(err, match=match):
        surgery.load_pretrained(cls, tmp_path)


def test_not_a_folder_and_config_passed_are_refused(tmp_path):
    with pytest.raises(surgery.SurgeryError, match=r"not a checkpoint folder with a config.json.*snapshot_download"):
        surgery.load_pretrained(AutoModelForSequenceClassification, tmp_path / "nothing")
    with pytest.raises(surgery.SurgeryTypeError, match="do not pass config="):
        surgery.load_pretrained(AutoModelForSequenceClassification, tmp_path, config=None)


# ---- the custom-code checkpoint ------------------------------------------------------------------------------

def test_the_save_is_a_custom_code_checkpoint_and_the_live_model_is_unchanged(tmp_path):
    model = surgery.apply(zoo.build("bert"), **LAYERED)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "surgery_layer_msd" and cfg["surgery_base_model_type"] == "bert"
    assert cfg["auto_map"]["AutoConfig"] == "remote_code.SurgeryLayerMSDConfig"
    assert cfg["auto_map"]["AutoModelForSequenceClassification"] == "remote_code.SurgeryLayerMSDModel"
    assert (tmp_path / "remote_code.py").read_text() == open(surgery.remote_code.__file__).read()
    # the live config: same class name and model_type, plain to_dict, no auto_map left on it
    assert model.config.model_type == "bert" and type(model.config).__name__ == "BertConfig"
    assert model.config.to_dict()["model_type"] == "bert" and "auto_map" not in vars(model.config)
    assert type(AutoModelForSequenceClassification.from_config(model.config)) is BertForSequenceClassification
    surgery.revert(model, drop_layer_weights=True)
    assert type(model.config) is type(zoo.build("bert").config)
    model.save_pretrained(tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["model_type"] == "bert"
    assert not (tmp_path / "plain" / "remote_code.py").exists()


def test_plain_loading_needs_trust_remote_code_and_then_loads_the_right_model(tmp_path):
    model = _trained("bert", SETUPS["bert"][1])
    batch = _batch("bert", model)
    model.save_pretrained(tmp_path / "ckpt")
    torch.save({"batch": batch, "logits": model.eval()(**batch).logits}, tmp_path / "ref.pt")
    script = tmp_path / "load.py"
    script.write_text(textwrap.dedent(f"""
        import sys, torch, transformers, surgery
        from transformers import AutoModelForSequenceClassification as Auto, BertForSequenceClassification
        ref = torch.load({str(tmp_path / "ref.pt")!r})
        path = {str(tmp_path / "ckpt")!r}
        try:
            Auto.from_pretrained(path)
            sys.exit("plain AutoModel loading did not fail")
        except ValueError as e:
            assert "contains custom code" in str(e) and "trust_remote_code=True" in str(e), e
        model = Auto.from_pretrained(path, trust_remote_code=True)
        assert type(model) is BertForSequenceClassification and surgery.is_surgered(model)
        assert torch.equal(model(**ref["batch"]).logits, ref["logits"])
        # the concrete class takes no custom code (transformers' rule): it says the model type is another one
        from transformers.utils import logging
        logging.set_verbosity_warning()
        import io, logging as pylog
        buf = io.StringIO()
        pylog.getLogger("transformers").addHandler(pylog.StreamHandler(buf))
        BertForSequenceClassification.from_pretrained(path)
        assert "surgery_layer_msd" in buf.getvalue() and "layer_pool.layer_weights" in buf.getvalue(), buf.getvalue()
        print("OK", file=sys.stderr)
    """))
    env = dict(os.environ, PYTHONPATH=ROOT, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    rc, err = run_python([str(script)], timeout=300, env=env)
    assert rc == 0 and "OK" in err, err
