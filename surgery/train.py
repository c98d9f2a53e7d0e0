"""Training integration: one loss for any loop, resume helpers, per-rank seeding.

* :func:`compute_loss` -- the training loss of a surgered model on a batch with labels,
  with R-Drop (``rdrop_alpha > 0``) and/or the paper-form multi-sample-dropout loss
  (``msd_loss=True``). Plain loops, Accelerate and DDP call it directly; the
  transformers ``Trainer`` subclass :class:`SurgeryTrainer` calls it too.
* ``SurgeryTrainer`` -- ``transformers.Trainer`` with those losses, checkpoints that resume
  with the Mixout targets, a check that a resumed model carries the checkpoint's surgery,
  per-rank mask seeds, and a user-called ``save_model`` that writes a plain checkpoint.
  It is built on first access (``surgery.SurgeryTrainer``), so ``import surgery`` does
  not import the Trainer stack.
* :func:`save_training_state` / :func:`load_training_state` -- a plain-loop checkpoint
  (weights with the Mixout targets, optimizer, scheduler, RNG states, step) that resumes
  bitwise, and refuses a model whose surgery differs from the checkpoint's.
* :func:`seed_rank` -- seed each distributed rank differently so every rank draws its own
  dropout and Mixout masks (DDP broadcasts rank 0's weights at construction, so the
  ranks do not need the same seed to start equal).
"""

from __future__ import annotations

import inspect
import os
import pickle
import random
from typing import Any, Mapping, NamedTuple

import torch
from torch import nn

from .errors import SurgeryError, SurgeryTypeError
from .msd import msd_loss as _msd_loss
from .msd import msd_sample_loss, msd_samples
from .rdrop import STRATEGIES, check_alpha, check_task, logits_of, rdrop_forward, rdrop_loss
from .record import Record, get_record, unwrap

__all__ = ["SurgeryTrainer", "RankSeedCallback", "TrainingLoss", "compute_loss", "infer_task", "consistency_mask", "seed_rank", "rank",
           "save_training_state", "load_training_state", "check_same_surgery"]


class TrainingLoss(NamedTuple):
    """What :func:`compute_loss` returns. ``loss`` is what to backpropagate."""

    loss: torch.Tensor
    task_loss: torch.Tensor  # the task part (averaged over passes / samples)
    consistency: torch.Tensor | None  # the R-Drop consistency term C (before alpha); None without R-Drop
    outputs: Any  # the (first pass's) model outputs


def infer_task(model: nn.Module) -> str:
    """``"regression"`` for a transformers model with ``problem_type="regression"`` or one label,
    else ``"classification"``.

    Raises:
        SurgeryError: ``problem_type="multi_label_classification"`` (per-label Bernoulli outputs;
            neither the softmax KL of R-Drop nor cross-entropy applies).
    """
    cfg = getattr(unwrap(model), "config", None)
    problem = getattr(cfg, "problem_type", None)
    if problem == "multi_label_classification":
        raise SurgeryError("multi-label classification (independent sigmoid outputs) is not supported by the R-Drop "
                           "and MSD losses here: their consistency/task terms assume one softmax or one regression "
                           "value; compute your own loss from surgery.rdrop_forward / surgery.msd_samples")
    if problem == "regression" or (problem is None and getattr(cfg, "num_labels", None) == 1):
        return "regression"
    return "classification"


def consistency_mask(inputs: Mapping, logits: torch.Tensor, *, decoder: bool | None = None) -> torch.Tensor | None:
    """The padding mask for a token-level consistency term, taken from the batch.

    For logits ``(B, T, C)``: the first of ``attention_mask``, ``decoder_attention_mask``,
    ``labels != -100`` whose shape is ``(B, T)``; None for ``(B, C)`` logits or when
    nothing matches. Decoder logits of an encoder-decoder model (``decoder=True``; by default
    assumed when the batch has a ``decoder_*`` entry) never take the encoder's
    ``attention_mask``, even when the two lengths happen to match: only
    ``decoder_attention_mask`` or ``labels != -100``.
    """
    if logits.dim() < 3:
        return None
    if decoder is None:
        decoder = any(isinstance(k, str) and k.startswith("decoder_") for k in inputs)
    rows = tuple(logits.shape[:-1])
    for key in ("decoder_attention_mask",) if decoder else ("attention_mask", "decoder_attention_mask"):
        m = inputs.get(key)
        if isinstance(m, torch.Tensor) and tuple(m.shape) == rows:
            return m
    labels = inputs.get("labels")
    if isinstance(labels, torch.Tensor) and tuple(labels.shape) == rows and not labels.dtype.is_floating_point:
        return labels != -100
    return None


