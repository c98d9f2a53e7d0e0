"""One run of ``surgery compare``: one method, one seed, one fold, trained with ``surgery.SurgeryTrainer``
(transformers' ``Trainer`` with surgery's losses), evaluated at fixed steps, timed, measured and exported.

Every method of a seed gets the same model and head initialisation (the seed, before loading), the
same data order (``data_seed``: accelerate's seedable sampler, whatever the method draws), the same
optimiser, steps and schedule. Only the regularizer differs.
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass

from .machine import PeakMemory
from .methods import Method

__all__ = ["RunPlan", "run_one", "training_loss", "total_steps", "eval_steps"]


def total_steps(n_train: int, settings) -> int:
    """Optimizer steps of every run: ``max_steps``, or ``epochs`` over ``n_train`` rows (whichever is fewer)."""
    per_epoch = math.ceil(n_train / settings.batch_size)
    steps = max(1, math.ceil(settings.epochs * per_epoch))
    return min(steps, settings.max_steps) if settings.max_steps else steps


def eval_steps(total: int, evals: int) -> list[int]:
    """``evals`` evaluation steps spread evenly over ``total``, the last one at ``total``."""
    return sorted({max(1, round(total * i / evals)) for i in range(1, evals + 1)})


def training_loss(model, batch, method: Method, backbone):
    """``(loss, outputs)`` of one training step of ``method``: :func:`surgery.compute_loss` (the model's own
    loss, R-Drop, the paper's MSD loss, pooled as the model pools: the last real token on GPT-2 / Llama)."""
    import surgery

    r = surgery.compute_loss(model, batch, rdrop_alpha=method.rdrop_alpha, msd_loss=method.msd_loss, task=backbone.task)
    return r.loss, r.outputs


@dataclass
class RunPlan:
    method: Method
    seed: int
    fold: int
    steps: int
    evals: list

    @property
    def key(self) -> str:
        return f"seed{self.seed}-fold{self.fold}-{self.method.label}"


def _callback(plan: RunPlan, on_step):
    import torch
    from transformers import TrainerCallback

    cuda = torch.cuda.is_available()

    class Watch(TrainerCallback):
        def __init__(self):
            self.durations: list[float] = []  # wall time of each step
            self.cpu: list[float] = []  # CPU time of the process (all its threads) in each step
            self.evals: dict[int, dict] = {}
            self._t = self._c = 0.0

        def on_step_begin(self, args, state, control, **kw):
            if cuda and args.device.type == "cuda":
                torch.cuda.synchronize()
            self._t, self._c = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            if cuda and args.device.type == "cuda":
                torch.cuda.synchronize()
            self.durations.append(time.perf_counter() - self._t)
            self.cpu.append(time.process_time() - self._c)
            if state.global_step in plan.evals:
                control.should_evaluate = True
            on_step(1)
            return control

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            value = (metrics or {}).get("eval_score")
            if value is not None:
                self.evals[state.global_step] = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4),
                                                 "value": float(value)}

    return Watch()


def _load_average() -> float | None:
    """The 1-minute load average (where the system has one): timings on a busy machine are not idle ones."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _export_size(model) -> tuple[int, str]:
    """Bytes of the checkpoint a user ships: ``surgery.export`` (plain), or ``save_pretrained`` of the
    surgered model where it has no plain form (the layer-weighted head)."""
    import surgery
    from ..errors import SurgeryError

    with tempfile.TemporaryDirectory(prefix="surgery-compare-export-") as tmp:
        try:
            surgery.export(model, tmp)
            form = "plain"
        except SurgeryError:
            model.save_pretrained(tmp)
            form = "surgered: no plain form"
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp) for f in fs)
    return size, form


def run_one(plan: RunPlan, backbone, train_ds, val_ds, metric, settings, device: str, *, measure_export: bool,
            on_step=lambda n: None) -> dict:
    """Train ``plan.method`` from the pretrained model with ``plan.seed``; the run's record (JSON-ready)."""
    from transformers import DataCollatorWithPadding, PrinterCallback, TrainingArguments

    import surgery

    t0 = time.perf_counter()
    model = backbone.load(plan.seed)
    kw = backbone.apply_kwargs(plan.method)
    if kw:
        surgery.apply(model, **kw)

    def compute_metrics(pred):
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        return {"score": metric.score(logits, pred.label_ids)}

    watch = _callback(plan, on_step)
    with tempfile.TemporaryDirectory(prefix="surgery-compare-run-") as tmp:
        args = TrainingArguments(
            output_dir=tmp, max_steps=plan.steps, per_device_train_batch_size=settings.batch_size,
            per_device_eval_batch_size=max(settings.batch_size, 64), learning_rate=settings.lr,
            weight_decay=settings.weight_decay, warmup_steps=int(round(settings.warmup * plan.steps)),
            lr_scheduler_type="linear", seed=plan.seed, data_seed=plan.seed, eval_strategy="no", save_strategy="no",
            logging_strategy="no", report_to=[], disable_tqdm=True, use_cpu=device == "cpu",
            dataloader_num_workers=0)
        if device == "cuda" and args.n_gpu > 1:
            # one GPU per comparison: the Trainer would wrap the model in nn.DataParallel, whose replica threads
            # run the MSD head where msd_loss cannot see it, and the costs would be those of several GPUs
            args._n_gpu = 1
        trainer = surgery.SurgeryTrainer(
            model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
            data_collator=DataCollatorWithPadding(backbone.tokenizer), compute_metrics=compute_metrics,
            callbacks=[watch], rdrop_alpha=plan.method.rdrop_alpha, msd_loss=plan.method.msd_loss, task=backbone.task)
        trainer.remove_callback(PrinterCallback)  # no log dicts on stdout: compare prints one line per run
        load = _load_average()
        with PeakMemory(device) as peak:
            out = trainer.train()
        load = [v for v in (load, _load_average()) if v is not None]
        evals = [watch.evals[s] for s in sorted(watch.evals)]
        if not evals or evals[-1]["step"] != plan.steps:  # the last evaluation is at the last step, always
            value = trainer.evaluate()["eval_score"]
            evals.append({"step": plan.steps, "epoch": round(trainer.state.epoch or 0.0, 4), "value": float(value)})
    values = [e["value"] for e in evals]
    best_i = (max if metric.higher_is_better else min)(range(len(values)), key=values.__getitem__)
    record = {
        "method": plan.method.label, "seed": plan.seed, "fold": plan.fold, "steps": plan.steps, "evals": evals,
        "last": values[-1], "best": values[best_i], "best_step": evals[best_i]["step"],
        "train_loss": float(out.training_loss), "seconds": time.perf_counter() - t0,
        # the median step: a moment of contention on a shared machine moves it less than the mean; on a CPU the
        # process's CPU time per step too, which the other work of a shared machine does not inflate as it does
        # the wall time (it waits, and is not counted)
        "step_seconds": statistics.median(watch.durations), "mean_step_seconds": statistics.fmean(watch.durations),
        "step_cpu_seconds": statistics.median(watch.cpu) if device == "cpu" else None,
        "peak_memory": peak.bytes, "memory_kind": peak.kind, "load_average": load,
    }
    if measure_export:
        record["export_bytes"], record["export_form"] = _export_size(model)
    return record
