"""A zoo of tiny transformers models built from configs (no downloads), for the tests.

Every entry is hidden size 32 (or close), 2 layers, with *nonzero* dropout in every field
the architecture has (including ones that default to 0, such as Llama's
``attention_dropout``), so dropout control is really exercised. Stochastic depth is on
where the architecture has it (BART's and Whisper's LayerDrop, wav2vec2's ``layerdrop``
read from the config in forward, Swin's and ConvNeXt's DropPath); wav2vec2's SpecAugment
masking (augmentation, not dropout) is off. ``build(name, drop=0.1)`` sets every numeric
config field whose name contains "drop", at every depth, to 0.1.

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
    inputs: str = "text"  # "text" | "image" | "seq2seq_lm" | "causal_lm" | "video_text" | "audio" | "speech_seq2seq"
    head: bool = True  # the task model has a head surgery finds (classifier/score/...) and labels


def _bertlike(**extra) -> dict[str, Any]:
    return dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                intermediate_size=FFN, max_position_embeddings=MAXPOS, hidden_dropout_prob=P,
                attention_probs_dropout_prob=P, **extra)


def _moe(**extra) -> dict[str, Any]:
    """A mixture-of-experts decoder: 4 experts, 2 per token, every layer sparse unless ``extra`` says otherwise."""
    return dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                num_key_value_heads=2, max_position_embeddings=MAXPOS, num_experts_per_tok=2, attention_dropout=P,
                pad_token_id=0) | extra


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
                      activation_dropout=P, classifier_dropout=P, encoder_layerdrop=P, decoder_layerdrop=P,
                      pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2)),
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
    "whisper": Spec("whisper", "WhisperForConditionalGeneration",  # input_features: (batch, mel bins, 2 * positions)
                    dict(vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS,
                         encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=FFN,
                         decoder_ffn_dim=FFN, num_mel_bins=8, max_source_positions=8, max_target_positions=MAXPOS,
                         dropout=P, attention_dropout=P, activation_dropout=P, encoder_layerdrop=P,
                         decoder_layerdrop=P, pad_token_id=0, bos_token_id=2, eos_token_id=2,
                         decoder_start_token_id=3),
                    inputs="speech_seq2seq", head=False),
    "wav2vec2": Spec("wav2vec2", "Wav2Vec2ForSequenceClassification",  # reads config.layerdrop in forward
                     dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
                          conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                          num_conv_pos_embedding_groups=2, classifier_proj_size=16, hidden_dropout=P,
                          activation_dropout=P, attention_dropout=P, feat_proj_dropout=P, feat_quantizer_dropout=P,
                          final_dropout=P, layerdrop=P, mask_time_prob=0.0, mask_feature_prob=0.0),
                     inputs="audio"),
    "swin": Spec("swin", "SwinForImageClassification",
                 dict(image_size=16, patch_size=2, num_channels=3, embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                      window_size=4, hidden_dropout_prob=P, attention_probs_dropout_prob=P, drop_path_rate=P),
                 inputs="image"),
    # mixture of experts: fused 3-D expert tensors and non-Linear routers (surgery.regularizers.experts). Mixtral's
    # router_jitter_noise (train-time noise on the router input) is off here: it is neither dropout nor drop-path
    "mixtral": Spec("mixtral", "MixtralForSequenceClassification",
                    _moe(num_local_experts=4, intermediate_size=24, router_jitter_noise=0.0)),
    "qwen3-moe": Spec("qwen3_moe", "Qwen3MoeForSequenceClassification",
                      _moe(num_experts=4, moe_intermediate_size=12, intermediate_size=FFN, head_dim=8)),
    "olmoe": Spec("olmoe", "OlmoeForCausalLM",
                  _moe(num_experts=4, intermediate_size=24, bos_token_id=2, eos_token_id=2),
                  inputs="causal_lm", head=False),
    "deepseek-v3": Spec("deepseek_v3", "DeepseekV3ForSequenceClassification",  # layer 0 dense, layer 1 MoE
                        _moe(n_routed_experts=4, moe_intermediate_size=12, intermediate_size=FFN, num_key_value_heads=HEADS,
                             n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16,
                             q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "gpt-oss": Spec("gpt_oss", "GptOssForSequenceClassification",  # experts stored (E, in, out), with biases
                    _moe(num_local_experts=4, intermediate_size=24, head_dim=8, sliding_window=8,
                         layer_types=["sliding_attention", "full_attention"],
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "convnext": Spec("convnext", "ConvNextForImageClassification",  # no dropout at all, DropPath only
                     dict(num_channels=3, patch_size=4, num_stages=2, hidden_sizes=[16, 32], depths=[2, 2], image_size=16,
                          drop_path_rate=P),
                     inputs="image"),
}

NAMES = sorted(ZOO)
HEAD_NAMES = [n for n in NAMES if ZOO[n].head]
NUM_LABELS = 3


def drop_fields(cfg) -> list[tuple[Any, str]]:
    """``(config, field)`` for every int/float config field whose name contains "drop", at every depth."""
    out = []
    for k, v in list(vars(cfg).items()):
        if isinstance(v, transformers.PretrainedConfig):
            out += drop_fields(v)
        elif "drop" in k.lower() and type(v) in (int, float):
            out.append((cfg, k))
    return out


def config(name: str, drop: float | None = None):
    """The tiny config of zoo entry ``name``; ``drop`` sets every "drop" field (``drop_fields``)."""
    spec = ZOO[name]
    kw = dict(spec.cfg)
    if spec.head:
        kw["num_labels"] = NUM_LABELS
    cfg = AutoConfig.for_model(spec.model_type, **kw)
    for c, k in drop_fields(cfg) if drop is not None else []:
        setattr(c, k, drop)
    return cfg


def build(name: str, seed: int = 0, drop: float | None = None, **cfg_overrides) -> torch.nn.Module:
    """A freshly initialised tiny model of zoo entry ``name`` (deterministic for ``seed``)."""
    cfg = config(name, drop)
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
    if spec.inputs == "audio":  # raw waveform
        return {"input_values": torch.randn(BATCH, 400, generator=g),
                "labels": torch.randint(0, NUM_LABELS, (BATCH,), generator=g)}
    if spec.inputs == "speech_seq2seq":  # log-mel features, target token ids
        return {"input_features": torch.randn(BATCH, 8, 16, generator=g),
                "labels": torch.randint(4, VOCAB, (BATCH, 5), generator=g)}
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
