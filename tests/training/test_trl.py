"""surgery with TRL's SFTTrainer (``surgery.trainer_class(SFTTrainer)``) on a tiny Llama and a tokenizer
built here (no hub): the final ``save_model()`` is plain, periodic checkpoints are surgered and resume
bitwise, R-Drop and the MSD loss run through the mixin, SFT's own loss and metrics still run when they
are off, and what cannot work is refused before training (the fused LM head, a trainer loss that is
not the model's own)."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from training_setup import StopAt
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Trainer
from trl import SFTConfig, SFTTrainer

import surgery
from surgery import SurgeryError
from surgery.layers.mixout import MixLinear

WORDS = "the a cat dog sat on mat ran far big small red blue and".split()
SPECIAL = ["[PAD]", "[UNK]", "<s>", "</s>"]
SFT = surgery.trainer_class(SFTTrainer)


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>",
                                   bos_token="<s>")


def texts(n=16, seed=0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        k = int(torch.randint(3, 9, (1,), generator=g))
        rows.append(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g)))
    return Dataset.from_dict({"text": rows})


def llama(seed=0, tie=True) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=len(SPECIAL) + len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0,
                      bos_token_id=2, eos_token_id=3, tie_word_embeddings=tie, attention_dropout=0.1)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def sft_args(out, steps, save_steps=0, **kw) -> SFTConfig:
    return SFTConfig(str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2, seed=1,
                     save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, logging_steps=2,
                     report_to=[], use_cpu=True, bf16=False, disable_tqdm=True, **kw)


def batch(n=3, t=6, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, len(SPECIAL) + len(WORDS), (n, t), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def eval_logits(model):
    model.eval()
    b = batch()
    with torch.no_grad():
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


SURGERY = dict(mixout=0.2, dropout=0.0)


# ---- saves ---------------------------------------------------------------------------------------------

def test_sft_final_save_is_plain_and_checkpoints_are_surgered(tmp_path):
    m = surgery.apply(llama(), **SURGERY)
    rec = surgery.get_record(m)
    tr = SFT(model=m, args=sft_args(tmp_path / "run", 4, save_steps=2), train_dataset=texts(),
             processing_class=tokenizer())
    tr.train()
    # SFT's own compute_loss ran (the options are off): its metrics are logged
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert logs and all("mean_token_accuracy" in h and "entropy" in h for h in logs)
    # the periodic checkpoint is surgered: every target, the record in config.json
    ckpt = tmp_path / "run" / "checkpoint-2"
    keys = load_file(ckpt / "model.safetensors")
    assert sorted(k for k in keys if k.endswith(".mixout_target")) == sorted(rec.target_keys)
    assert json.loads((ckpt / "config.json").read_text())["surgery"]["args"]["mixout"] == 0.2
    # the save you call is plain: no target, no record, original dropout; plain transformers loads it
    tr.save_model(str(tmp_path / "final"))
    assert surgery.is_surgered(m)
    assert not any(k.endswith("mixout_target") for k in load_file(tmp_path / "final" / "model.safetensors"))
    cfg = json.loads((tmp_path / "final" / "config.json").read_text())
    assert "surgery" not in cfg and cfg["attention_dropout"] == 0.1
    plain, info = LlamaForCausalLM.from_pretrained(str(tmp_path / "final"), output_loading_info=True)
    assert not any(info.values()), info
    assert torch.equal(eval_logits(plain), eval_logits(m))


def test_sft_of_a_lora_model_saves_a_plain_adapter(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    pm = get_peft_model(llama(), LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    surgery.apply(pm, **SURGERY)
    assert {m.kind for m in surgery.get_record(pm).mixout} == {"lora"}
    tr = SFT(model=pm, args=sft_args(tmp_path / "run", 2, save_steps=2), train_dataset=texts(),
             processing_class=tokenizer())
    tr.train()
    ckpt = tmp_path / "run" / "checkpoint-2"  # the adapter, and the record beside it for the resume check
    assert json.loads((ckpt / "surgery.json").read_text())["args"]["mixout"] == 0.2
    tr.save_model(str(tmp_path / "final"))
    assert not (tmp_path / "final" / "surgery.json").exists() and not (tmp_path / "final" / "config.json").exists()
    loaded = PeftModel.from_pretrained(llama(), str(tmp_path / "final"))
    assert torch.equal(eval_logits(loaded), eval_logits(pm))
    lora_b = next(p for n, p in pm.named_parameters() if "lora_B" in n)
    assert lora_b.abs().sum() > 0  # it trained


def _run(out, steps, save_steps=0, stop=None, seed=0, **kw):
    m = surgery.apply(llama(seed), **SURGERY)
    callbacks = [] if stop is None else [StopAt(stop)]
    tr = SFT(model=m, args=sft_args(out, steps, save_steps), train_dataset=texts(), processing_class=tokenizer(),
             callbacks=callbacks, **kw)
    return m, tr


@pytest.mark.slow
@pytest.mark.parametrize("loss", [{}, {"rdrop_alpha": 1.0}], ids=["sft-loss", "rdrop"])
def test_sft_resume_is_bitwise(tmp_path, loss):
    full, tr = _run(tmp_path / "full", 6, **loss)
    tr.train()
    cut, tr = _run(tmp_path / "cut", 6, save_steps=3, stop=3, **loss)
    tr.train()
    assert (tmp_path / "cut" / "checkpoint-3").is_dir() and not (tmp_path / "cut" / "checkpoint-6").exists()
    resumed, tr = _run(tmp_path / "cut", 6, save_steps=3, **loss)  # a fresh start: pretrained model, same surgery
    tr.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-3"))
    ref, got = full.state_dict(), resumed.state_dict()
    assert ref.keys() == got.keys()
    assert [k for k in ref if not torch.equal(ref[k], got[k])] == []  # bitwise: data order, RNG, arithmetic
    start = llama().state_dict()
    assert not torch.equal(got["model.layers.0.mlp.up_proj.weight"], start["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(got["model.layers.0.mlp.up_proj.mixout_target"], start["model.layers.0.mlp.up_proj.weight"])


def test_resume_with_other_surgery_is_refused(tmp_path):
    _, tr = _run(tmp_path / "a", 2, save_steps=1)
    tr.train()
    other = surgery.apply(llama(), mixout=0.5)
    tr = SFT(model=other, args=sft_args(tmp_path / "a", 3, save_steps=1), train_dataset=texts(),
             processing_class=tokenizer())
    with pytest.raises(SurgeryError, match="same arguments"):
        tr.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-1"))


# ---- R-Drop and the MSD loss through the mixin -----------------------------------------------------------

def test_sft_with_rdrop_and_msd_loss_trains_and_logs_its_parts(tmp_path):
    m = surgery.apply(llama(), mixout=0.2, msd=4, head="lm_head")
    tr = SFT(model=m, args=sft_args(tmp_path / "run", 4), train_dataset=texts(), processing_class=tokenizer(),
             rdrop_alpha=1.0, msd_loss=True)
    before = m.model.layers[0].mlp.up_proj.weight.detach().clone()
    tr.train()
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert logs and all(h["task_loss"] > 0 and h["rdrop_consistency"] > 0 for h in logs)
    assert not torch.equal(m.model.layers[0].mlp.up_proj.weight, before)
    tr.save_model(str(tmp_path / "final"))  # the MSD head holds no tensors: the plain model is the plain Llama
    plain = LlamaForCausalLM.from_pretrained(str(tmp_path / "final"))
    assert torch.equal(eval_logits(plain), eval_logits(m))


def test_mixin_loss_is_surgery_compute_loss(tmp_path):
    """One training step of the mixin's loss is surgery.compute_loss on the same batch and masks."""
    m = surgery.apply(llama(), mixout=0.2, msd=4, head="lm_head")
    tr = SFT(model=m, args=sft_args(tmp_path, 1), train_dataset=texts(), processing_class=tokenizer(),
             rdrop_alpha=0.5, msd_loss=True)
    m.train()
    torch.manual_seed(4)
    got = tr.compute_loss(m, batch())
    torch.manual_seed(4)
    want = surgery.compute_loss(m, {**batch(), "use_cache": False}, rdrop_alpha=0.5, msd_loss=True).loss
    assert torch.equal(got, want)