def compute_loss(model: nn.Module, batch: Mapping, *, rdrop_alpha: float = 0.0, msd_loss: bool = False,
                 task: str | None = None, strategy: str = "auto") -> TrainingLoss:
    """The training loss of ``model`` on ``batch`` (a dict with ``labels``).

    * neither option: the model's own loss, one forward;
    * ``msd_loss=True``: the mean of the K per-sample losses of the MSD head (one forward);
    * ``rdrop_alpha > 0``: two passes (:func:`surgery.rdrop_forward`), the model's own loss
      averaged over them plus ``rdrop_alpha * C`` on the logits (padding excluded with
      :func:`consistency_mask`);
    * both: two passes, the task part is the mean of the per-sample losses of both passes,
      the consistency term compares the two passes' averaged outputs.

    Args:
        task: ``"classification"`` or ``"regression"``; default :func:`infer_task`.
        strategy: how the two R-Drop passes run (``"auto"``, ``"concat"``, ``"separate"``).

    Raises:
        SurgeryError: no ``labels``, ``alpha`` < 0 / NaN, an unknown task/strategy, no MSD
            head with ``msd_loss=True`` (``apply(model, msd=K)`` first), a model that computes
            no loss from its labels.
    """
    alpha = check_alpha(rdrop_alpha)
    if strategy not in STRATEGIES:
        raise SurgeryError(f"unknown strategy {strategy!r}; use one of {', '.join(map(repr, STRATEGIES))}")
    if not isinstance(batch, Mapping) or "labels" not in batch:
        raise SurgeryError("compute_loss needs a dict batch with 'labels' (the model's keyword arguments)")
    if not isinstance(model, nn.Module):
        raise SurgeryTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    task = check_task(task) if task is not None else infer_task(model)
    if msd_loss:
        get_record(model)  # NotSurgeredError with the apply() hint
    else:
        _check_takes_labels(model, alpha)
    if alpha == 0.0 and not msd_loss:
        out = model(**batch)
        loss = _own_loss(out)
        return TrainingLoss(loss, loss.detach(), None, out)
    if not msd_loss:
        out1, out2 = rdrop_forward(model, batch, strategy=strategy)
        task_loss = (_own_loss(out1) + _own_loss(out2)) / 2
        logits = logits_of(out1, "model output")
    else:
        labels = batch["labels"]
        fwd = {k: v for k, v in batch.items() if k != "labels"}
        if alpha == 0.0:
            loss, out = _msd_loss(model, fwd, labels, task=task)
            return TrainingLoss(loss, loss.detach(), None, out)
        with msd_samples(model) as got:
            out1, out2 = rdrop_forward(model, fwd, strategy=strategy)
        if len(got) not in (1, 2):
            raise SurgeryError(f"the multi-sample-dropout head ran {len(got)} times in two R-Drop passes; expected one "
                               "call per forward")
        samples = got[0] if len(got) == 1 else torch.cat(got, dim=1)  # (K, 2B, ...) in both strategies
        task_loss = msd_sample_loss(samples, torch.cat([labels, labels]), task=task)
        logits = logits_of(out1, "model output")
    decoder = bool(getattr(getattr(unwrap(model), "config", None), "is_encoder_decoder", False))
    consistency = rdrop_loss(out1, out2, task=task, alpha=1.0, mask=consistency_mask(batch, logits, decoder=decoder))
    return TrainingLoss(task_loss + alpha * consistency, task_loss.detach(), consistency.detach(), out1)


