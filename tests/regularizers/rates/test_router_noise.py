"""``router_noise=e``: train-time noise on a mixture-of-experts router's input (Mixtral's
``router_jitter_noise``, DBRX's ``moe_jitter_eps``, Switch's router jitter, PhiMoE's
``input_jitter_noise``) is its own knob, recorded, reverted, converted and described like dropout
and drop-path; ``dropout=0.0, drop_path=0.0, router_noise=0.0`` makes MoE training forwards
deterministic and equal to eval."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from agreement import ALL_OFF, check_agreement, left_on
from transformers import AutoConfig

import surgery
from surgery.cli import main
from surgery.regularizers.rates import DROPOUT, ROUTER_NOISE
from surgery.regularizers.rates.kinds import find_probs
from surgery import train_noise

J = 0.1  # router jitter of every MoE config below
_DECODER = dict(vocab_size=99, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.15, pad_token_id=0,
                bos_token_id=1, eos_token_id=2)
# name -> (model type, class, config fields, router-noise fields of the config as (path, value))
MOE = {
    "mixtral": ("mixtral", "MixtralForCausalLM", dict(_DECODER, num_local_experts=4, num_experts_per_tok=2,
                                                      router_jitter_noise=J), [(("router_jitter_noise",), J)]),
    "qwen2-moe": ("qwen2_moe", "Qwen2MoeForCausalLM", dict(_DECODER, num_experts=4, num_experts_per_tok=2,
                                                           moe_intermediate_size=16, shared_expert_intermediate_size=24),
                  []),
    "qwen3-moe": ("qwen3_moe", "Qwen3MoeForCausalLM", dict(_DECODER, num_experts=4, num_experts_per_tok=2,
                                                           moe_intermediate_size=16, head_dim=8), []),
    "olmoe": ("olmoe", "OlmoeForCausalLM", dict(_DECODER, num_experts=4, num_experts_per_tok=2), []),
    "dbrx": ("dbrx", "DbrxForCausalLM",  # the noise lives in a nested config: ffn_config.moe_jitter_eps
             dict(vocab_size=99, d_model=32, n_heads=4, n_layers=2, max_seq_len=64, resid_pdrop=0.1, emb_pdrop=0.1,
                  pad_token_id=0, attn_config=dict(kv_n_heads=2, attn_pdrop=0.1, rope_theta=10000.0, clip_qkv=8.0),
                  ffn_config=dict(ffn_hidden_size=32, moe_num_experts=4, moe_top_k=2, moe_jitter_eps=J)),
             [(("ffn_config", "moe_jitter_eps"), J)]),
    "switch": ("switch_transformers", "SwitchTransformersForConditionalGeneration",  # encoder-decoder
               dict(vocab_size=99, d_model=32, d_kv=8, d_ff=32, expert_capacity=8, num_layers=2,
                    num_sparse_encoder_layers=1, num_decoder_layers=2, num_sparse_decoder_layers=1, num_heads=4,
                    num_experts=4, router_jitter_noise=J, dropout_rate=0.1, pad_token_id=0,
                    decoder_start_token_id=0), [(("router_jitter_noise",), J)]),
}
NOISY = [n for n in MOE if MOE[n][3]]


def build(name: str, **overrides):
    model_type, cls, fields, _ = MOE[name]
    torch.manual_seed(0)
    return getattr(transformers, cls)(AutoConfig.for_model(model_type, **{**fields, **overrides})).eval()


def inputs(name: str) -> dict:
    ids = torch.randint(4, 99, (2, 7), generator=torch.Generator().manual_seed(1))
    return dict(input_ids=ids, decoder_input_ids=ids) if name == "switch" else dict(input_ids=ids)


def logits(model, x, train: bool) -> torch.Tensor:
    model.train(train)
    with torch.no_grad():
        return model(**x).logits


def config_value(model, path):
    v = model.config
    for k in path:
        v = getattr(v, k)
    return v


@pytest.mark.parametrize("name", sorted(MOE))
def test_all_three_off_make_moe_training_deterministic(name):
    """The determinism contract on MoE models: two train forwards bitwise equal to each other and to
    eval, no random operation left, and revert gives back every value and the config."""
    model, x = build(name), inputs(name)
    eval_before, cfg = logits(model, x, False), model.config.to_json_string()
    noise = train_noise(model, **x)
    assert ("uniform_" in noise) == (name in NOISY)  # the router jitter: one uniform_ draw per MoE layer
    surgery.apply(model, **ALL_OFF)
    assert train_noise(model, **x) == []
    a, b, e = logits(model, x, True), logits(model, x, True), logits(model, x, False)
    assert torch.equal(a, b) and torch.equal(a, e) and torch.equal(e, eval_before)
    surgery.revert(model)
    assert model.config.to_json_string() == cfg
    assert [v for _, _, v in find_probs(model, ROUTER_NOISE)] == [J] * len(list(find_probs(model, ROUTER_NOISE)))
    assert train_noise(model, **x) == noise


@pytest.mark.parametrize("name", sorted(MOE))
def test_describe_and_train_noise_agree_on_moe(name):
    model, x = build(name), inputs(name)
    kinds = check_agreement(model, lambda: train_noise(model, **x))
    assert kinds == {DROPOUT} | ({ROUTER_NOISE} if name in NOISY else set())


@pytest.mark.parametrize("name", NOISY)
def test_router_noise_is_recorded_reverted_and_described(name):
    model, x = build(name), inputs(name)
    attrs = list(find_probs(model, ROUTER_NOISE))
    assert attrs and all(v == J for _, _, v in attrs)
    surgery.apply(model, dropout=0.0)  # router noise not asked about: left on, and said so
    assert left_on(model) == {ROUTER_NOISE}
    fields = surgery.get_record(model).left_on[-1].config  # Switch: its encoder and decoder own a copy each
    assert fields == len(MOE[name][3]) * (3 if name == "switch" else 1)
    assert (f"left on in training: router noise {J:g} on {len(attrs)} modules, {fields} config field"
            in surgery.describe(model))
    assert train_noise(model, **x) == ["uniform_"] * len(attrs)
    surgery.revert(model)

    surgery.apply(model, router_noise=0.0)
    rec = surgery.get_record(model)
    assert rec.args["router_noise"] == 0.0
    assert [(c.module, c.attr, c.old, c.new, c.kind) for c in rec.dropout] == \
        [(n, a, J, 0.0, ROUTER_NOISE) for n, a, _ in attrs]
    assert len(rec.config) == fields and {(tuple(c.path), c.old, c.kind) for c in rec.config} == \
        {(path, J, ROUTER_NOISE) for path, _ in MOE[name][3]}
    assert all(config_value(model, path) == 0.0 for path, _ in MOE[name][3])
    assert (f"  router noise -> 0.0: {len(attrs)} module attributes, {fields} config field{'s' * (fields > 1)} "
            f"(were {J:g})" in surgery.describe(model).splitlines())
    back = surgery.Record.from_dict(json.loads(rec.to_json()))
    assert surgery.describe(back) == surgery.describe(model).replace(type(model).__name__, "checkpoint")
    noise = train_noise(model, **x)
    assert noise and "uniform_" not in noise  # dropout is still on, the jitter is off
    surgery.revert(model)
    assert list(find_probs(model, ROUTER_NOISE)) == attrs
    assert all(config_value(model, path) == J for path, _ in MOE[name][3])


def test_options_are_independent():
    """``dropout=`` never touches router noise, ``router_noise=`` never touches dropout."""
    model = build("mixtral")
    surgery.apply(model, dropout=0.0)
    assert all(v == J for _, _, v in find_probs(model, ROUTER_NOISE))
    assert all(c.kind == DROPOUT for c in surgery.get_record(model).dropout)
    surgery.revert(model)
    surgery.apply(model, router_noise=0.3)
    assert [v for _, _, v in find_probs(model, DROPOUT)] == [0.15, 0.15]
    assert [v for _, _, v in find_probs(model, ROUTER_NOISE)] == [0.3, 0.3] and model.config.router_jitter_noise == 0.3
    surgery.revert(model)


def test_router_noise_not_given_is_not_in_the_record_args():
    """Records written before the option existed compare equal on resume: the key appears only when given."""
    model = build("mixtral")
    surgery.apply(model, dropout=0.0)
    assert "router_noise" not in surgery.get_record(model).args
    surgery.revert(model)


def test_convert_and_export_restore_the_jitter(tmp_path, capsys):
    model = build("mixtral")
    surgery.apply(model, mixout=0.1, dropout=0.0, router_noise=0.0)
    model.save_pretrained(tmp_path / "src")
    saved = json.loads((tmp_path / "src" / "config.json").read_text())
    assert saved["router_jitter_noise"] == 0.0 and "surgery" in saved
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst")]) == 0, capsys.readouterr().err
    plain = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert plain["router_jitter_noise"] == J and plain["attention_dropout"] == 0.15 and "surgery" not in plain
    loaded = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "dst")
    assert [m.jitter_noise for m in loaded.modules() if hasattr(m, "jitter_noise")] == [J, J]
    surgery.export(model, tmp_path / "export")
    assert json.loads((tmp_path / "export" / "config.json").read_text())["router_jitter_noise"] == J


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(router_noise=1.5), ValueError, "router_noise must be a probability in"),
    (dict(router_noise="0"), ValueError, "router_noise must be a probability in"),
    (dict(router_noise=0.1), surgery.SurgeryError, "router_noise=0.1: the model has no router noise"),
])
def test_bad_router_noise_is_refused_before_anything_changes(kwargs, error, message, untouched):
    model = build("qwen3-moe")  # no jitter field at all
    check = untouched(model)
    with pytest.raises(error, match=message):
        surgery.apply(model, mixout=0.1, **kwargs)
    check()


def test_off_on_a_model_without_it_is_accepted_and_described():
    model = build("qwen3-moe")
    surgery.apply(model, dropout=0.0, router_noise=0.0)
    assert surgery.describe(model).splitlines()[2:] == ["  router noise -> 0.0: the model has no router noise"]


def _phimoe():
    cfg = AutoConfig.for_model("phimoe", **_DECODER, num_local_experts=4, num_experts_per_tok=2,
                               router_jitter_noise=0.01, input_jitter_noise=J)
    torch.manual_seed(0)
    return transformers.PhimoeForCausalLM(cfg).eval()


def test_phimoe_threshold_is_not_noise():
    """PhiMoE's ``router_jitter_noise`` is the masking threshold of its expert choice, read in eval too:
    ``router_noise=`` leaves it alone (eval stays bitwise), and sets the real noise, ``input_jitter_noise``."""
    model, x = _phimoe(), inputs("phimoe")
    before = logits(model, x, False)
    surgery.apply(model, router_noise=0.0)
    changed = {c.attr for c in surgery.get_record(model).dropout} | {c.path[-1] for c in surgery.get_record(model).config}
    assert changed == {"input_jitter_noise"}
    assert model.config.router_jitter_noise == 0.01 and model.config.input_jitter_noise == 0.0
    assert all(m.router_jitter_noise == 0.01 for m in model.modules() if hasattr(m, "router_jitter_noise"))
    assert torch.equal(logits(model, x, False), before)
    surgery.revert(model)
    assert model.config.input_jitter_noise == J


def test_phimoe_expert_sampling_is_named_left_on():
    """PhiMoE's router samples its experts in every training forward (Gumbel draws), which no option
    turns off: with every option at 0.0 ``train_noise`` still sees draws, and ``describe`` says why."""
    model, x = _phimoe(), inputs("phimoe")
    assert check_agreement(model, lambda: train_noise(model, **x)) == {DROPOUT, ROUTER_NOISE, "sampling"}
    surgery.apply(model, **ALL_OFF)
    noise = train_noise(model, **x)
    assert "exponential_" in noise and "rand_like" in noise
    assert surgery.describe(model).splitlines()[-1] == (
        "  left on in training: PhimoeTopKRouter: expert choice sampled in training (sparsemixer's Gumbel draws), "
        "on 2 modules: no option turns it off")
    back = surgery.Record.from_dict(json.loads(surgery.get_record(model).to_json()))  # what convert/inspect read
    assert surgery.describe(back) == surgery.describe(model).replace(type(model).__name__, "checkpoint")
    surgery.revert(model)