@pytest.mark.parametrize("k", [1, 4])
def test_msd_loss_of_a_causal_lm_scores_the_next_token(k):
    """With msd_p=0 every sample is the plain LM head, so the MSD loss is the model's own (shifted) loss."""
    m = surgery.apply(llama(), msd=k, msd_p=0.0, head="lm_head", dropout=0.0).train()  # no other noise
    b = batch()
    b["labels"][0, :2] = -100  # ignored positions count in neither
    r = surgery.compute_loss(m, b, msd_loss=True)
    own = m(**b).loss
    torch.testing.assert_close(r.loss, own, rtol=0, atol=1e-6)
    loss, _ = surgery.msd_loss(m, b)
    torch.testing.assert_close(loss, own, rtol=0, atol=1e-6)


# ---- refusals ----------------------------------------------------------------------------------------------

FUSED = ("SurgerySFTTrainer trains through TRL's fused LM head: the model's forward computes the log-probabilities "
         "from lm_head.weight directly and never calls 'lm_head', so {what} would not run in training. Apply surgery "
         "without it (surgery.revert(model), then surgery.apply(model, ..., exclude=['lm_head']) for Mixout, or no "
         "msd head on 'lm_head'), or train with rdrop_alpha > 0 or msd_loss=True, whose training forwards are the "
         "model's own")


