"""Checkpoint I/O: the safetensors reader/writer, safe .bin/.pt loading, surgery.export,
surgery.checkpoint.save and the resume story."""

import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

import surgery
from surgery.checkpoint import (CheckpointError, inspect, load_state_dict_file, read_header, restore_config, save,
                                tensor_item, write_safetensors)
from surgery.layers.mixout import MixLinear


# ---- the format --------------------------------------------------------------------------

def _tensors():
    g = torch.Generator().manual_seed(0)
    t = {
        "f32": torch.randn(3, 5, generator=g),
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 3, generator=g).bfloat16(),
        "f64": torch.randn(2, generator=g).double(),
        "i64": torch.arange(5),
        "i32": torch.arange(3, dtype=torch.int32),
        "i16": torch.arange(3, dtype=torch.int16),
        "i8": torch.arange(-3, 3, dtype=torch.int8),
        "u8": torch.arange(9, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "f8": torch.randn(4, generator=g).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
        "strided": torch.randn(4, 6, generator=g).t(),  # non-contiguous
    }
    return t


def test_writer_output_reads_back_with_safetensors(tmp_path):
    t = _tensors()
    p = tmp_path / "a.safetensors"
    write_safetensors(p, [tensor_item(k, v) for k, v in t.items()], {"format": "pt", "note": "x"})
    back = load_file(p)
    assert set(back) == set(t)
    for k, v in t.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        assert torch.equal(back[k].view(torch.uint8) if v.dtype == torch.float8_e4m3fn else back[k],
                           v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v), k
    with safe_open(str(p), "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "x"}
    h = read_header(p)
    assert h.data_start % 8 == 0
    for info in h.tensors.values():  # every tensor aligned to its element size
        assert info.start % max(1, back[info.name].element_size()) == 0


def test_reader_agrees_with_safetensors_save_file(tmp_path):
    t = {k: v.contiguous() for k, v in _tensors().items()}
    p = tmp_path / "b.safetensors"
    save_file(t, p, metadata={"format": "pt"})
    h = read_header(p)
    assert h.metadata == {"format": "pt"}
    with safe_open(str(p), "pt") as f:
        for k in f.keys():
            s = f.get_slice(k)
            assert h.tensors[k].shape == tuple(s.get_shape())
            assert h.tensors[k].nbytes == t[k].numel() * t[k].element_size()


def _valid_bytes():
    hdr = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
           "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}
    return hdr, bytes(range(12))


def _file(tmp_path, hdr, data, *, length=None, raw=None):
    h = raw if raw is not None else json.dumps(hdr).encode()
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", len(h) if length is None else length) + h + data)
    return p


@pytest.mark.parametrize("case,needle", [
    ("short", "8-byte header length"),
    ("length", "header length says"),
    ("json", "the header is not valid JSON"),
    ("dtype", "not {dtype"),
    ("span", "needs 8 bytes"),
    ("past_eof", "past the end"),
    ("truncated", "past the end"),
    ("overlap", "overlaps"),
    ("trailing", "after the last tensor"),
])
def test_corrupt_safetensors_are_refused_with_the_file_named(tmp_path, case, needle):
    hdr, data = _valid_bytes()
    if case == "short":
        p = tmp_path / "x.safetensors"
        p.write_bytes(b"\x01\x02")
    elif case == "length":
        p = _file(tmp_path, hdr, data, length=10**6)
    elif case == "json":
        p = _file(tmp_path, None, data, raw=b"{not json")
    elif case == "dtype":
        hdr["a"]["dtype"] = "F31"
        p = _file(tmp_path, hdr, data)
    elif case == "span":
        hdr["a"]["data_offsets"] = [0, 4]
        hdr["b"]["data_offsets"] = [4, 8]
        p = _file(tmp_path, hdr, data[:8])
    elif case == "past_eof":
        hdr["b"]["data_offsets"] = [8, 12]
        hdr["b"]["shape"] = [1]
        hdr["a"]["data_offsets"] = [0, 8]
        hdr["c"] = {"dtype": "F32", "shape": [4], "data_offsets": [12, 28]}
        p = _file(tmp_path, hdr, data)
    elif case == "truncated":
        p = _file(tmp_path, hdr, data[:-3])
    elif case == "overlap":
        hdr["b"] = {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}
        hdr["c"] = {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}
        p = _file(tmp_path, hdr, data)
    elif case == "trailing":
        p = _file(tmp_path, hdr, data + b"\0" * 8)
    with pytest.raises(CheckpointError) as e:
        read_header(p)
    assert str(p) in str(e.value) and needle in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(Exception):  # safetensors itself agrees the file is bad
        with safe_open(str(p), "pt") as f:
            [f.get_tensor(k) for k in f.keys()]


# ---- .bin / .pt ----------------------------------------------------------------------------

class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_and_never_run(tmp_path):
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Evil(control)))  # the payload works when unpickled unsafely
    assert control.exists()

    marker = tmp_path / "pwned"
    p1 = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "x": _Evil(marker)}, p1)
    p2 = tmp_path / "evil_raw.bin"
    p2.write_bytes(pickle.dumps({"w": _Evil(marker)}))
    for p in (p1, p2):
        with pytest.raises(CheckpointError) as e:
            load_state_dict_file(p)
        assert str(p) in str(e.value)
    with pytest.raises(CheckpointError, match="refused to load: the pickle references posix.system"):
        load_state_dict_file(p1)
    assert not marker.exists()


