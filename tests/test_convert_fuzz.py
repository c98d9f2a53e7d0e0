"""A table of malformed headers, indexes, configs and records (issue 9, item 3): every row
is refused by `surgery convert` and `surgery inspect` with exit 2 and one line, before
anything is written: SRC unchanged, no DST, no temporary."""

import json
import struct

import pytest

from fake_checkpoint import RECORD, debris, make_dir, snapshot, st_bytes, tensors
from surgery.cli import main

DEEP = "[" * 100_000 + "]" * 100_000
BIG_INT = "1" + "0" * 5000
GOOD = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}


def _hdr(entry_or_header, raw=False):
    """A header text: a whole header (raw text, or a dict) or entry 'a' replaced."""
    if raw:
        return entry_or_header
    return json.dumps(entry_or_header)


# (id, what is damaged, text of it)
HEADERS = [
    ("dtype-list", _hdr({"a": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}})),
    ("dtype-dict", _hdr({"a": {"dtype": {"x": 1}, "shape": [2], "data_offsets": [0, 8]}})),
    ("dtype-int", _hdr({"a": {"dtype": 7, "shape": [2], "data_offsets": [0, 8]}})),
    ("dtype-unknown", _hdr({"a": {"dtype": "F31", "shape": [2], "data_offsets": [0, 8]}})),
    ("shape-string", _hdr({"a": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}})),
    ("shape-negative", _hdr({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}})),
    ("shape-float", _hdr({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}})),
    ("shape-bool", _hdr({"a": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}})),
    ("shape-huge-int", f'{{"a":{{"dtype":"F32","shape":[{BIG_INT}],"data_offsets":[0,8]}}}}'),
    ("shape-4000-digits", f'{{"a":{{"dtype":"F32","shape":[{"9" * 4000}],"data_offsets":[0,8]}}}}'),
    ("offsets-three", _hdr({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4, 8]}})),
    ("offsets-reversed", _hdr({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}})),
    ("offsets-strings", _hdr({"a": {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}})),
    ("offsets-null", _hdr({"a": {"dtype": "F32", "shape": [2], "data_offsets": None}})),
    ("missing-dtype", _hdr({"a": {"shape": [2], "data_offsets": [0, 8]}})),
    ("extra-key", _hdr({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": 1}})),
    ("entry-list", _hdr({"a": [1, 2]})),
    ("entry-null", _hdr({"a": None})),
    ("header-list", _hdr([1, 2, 3])),
    ("header-string", _hdr("x")),
    ("header-deep", _hdr(DEEP, raw=True)),
    ("entry-deep", '{"a":' + DEEP + "}"),
    ("metadata-deep", '{"__metadata__":' + DEEP + "}"),
    ("metadata-not-strings", _hdr({"__metadata__": {"format": 1}, **GOOD})),
    ("metadata-list", _hdr({"__metadata__": ["x"], **GOOD})),
    ("not-json", _hdr("{not json", raw=True)),
    ("not-utf8", b'{"a\xff":1}'),
    ("nan-offsets", '{"a":{"dtype":"F32","shape":[2],"data_offsets":[NaN,8]}}'),
    ("record-deep", _hdr({"__metadata__": {"surgery": DEEP}, **GOOD})),
    ("record-big-int", _hdr({"__metadata__": {"surgery": '{"format":"surgery","version":' + BIG_INT + "}"}, **GOOD})),
    ("record-not-json", _hdr({"__metadata__": {"surgery": "{oops"}, **GOOD})),
    ("record-mixout-int", _hdr({"__metadata__": {"surgery": json.dumps({**RECORD, "mixout": 3})}, **GOOD})),
]

INDEXES = [
    ("index-deep", DEEP),
    ("index-big-int", '{"weight_map": {"a": "x"}, "metadata": {"total_size": ' + BIG_INT + "}}"),
    ("index-list", "[]"),
    ("index-weight-map-list", json.dumps({"weight_map": ["model-00001-of-00002.safetensors"]})),
    ("index-weight-map-ints", json.dumps({"weight_map": {"enc.0.weight": 1}})),
    ("index-metadata-list", json.dumps({"metadata": [1], "weight_map": {"enc.0.weight": "model-00001-of-00002"
                                                                                          ".safetensors"}})),
    ("index-empty-weight-map", json.dumps({"weight_map": {}})),
    ("index-traversal", json.dumps({"weight_map": {"enc.0.weight": "../model-00001-of-00002.safetensors"}})),
    ("index-missing-shard", json.dumps({"weight_map": {"enc.0.weight": "model-00009-of-00009.safetensors"}})),
]

CONFIGS = [
    ("config-deep", DEEP),
    ("config-deep-65", '{"a":' * 65 + "1" + "}" * 65),
    ("config-big-int", '{"vocab_size": ' + BIG_INT + "}"),
    ("config-list", "[1]"),
    ("config-not-utf8", b'{"a": "\xff"}'),
]

R = RECORD
RECORDS = [
    ("rec-path-string", {**R, "config": [{"module": "", "path": "hidden_dropout_prob", "old": 0.1, "new": 0.0}]}),
    ("rec-path-empty", {**R, "config": [{"path": [], "old": 0.1}]}),
    ("rec-old-list", {**R, "config": [{"path": ["x"], "old": [0.1]}]}),
    ("rec-old-dict-unhashable", {**R, "dropout": [{"module": "d", "attr": "p", "old": {"a": 1}}]}),
    ("rec-old-string", {**R, "dropout": [{"module": "d", "attr": "p", "old": "0.1"}]}),
    ("rec-mixout-int", {**R, "mixout": 1}),
    ("rec-mixout-no-name", {**R, "mixout": [{"p": 0.1}]}),
    ("rec-mixout-name-int", {**R, "mixout": [{"name": 3, "p": 0.1}]}),
    ("rec-mixout-p-string", {**R, "mixout": [{"name": "enc.0", "p": "0.1"}]}),
    ("rec-mixout-p-2", {**R, "mixout": [{"name": "enc.0", "p": 2}]}),
    ("rec-msd-k-zero", {**R, "msd": [{"name": "head", "k": 0, "p": 0.1}]}),
    ("rec-msd-k-float", {**R, "msd": [{"name": "head", "k": 4.0, "p": 0.1}]}),
    ("rec-skipped-entry-list", {**R, "skipped": [["lm_head", "tied"]]}),
    ("rec-args-list", {**R, "args": [1]}),
    ("rec-version-2", {**R, "version": 2}),
    ("rec-format-other", {**R, "format": "other"}),
    ("rec-string-garbage", "surgery!"),
    ("rec-name-escape-sequence", {**R, "mixout": [{"name": "enc.0\n\x1b[2J", "p": 0.1}]}),
    ("rec-path-newline", {**R, "config": [{"path": ["hidden\ndropout"], "old": 0.1}]}),
    ("rec-deep-args", {**R, "args": json.loads('{"a":' * 30 + "1" + "}" * 30)}),
]


def _run(capsys, argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, err


def _check(tmp_path, capsys, src, dst):
    before = snapshot(src)
    for argv in (["convert", src, dst], ["inspect", src], ["inspect", src, "--json"]):
        rc, err = _run(capsys, argv)
        assert rc == 2, (argv[0], err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err and "internal error" not in err, err
        assert len(lines[0]) < 1000, lines[0][:300]
    assert snapshot(src) == before
    assert not dst.exists() and debris(tmp_path) == []


@pytest.mark.parametrize("case, text", HEADERS, ids=[c for c, _ in HEADERS])
def test_malformed_header(tmp_path, capsys, case, text):
    raw = text if isinstance(text, bytes) else text.encode()
    p = tmp_path / "src" / "model.safetensors"
    p.parent.mkdir()
    p.write_bytes(st_bytes({}, raw_header=raw) + b"\0" * 8)
    _check(tmp_path, capsys, p, tmp_path / "out" / "plain.safetensors")


@pytest.mark.parametrize("case, text", INDEXES, ids=[c for c, _ in INDEXES])
def test_malformed_index(tmp_path, capsys, case, text):
    src = make_dir(tmp_path / "src", sharded=True)
    (src / "model.safetensors.index.json").write_text(text)
    _check(tmp_path, capsys, src, tmp_path / "dst")


@pytest.mark.parametrize("case, text", CONFIGS, ids=[c for c, _ in CONFIGS])
def test_malformed_config(tmp_path, capsys, case, text):
    src = make_dir(tmp_path / "src")
    (src / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    _check(tmp_path, capsys, src, tmp_path / "dst")


@pytest.mark.parametrize("case, record", RECORDS, ids=[c for c, _ in RECORDS])
@pytest.mark.parametrize("where", ["config", "metadata"])
def test_malformed_record(tmp_path, capsys, case, record, where):
    if where == "config":
        src = make_dir(tmp_path / "src", record=record)
    else:
        src = tmp_path / "src.safetensors"
        text = record if isinstance(record, str) else json.dumps(record)
        src.write_bytes(st_bytes(tensors(), {"format": "pt", "surgery": text}))
    _check(tmp_path, capsys, src, tmp_path / ("dst" if where == "config" else "dst.safetensors"))


def test_the_table_is_large_enough():
    assert len(HEADERS) + len(INDEXES) + len(CONFIGS) + 2 * len(RECORDS) >= 40
