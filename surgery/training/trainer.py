"""The transformers ``Trainer`` integration, for any Trainer subclass.

:class:`SurgeryTrainerMixin` adds to a Trainer (the plain one, TRL's ``SFTTrainer``/``DPOTrainer``,
your own): the R-Drop and multi-sample-dropout losses (:func:`surgery.compute_loss`), checkpoints
that resume with the Mixout targets, a check that a resumed model carries the checkpoint's surgery,
per-rank mask seeds, and a ``save_model()`` you call that writes a plain checkpoint.
:class:`SurgeryTrainer` is the mixin on ``transformers.Trainer``; :func:`trainer_class` puts it on
any other (``surgery.trainer_class(trl.SFTTrainer)``).

Saves: the ``save_model()`` you call (and hub uploads) write the plain model with
:func:`surgery.export` (a PEFT model: its plain adapter checkpoint); the periodic
``checkpoint-N`` folders keep the surgered form (Mixout targets, and the record: in
``config.json`` for a transformers model, in the ``model.safetensors`` header for another
module, in ``surgery.json`` beside a PEFT adapter checkpoint), which resume checks and needs.
"""

from __future__ import annotations

import os

import torch
from transformers import PreTrainedModel, Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from ..checkpoint.save import save
from ..errors import SurgeryError
from .. import exporting
from ..record import Record, get_record, no_plain_form, records, unwrap
from ..regularizers.mixout.copies import layout
from ..wrappers import loaded_class
from .compute import compute_loss, msd_loss_default, shifts_labels
from .hub import push_from_checkpoint
from .own_format import TARGETS_FILE, load_targets, own_format, targets_record, write_targets
from .losses import check_alpha, check_task
from .rdrop import STRATEGIES
from .state import check_same_surgery, checkpoint_record

__all__ = ["SurgeryTrainerMixin", "SurgeryTrainer", "RankSeedCallback", "trainer_class", "RECORD_FILE"]

RECORD_FILE = "surgery.json"  # the record beside a PEFT adapter checkpoint (which has no config.json)


class RankSeedCallback(TrainerCallback):
    """At the start of training, reseed torch with ``args.seed + process_index`` when there are
    several processes, so every rank draws its own dropout and Mixout masks. (A resumed
    run then restores each rank's saved RNG state, as the Trainer does.)"""

    def on_train_begin(self, args, state, control, **kwargs):
        if args.world_size > 1:
            torch.manual_seed(args.seed + args.process_index)


def _is_pretrained(model) -> bool:
    return isinstance(model, PreTrainedModel)