def test_state_dict_files(tmp_path):
    sd = {"a": torch.randn(3, 4), "b": torch.arange(3)}
    p = tmp_path / "ok.pt"
    torch.save(sd, p)
    back = load_state_dict_file(p)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    legacy = tmp_path / "legacy.pt"  # pre-zip format: cannot be memory-mapped, still loads
    torch.save(sd, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(load_state_dict_file(legacy)["a"], sd["a"])
    nested = tmp_path / "nested.pt"
    torch.save({"model": sd, "epoch": 3}, nested)
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_state_dict_file(nested)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(CheckpointError, match="cannot read as a torch.save state dict"):
        load_state_dict_file(junk)


# ---- export ---------------------------------------------------------------------------------

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 5)
        self.drop = nn.Dropout(0.1)
        self.b = nn.Linear(5, 4)
        self.alias = self.b  # the same module under two names: two state_dict keys, one tensor

    def forward(self, x):
        return self.b(self.drop(self.a(x)))


def _train(m, x, loss_fn, steps=2):
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    m.train()
    for _ in range(steps):
        loss_fn(m, x).backward()
        opt.step()
        opt.zero_grad()


def test_export_plain_module_keeps_model_and_writes_reverted_weights(tmp_path):
    torch.manual_seed(0)
    m = Net()
    surgery.apply(m, mixout=0.5, dropout=0.0)
    _train(m, torch.randn(8, 6), lambda m, x: m(x).pow(2).mean())
    before = {k: v.clone() for k, v in m.state_dict().items()}
    p = surgery.export(m, tmp_path / "net.safetensors")
    # the model is untouched: still surgered, same tensors, same dropout
    assert surgery.is_surgered(m) and m.drop.p == 0.0
    after = m.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    got = load_file(p)
    surgery.revert(m)
    ref = m.state_dict()
    assert set(got) == set(ref)  # original keys, the alias included
    assert all(torch.equal(got[k], ref[k]) and got[k].dtype == ref[k].dtype for k in ref)
    with pytest.raises(surgery.SurgeryError, match="ending in .safetensors"):
        surgery.export(m, tmp_path / "net.pt")


def _tiny_bert():
    cfg = AutoConfig.for_model("bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=37, vocab_size=99, num_labels=3, max_position_embeddings=32)
    return AutoModelForSequenceClassification.from_config(cfg)


def test_export_transformers_model_does_not_mutate_and_loads_plain(tmp_path):
    torch.manual_seed(0)
    m = _tiny_bert()
    surgery.apply(m, mixout=0.3, dropout=0.0, msd=4)
    x = torch.randint(0, 99, (4, 7))
    _train(m, x, lambda m, x: m(input_ids=x, labels=torch.tensor([0, 1, 2, 0])).loss)
    cfg_before = m.config.to_dict()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "tokenizer.json").write_text("{}")  # kept, as save_pretrained keeps it
    (tmp_path / "out" / "model-00001-of-00002.safetensors").write_text("stale")  # removed
    surgery.export(m, tmp_path / "out")
    assert m.config.to_dict() == cfg_before and surgery.is_surgered(m)
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors", "tokenizer.json"]
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "surgery" not in saved and saved["hidden_dropout_prob"] == 0.1
    assert saved["architectures"] == ["BertForSequenceClassification"]
    surgery.revert(m)
    m.eval()
    plain, info = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    plain.eval()
    assert torch.equal(plain(input_ids=x).logits, m(input_ids=x).logits)
    with pytest.raises(surgery.SurgeryError, match="writes a directory"):
        surgery.export(m, tmp_path / "out" / "model.safetensors")


