"""The model of ``surgery compare``: any folder ``AutoModelForSequenceClassification.from_pretrained`` loads
(or a sentence-transformers folder, whose transformer folder is read from its ``modules.json``), its
tokenizer, a fresh task head drawn from the run's seed, and the methods checked against it before
any training.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .methods import DEFAULT_METHODS, Method, parse_methods
from .settings import CompareError

__all__ = ["Backbone", "resolve_folder", "load_backbone"]

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model", "spm.model", "bpe.codes")


def resolve_folder(path: str) -> tuple[Path, str | None]:
    """``(the transformers model folder, a note)`` for ``path``: the folder itself, or the folder of the
    Transformer module of a sentence-transformers folder.

    Raises:
        CompareError: no such folder, or no ``config.json`` in it (nor in a sentence-transformers module).
    """
    root = Path(os.path.expanduser(path))
    if not root.is_dir():
        raise CompareError(f"--model {root}: {'not a folder' if root.exists() else 'no such folder'} (give a folder "
                           "saved with model.save_pretrained(DIR) and tokenizer.save_pretrained(DIR))")
    modules = root / "modules.json"
    if modules.is_file():
        try:
            entries = json.loads(modules.read_text(encoding="utf-8"))
            sub = next(e.get("path", "") for e in entries
                       if str(e.get("type", "")).rsplit(".", 1)[-1] == "Transformer")
        except (ValueError, TypeError, AttributeError, StopIteration):
            sub = None
        if sub is None:
            raise CompareError(f"--model {root}: a sentence-transformers folder whose modules.json lists no "
                               "Transformer module: nothing to fine-tune")
        folder = (root / sub).resolve()
        if root.resolve() not in (folder, *folder.parents):
            raise CompareError(f"--model {root}: modules.json points outside the folder ({sub!r})")
        if (folder / "config.json").is_file():
            return folder, f"sentence-transformers folder: its transformer in {sub or '.'}"
    if not (root / "config.json").is_file():
        raise CompareError(f"--model {root}: no config.json (not a transformers model folder; save one with "
                           "model.save_pretrained(DIR) and tokenizer.save_pretrained(DIR))")
    return root, None


def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _tokenizer(folder: Path, given: str):
    from transformers import AutoTokenizer

    names = set(TOKENIZER_FILES)
    if not any((folder / n).is_file() for n in names):
        raise CompareError(f"--model {given}: no tokenizer in {folder} (none of {', '.join(TOKENIZER_FILES[:4])} ...); "
                           "save it there with tokenizer.save_pretrained(DIR)")
    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:
        raise CompareError(f"--model {given}: its tokenizer does not load ({' '.join(str(e).split())[:200]})") from None
    if len(tok) <= len(set(tok.all_special_tokens)):
        raise CompareError(f"--model {given}: the tokenizer in {folder} has no vocabulary beyond its special tokens; "
                           "save the model's own tokenizer there")
    note = None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise CompareError(f"--model {given}: the tokenizer has no pad token and no eos token to pad with; add one "
                               "(tokenizer.add_special_tokens({'pad_token': '<pad>'}), resize the embeddings, save)")
        tok.pad_token = tok.eos_token
        note = f"the tokenizer has no pad token: padding with its eos token {tok.eos_token!r}"
    return tok, note


@dataclass
class Backbone:
    """The pretrained model folder, its tokenizer and the task it is loaded for."""

    given: str
    folder: Path
    tokenizer: object
    model_type: str
    class_name: str
    num_labels: int
    task: str
    names: list | None
    notes: list
    last_token: bool = False  # the head scores every token and the model picks the last (GPT-2, Llama)
    head: str | None = None  # the task head for MSD (--head); found by name when None

    def apply_kwargs(self, method: Method) -> dict:
        """The ``surgery.apply`` arguments of ``method`` on this model."""
        return method.apply_kwargs(last_token=self.last_token, head=self.head)

    def load(self, seed: int, *, loading_info: bool = False):
        """The pretrained model with a task head drawn from ``seed`` (the same seed, the same head); a head the
        checkpoint holds (same number of labels) is loaded instead. ``loading_info``: ``(model, info)``."""
        import torch
        from transformers import AutoModelForSequenceClassification, set_seed

        _quiet_transformers()
        set_seed(seed)
        kw = {"num_labels": self.num_labels, "problem_type": "regression" if self.task == "regression"
              else "single_label_classification", "pad_token_id": self.tokenizer.pad_token_id}
        if self.names is not None:
            kw["id2label"] = {i: str(n) for i, n in enumerate(self.names)}
            kw["label2id"] = {str(n): i for i, n in enumerate(self.names)}
        return AutoModelForSequenceClassification.from_pretrained(str(self.folder), dtype=torch.float32,
                                                                  ignore_mismatched_sizes=True,
                                                                  output_loading_info=loading_info, **kw)

    def encode(self, texts: list, pairs: list | None, labels: list, max_length: int):
        """A ``datasets.Dataset`` of token ids and ``labels``."""
        import datasets

        enc = self.tokenizer(texts, pairs, truncation=True, max_length=max_length)
        cols = {k: list(v) for k, v in enc.items()}
        cols["labels"] = labels
        return datasets.Dataset.from_dict(cols)


def load_backbone(given: str, labels, head: str | None = None) -> Backbone:
    """The model folder and tokenizer of ``given``, checked for a sequence-classification head.

    Raises:
        CompareError: not a model folder, no tokenizer, a model type without a sequence-classification
            class in transformers, a config that does not load.
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES as HEADS

    folder, note = resolve_folder(given)
    _quiet_transformers()
    try:
        config = AutoConfig.from_pretrained(str(folder))
    except Exception as e:
        raise CompareError(f"--model {given}: its config.json does not load ({' '.join(str(e).split())[:200]})") \
            from None
    model_type = getattr(config, "model_type", None)
    if model_type not in HEADS:
        raise CompareError(f"--model {given}: a {model_type!r} model, for which transformers has no "
                           "AutoModelForSequenceClassification class; compare needs a model with a text-classification "
                           "head")
    tok, tok_note = _tokenizer(folder, given)
    return Backbone(given, folder, tok, model_type, HEADS[model_type], labels.num_labels, labels.task, labels.names,
                    [n for n in (note, tok_note) if n], head=head)


