"""The transformers ``Trainer`` integration, for any Trainer subclass.

:class:`SurgeryTrainerMixin` adds to a Trainer (the plain one, TRL's ``SFTTrainer``/``DPOTrainer``,
your own): the R-Drop and multi-sample-dropout losses (:func:`surgery.compute_loss`), checkpoints
that resume with the Mixout targets, a check that a resumed model carries the checkpoint's surgery,
per-rank mask seeds, and a ``save_model()`` you call that writes a plain checkpoint.
:class:`SurgeryTrainer` is the mixin on ``transformers.Trainer``.
"""

from __future__ import annotations

import os

import torch
from transformers import PreTrainedModel, Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from ..checkpoint.save import save
from ..distributed import refuse_deepspeed
from ..errors import SurgeryError
from .. import exporting
from ..record import get_record, no_plain_form
from .compute import compute_loss
from .hub import push_from_checkpoint
from .losses import check_alpha, check_task
from .rdrop import STRATEGIES
from .state import check_same_surgery, checkpoint_record

__all__ = ["SurgeryTrainerMixin", "SurgeryTrainer", "RankSeedCallback", "trainer_class"]


class RankSeedCallback(TrainerCallback):
    """At the start of training, reseed torch with ``args.seed + process_index`` when there are
    several processes, so every rank draws its own dropout and Mixout masks. (A resumed
    run then restores each rank's saved RNG state, as the Trainer does.)"""

    def on_train_begin(self, args, state, control, **kwargs):
        if args.world_size > 1:
            torch.manual_seed(args.seed + args.process_index)


def _is_pretrained(model) -> bool:
    return isinstance(model, PreTrainedModel)


class SurgeryTrainerMixin:
    """What surgery adds to a ``transformers.Trainer``; mix it into any Trainer subclass, in front:
    ``class MySFTTrainer(surgery.SurgeryTrainerMixin, trl.SFTTrainer)``, or
    ``surgery.trainer_class(trl.SFTTrainer)``. :class:`SurgeryTrainer` is it on the plain Trainer.

    Args (keyword, on top of the Trainer's):
        rdrop_alpha: R-Drop weight (0 = off); see :func:`compute_loss`.
        msd_loss: train with the paper-form multi-sample-dropout loss (needs ``apply(msd=K)``).
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

    def __init__(self, *args, rdrop_alpha: float = 0.0, msd_loss: bool = False, task: str | None = None,
                 rdrop_strategy: str = "auto", plain_save: bool = True, seed_per_rank: bool = True, **kwargs):
        self.rdrop_alpha = check_alpha(rdrop_alpha)
        self.msd_loss = bool(msd_loss)
        self.task = check_task(task) if task is not None else None
        if rdrop_strategy not in STRATEGIES:
            raise SurgeryError(f"unknown rdrop_strategy {rdrop_strategy!r}; use one of "
                               f"{', '.join(map(repr, STRATEGIES))}")
        self.rdrop_strategy = rdrop_strategy
        self.plain_save = plain_save
        model = kwargs.get("model", args[0] if args else None)
        if self.msd_loss and model is not None:
            rec = get_record(model, required=False)
            if rec is None or not rec.msd:
                raise SurgeryError("msd_loss=True needs a multi-sample-dropout head; call "
                                   "surgery.apply(model, msd=K) first")
        self._pushing = False
        super().__init__(*args, **kwargs)
        if self.is_deepspeed_enabled and get_record(self.model, required=False) is not None:
            refuse_deepspeed()
        if self.rdrop_alpha > 0 or self.msd_loss:
            # compute_loss returns a per-batch mean, never normalised by num_items_in_batch, so every
            # transformers version must divide it by the accumulation steps: < 4.46 accelerate does;
            # 4.46-4.57 divide unless model_accepts_loss_kwargs (and num_items_in_batch); >= 5 read
            # loss_is_scaled_for_ga first. The model's own loss (eval, options off) is unaffected:
            # it then gets no num_items_in_batch and returns its per-batch mean too.
            self.model_accepts_loss_kwargs = False
            self.loss_is_scaled_for_ga = False
        if seed_per_rank:
            self.add_callback(RankSeedCallback())
        self._parts: dict[str, list[float]] = {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training or (self.rdrop_alpha == 0 and not self.msd_loss):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
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
            check_same_surgery(self.model, checkpoint_record(os.fspath(ckpt)), where=f"checkpoint {ckpt!r}")
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _plain_output(self) -> bool:
        """Whether saves the user asks for and hub uploads get the plain model."""
        rec = get_record(self.model, required=False)  # a layer-weighted MSD head has no plain form
        return (self.plain_save and rec is not None and no_plain_form(rec, "save_model") is None
                and not self.is_deepspeed_enabled)

    def _write_plain(self, output_dir: str) -> None:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        # a module that is not a transformers model gets what the Trainer writes for it: model.safetensors
        path = output_dir if _is_pretrained(model) else os.path.join(output_dir, "model.safetensors")
        if self.is_fsdp_enabled:  # every rank gathers the full state dict, the saving rank exports it
            exporting.export_sharded(self.model, path, should_save=self.args.should_save)
        elif self.args.should_save:
            exporting.export(model, path)
        if self.args.should_save:
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _save(self, output_dir=None, state_dict=None):
        """Periodic checkpoints of a surgered module that is not a transformers model: the Trainer
        would write a bare state dict, which resume, ``surgery inspect`` and ``surgery convert``
        could not tell from a plain one; write it with the record in the header metadata instead
        (:func:`surgery.checkpoint.save`), the rest as the Trainer does."""
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if state_dict is not None or _is_pretrained(model) or get_record(model, required=False) is None \
                or not self.args.should_save:
            return super()._save(output_dir, state_dict=state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        save(model, os.path.join(output_dir, "model.safetensors"))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def save_model(self, output_dir=None, _internal_call=False):
        # transformers' push_to_hub saves with _internal_call=True before uploading output_dir:
        # that save is plain too; periodic checkpoints (_internal_call, not pushing) stay surgered
        if not self._plain_output() or (_internal_call and not self._pushing):
            return super().save_model(output_dir, _internal_call=_internal_call)
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