def _saved_record(checkpoint: str) -> dict | None:
    """The record a checkpoint folder carries: ``surgery.json`` beside a PEFT adapter checkpoint, the header of
    the targets file beside a checkpoint in a trainer's own format, else
    :func:`~surgery.training.state.checkpoint_record`."""
    path = os.path.join(checkpoint, RECORD_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return Record.from_dict(f.read()).to_dict()
    if os.path.isfile(os.path.join(checkpoint, TARGETS_FILE)):
        return targets_record(checkpoint)
    return checkpoint_record(checkpoint)


def _fused_lm_head(model) -> bool:
    """Whether TRL replaced ``model``'s forward with its fused LM head (``trl.trainer.utils.add_fused_lm_head``,
    which SFT/DPO/GRPO/... trainers install): in training it computes the log-probabilities from
    ``get_output_embeddings().weight`` directly, never calling that module."""
    fn = getattr(vars(model).get("forward"), "__func__", None)
    return (fn is not None and str(getattr(fn, "__globals__", {}).get("__name__", "")).startswith("trl.")
            and "fused" in getattr(getattr(fn, "__code__", None), "co_name", ""))


def _module_name(root, module) -> str | None:
    return next((n for n, m in root.named_modules() if m is module), None)


class SurgeryTrainerMixin:
    """What surgery adds to a ``transformers.Trainer``; mix it into any Trainer subclass, in front:
    ``class MySFTTrainer(surgery.SurgeryTrainerMixin, trl.SFTTrainer)``, or
    ``surgery.trainer_class(trl.SFTTrainer)``. :class:`SurgeryTrainer` is it on the plain Trainer.

    Args (keyword, on top of the Trainer's):
        rdrop_alpha: R-Drop weight (0 = off); see :func:`compute_loss`.
        msd_loss: train with the paper-form multi-sample-dropout loss, the mean of the K per-sample
            losses (needs ``apply(msd=K)``). Default None: on for a model with an MSD head where the
            trainer trains on the model's own loss; a trainer with a loss of its own (DPO, label
            smoothing, ``compute_loss_func``) trains on the head's averaged output. ``False`` opts out.
        task: ``"classification"`` / ``"regression"``; default from the model config.
        rdrop_strategy: ``"auto"`` / ``"concat"`` / ``"separate"``.
        plain_save: a ``save_model()`` *you* call writes a plain checkpoint with
            :func:`surgery.export` (no Mixout targets, no ``surgery`` record, original
            dropout values; loads with plain ``from_pretrained``). A model with a
            layer-weighted MSD head has no plain form: it is saved surgered. The periodic
            checkpoints (``checkpoint-N``) always keep the surgered form, which resume needs.
        seed_per_rank: add :class:`RankSeedCallback`.

    ``train(resume_from_checkpoint=...)`` first checks that the model carries the same
    surgery as the checkpoint (build the pretrained model, ``surgery.apply`` it with the
    same arguments, then resume: the checkpoint's weights and targets are loaded).

    Raises:
        SurgeryError: bad ``rdrop_alpha``/``task``/``rdrop_strategy``; ``msd_loss=True``
            on a model without an MSD head; resuming with different surgery.
    """

    def __init__(self, *args, rdrop_alpha: float = 0.0, msd_loss: bool | None = None, task: str | None = None,
                 rdrop_strategy: str = "auto", plain_save: bool = True, seed_per_rank: bool = True, **kwargs):
        self.rdrop_alpha = check_alpha(rdrop_alpha)
        self.task = check_task(task) if task is not None else None
        if rdrop_strategy not in STRATEGIES:
            raise SurgeryError(f"unknown rdrop_strategy {rdrop_strategy!r}; use one of "
                               f"{', '.join(map(repr, STRATEGIES))}")
        self.rdrop_strategy = rdrop_strategy
        self.plain_save = plain_save
        model = kwargs.get("model", args[0] if args else None)
        targs, loss_func = kwargs.get("args", args[1] if len(args) > 1 else None), kwargs.get("compute_loss_func")
        if msd_loss is None:  # the paper's loss for a model with an MSD head, where the trainer trains on the model's own
            rec = get_record(model, required=False) if model is not None else None
            msd_loss = bool(rec is not None and rec.msd) and self._foreign_loss(targs, loss_func) is None
        self.msd_loss = msd_loss_default(model, msd_loss)
        if self.msd_loss and model is not None:
            rec = get_record(model, required=False)
            if rec is None or not rec.msd:
                raise SurgeryError("msd_loss=True needs a multi-sample-dropout head; call "
                                   "surgery.apply(model, msd=K) first")
        if self.rdrop_alpha > 0 or self.msd_loss:  # before the base trainer prepares anything
            self._check_own_loss(targs, loss_func)
        self._pushing = False
        self._final_save = False
        super().__init__(*args, **kwargs)
        self._check_synced_reference()
        if self.rdrop_alpha > 0 or self.msd_loss:
            # compute_loss returns a per-batch mean, never normalised by num_items_in_batch, so every
            # transformers version must divide it by the accumulation steps: < 4.46 accelerate does;
            # 4.46-4.57 divide unless model_accepts_loss_kwargs (and num_items_in_batch); >= 5 read
            # loss_is_scaled_for_ga first. The model's own loss (eval, options off) is unaffected:
            # it then gets no num_items_in_batch and returns its per-batch mean too.
            self.model_accepts_loss_kwargs = False
            self.loss_is_scaled_for_ga = False
        if not (self.rdrop_alpha > 0 or self.msd_loss):
            self._check_fused_head()
        if seed_per_rank:
            self.add_callback(RankSeedCallback())
        self._parts: dict[str, list[float]] = {}

    def _check_own_loss(self, targs, compute_loss_func) -> None:
        """R-Drop and the MSD loss train on the model's own loss (its forward with ``labels``) plus their
        terms, in place of the trainer's training loss: refuse a trainer whose loss is something else.

        Raises:
            SurgeryError: label smoothing, ``compute_loss_func``, an SFT ``loss_type`` other than
                ``"nll"``, or a Trainer subclass with its own ``compute_loss`` (DPO, GRPO, ...).
        """
        why = self._foreign_loss(targs, compute_loss_func)
        if why is not None:
            raise SurgeryError(
                "rdrop_alpha/msd_loss train on the model's own loss (its forward with labels) plus surgery's term, in "
                f"place of the trainer's training loss, but this trainer's loss is not the model's own: {why} would be "
                "silently dropped. Leave rdrop_alpha/msd_loss off here, or compute the loss yourself in a compute_loss "
                "override with surgery.rdrop_forward/surgery.rdrop_loss or surgery.msd_samples")

    def _foreign_loss(self, targs, compute_loss_func) -> str | None:
        """What makes this trainer's training loss something other than the model's own, or None."""
        why = None
        smoothing = getattr(targs, "label_smoothing_factor", 0)
        if smoothing:
            why = f"label_smoothing_factor={smoothing} (the Trainer's label smoothing)"
        elif compute_loss_func is not None:
            why = "compute_loss_func"
        else:
            sft = loaded_class("trl.trainer.sft_trainer", "SFTTrainer")
            mro = type(self).__mro__
            for cls in mro[mro.index(SurgeryTrainerMixin) + 1:]:
                if cls is Trainer:
                    break
                if "compute_loss" not in vars(cls):
                    continue
                if cls is sft:  # SFT's loss is the model's next-token NLL unless loss_type says otherwise
                    loss_type = getattr(targs, "loss_type", "nll")
                    if loss_type != "nll":
                        why = f"SFTConfig(loss_type={loss_type!r})"
                        break
                    continue
                why = f"{cls.__module__}.{cls.__qualname__}.compute_loss (its own training loss)"
                break
        return why

    def _check_synced_reference(self) -> None:
        """A reference model the trainer syncs with the model by position (TRL's ``sync_ref_model=True``, which
        mixes ``model.parameters()`` into ``ref.parameters()`` pair by pair) must have the model's parameter
        layout: a plain reference beside a model with Mixout targets would be paired with the wrong tensors.

        Raises:
            SurgeryError: the layouts differ, naming the order that works.
        """
        ref = getattr(self, "ref_model", None)
        if ref is None or not getattr(self.args, "sync_ref_model", False) or not records(self.model):
            return
        if layout(unwrap(ref)) != layout(unwrap(self.model)):
            raise SurgeryError(
                "sync_ref_model=True mixes the model's parameters into the reference model's pair by pair, by position, "
                "but the reference model is not surgered like the model: Mixout's frozen targets (one Parameter after "
                "each mixed weight) would shift the pairs. Pass ref_model=copy.deepcopy(model) made after "
                "surgery.apply (the reference then has the same layout; it runs in eval mode, where surgery is "
                "inert), or sync_ref_model=False")

    def _check_fused_head(self) -> None:
        """Refuse surgery on the LM head when the trainer trains through TRL's fused LM head, which reads the
        head's weight directly: a Mixout layer or MSD head there would never run in training.

        Raises:
            SurgeryError: a Mixout layer or MSD head on the output embeddings of a model with TRL's fused LM head.
        """
        rec = get_record(self.model, required=False)
        root = unwrap(self.model)
        if rec is None or not _fused_lm_head(root) or not hasattr(root, "get_output_embeddings"):
            return
        head = _module_name(root, root.get_output_embeddings())
        if not head:
            return
        on = [f"Mixout on {e.name!r}" for e in rec.mixout if e.name == head or e.name.startswith(head + ".")]
        on += [f"the multi-sample-dropout head {e.name!r}" for e in rec.msd if e.name == head]
        if on:
            raise SurgeryError(
                f"{type(self).__name__} trains through TRL's fused LM head: the model's forward computes the "
                f"log-probabilities from {head}.weight directly and never calls {head!r}, so {on[0]} would not run in "
                f"training. Apply surgery without it (surgery.revert(model), then surgery.apply(model, ..., "
                f"exclude=[{head!r}]) for Mixout, or no msd head on {head!r}), or train with rdrop_alpha > 0 or "
                "msd_loss=True, whose training forwards are the model's own")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training or (self.rdrop_alpha == 0 and not self.msd_loss):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        if shifts_labels(model) and "use_cache" not in inputs:  # a causal LM: no KV cache in training (as SFT does)
            inputs = {**inputs, "use_cache": False}
        r = compute_loss(model, inputs, rdrop_alpha=self.rdrop_alpha, msd_loss=self.msd_loss, task=self.task,
                         strategy=self.rdrop_strategy)
        self._parts.setdefault("task_loss", []).append(r.task_loss.item())
        if r.consistency is not None:
            self._parts.setdefault("rdrop_consistency", []).append(r.consistency.item())
        return (r.loss, r.outputs) if return_outputs else r.loss

    def log(self, logs, *args, **kwargs):
        if "loss" in logs and self._parts:
            for k, v in self._parts.items():
                logs[k] = round(sum(v) / len(v), 6)
            self._parts = {}
        return super().log(logs, *args, **kwargs)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        ckpt = resume_from_checkpoint
        if isinstance(ckpt, bool) and ckpt:
            ckpt = get_last_checkpoint(self.args.output_dir)
        if isinstance(ckpt, (str, os.PathLike)) and os.path.isdir(ckpt):
            check_same_surgery(self.model, _saved_record(os.fspath(ckpt)), where=f"checkpoint {ckpt!r}")
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _plain_output(self) -> bool:
        """Whether saves the user asks for and hub uploads get the plain model."""
        recs = [r for _, r in records(self.model)]  # the model's own, or a sub-module's (apply(model.bert, ...))
        return self.plain_save and bool(recs) and all(no_plain_form(r, "save_model") is None for r in recs)

    def _write_plain(self, output_dir: str) -> None:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        # a transformers model: a model directory; a PEFT model: its adapter directory; any other module gets
        # what the Trainer writes for it: model.safetensors
        path = output_dir if exporting.writes_directory(model) else os.path.join(output_dir, "model.safetensors")
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:  # every rank gathers, the saving rank exports
            exporting.export_sharded(self.model, path, should_save=self.args.should_save)
        elif self.args.should_save:
            exporting.export(model, path)
        if self.args.should_save:
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _save(self, output_dir=None, state_dict=None):
        """Periodic checkpoints of a surgered model the Trainer cannot tag with its record.

        * A PEFT model: the Trainer writes its adapter checkpoint (the ``modules_to_save`` copies
          with their Mixout targets, which resume loads), and no ``config.json``; the record goes
          beside it as ``surgery.json``, which the resume check reads.
        * A module that is not a transformers model: the Trainer would write a bare state dict, which
          resume, ``surgery inspect`` and ``surgery convert`` could not tell from a plain one; write it
          with the record in the header metadata instead (:func:`surgery.checkpoint.save`), the rest as
          the Trainer does.
        """
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        rec = get_record(model, required=False)
        recs = [r for _, r in records(model)]
        if own_format(type(self), SurgeryTrainerMixin) and recs and all(no_plain_form(r, "save") is None for r in recs):
            return self._save_own_format(model, output_dir, state_dict)
        if exporting.adapter_model(model) is not None:
            out = super()._save(output_dir, state_dict=state_dict)
            if rec is not None and self.args.should_save:
                with open(os.path.join(output_dir if output_dir is not None else self.args.output_dir, RECORD_FILE),
                          "w", encoding="utf-8") as f:
                    f.write(rec.to_json())
            return out
        if state_dict is not None or _is_pretrained(model) or rec is None or not self.args.should_save:
            return super()._save(output_dir, state_dict=state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        save(model, os.path.join(output_dir, "model.safetensors"))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _save_own_format(self, model, output_dir, state_dict):
        """The trainer's own save of the plain model; a periodic checkpoint gets the targets file beside it."""
        with exporting.plain_view(model):
            out = super()._save(output_dir, state_dict=state_dict)
        if not self._final_save and self.args.should_save:
            write_targets(model, os.path.join(output_dir if output_dir is not None else self.args.output_dir,
                                              TARGETS_FILE))
        return out

    def _load_from_checkpoint(self, checkpoint, *args, **kwargs):
        """The trainer's own load, then the Mixout targets a checkpoint in its own format holds beside it."""
        out = super()._load_from_checkpoint(checkpoint, *args, **kwargs)
        if own_format(type(self), SurgeryTrainerMixin):
            load_targets(self.accelerator.unwrap_model(self.model, keep_torch_compile=False), checkpoint)
        return out

    def save_model(self, output_dir=None, _internal_call=False):
        # transformers' push_to_hub saves with _internal_call=True before uploading output_dir:
        # that save is plain too; periodic checkpoints (_internal_call, not pushing) stay surgered
        if not self._plain_output() or (_internal_call and not self._pushing):
            return super().save_model(output_dir, _internal_call=_internal_call)
        if own_format(type(self), SurgeryTrainerMixin):  # the trainer's own format, plain (see _save_own_format)
            self._final_save = True
            try:
                super().save_model(output_dir, _internal_call=_internal_call)
            finally:
                self._final_save = False
        else:
            self._write_plain(output_dir if output_dir is not None else self.args.output_dir)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=getattr(self.args, "hub_revision", None))

    def push_to_hub(self, *args, **kwargs):
        """Upload the PLAIN model (``surgery.export``: no Mixout targets, no record, original
        dropout) and the processing class to the Hub, as ``Trainer.push_to_hub`` does."""
        self._pushing = True
        try:
            return super().push_to_hub(*args, **kwargs)
        finally:
            self._pushing = False

    def _push_from_checkpoint(self, checkpoint_folder):
        """``args.push_to_hub`` at every save: the repo's root gets the plain model (see
        :func:`surgery.training.hub.push_from_checkpoint`); the checkpoint itself is uploaded as
        saved, surgered, so training resumes from it."""
        if not self._plain_output():
            return super()._push_from_checkpoint(checkpoint_folder)
        push_from_checkpoint(self, checkpoint_folder)


class SurgeryTrainer(SurgeryTrainerMixin, Trainer):
    """``transformers.Trainer`` for surgered models (:class:`SurgeryTrainerMixin` on the plain Trainer)."""


def trainer_class(base: type) -> type:
    """``base`` (a ``transformers.Trainer`` subclass, e.g. ``trl.SFTTrainer``) with surgery mixed in.

    Raises:
        SurgeryError: ``base`` is not a Trainer subclass.
    """
    if not (isinstance(base, type) and issubclass(base, Trainer)):
        raise SurgeryError(f"trainer_class needs a transformers.Trainer subclass, got {base!r}")
    if issubclass(base, SurgeryTrainerMixin):
        return base
    return type(f"Surgery{base.__name__}", (SurgeryTrainerMixin, base), {"__module__": base.__module__})
