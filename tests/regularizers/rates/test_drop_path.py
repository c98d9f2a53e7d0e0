"""``drop_path=r``: stochastic depth (DropPath, LayerDrop) is its own knob. ``dropout=`` never
touches it, ``drop_path=`` never touches dropout; both are recorded, reverted, exported and
described the same way, and ``describe`` names the randomness left on."""

from __future__ import annotations

import json
import math

import pytest
import torch
from zoo import NAMES, batch, build

import surgery
from surgery.regularizers.rates import DROP_PATH, DROPOUT, ROUTER_NOISE, AttrChange
from surgery.regularizers.rates.kinds import find_probs
from surgery import train_noise

STOCHASTIC_DEPTH = ["bart", "convnext", "swin", "wav2vec2", "whisper"]  # zoo entries with LayerDrop / DropPath


def rates(model, kind: str) -> list[tuple[str, str, float]]:
    """Module probabilities of ``kind`` and the config fields that hold that kind."""
    mods = list(find_probs(model, kind))
    cfg = [("config", k, v) for k, v in sorted(model.config.to_dict().items())
           if type(v) in (int, float) and ("layerdrop" in k or "drop_path" in k) == (kind == DROP_PATH)
           and ("drop" in k)]
    return mods + cfg


def test_zoo_entries_with_stochastic_depth_are_found():
    found = [n for n in NAMES if any(v > 0 for _, _, v in rates(build(n), DROP_PATH))]
    assert found == STOCHASTIC_DEPTH


@pytest.mark.parametrize("name", STOCHASTIC_DEPTH)
def test_dropout_leaves_stochastic_depth_alone_and_drop_path_leaves_dropout_alone(name):
    model = build(name)
    inputs = batch(name)
    depth, drop = rates(model, DROP_PATH), rates(model, DROPOUT)

    surgery.apply(model, dropout=0.0)
    assert rates(model, DROP_PATH) == depth
    assert all(c.kind == "dropout" for c in surgery.get_record(model).dropout)
    noise = train_noise(model, **inputs)
    assert noise and all("(" not in c for c in noise)  # only DropPath/LayerDrop draws, no dropout-family call
    assert "pass drop_path=0.0 to turn it off" in surgery.describe(model)
    surgery.revert(model)

    surgery.apply(model, drop_path=0.0)
    assert rates(model, DROPOUT) == drop
    assert all(v == 0.0 for _, _, v in rates(model, DROP_PATH))
    noise = train_noise(model, **inputs)
    assert (noise == []) == (name == "convnext")  # ConvNeXt has no dropout
    assert all("(" in c for c in noise)  # dropout-family calls only: no DropPath/LayerDrop draw
    assert ("pass dropout=0.0 to turn it off" in surgery.describe(model)) == (name != "convnext")
    surgery.revert(model)
    assert rates(model, DROP_PATH) == depth and rates(model, DROPOUT) == drop


def test_record_entries_json_round_trip_and_describe():
    model = build("swin")  # depth schedule 0.15 * i / 3 over 4 blocks: the first block has no DropPath
    schedule = [0.15 * i / 3 for i in range(1, 4)]
    surgery.apply(model, dropout=0.0, drop_path=0.0)
    rec = surgery.get_record(model)
    depth = [c for c in rec.dropout + rec.config if c.kind == "drop_path"]
    assert [(c.attr if isinstance(c, AttrChange) else c.path[-1], c.old) for c in depth] == [
        ("drop_prob", schedule[0]), ("drop_prob", schedule[1]), ("drop_prob", schedule[2]), ("drop_path_rate", 0.15)]
    assert rec.args["drop_path"] == 0.0 and rec.left_on == []
    back = surgery.Record.from_dict(json.loads(rec.to_json()))
    assert back.to_dict() == rec.to_dict()
    text = surgery.describe(model)
    assert "  drop-path -> 0.0: 3 module attributes, 1 config field (were 0.05, 0.1, 0.15)" in text.splitlines()
    assert surgery.describe(back) == text.replace(type(model).__name__, "checkpoint")


def test_describe_names_randomness_left_on():
    model = build("bart")
    surgery.apply(model, mixout=0.1)
    lines = surgery.describe(model).splitlines()
    assert lines[-2:] == [
        "  left on in training: dropout 0.15 on 13 modules, 4 config fields: pass dropout=0.0 to turn it off",
        "  left on in training: drop-path 0.15 on 2 modules, 2 config fields: pass drop_path=0.0 to turn it off"]
    assert [on.to_json() for on in surgery.get_record(model).left_on] == [
        {"kind": "dropout", "values": [0.15], "modules": 13, "config": 4},
        {"kind": "drop_path", "values": [0.15], "modules": 2, "config": 2}]
    surgery.revert(model)
    surgery.apply(model, dropout=0.1, drop_path=0.0)  # set by the caller: not "left on"
    assert "left on" not in surgery.describe(model)


def test_drop_path_r_sets_every_rate_and_revert_restores_the_schedule():
    model = build("swin")
    before = rates(model, DROP_PATH)
    assert len(before) == 4 and len({v for _, _, v in before}) == 3  # 0.05, 0.1, 0.15 and the config's 0.15
    surgery.apply(model, drop_path=0.3)
    assert [v for _, _, v in rates(model, DROP_PATH)] == [0.3] * len(before)
    assert model.config.drop_path_rate == 0.3
    surgery.revert(model)
    assert rates(model, DROP_PATH) == before


