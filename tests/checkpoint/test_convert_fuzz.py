"""A table of malformed headers, indexes, configs, records and folders (issue 9, item 3;
issue 16): every row is refused by `surgery convert`, `surgery inspect` and
`surgery inspect --json` with exit 2 and one line, before anything is written: SRC
unchanged, no DST, no temporary. Every field of the change record is fuzzed. A second
table holds hostile inputs that are fine to convert: their output must be correct and safe
(no terminal control characters, strict JSON)."""

import json
import math
import os

import pytest

from fake_checkpoint import RECORD, debris, make_deep, make_dir, remove_deep, snapshot, st_bytes, tensors
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
    # issue 16, item 5: what safetensors' own parser refuses is refused (duplicate keys anywhere)
    ("utf8-bom", b"\xef\xbb\xbf" + _hdr(GOOD).encode()),
    ("utf32-le", _hdr(GOOD).encode("utf-32-le")),
    ("utf16-le", _hdr(GOOD).encode("utf-16-le")),
    ("duplicate-metadata", '{"__metadata__":{"surgery":' + json.dumps(json.dumps(RECORD)) + '},'
                           '"__metadata__":{"format":"pt"},' + _hdr(GOOD)[1:]),
    ("duplicate-tensor", "{" + _hdr(GOOD)[1:-1] + "," + _hdr(GOOD)[1:]),
    ("duplicate-entry-key", '{"a":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}}'),
    ("duplicate-metadata-key", '{"__metadata__":{"format":"pt","format":"np"},' + _hdr(GOOD)[1:]),
    ("lone-surrogate-name", '{"a\\ud800":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'),
    ("lone-surrogate-metadata", '{"__metadata__":{"x":"\\udc00"},' + _hdr(GOOD)[1:]),
    ("infinity-in-metadata", '{"__metadata__":{"x":Infinity},' + _hdr(GOOD)[1:]),
    ("nul-padding", _hdr(GOOD) + "\0\0\0\0\0\0"),
    ("record-duplicate-key", _hdr({"__metadata__": {"surgery": '{"format":"surgery","version":1,"mixout":[],'
                                                              '"mixout":[]}'}, **GOOD})),
    ("record-infinity", _hdr({"__metadata__": {"surgery": json.dumps({**RECORD, "args": {"mixout": math.inf}})},
                              **GOOD})),
    ("record-bom", _hdr({"__metadata__": {"surgery": "\ufeff" + json.dumps(RECORD)}, **GOOD})),
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
    ("index-duplicate-key", '{"weight_map": {"enc.0.weight": "model-00001-of-00002.safetensors", '
                            '"enc.0.weight": "model-00002-of-00002.safetensors"}}'),
    ("index-bom", "\ufeff" + json.dumps({"weight_map": {"enc.0.weight": "model-00001-of-00002.safetensors"}})),
]

CONFIGS = [
    ("config-deep", DEEP),
    ("config-deep-65", '{"a":' * 65 + "1" + "}" * 65),
    ("config-big-int", '{"vocab_size": ' + BIG_INT + "}"),
    ("config-list", "[1]"),
    ("config-not-utf8", b'{"a": "\xff"}'),
    ("config-bom", b"\xef\xbb\xbf" + json.dumps({"model_type": "bert", "surgery": RECORD}).encode()),
    ("config-utf16", json.dumps({"model_type": "bert"}).encode("utf-16-le")),
    ("config-duplicate-key", '{"model_type": "bert", "hidden_dropout_prob": 0.0, "hidden_dropout_prob": 0.1}'),
    ("config-duplicate-record", '{"surgery": ' + json.dumps(RECORD) + ', "surgery": null}'),
    ("config-lone-surrogate", '{"model_type": "bert\\ud800"}'),
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
    # issue 16, item 3: fields a reader uses that nothing checked
    ("rec-version-true", {**R, "version": True}),
    ("rec-version-float", {**R, "version": 1.0}),
    ("rec-left-on-unknown-kind", {**R, "left_on": [{"kind": "xx", "values": [0.1], "modules": 1, "config": 0}]}),
    ("rec-left-on-int", {**R, "left_on": 3}),
    ("rec-left-on-string-values", {**R, "left_on": [{"kind": "dropout", "values": "ab", "modules": 1, "config": 0}]}),
    ("rec-left-on-no-modules", {**R, "left_on": [{"kind": "dropout", "values": [0.1], "config": 0}]}),
    ("rec-msd-layers-missing-keys", {**R, "msd": [{"name": "head", "k": 2, "p": 0.1, "layers": {"n": 3}}]}),
    ("rec-msd-layers-list", {**R, "msd": [{"name": "head", "k": 2, "p": 0.1, "layers": [1]}]}),
    ("rec-args-dropout-escape", {**R, "args": {"dropout": "\x1b]0;pwned\x07"}}),
    ("rec-args-infinity", {**R, "args": {"mixout": math.inf}}),
    ("rec-old-nan", {**R, "dropout": [{"module": "d", "attr": "p", "old": math.nan}]}),
    ("rec-unknown-field-infinity", {**R, "future": [math.inf]}),
    ("rec-scope-list", {**R, "scope": ["bert"]}),
    ("rec-scope-escape", {**R, "scope": "bert\x1b[2J"}),
    ("rec-dropout-kind-int", {**R, "dropout": [{"module": "d", "attr": "p", "old": 0.1, "kind": 1}]}),
    ("rec-mixout-kind-other", {**R, "mixout": [{"name": "enc.0", "p": 0.1, "kind": "qlora"}]}),
]