def _check_takes_labels(model: nn.Module, alpha: float) -> None:
    """Refuse, before any forward, a model whose forward takes no ``labels``: it computes no loss."""
    inner = unwrap(model)
    try:
        params = inspect.signature(inner.forward).parameters.values()
    except (TypeError, ValueError):
        return
    if any(p.name == "labels" or p.kind == p.VAR_KEYWORD for p in params):
        return
    how = ("out1, out2 = surgery.rdrop_forward(model, inputs); loss = surgery.rdrop_loss(out1, out2, labels, "
           "task=..., alpha=...)" if alpha > 0 else "loss = your_loss_fn(model(**inputs), labels)")
    raise SurgeryError(
        f"{type(inner).__name__}.forward takes no 'labels' argument, so the model computes no loss of its own, and "
        "compute_loss without msd_loss=True trains on the model's own loss. Compute the task loss yourself from the "
        f"batch without 'labels': {how}; or, with a multi-sample-dropout head, pass msd_loss=True (surgery then "
        "computes cross-entropy or MSE against batch['labels'], task=...)"
    )


def _own_loss(out: Any) -> torch.Tensor:
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if loss is None and isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor) and out[0].dim() == 0:
        loss = out[0]
    if not isinstance(loss, torch.Tensor):
        raise SurgeryError("the model computed no loss from the batch's 'labels' (its output has no .loss); "
                           "use surgery.rdrop_loss(out1, out2, target, task=...) for models without a built-in loss")
    return loss


# ---- distributed ranks ----------------------------------------------------------------------

def rank() -> int:
    """This process's global rank: from ``torch.distributed`` when initialised, else ``$RANK``, else 0."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", 0))


def seed_rank(seed: int) -> int:
    """Seed ``random`` and torch (and numpy if installed) with ``seed + rank()``; returns that seed.

    Call it after the model is built and wrapped (DDP copies rank 0's parameters and buffers
    to every rank at construction), so each rank draws its own dropout and Mixout masks.
    With one process it is ``torch.manual_seed(seed)``.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SurgeryTypeError(f"seed must be an int, got {type(seed).__name__}")
    s = seed + rank()
    random.seed(s)
    torch.manual_seed(s)
    try:
        import numpy as np
        np.random.seed(s % 2**32)
    except ImportError:  # pragma: no cover - numpy is optional
        pass
    return s


# ---- plain-loop checkpoints ------------------------------------------------------------------