def _changes(rec: dict, kind: str) -> int:
    """How many values of ``kind`` ("dropout" / "drop_path") a record changed."""
    entries = [e for e in rec.get("dropout", []) + rec.get("config", []) if e.get("kind", "dropout") == kind]
    return sum(1 for e in entries if e.get("old") != e.get("new"))


def _probe_batch(backbone: Backbone):
    import torch

    enc = backbone.tokenizer(["a b c", "a"], padding=True, return_tensors="pt")
    batch = dict(enc)
    if backbone.task == "regression":
        batch["labels"] = torch.tensor([0.5, -0.5])
    else:
        batch["labels"] = torch.tensor([0, backbone.num_labels - 1])
    return batch


def check_methods(backbone: Backbone, specs) -> list[Method]:
    """The methods of ``specs`` (the default set when empty: ``no_drop_path`` joins it where the model has
    stochastic depth, and a default method the model cannot take is left out with a note), each applied
    to the model once, trained one step and reverted, before any training.

    Sets ``backbone.last_token``.

    Raises:
        CompareError: a spec that does not parse, a method the model cannot take (no head for MSD,
            nothing to switch off), a combination the losses cannot compute for this head.
    """
    import torch

    import surgery

    from ..errors import SurgeryError

    model, info = backbone.load(0, loading_info=True)
    if not info.get("missing_keys") and not info.get("mismatched_keys"):
        backbone.notes.append("its task head comes from the checkpoint: the same start for every seed")
    batch = _probe_batch(backbone)
    try:
        surgery.apply(model, msd=2, head=backbone.head)  # does the head score every token (GPT-2, Llama)?
    except (SurgeryError, ValueError):
        pass  # no head found: the methods that need one say so below
    else:
        model.train()
        try:
            with surgery.msd_samples(model) as got, torch.no_grad():
                model(**{k: v for k, v in batch.items() if k != "labels"})
            backbone.last_token = bool(got) and got[0].dim() == 4
        finally:
            surgery.revert(model)
    methods = parse_methods(specs or DEFAULT_METHODS)
    if not specs:  # the default set: stochastic depth off too, where the model has some
        off = parse_methods(["no_drop_path"])[-1]
        try:
            if _try(model, off, backbone, batch, check_noop=False):
                methods.append(off)
        except CompareError:
            pass
    fitting = []
    for m in methods:
        try:
            if not m.is_baseline:
                _try(model, m, backbone, batch, check_noop=True)
            fitting.append(m)
        except CompareError as e:
            if specs:  # asked for: refused
                raise
            backbone.notes.append(f"the default method {m.label} left out: {str(e).split(': ', 1)[-1]}")
    return fitting


def _try(model, method: Method, backbone: Backbone, batch, *, check_noop: bool) -> bool:
    """Apply ``method`` to ``model``, run one training loss, revert; whether it changed the model."""
    import surgery
    from ..errors import SurgeryError, SurgeryTypeError

    kw = backbone.apply_kwargs(method)
    rec = None
    try:
        if kw:
            surgery.apply(model, **kw)
    except (SurgeryError, SurgeryTypeError, ValueError) as e:
        why = " ".join(str(e).split()).replace("head=...", "--head NAME")  # compare's way of naming the head
        raise CompareError(f"method {method.label!r} does not fit {backbone.class_name}: {why}") from None
    rec = surgery.get_record(model, required=False)
    try:
        d = rec.to_dict() if rec is not None else {}
        changed = True
        for knob, kind in (("dropout", "dropout"), ("drop_path", "drop_path")):
            if knob in method.knobs and not _changes(d, kind):
                changed = False
                if check_noop:
                    what = "dropout" if kind == "dropout" else "stochastic depth (DropPath / LayerDrop)"
                    raise CompareError(f"method {method.label!r} changes nothing on {backbone.class_name}: it has no "
                                       f"{what} {'above' if not method.knobs[knob] else 'other than'} "
                                       f"{method.knobs[knob]:g}; leave the method out")
        if check_noop:
            from .running import training_loss

            model.train()
            try:
                training_loss(model, batch, method, backbone)[0].backward()
            except (SurgeryError, SurgeryTypeError, ValueError) as e:
                raise CompareError(f"method {method.label!r} does not train {backbone.class_name}: "
                                   f"{' '.join(str(e).split())}") from None
        return changed
    finally:
        if rec is not None:
            surgery.revert(model, drop_layer_weights=True)
        model.zero_grad(set_to_none=True)