def _run(capsys, argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, err


def _check(tmp_path, capsys, src, dst, *needles):
    before = snapshot(src)
    for argv in (["convert", src, dst], ["inspect", src], ["inspect", src, "--json"]):
        rc, err = _run(capsys, argv)
        assert rc == 2, (argv[0], err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err and "internal error" not in err, err
        assert len(lines[0]) < 1000, lines[0][:300]
        assert _safe(lines[0]), lines[0]
        for n in needles:
            assert n in lines[0], (n, lines[0])
    assert snapshot(src) == before
    assert not dst.exists() and debris(tmp_path) == []


def _safe(text: str) -> bool:
    """No character a terminal acts on (escape sequences, bidi overrides ...) but newlines."""
    return all(c.isprintable() or c == "\n" for c in text)


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


# ---- whole folders (issue 16, items 2, 3, 6) ------------------------------------------------

def _deep(tmp_path):
    src = make_dir(tmp_path / "src")
    (src / "x").mkdir()
    make_deep(src / "x", 1200)  # os.walk on Python 3.11 recursed: RecursionError, exit 1
    return src


def _records_disagree(tmp_path):
    src = make_dir(tmp_path / "src")
    other = {**RECORD, "mixout": [{"name": "enc.0", "p": 0.5}]}
    (src / "model.safetensors").write_bytes(st_bytes(tensors(), {"format": "pt", "surgery": json.dumps(other)}))
    return src


def _hard_link(name):
    def build(tmp_path):
        (tmp_path / "private").write_bytes(st_bytes(tensors()) if name.endswith(".safetensors") else b"API_KEY=x")
        src = make_dir(tmp_path / "src")
        if (src / name).exists():
            (src / name).unlink()
        os.link(tmp_path / "private", src / name)
        return src
    return build


def _duplicate_in_config_record(tmp_path):
    src = make_dir(tmp_path / "src", record=None)
    rec = json.dumps(RECORD)[:-1] + ', "mixout": []}'  # the first mixout list would be silently dropped
    (src / "config.json").write_text('{"model_type": "bert", "surgery": ' + rec + "}")
    return src


TREES = [
    ("folders-1200-deep", _deep, "nested more than 64 levels deep"),
    ("records-disagree", _records_disagree, "hold different surgery records"),
    ("hard-link-tokenizer-outside", _hard_link("tokenizer.json"), "is a hard link"),
    ("hard-link-weights-outside", _hard_link("model.safetensors"), "is a hard link"),
    ("hard-link-config-outside", _hard_link("config.json"), "is a hard link"),
    ("duplicate-key-in-config-record", _duplicate_in_config_record, "has the key 'mixout' twice"),
]


@pytest.mark.parametrize("case, build, needle", TREES, ids=[c for c, _, _ in TREES])
def test_hostile_folder(tmp_path, capsys, case, build, needle):
    src = build(tmp_path)
    try:
        _check(tmp_path, capsys, src, tmp_path / "dst", needle)
    finally:
        if case == "folders-1200-deep":
            remove_deep(src / "x")


# ---- every field of the record, fuzzed -------------------------------------------------------
# Written here from what the readers use (describing.py, summary.py, conversion.py, configs.py),
# not read from surgery/schema.py: a field the schema forgets fails this table.

def _is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_text(v):
    return isinstance(v, str) and v.isprintable()


KINDS = {
    "str": _is_text,
    "num": _is_num,
    "prob": lambda v: _is_num(v) and 0 <= v <= 1,
    "bool": lambda v: isinstance(v, bool),
    "k": lambda v: type(v) is int and 1 <= v <= 2**20,
    "count": lambda v: type(v) is int and 0 <= v <= 2**53,
    "path": lambda v: isinstance(v, list) and v != [] and all(_is_text(x) and x for x in v),
    # a config path is restored into config.json: at most 16 keys deep (issue 23: 2,000 keys was a RecursionError)
    "config-path": lambda v: isinstance(v, list) and 0 < len(v) <= 16 and all(_is_text(x) and x for x in v),
    "strs": lambda v: isinstance(v, list) and all(_is_text(x) for x in v),
    "str-or-strs": lambda v: _is_text(v) or (isinstance(v, list) and all(_is_text(x) for x in v)),
    "values": lambda v: isinstance(v, list) and all(_is_num(x) for x in v),  # [] for left-on "sampling"
    "object": lambda v: isinstance(v, dict),
    "list": lambda v: isinstance(v, list),
    "kind": lambda v: v in ("dropout", "drop_path", "router_noise"),
    "left-kind": lambda v: v in ("dropout", "drop_path", "router_noise", "sampling"),
    "pool": lambda v: v in ("first", "last"),
    "lora": lambda v: v in ("lora", "experts", "router"),
    "version": lambda v: type(v) is int and v == 1,
    "format": lambda v: v == "surgery",
}
LAYERS = {"backbone": "bert", "n": 3, "p": 0.2, "pool": "first", "init": -3.0, "param": "layer_pool.layer_weights",
          "frozen": ["bert.pooler.dense.weight"]}
ENTRY = {"mixout": {"name": "enc.0", "p": 0.1, "orig": "torch.nn.Linear", "transposed": False, "kind": "lora",
                    "params": ["gate_up_proj"]},
         "dropout": {"module": "drop", "attr": "p", "old": 0.1, "new": 0.0, "kind": "dropout"},
         "config": {"module": "", "path": ["hidden_dropout_prob"], "old": 0.1, "new": 0.0, "kind": "dropout"},
         "msd": {"name": "head", "k": 2, "p": 0.1, "layers": LAYERS},
         "skipped": {"name": "lm_head", "reason": "tied"},
         "left_on": {"kind": "drop_path", "values": [0.1], "modules": 2, "config": 1}}
# (where, field, kind, required, nullable)
FIELDS = [("top", "format", "format", True, False), ("top", "version", "version", True, False),
          ("top", "scope", "str", False, False), ("top", "args", "object", False, False)]
FIELDS += [("top", f, "list", False, False) for f in ENTRY]
FIELDS += [("args", f, kind, False, nullable) for f, kind, nullable in [
    ("mixout", "prob", False), ("dropout", "prob", True), ("drop_path", "prob", True), ("msd", "count", False),
    ("msd_p", "prob", False), ("head", "str", True), ("include", "str-or-strs", True),
    ("exclude", "str-or-strs", True), ("mixout_head", "bool", False), ("mixout_tied", "bool", False),
    ("target_dtype", "str", True), ("low_memory", "bool", False), ("msd_layers", "bool", False),
    ("msd_layer_p", "prob", False), ("msd_pool", "pool", False), ("router_noise", "prob", True)]]
FIELDS += [("mixout", "name", "str", True, False), ("mixout", "p", "prob", True, False),
           ("mixout", "orig", "str", False, False), ("mixout", "transposed", "bool", False, False),
           ("mixout", "kind", "lora", False, False), ("mixout", "params", "path", False, False),
           ("dropout", "module", "str", True, False), ("dropout", "attr", "str", True, False),
           ("dropout", "old", "num", True, False), ("dropout", "new", "num", False, True),
           ("dropout", "kind", "kind", False, False),
           ("config", "path", "config-path", True, False), ("config", "old", "num", True, False),
           ("config", "new", "num", False, True), ("config", "module", "str", False, False),
           ("config", "kind", "kind", False, False),
           ("msd", "name", "str", True, False), ("msd", "k", "k", True, False), ("msd", "p", "prob", True, False),
           ("msd", "layers", "object", False, True),
           ("skipped", "name", "str", True, False), ("skipped", "reason", "str", True, False),
           ("left_on", "kind", "left-kind", True, False), ("left_on", "values", "values", True, False),
           ("left_on", "what", "str", False, False),
           ("left_on", "modules", "count", True, False), ("left_on", "config", "count", True, False)]
COVERAGE = {"trainable": 10, "mixout": 6, "msd": 2, "left": [{"kind": "norms", "weights": 4, "names": ["ln.weight"]}]}
FIELDS += [("top", "coverage", "object", False, False)]
FIELDS += [("coverage", f, kind, f == "trainable", False) for f, kind in [
    ("trainable", "count"), ("mixout", "count"), ("msd", "count"), ("left", "list")]]
FIELDS += [("left", f, kind, True, False) for f, kind in [("kind", "str"), ("weights", "count"), ("names", "strs")]]
FIELDS += [("layers", f, kind, f != "init", False) for f, kind in [
    ("backbone", "str"), ("n", "k"), ("p", "prob"), ("pool", "pool"), ("param", "str"), ("frozen", "strs"),
    ("init", "num")]]
HOSTILE = [None, True, False, 0, 1, -1, 2, 0.5, 1e300, 2**70, "", "x", "first", "lora", "dropout",
           "\x1b]0;pwned\x07\x1b[2J", "a\u202eb", [], ["x"], [1], [""], [math.inf], {}, {"a": 1}, math.inf, -math.inf,
           math.nan, ["x"] * 17, ["x"] * 2000]
MISSING = object()


def _record_with(where, field, value):
    rec = json.loads(json.dumps({**RECORD, "msd": [], "left_on": []}))
    if where == "top":
        target = rec
    elif where == "args":
        target = rec["args"]
    elif where == "layers":
        rec["msd"] = [json.loads(json.dumps(ENTRY["msd"]))]
        target = rec["msd"][0]["layers"]
    elif where in ("coverage", "left"):
        rec["coverage"] = json.loads(json.dumps(COVERAGE))
        target = rec["coverage"] if where == "coverage" else rec["coverage"]["left"][0]
    else:
        rec[where] = [json.loads(json.dumps(ENTRY[where]))]
        target = rec[where][0]
    if value is MISSING:
        target.pop(field, None)
    else:
        target[field] = value
    return rec


def _invalid(kind, required, nullable):
    ok = KINDS[kind]
    bad = [v for v in HOSTILE if not (ok(v) or (nullable and v is None))]
    return bad + ([MISSING] if required else [])


@pytest.mark.parametrize("where, field, kind, required, nullable", FIELDS,
                         ids=[f"{w}.{f}" for w, f, *_ in FIELDS])
def test_every_record_field_is_checked(tmp_path, capsys, where, field, kind, required, nullable):
    """Each value a field must not hold is refused by convert, inspect and inspect --json,
    one line naming the field (the version and format by their own words)."""
    values = _invalid(kind, required, nullable)
    assert len(values) >= 5
    for i, v in enumerate(values):
        src = tmp_path / f"{i}.safetensors"
        text = json.dumps(_record_with(where, field, v))  # NaN and Infinity as Python's json writes them
        src.write_bytes(st_bytes(tensors(), {"format": "pt", "surgery": text}))
        needle = "" if field in ("format", "version") else field
        _check(tmp_path, capsys, src, tmp_path / "dst.safetensors", "invalid surgery record", needle)


def test_the_field_table_covers_the_record():
    """Every field the record writes and every field its regularizers declare (their options, their entry
    types) is in FIELDS (a new field must join it)."""
    from surgery import regularizers
    from surgery.record import Record, Skip

    top = {f for w, f, *_ in FIELDS if w == "top"}
    assert set(Record(coverage={"trainable": 1}, scope="x").to_dict()) <= top
    args = {f for w, f, *_ in FIELDS if w == "args"}
    assert {o.name for o in regularizers.all_options()} <= args
    for section, kind in [*regularizers.section_types().items(), ("skipped", Skip)]:
        assert set(kind.fields()) <= {f for w, f, *_ in FIELDS if w == section}, section
    from surgery.regularizers.msd import LayerMix
    assert set(LayerMix.fields()) <= {f for w, f, *_ in FIELDS if w == "layers"}


# ---- hostile but valid: converted and inspected, output correct and safe ----------------------

ESC = "\x1b]0;pwned\x07\x1b[2J"


def _escape_tensor_name(tmp_path):
    t = tensors()
    t[f"enc.1{ESC}.weight"] = ("F32", [64], bytes(256))  # the largest tensor: inspect names it
    src = make_dir(tmp_path / "src", files={f"tok{ESC}.json": b"{}", f"sub{ESC}/x.txt": b"x"})
    (src / "model.safetensors").write_bytes(st_bytes(t, {"format": "pt"}))
    return src


def _escape_shard_name(tmp_path):
    src = make_dir(tmp_path / "src", sharded=True)
    idx = json.loads((src / "model.safetensors.index.json").read_text())
    new = f"w{ESC}.safetensors"
    os.rename(src / "model-00002-of-00002.safetensors", src / new)
    idx["weight_map"] = {k: (new if v.startswith("model-00002") else v) for k, v in idx["weight_map"].items()}
    (src / "model.safetensors.index.json").write_text(json.dumps(idx))
    return src


def _odd_layer_names(tmp_path):
    names = ["enc.\u00b2", "enc." + "9" * 5000, "enc.007", "enc.\u0663", "enc.0"]
    rec = {**RECORD, "mixout": [{"name": n, "p": 0.1} for n in names],
           "skipped": [{"name": "a.\u00b2.b", "reason": "x"}, {"name": "a.3.b", "reason": "x"}]}
    return make_dir(tmp_path / "src", record=rec)


def _infinity_in_config(tmp_path):
    src = make_dir(tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["hidden_dropout_prob"] = math.inf  # Python's json (transformers' save) writes Infinity
    cfg["layer_norm_eps"] = math.nan
    (src / "config.json").write_text(json.dumps(cfg))
    return src


def _left_on_and_layers(tmp_path):
    rec = {**RECORD, "left_on": [{"kind": "drop_path", "values": [0.1, 0.2], "modules": 12, "config": 1}],
           "scope": "bert"}
    return make_dir(tmp_path / "src", record=rec)


def _hard_link_inside(tmp_path):
    src = make_dir(tmp_path / "src")
    os.link(src / "tokenizer.json", src / "tokenizer_copy.json")
    os.link(src / "model.safetensors", src / "weights-alias.safetensors")
    return src


def _records_agree(tmp_path):
    src = make_dir(tmp_path / "src")
    (src / "model.safetensors").write_bytes(st_bytes(tensors(), {"format": "pt", "surgery": json.dumps(RECORD)}))
    return src


E = "\\x1b]0;pwned\\x07\\x1b[2J"  # ESC as printed: escaped
# (id, build SRC, in `inspect` text, in `convert --dry-run`)
ACCEPTED = [
    ("escape-in-tensor-and-file-names", _escape_tensor_name, f"largest tensor: enc.1{E}.weight",
     f"copy: tok{E}.json, sub{E}/x.txt"),
    ("escape-in-shard-name", _escape_shard_name, "Mixout targets: 1", f"w{E}.safetensors -> w{E}.safetensors"),
    ("superscript-and-5000-digit-layer-names", _odd_layer_names, "enc.\u00b2\n", "record: config.json"),
    ("infinity-in-config-json", _infinity_in_config, "hidden_dropout_prob: saved Infinity, original 0.1",
     "hidden_dropout_prob inf -> 0.1"),
    ("left-on-and-scope", _left_on_and_layers, "left on in training: drop-path 0.1, 0.2 on 12 modules", "record"),
    ("hard-links-inside-src", _hard_link_inside, "tensors: 3", "copy: tokenizer.json, tokenizer_copy.json"),
    ("records-agree", _records_agree, "record (config.json)", "record: config.json"),
]


def _strict_json(text):
    def refuse(name):
        raise AssertionError(f"{name} in --json output is not JSON")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("case, build, needle, dry_needle", ACCEPTED, ids=[c for c, *_ in ACCEPTED])
def test_hostile_but_valid_output_is_correct_and_safe(tmp_path, capsys, case, build, needle, dry_needle):
    src = build(tmp_path)
    before = snapshot(src)
    outputs = {}
    for name, argv in [("dry", ["convert", src, tmp_path / "dst", "--dry-run"]), ("text", ["inspect", src]),
                       ("json", ["inspect", src, "--json"]), ("convert", ["convert", src, tmp_path / "dst"])]:
        rc = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        assert rc == 0, (name, err)
        assert _safe(out) and _safe(err), (name, out + err)
        outputs[name] = out
    info = _strict_json(outputs["json"])
    assert needle in outputs["text"], outputs["text"]
    assert dry_needle in outputs["dry"], outputs["dry"]
    assert info["tensors"] >= 3 and "\x1b" not in outputs["json"]
    if case == "escape-in-tensor-and-file-names":  # JSON keeps the real name (escaped as \u001b)
        assert info["largest_tensor"]["name"] == f"enc.1{ESC}.weight"
    if case == "escape-in-shard-name":
        assert f"w{ESC}.safetensors" in info["files"]
    if case == "infinity-in-config-json":
        assert info["config_restore"][0]["saved"] == "Infinity"
    assert snapshot(src) == before
    dst = tmp_path / "dst"
    assert debris(tmp_path) == []
    cfg = _strict_json((dst / "config.json").read_text()) if case != "infinity-in-config-json" else None
    if cfg is not None:
        assert "surgery" not in cfg
    if case == "escape-in-tensor-and-file-names":
        assert (dst / f"tok{ESC}.json").read_bytes() == b"{}" and (dst / f"sub{ESC}" / "x.txt").exists()