@pytest.mark.parametrize("mixout_tied", [False, True])
def test_export_tied_lm_head_as_transformers_expects(tmp_path, mixout_tied):
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=2, vocab_size=99, n_positions=32)
    m = AutoModelForCausalLM.from_config(cfg)
    surgery.apply(m, mixout=0.3, mixout_tied=mixout_tied)
    assert isinstance(m.lm_head, MixLinear) == mixout_tied
    x = torch.randint(0, 99, (2, 9))
    _train(m, x, lambda m, x: m(input_ids=x, labels=x).loss)
    surgery.export(m, tmp_path / "out", max_shard_size="20KB")
    names = set(os.listdir(tmp_path / "out"))
    assert {"config.json", "generation_config.json", "model.safetensors.index.json"} <= names
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]  # the tied alias is not written twice
    assert not any(k.endswith("mixout_target") for k in index["weight_map"])
    surgery.revert(m)
    m.eval()
    plain, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert plain.lm_head.weight is plain.transformer.wte.weight
    plain.eval()
    assert torch.equal(plain(input_ids=x).logits, m(input_ids=x).logits)


@pytest.mark.slow
def test_export_makes_no_second_copy_in_memory(tmp_path):
    """Peak RSS growth during export stays far below the size of the weights written."""
    script = textwrap.dedent(f"""
        import torch, surgery
        from torch import nn
        torch.manual_seed(0)
        m = nn.Sequential(*[nn.Linear(2048, 2048) for _ in range(12)])  # 192 MiB of weights
        surgery.apply(m, mixout=0.1)  # + 192 MiB of targets
        def rss(field):
            for line in open("/proc/self/status"):
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM)
        base = rss("VmRSS")
        surgery.export(m, r"{tmp_path / 'big.safetensors'}")
        print((rss("VmHWM") - base) / 2**20)
    """)
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))}  # this tree
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env,
                         timeout=600)
    growth_mib = float(out.stdout.split()[-1])
    assert growth_mib < 48, f"export grew RSS by {growth_mib:.0f} MiB for 192 MiB of weights"


# ---- surgered saves with the record, and resuming from them ---------------------------------

def test_save_puts_record_in_metadata_and_resume_loads_it_back(tmp_path):
    torch.manual_seed(0)
    m = Net()
    surgery.apply(m, mixout=0.5, dropout=0.0)
    _train(m, torch.randn(8, 6), lambda m, x: m(x).pow(2).mean())
    p = save(m, tmp_path / "run.safetensors")
    with safe_open(str(p), "pt") as f:
        md = f.metadata()
    assert surgery.Record.from_dict(md["surgery"]).to_dict() == surgery.get_record(m).to_dict()
    info = inspect(p)
    assert info["record_source"] == "run.safetensors header metadata"
    assert info["mixout_targets"]["keys"] == ["a.mixout_target"]  # b is registered twice: left alone
    assert info["record"]["args"]["mixout"] == 0.5
    # resume: a fresh (pretrained) model, the same apply, then the checkpoint's state_dict
    torch.manual_seed(1)
    fresh = Net()
    surgery.apply(fresh, mixout=0.5, dropout=0.0)
    res = fresh.load_state_dict(load_file(p), strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in m.state_dict().items())
    with pytest.raises(surgery.NotSurgeredError):
        save(Net(), tmp_path / "plain.safetensors")


def test_resume_from_save_pretrained_dir(tmp_path):
    """The resume story for transformers: pretrained model, same apply, load the checkpoint."""
    torch.manual_seed(0)
    m = _tiny_bert()
    m.save_pretrained(tmp_path / "pretrained")
    surgery.apply(m, mixout=0.3, dropout=0.0, msd=4)
    _train(m, torch.randint(0, 99, (4, 7)), lambda m, x: m(input_ids=x, labels=torch.tensor([0, 1, 2, 0])).loss)
    m.save_pretrained(tmp_path / "ckpt")
    fresh = AutoModelForSequenceClassification.from_pretrained(tmp_path / "pretrained")
    surgery.apply(fresh, mixout=0.3, dropout=0.0, msd=4)
    res = fresh.load_state_dict(load_file(tmp_path / "ckpt" / "model.safetensors"))
    assert not res.missing_keys and not res.unexpected_keys
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in m.state_dict().items())
    with pytest.raises(surgery.AlreadySurgeredError, match="surgery convert"):
        surgery.apply(AutoModelForSequenceClassification.from_pretrained(tmp_path / "ckpt"), mixout=0.1)


def test_restore_config_puts_back_values_the_save_left_out():
    rec = surgery.Record(config=[{"module": "", "path": ["hidden_dropout_prob"], "old": 0.2, "new": 0.1},
                                 {"module": "", "path": ["text_config", "dropout"], "old": 0.3, "new": 0.0},
                                 {"module": "encoder", "path": ["dropout"], "old": 0.5, "new": 0.0}])
    saved = {"model_type": "x", "surgery": rec.to_dict(), "text_config": {"dropout": 0.0}}
    out, changes = restore_config(saved)
    assert out == {"model_type": "x", "hidden_dropout_prob": 0.2, "text_config": {"dropout": 0.3}}
    assert changes == [("hidden_dropout_prob", "<absent>", 0.2), ("text_config.dropout", 0.0, 0.3)]
    assert "surgery" in saved  # the input is not modified