def test_layerdrop_read_from_the_config_in_forward():
    """wav2vec2's encoder reads ``config.layerdrop`` at call time: the config field is the knob."""
    model = build("wav2vec2", layerdrop=1.0, hidden_dropout=0.0, activation_dropout=0.0, attention_dropout=0.0,
                  feat_proj_dropout=0.0, final_dropout=0.0)
    inputs = batch("wav2vec2")
    assert train_noise(model, **inputs) == ["rand", "rand"]  # one draw per layer, every layer skipped
    surgery.apply(model, drop_path=0.0)
    assert model.config.layerdrop == 0.0 and train_noise(model, **inputs) == []
    surgery.revert(model)
    assert model.config.layerdrop == 1.0


def test_export_writes_the_original_rates(tmp_path):
    model = build("bart")
    surgery.apply(model, dropout=0.0, drop_path=0.0)
    surgery.export(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert (cfg["encoder_layerdrop"], cfg["decoder_layerdrop"], cfg["dropout"]) == (0.15, 0.15, 0.15)
    assert "surgery" not in cfg


def test_rdrop_strategy_sees_layerdrop_not_droppath():
    assert surgery.rdrop_strategy(build("bart").train())[1].startswith("LayerDrop config.decoder_layerdrop=0.15 and 3")
    assert surgery.rdrop_strategy(build("wav2vec2").train())[1].startswith("LayerDrop config.layerdrop=0.15")
    assert surgery.rdrop_strategy(build("swin").train())[0] == "concat"  # DropPath draws per example
    model = build("bart")
    surgery.apply(model, drop_path=0.0)
    assert surgery.rdrop_strategy(model.train())[0] == "concat"


def _untouched(name, **kwargs):
    model = build(name, **kwargs)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = model.config.to_json_string()
    return model, lambda: (not surgery.is_surgered(model) and model.config.to_json_string() == cfg
                           and all(torch.equal(v, state[k]) for k, v in model.state_dict().items()))


@pytest.mark.parametrize("name, kwargs, message", [
    ("convnext", dict(drop_path=0.1), "drop_path=0.1: the model reads no stochastic-depth rate in forward"),
    ("convnext", dict(dropout=0.1), "dropout=0.1: the model has no dropout"),
    ("bert", dict(drop_path=0.2), "config fields: none"),
])
def test_nothing_to_set_is_refused(name, kwargs, message):
    model, untouched = _untouched(name, drop_path_rate=0.0) if name == "convnext" else _untouched(name)
    with pytest.raises(surgery.SurgeryError, match=message):
        surgery.apply(model, mixout=0.1, **kwargs)
    assert untouched()


def test_off_on_a_model_without_it_is_accepted_and_described():
    model = build("convnext", drop_path_rate=0.0)
    surgery.apply(model, dropout=0.0, drop_path=0.0)
    lines = surgery.describe(model).splitlines()
    assert lines[1:] == ["  dropout -> 0.0: the model has no dropout",
                         "  drop-path -> 0.0: 0 module attributes, 1 config field (were 0)"]


@pytest.mark.parametrize("bad", [1.5, -0.1, math.nan, "0.1", True])
def test_bad_drop_path_is_refused_before_anything_changes(bad):
    model, untouched = _untouched("swin")
    with pytest.raises(ValueError, match="drop_path must be a probability in"):
        surgery.apply(model, drop_path=bad)
    assert untouched()


def _owner(cls_name: str):
    return type(cls_name, (torch.nn.Module,), {})() if cls_name else torch.nn.Module()


@pytest.mark.parametrize("attr, owner, kind", [
    ("dropout", "", DROPOUT), ("attention_probs_dropout_prob", "", DROPOUT), ("attn_pdrop", "", DROPOUT),
    ("drop_rate", "", DROPOUT), ("attn_drop", "", DROPOUT), ("drop_prob", "StableDropout", DROPOUT),
    ("drop_prob", "DropBlock2d", DROPOUT), ("layerdrop", "", DROP_PATH), ("encoder_layerdrop", "", DROP_PATH),
    ("decoder_layerdrop", "", DROP_PATH), ("drop_path_rate", "", DROP_PATH), ("drop_path", "", DROP_PATH),
    ("drop_connect_rate", "", DROP_PATH), ("drop_prob", "DropPath", DROP_PATH), ("drop_prob", "SwinDropPath", DROP_PATH),
    ("p", "StochasticDepth", DROP_PATH), ("batch_dim", "DropPath", None), ("hidden_size", "", None),
    ("mask_time_prob", "", None),  # SpecAugment: augmentation, neither knob
    # a dropping layer's rate, whatever its name: timm's PatchDropout (tokens), DropBlock2d (blocks)
    ("prob", "PatchDropout", DROPOUT), ("p", "TokenDropout", DROPOUT), ("num_prefix_tokens", "PatchDropout", None),
    ("gamma_scale", "DropBlock2d", None), ("prob", "", None), ("p", "", None),
    # train-time noise on a router's input
    ("router_jitter_noise", "", ROUTER_NOISE), ("jitter_noise", "MixtralSparseMoeBlock", ROUTER_NOISE),
    ("moe_jitter_eps", "DbrxRouter", ROUTER_NOISE), ("input_jitter_noise", "PhimoeTopKRouter", ROUTER_NOISE),
    ("router_jitter_noise", "PhimoeTopKRouter", None), ("router_jitter_noise", "PhimoeConfig", None),  # a threshold
    ("pos_embed_jitter", "", None),  # DINOv3's coordinate augmentation: neither knob
])
def test_prob_kind_rule(attr, owner, kind):
    from surgery.regularizers.rates.kinds import prob_kind
    assert prob_kind(attr, _owner(owner)) == kind