@pytest.mark.parametrize("kw, what", [
    (dict(mixout=0.2), "Mixout on 'lm_head'"),  # an untied LM head is mixed by default
    (dict(msd=4, head="lm_head"), "the multi-sample-dropout head 'lm_head'"),
])
def test_fused_lm_head_refuses_surgery_on_the_lm_head(tmp_path, kw, what):
    m = surgery.apply(llama(tie=False), **kw)
    with pytest.raises(SurgeryError) as e:  # an MSD head trains on its paper loss by default: opted out here
        SFT(model=m, args=sft_args(tmp_path, 1), train_dataset=texts(), processing_class=tokenizer(),
            **({"msd_loss": False} if "msd" in kw else {}))
    assert str(e.value) == FUSED.format(what=what)


def test_msd_head_on_the_lm_head_trains_on_its_paper_loss_by_default(tmp_path):
    m = surgery.apply(llama(tie=False), msd=4, head="lm_head")
    tr = SFT(model=m, args=sft_args(tmp_path, 1), train_dataset=texts(), processing_class=tokenizer())
    assert tr.msd_loss is True  # the model's own forwards (not the fused head): the MSD head runs


def test_fused_lm_head_without_surgery_on_it_trains_and_mixes(tmp_path):
    m = surgery.apply(llama(tie=False), mixout=0.2, exclude=["lm_head"])
    assert type(m.lm_head) is not MixLinear and type(m.model.layers[0].mlp.up_proj) is MixLinear
    tr = SFT(model=m, args=sft_args(tmp_path, 2), train_dataset=texts(), processing_class=tokenizer())
    calls = []
    m.model.layers[0].mlp.up_proj.register_forward_hook(lambda mod, i, o: calls.append(mod.training))
    tr.train()
    assert calls and all(calls)  # the Mixout layers run in SFT's fused training forward


class OwnLossTrainer(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch) * 2


OWN_LOSS = ("rdrop_alpha/msd_loss train on the model's own loss (its forward with labels) plus surgery's term, in "
            "place of the trainer's training loss, but this trainer's loss is not the model's own: {why} would be "
            "silently dropped. Leave rdrop_alpha/msd_loss off here, or compute the loss yourself in a compute_loss "
            "override with surgery.rdrop_forward/surgery.rdrop_loss or surgery.msd_samples")


@pytest.mark.parametrize("case", ["dft", "label_smoothing", "own_compute_loss"])
def test_rdrop_refuses_a_trainer_loss_that_is_not_the_models(tmp_path, case):
    m = surgery.apply(llama(), **SURGERY)
    if case == "dft":
        make = lambda: SFT(model=m, args=sft_args(tmp_path, 1, loss_type="dft"), train_dataset=texts(),  # noqa: E731
                           processing_class=tokenizer(), rdrop_alpha=1.0)
        why = "SFTConfig(loss_type='dft')"
    elif case == "label_smoothing":
        make = lambda: SFT(model=m, args=sft_args(tmp_path, 1, label_smoothing_factor=0.1),  # noqa: E731
                           train_dataset=texts(), processing_class=tokenizer(), rdrop_alpha=1.0)
        why = "label_smoothing_factor=0.1 (the Trainer's label smoothing)"
    else:
        from transformers import TrainingArguments
        args = TrainingArguments(str(tmp_path), report_to=[], use_cpu=True)
        make = lambda: surgery.trainer_class(OwnLossTrainer)(model=m, args=args, rdrop_alpha=1.0)  # noqa: E731
        why = "test_trl.OwnLossTrainer.compute_loss (its own training loss)"
    with pytest.raises(SurgeryError) as e:
        make()
    assert str(e.value) == OWN_LOSS.format(why=why)
    assert "forward" not in vars(m)  # refused before the trainer prepared anything (SFT patches the forward)