def _rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain Python data only, so ``torch.load(weights_only=True)`` reads them."""
    state = {"python": random.getstate(), "torch": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(gauss)]
    except ImportError:  # pragma: no cover
        pass
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))


_PLAIN = (str, int, float, bool, type(None), torch.Tensor, torch.dtype, torch.device, torch.Size)


def _check_plain(value: Any, where: str) -> None:
    """Refuse what ``torch.load(weights_only=True)`` would refuse to read back."""
    if isinstance(value, _PLAIN):
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            _check_plain(k, where)
            _check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    raise SurgeryTypeError(f"{where} is a {type(value).__name__}; training states hold only tensors and plain data "
                           "(numbers, strings, lists, tuples, dicts), because they are read back with "
                           "torch.load(weights_only=True), which runs no code. Convert it (e.g. .tolist(), float())")


def _comparable(rec: Record | Mapping | None) -> Any:
    if rec is None:
        return None
    d = rec.to_dict() if isinstance(rec, Record) else dict(rec)
    return {"args": d.get("args"), "mixout": [m["name"] for m in d.get("mixout", [])],
            "msd": d.get("msd"), "dropout": len(d.get("dropout", []))}


def check_same_surgery(model: nn.Module, saved: Record | Mapping | None, where: str = "the checkpoint") -> None:
    """Raise unless ``model`` carries the same surgery as the record ``saved`` (None = none).

    Raises:
        SurgeryError: the surgery differs (different args, layers or heads), or one side has none.
    """
    live = get_record(model, required=False)
    a, b = _comparable(live), _comparable(saved)
    if a == b:
        return
    if b is None:
        raise SurgeryError(f"{where} was saved without surgery but the model carries surgery; resume with the same "
                           "setup it was trained with")
    if a is None:
        raise SurgeryError(f"{where} was trained with surgery {b['args']}; build the pretrained model and call "
                           "surgery.apply(model, ...) with those arguments before resuming, so Mixout mixes toward the "
                           "pretrained weights")
    raise SurgeryError(f"{where} was trained with surgery {b['args']} but the model carries {a['args']}; apply the "
                       "same arguments before resuming")


def save_training_state(path: str | os.PathLike, model: nn.Module, optimizer=None, scheduler=None, *,
                        step: int = 0, **extra: Any) -> None:
    """Write everything a plain loop needs to resume bitwise to one file (``torch.save``).

    Saved: the model's state_dict (with the Mixout targets), the surgery record, the
    optimizer and scheduler state, ``step``, ``extra`` (tensors and plain data only) and the
    RNG states of ``random``, torch (CPU and CUDA) and numpy, all as tensors and plain data,
    so :func:`load_training_state` reads the file with ``torch.load(weights_only=True)``. In
    DDP every rank draws its own masks, so every rank saves its own file (e.g.
    ``f"state-{surgery.rank()}.pt"``).

    Raises:
        SurgeryTypeError: ``extra`` holds something other than tensors and plain data.
    """
    rec = get_record(model, required=False)
    _check_plain(extra, "extra")
    torch.save({"model": unwrap(model).state_dict(), "surgery": rec.to_dict() if rec is not None else None,
                "optimizer": optimizer.state_dict() if optimizer is not None else None,
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "step": step, "extra": extra, "rng": _rng_state()}, os.fspath(path))


def load_training_state(path: str | os.PathLike, model: nn.Module, optimizer=None, scheduler=None) -> dict[str, Any]:
    """Restore what :func:`save_training_state` wrote into a freshly built and surgered model.

    Build the *pretrained* model, ``surgery.apply`` it with the same arguments, then call
    this: the weights, the Mixout targets (the pretrained weights), optimizer, scheduler and
    RNG states are restored, so the next step is the one an uninterrupted run would take.

    Returns:
        ``{"step": ..., **extra}``.

    Raises:
        SurgeryError: the model's surgery differs from the checkpoint's, or the checkpoint
            lacks keys the model has (strict loading).
    """
    try:
        state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise SurgeryError(f"checkpoint {os.fspath(path)!r} holds objects other than tensors and plain data, so it is "
                           "not unpickled (torch.load(weights_only=True) runs no code): re-save it with "
                           f"surgery.save_training_state ({str(e).splitlines()[0]})") from None
    check_same_surgery(model, state.get("surgery"), where=f"checkpoint {os.fspath(path)!r}")
    missing, unexpected = unwrap(model).load_state_dict(state["model"], strict=False)
    if missing or unexpected:
        raise SurgeryError(f"checkpoint {os.fspath(path)!r} does not match the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    if optimizer is not None:
        if state.get("optimizer") is None:
            raise SurgeryError(f"checkpoint {os.fspath(path)!r} holds no optimizer state")
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return {"step": state["step"], **state.get("extra", {})}


# ---- transformers Trainer ----------------------------------------------------------------------

def _checkpoint_record(checkpoint: str) -> dict | None:
    """The record a Trainer checkpoint carries: in ``config.json`` (transformers models) or in the
    header metadata of ``model.safetensors`` (other modules, see ``SurgeryTrainer._save``)."""
    import json

    cfg = os.path.join(checkpoint, "config.json")
    if os.path.isfile(cfg):
        with open(cfg, encoding="utf-8") as f:
            return json.load(f).get("surgery")
    weights = os.path.join(checkpoint, "model.safetensors")
    if not os.path.isfile(weights):
        return None
    from safetensors import safe_open

    from .checkpoint.common import RECORD_METADATA_KEY

    with safe_open(weights, framework="pt") as f:
        raw = (f.metadata() or {}).get(RECORD_METADATA_KEY)
    return None if raw is None else Record.from_dict(raw).to_dict()


def _is_pretrained(model: nn.Module) -> bool:
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def _build_trainer_classes():
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_utils import get_last_checkpoint

    class RankSeedCallback(TrainerCallback):
        """At the start of training, reseed torch with ``args.seed + process_index`` when there are
        several processes, so every rank draws its own dropout and Mixout masks. (A resumed
        run then restores each rank's saved RNG state, as the Trainer does.)"""

        def on_train_begin(self, args, state, control, **kwargs):
            if args.world_size > 1:
                torch.manual_seed(args.seed + args.process_index)

    class SurgeryTrainer(Trainer):
        """``transformers.Trainer`` for surgered models.

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
                from .distributed import refuse_deepspeed
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
                check_same_surgery(self.model, _checkpoint_record(os.fspath(ckpt)), where=f"checkpoint {ckpt!r}")
            return super().train(resume_from_checkpoint, *args, **kwargs)

        def _plain_output(self) -> bool:
            """Whether saves the user asks for and hub uploads get the plain model."""
            from .layer_msd import is_layered

            rec = get_record(self.model, required=False)  # a layer-weighted MSD head has no plain form
            return self.plain_save and rec is not None and not is_layered(rec) and not self.is_deepspeed_enabled

        def _write_plain(self, output_dir: str) -> None:
            from .distributed import export_sharded
            from .exporting import export

            model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
            # a module that is not a transformers model gets what the Trainer writes for it: model.safetensors
            path = output_dir if _is_pretrained(model) else os.path.join(output_dir, "model.safetensors")
            if self.is_fsdp_enabled:  # every rank gathers the full state dict, the saving rank exports it
                export_sharded(self.model, path, should_save=self.args.should_save)
            elif self.args.should_save:
                export(model, path)
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
            from .checkpoint.save import save

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
            """``args.push_to_hub`` at every save: the repo's root gets the plain model, exported from
            the live one (transformers copies the checkpoint's surgered files there); the checkpoint
            itself (``hub_strategy="checkpoint"/"all_checkpoints"``) is uploaded as saved, surgered, so
            training resumes from it."""
            if not self._plain_output():
                return super()._push_from_checkpoint(checkpoint_folder)
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, HubStrategy
            from transformers.utils.hub import PushInProgress

            args = self.args
            if not self.is_world_process_zero() or args.hub_strategy == HubStrategy.END:
                return
            if not args.hub_always_push and self.push_in_progress is not None and not self.push_in_progress.is_done():
                return
            if hasattr(self.callback_handler, "on_push_begin"):
                self.callback_handler.on_push_begin(args, self.state, self.control)
            self._write_plain(args.output_dir)
            when = f"step {self.state.global_step}" if args.save_strategy == "steps" else f"epoch {int(self.state.epoch)}"
            message = f"Training in progress, {when}"
            api = _hub_api()
            common = dict(repo_id=self.hub_model_id, token=args.hub_token, run_as_future=True,
                          revision=getattr(args, "hub_revision", None))
            jobs = [api.upload_folder(folder_path=args.output_dir, commit_message=message,
                                      ignore_patterns=["_*", f"{PREFIX_CHECKPOINT_DIR}-*"], **common)]
            if args.hub_strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
                in_repo = "last-checkpoint" if args.hub_strategy == HubStrategy.CHECKPOINT \
                    else os.path.basename(os.path.normpath(checkpoint_folder))
                jobs.append(api.upload_folder(folder_path=checkpoint_folder, path_in_repo=in_repo,
                                              commit_message=message + ", checkpoint", **common))
            if self.push_in_progress is None or self.push_in_progress.is_done():
                self.push_in_progress = PushInProgress(jobs)
            else:
                self.push_in_progress.jobs.extend(jobs)

    for cls in (RankSeedCallback, SurgeryTrainer):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
    return {"RankSeedCallback": RankSeedCallback, "SurgeryTrainer": SurgeryTrainer}


def _hub_api():
    """The HfApi transformers uploads with (its tagged shared instance when it has one)."""
    try:
        from transformers.utils.hub import hf_api
        return hf_api()
    except ImportError:
        from huggingface_hub import HfApi
        return HfApi()


_LAZY: dict[str, type] = {}


def __getattr__(name: str):
    if name in ("SurgeryTrainer", "RankSeedCallback"):
        if not _LAZY:
            _LAZY.update(_build_trainer_classes())
        return _LAZY[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
