"""Builders for the ``surgery compare`` tests: tiny random models of each head family saved with a tiny
word-level tokenizer (no hub), and small data files in each input format.

The words are ``w0`` .. ``w39``; a row's label follows its first word (``w0``-``w19``: one class / a low
score, ``w20``-``w39``: the other / a high score), so there is something to learn.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, PreTrainedTokenizerFast

WORDS = [f"w{i}" for i in range(40)]
H = 16  # hidden size
_BERTLIKE = dict(hidden_size=H, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                 max_position_embeddings=64, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)

# family -> (config fields, decoder-only: no [CLS]/[SEP], padded with eos when the tokenizer has no pad token)
FAMILIES = {
    "bert": (dict(model_type="bert", **_BERTLIKE), False),
    "roberta": (dict(model_type="roberta", pad_token_id=0, **_BERTLIKE), False),
    "deberta-v2": (dict(model_type="deberta-v2", pooler_hidden_size=H, relative_attention=True, position_buckets=8,
                        pos_att_type=["p2c", "c2p"], type_vocab_size=0, **_BERTLIKE), False),
    "electra": (dict(model_type="electra", embedding_size=H, **_BERTLIKE), False),
    "distilbert": (dict(model_type="distilbert", dim=H, n_layers=2, n_heads=2, hidden_dim=24,
                        max_position_embeddings=64, dropout=0.1, attention_dropout=0.1, pad_token_id=0), False),
    "gpt2": (dict(model_type="gpt2", n_embd=H, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.1, embd_pdrop=0.1,
                  attn_pdrop=0.1, bos_token_id=1, eos_token_id=1), True),
    "llama": (dict(model_type="llama", hidden_size=H, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1, max_position_embeddings=64, attention_dropout=0.1, bos_token_id=1,
                   eos_token_id=1), True),
}
# a model with stochastic depth (LayerDrop) and no layer-weighted head (an encoder-decoder): BART
OTHERS = {
    "bart": (dict(model_type="bart", d_model=H, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                  decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24, max_position_embeddings=64,
                  dropout=0.1, encoder_layerdrop=0.1, decoder_layerdrop=0.1, pad_token_id=0, bos_token_id=2,
                  eos_token_id=3, decoder_start_token_id=3, forced_eos_token_id=3), False),
}


def tokenizer(decoder: bool = False) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over :data:`WORDS`. Encoder style: ``[PAD] [UNK] [CLS] [SEP]``, pairs as
    ``[CLS] a [SEP] b [SEP]``. Decoder style: ``<unk> </s>`` and no pad token (compare pads with eos)."""
    special = ["<unk>", "</s>"] if decoder else ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {w: i for i, w in enumerate(special + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token=special[0] if decoder else "[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    if decoder:
        return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="</s>")
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]")


def save_model(folder: Path, family: str = "bert", *, with_tokenizer: bool = True, head: bool = False,
               **overrides) -> Path:
    """A tiny random ``family`` model saved as a transformers folder: the backbone alone, as a pretrained
    checkpoint comes (``head=True``: with a 2-label sequence-classification head). BART's classifier reads
    the last eos token, [SEP] here, which every row ends with."""
    fields, decoder = {**FAMILIES, **OTHERS}[family]
    fields = dict(fields, vocab_size=len(WORDS) + 4, num_labels=2, **overrides)
    config = AutoConfig.for_model(**fields)
    torch.manual_seed(0)
    (AutoModelForSequenceClassification if head else AutoModel).from_config(config).save_pretrained(folder)
    if with_tokenizer:
        tokenizer(decoder).save_pretrained(folder)
    return folder


def save_sentence_transformers(folder: Path, *, subfolder: str = "",
                               kind: str = "sentence_transformers.models.Transformer") -> Path:
    """A sentence-transformers folder (``modules.json``, a pooling module) with a tiny BERT as its
    Transformer module at ``subfolder`` ("" = the folder itself, as current sentence-transformers saves it)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_model(folder / subfolder if subfolder else folder, "bert")
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": H,
                                                                  "pooling_mode_mean_tokens": True}))
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": subfolder, "type": kind},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    return folder


def rows(n: int = 60, *, task: str = "classification", pairs: bool = False, seed: int = 0) -> list[dict]:
    """``n`` rows ``{"text", ("text_pair"), "label"}``: labels "neg"/"pos" (classification) or scores."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        first = (i * 21) % 40  # alternates low and high words: both classes in any prefix
        row = {"text": f"w{first} w{rnd.randrange(40)} w{rnd.randrange(40)}"}
        if pairs:
            row["text_pair"] = f"w{rnd.randrange(40)} w{rnd.randrange(40)}"
        high = first >= 20
        row["label"] = ("pos" if high else "neg") if task == "classification" else round(
            (2.0 if high else -2.0) + rnd.uniform(-1, 1), 3)
        out.append(row)
    return out


def write(path: Path, data: list[dict], fmt: str | None = None, *, header: bool = True) -> Path:
    """``data`` as CSV / TSV / JSON lines / parquet (from the file name), or a saved datasets folder
    (``fmt="disk"``: a DatasetDict with 'train' and, every fifth row, 'validation')."""
    fmt = fmt or path.suffix.lstrip(".")
    cols = list(data[0])
    if fmt in ("csv", "tsv"):
        import csv

        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, delimiter="," if fmt == "csv" else "\t", lineterminator="\n")
            if header:
                w.writerow(cols)
            w.writerows([r[c] for c in cols] for r in data)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")
    elif fmt == "parquet":
        import datasets

        datasets.Dataset.from_list(data).to_parquet(str(path))
    elif fmt == "disk":
        import datasets

        datasets.DatasetDict({"train": datasets.Dataset.from_list([r for i, r in enumerate(data) if i % 5]),
                              "validation": datasets.Dataset.from_list(data[::5])}).save_to_disk(str(path))
    else:
        raise ValueError(fmt)
    return path
