"""A zoo of tiny transformers models built from configs (no downloads), for the tests.

Every entry is hidden size 32 (or close), 2 layers, with *nonzero* dropout in every field
the architecture has (including ones that default to 0, such as Llama's
``attention_dropout``), so dropout control is really exercised.

    from zoo import ZOO, build, batch
    model = build("bert")          # fresh tiny model, seeded
    inputs = batch("bert", model)  # small input dict with labels
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from transformers import AutoConfig

VOCAB = 99
HIDDEN = 32
LAYERS = 2
HEADS = 4
FFN = 37
MAXPOS = 64
BATCH = 3
SEQ = 7
P = 0.15  # every dropout field of every config

__all__ = ["Spec", "ZOO", "NAMES", "HEAD_NAMES", "config", "build", "batch", "logits", "P"]


@dataclass(frozen=True)
class Spec:
    """One zoo entry: model type, config fields, task-model class name and input kind."""

    model_type: str
    cls: str  # attribute name in transformers
    cfg: dict[str, Any] = field(default_factory=dict)
    inputs: str = "text"  # "text" | "image" | "seq2seq_lm" | "causal_lm" | "video_text"
    head: bool = True  # the task model has a head surgery finds (classifier/score/...) and labels


def _bertlike(**extra) -> dict[str, Any]:
    return dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                intermediate_size=FFN, max_position_embeddings=MAXPOS, hidden_dropout_prob=P,
                attention_probs_dropout_prob=P, **extra)


ZOO: dict[str, Spec] = {
    "bert": Spec("bert", "BertForSequenceClassification", _bertlike(classifier_dropout=P, type_vocab_size=2)),
    "roberta": Spec("roberta", "RobertaForSequenceClassification", _bertlike(classifier_dropout=P, pad_token_id=1)),
    "xlm-roberta": Spec("xlm-roberta", "XLMRobertaForSequenceClassification",
                        _bertlike(classifier_dropout=P, pad_token_id=1)),
    "deberta-v2": Spec("deberta-v2", "DebertaV2ForSequenceClassification",
                       _bertlike(pooler_dropout=P, pooler_hidden_size=HIDDEN, relative_attention=True,
                                 position_buckets=8, pos_att_type=["p2c", "c2p"], type_vocab_size=0)),
    "distilbert": Spec("distilbert", "DistilBertForSequenceClassification",
                       dict(vocab_size=VOCAB, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=FFN,
                            max_position_embeddings=MAXPOS, dropout=P, attention_dropout=P, qa_dropout=P,
                            seq_classif_dropout=P)),
    "electra": Spec("electra", "ElectraForSequenceClassification",
                    _bertlike(embedding_size=16, classifier_dropout=P, summary_last_dropout=P)),
    "albert": Spec("albert", "AlbertForSequenceClassification",
                   _bertlike(embedding_size=16, classifier_dropout_prob=P)),
    "mpnet": Spec("mpnet", "MPNetForSequenceClassification", _bertlike(pad_token_id=1)),
    "gpt2": Spec("gpt2", "GPT2ForSequenceClassification",
                 dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=MAXPOS,
                      resid_pdrop=P, embd_pdrop=P, attn_pdrop=P, summary_first_dropout=P, pad_token_id=0,
                      bos_token_id=2, eos_token_id=2)),
    "gpt2-lm": Spec("gpt2", "GPT2LMHeadModel",
                    dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=MAXPOS,
                         resid_pdrop=P, embd_pdrop=P, attn_pdrop=P, tie_word_embeddings=True,
                         bos_token_id=2, eos_token_id=2),
                    inputs="causal_lm", head=False),
    "llama": Spec("llama", "LlamaForSequenceClassification",
                  dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                       num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=MAXPOS,
                       attention_dropout=P, pad_token_id=0)),
    "t5": Spec("t5", "T5ForSequenceClassification",
               dict(vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=FFN, num_layers=LAYERS, num_decoder_layers=LAYERS,
                    num_heads=HEADS, relative_attention_num_buckets=8, dropout_rate=P, classifier_dropout=P,
                    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)),
    "t5-gen": Spec("t5", "T5ForConditionalGeneration",
                   dict(vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=FFN, num_layers=LAYERS,
                        num_decoder_layers=LAYERS, num_heads=HEADS, relative_attention_num_buckets=8, dropout_rate=P,
                        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0),
                   inputs="seq2seq_lm", head=False),
    "bart": Spec("bart", "BartForSequenceClassification",
                 dict(vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS,
                      encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=FFN,
                      decoder_ffn_dim=FFN, max_position_embeddings=MAXPOS, dropout=P, attention_dropout=P,
                      activation_dropout=P, classifier_dropout=P, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                      decoder_start_token_id=2, forced_eos_token_id=2)),
    "falcon": Spec("falcon", "FalconForSequenceClassification",  # reads config.attention_dropout in forward
                   dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                        hidden_dropout=P, attention_dropout=P, parallel_attn=False, pad_token_id=0, bos_token_id=2,
                        eos_token_id=2)),
    "x-clip": Spec("xclip", "XCLIPModel",  # nested sub-configs; prompt attention reads `self.attn_drop`
                   dict(text_config=dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
                                         num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                         max_position_embeddings=MAXPOS, dropout=P, attention_dropout=P),
                        vision_config=dict(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                                           num_attention_heads=HEADS, image_size=16, patch_size=8, num_frames=2,
                                           mit_hidden_size=HIDDEN, mit_intermediate_size=FFN,
                                           mit_num_hidden_layers=1, mit_num_attention_heads=HEADS, dropout=P,
                                           attention_dropout=P),
                        projection_dim=HIDDEN, prompt_layers=1, prompt_attention_dropout=P,
                        prompt_projection_dropout=P, prompt_num_attention_heads=HEADS),
                   inputs="video_text", head=False),
    "vit": Spec("vit", "ViTForImageClassification",
                dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
                     image_size=16, patch_size=8, num_channels=3, hidden_dropout_prob=P,
                     attention_probs_dropout_prob=P),
                inputs="image"),
}

NAMES = sorted(ZOO)
HEAD_NAMES = [n for n in NAMES if ZOO[n].head]
NUM_LABELS = 3


def config(name: str):
    """The tiny config of zoo entry ``name``."""
    spec = ZOO[name]
    kw = dict(spec.cfg)
    if spec.head:
        kw["num_labels"] = NUM_LABELS
    return AutoConfig.for_model(spec.model_type, **kw)


def build(name: str, seed: int = 0, **cfg_overrides) -> torch.nn.Module:
    """A freshly initialised tiny model of zoo entry ``name`` (deterministic for ``seed``)."""
    cfg = config(name)
    for k, v in cfg_overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    model = getattr(transformers, ZOO[name].cls)(cfg)
    model.eval()
    return model


def batch(name: str, model: torch.nn.Module | None = None, seed: int = 1) -> dict[str, torch.Tensor]:
    """A small input batch with labels for zoo entry ``name``.

    Text inputs avoid special ids (0-3) and end every row with the EOS id, as BART's
    classification head requires; there is no padding, so every position is attended.
    """
    spec = ZOO[name]
    g = torch.Generator().manual_seed(seed)
    if spec.inputs == "video_text":  # 2 videos of 2 frames, 2 texts; contrastive loss
        return {"input_ids": torch.randint(4, VOCAB, (2, SEQ), generator=g),
                "pixel_values": torch.randn(2, 2, 3, 16, 16, generator=g), "return_loss": True}
    if spec.inputs == "image":
        return {"pixel_values": torch.randn(BATCH, 3, 16, 16, generator=g),
                "labels": torch.randint(0, NUM_LABELS, (BATCH,), generator=g)}
    ids = torch.randint(4, VOCAB, (BATCH, SEQ), generator=g)
    eos = spec.cfg.get("eos_token_id")
    if eos is not None:
        ids[:, -1] = eos
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if spec.inputs == "causal_lm":
        out["labels"] = ids.clone()
    elif spec.inputs == "seq2seq_lm":
        out["labels"] = torch.randint(4, VOCAB, (BATCH, 5), generator=g)
    else:
        out["labels"] = torch.randint(0, NUM_LABELS, (BATCH,), generator=g)
    return out


def logits(out) -> torch.Tensor:
    """The tensor to compare between two forwards: ``logits`` (X-CLIP: ``logits_per_video``)."""
    return out.logits if "logits" in out else out.logits_per_video
