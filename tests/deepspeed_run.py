"""Run by ``tests/test_deepspeed.py`` under ``torchrun --nproc_per_node 2`` with ``DS_ACCELERATOR=cpu``: real
DeepSpeed ZeRO on gloo. Each rank writes ``rank<r>.json`` (what the test asserts) into the output folder.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/deepspeed_run.py loop OUT
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/deepspeed_run.py trainer OUT

``loop``: ``surgery.apply`` then ``deepspeed.initialize`` in an own training loop, ZeRO stages 1, 2, 3, and
Accelerate's DeepSpeed plugin. ``trainer``: ``SurgeryTrainer`` with DeepSpeed configs (ZeRO-3 builds the model
under ``zero.Init``, so ``apply`` meets partitioned weights).
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import surgery  # noqa: E402
from surgery import zero  # noqa: E402
from surgery.layers.mixout import MixLinear  # noqa: E402
from training_setup import batch, pretrained  # noqa: E402

TARGET = "mixout_target"
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def config(stage: int, **extra) -> dict:
    # persistence threshold 0: ZeRO-3 partitions every parameter of the tiny model (by default it keeps
    # parameters under 100k elements whole on every rank)
    zo = {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})}
    return {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "zero_optimization": zo,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}, **extra}


def my_batch(rank: int, step: int) -> dict:
    return batch(n=4, seed=10 * step + rank)


def engine(model, stage):
    eng, opt, _, _ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=config(stage))
    return eng, opt


def train(eng, rank, steps, first=0, rdrop=0.0, msd_loss=False) -> list[float]:
    losses = []
    eng.train()  # (DeepSpeedEngine.train returns None)
    for i in range(first, first + steps):
        b = my_batch(rank, i)
        if rdrop or msd_loss:
            loss = surgery.compute_loss(eng, b, rdrop_alpha=rdrop, msd_loss=msd_loss).loss
        else:
            loss = eng(**b).loss
        eng.backward(loss)
        eng.step()
        losses.append(loss.item())
    return losses


def optimizer_params(opt) -> list:
    """The parameters DeepSpeed's ZeRO optimizer holds state for (and reduces gradients of)."""
    groups = getattr(opt, "bit16_groups", None) or getattr(opt, "fp16_groups", None)
    return [p for g in groups for p in g]


def loop(out: str, rank: int) -> dict:
    res = {}
    for stage in (1, 2, 3):
        r = res[f"zero{stage}"] = {}
        # Mixout layers at p=0 with dropout off train bitwise like the model without surgery
        torch.manual_seed(5 + rank)
        eng, _ = engine(pretrained(**NO_DROPOUT), stage)
        r["plain"] = train(eng, rank, 3)
        keys = list(eng.module.state_dict())
        try:  # apply after deepspeed.initialize: refused, the model unchanged
            surgery.apply(eng, mixout=0.3)
        except surgery.SurgeryError as e:
            r["engine_refused"] = str(e)
        r["engine_unchanged"] = list(eng.module.state_dict()) == keys and not surgery.is_surgered(eng)
        m = surgery.apply(pretrained(), mixout=0.3, dropout=0.0)
        for layer in m.modules():
            if isinstance(layer, MixLinear):
                layer.mixout_p = 0.0
        torch.manual_seed(5 + rank)
        eng, _ = engine(m, stage)
        r["p0"] = train(eng, rank, 3)
        # Mixout on, MSD, R-Drop: each rank draws its own masks (seeded per rank, as under DDP)
        m = surgery.apply(pretrained(**NO_DROPOUT), mixout=0.3, msd=4, dropout=0.1)
        targets = [p for n, p in m.named_parameters() if n.endswith(TARGET)]
        eng, opt = engine(m, stage)
        torch.manual_seed(7 + rank)
        r["mixout"] = train(eng, rank, 2, rdrop=1.0, msd_loss=True)
        held = optimizer_params(opt)
        r["targets_in_optimizer"] = sum(any(t is p for p in held) for t in targets)
        r["optimizer_params"] = len(held)
        r["trainable"] = sum(1 for p in m.parameters() if p.requires_grad)
        r["targets_with_grad"] = sum(t.grad is not None for t in targets)
        total = sum(int(torch.Size(getattr(t, "ds_shape", t.shape)).numel()) for t in targets)
        r["target_elems"] = total
        r["target_local"] = sum((t.ds_tensor if zero.is_zero3(t) else t).numel() for t in targets)
        # DeepSpeed checkpoint, resumed in a fresh engine (RNG state carried by hand, as the Trainer does)
        ckpt = os.path.join(out, f"ds{stage}")
        eng.save_checkpoint(ckpt, tag="step2")
        rng = torch.get_rng_state()
        r["after"] = train(eng, rank, 2, first=2, rdrop=1.0, msd_loss=True)
        full = zero.full_state_dict(m)
        # the eval forward equals the plain model's with the gathered weights
        eb = batch(n=4, seed=99)
        with torch.no_grad():
            eng.eval()
            logits = eng(**eb).logits
            plain = pretrained()
            plain.load_state_dict({k: v for k, v in full.items() if not k.endswith(TARGET)})
            r["eval_equal"] = torch.equal(plain.eval()(**eb).logits, logits)
        r["targets_pretrained"] = all(torch.equal(full[k], pretrained().state_dict()[k[:-len(TARGET)] + "weight"])
                                      for k in full if k.endswith(TARGET))
        export_dir = os.path.join(out, f"export{stage}")
        surgery.exporting.export_sharded(eng, export_dir, should_save=rank == 0)
        if stage == 3:
            try:
                surgery.export(eng, os.path.join(out, "one-rank"))
            except surgery.SurgeryError as e:
                r["export_refused"] = str(e)
        m2 = surgery.apply(pretrained(**NO_DROPOUT), mixout=0.3, msd=4, dropout=0.1)
        eng2, _ = engine(m2, stage)
        eng2.load_checkpoint(ckpt, tag="step2")
        torch.set_rng_state(rng)
        r["resumed"] = train(eng2, rank, 2, first=2, rdrop=1.0, msd_loss=True)
        full2 = zero.full_state_dict(m2)
        r["resumed_equal"] = full.keys() == full2.keys() and all(torch.equal(full[k], full2[k]) for k in full)
        if stage == 3:  # describe counts DeepSpeed's partitions; revert gives the plain layers their weights back
            r["describe"] = surgery.describe(m2)
            surgery.revert(m2)
            plain2 = zero.full_state_dict(m2)
            r["revert_plain"] = (plain2.keys() == {k for k in full2 if not k.endswith(TARGET)}
                                 and all(torch.equal(plain2[k], full2[k]) for k in plain2)
                                 and type(m2.classifier) is torch.nn.Linear)
        if rank == 0:
            torch.save(full, os.path.join(out, f"full{stage}.pt"))
        dist.barrier()
    # the layer-weighted MSD head under ZeRO-3: its layer weights are partitioned and trained like the rest
    m = surgery.apply(pretrained(layers=2, **NO_DROPOUT), msd=4, msd_layers=True)
    eng, _ = engine(m, 3)
    added = [n for n, p in m.named_parameters() if not n.startswith(("bert.", "classifier."))]
    before = zero.full_state_dict(m)
    torch.manual_seed(3 + rank)
    res["layered"] = {"losses": train(eng, rank, 2), "added": len(added),
                      "partitioned": all(zero.is_partitioned(m.get_parameter(n)) for n in added)}
    after = zero.full_state_dict(m)
    res["layered"]["moved"] = [n for n in added if not torch.equal(before[n], after[n])]
    # bf16 targets with low_memory (the layer keeps the weight and target, not the mixed weight, for backward)
    res["bf16_low_memory"] = {}
    for stage in (2, 3):
        m = surgery.apply(pretrained(**NO_DROPOUT), mixout=0.3, target_dtype=torch.bfloat16, low_memory=True)
        eng3, _ = engine(m, stage)
        torch.manual_seed(3 + rank)
        losses = train(eng3, rank, 2)
        dtypes = {str(v.dtype) for k, v in zero.full_state_dict(m).items() if k.endswith(TARGET)}
        res["bf16_low_memory"][stage] = {"losses": losses, "dtypes": sorted(dtypes)}
    # train_noise runs a training forward: under ZeRO-3 too, it lists what it lists without DeepSpeed
    b = batch(n=2)
    res["train_noise"] = [surgery.train_noise(eng.module, **b),
                          surgery.train_noise(surgery.apply(pretrained(layers=2, **NO_DROPOUT), msd=4, msd_layers=True), **b)]
    return res


def trainer_config(stage: int) -> dict:
    """A DeepSpeed config for the HF Trainer: no ``train_batch_size`` (on CPU the Trainer counts one process)."""
    zo = {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})}
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "zero_optimization": zo}


def p0(model):
    """The Mixout layers at p=0 (with dropout off: the model computes what the plain one computes)."""
    for layer in model.modules():
        if isinstance(layer, MixLinear):
            layer.mixout_p = 0.0
    return model


def trainer_run(out, stage, build, steps, resume=None, **kw):
    from training_setup import dataset, trainer_args

    args = trainer_args(out, steps, save_steps=2, deepspeed=trainer_config(stage), ddp_backend="gloo")
    model = pretrained(**NO_DROPOUT)  # under a ZeRO-3 config the Trainer's args turn zero.Init on: partitioned here
    partitioned = any(zero.is_partitioned(p) for p in model.parameters())
    model = build(model)
    local = [(p.ds_tensor if zero.is_zero3(p) else p).numel() for n, p in model.named_parameters() if n.endswith(TARGET)]
    tr = surgery.SurgeryTrainer(model=model, args=args, train_dataset=dataset(), **kw)
    tr.train(resume_from_checkpoint=resume)
    tr.save_model(os.path.join(out, "final"))
    return {"losses": [h["loss"] for h in tr.state.log_history if "loss" in h], "partitioned_at_apply": partitioned,
            "target_local": sum(local)}


def trainer(out: str, rank: int) -> dict:
    full = dict(rdrop_alpha=1.0, msd_loss=True)
    res = {}
    for stage in (1, 2, 3):
        d = os.path.join(out, f"trainer{stage}")
        res[f"zero{stage}"] = trainer_run(d, stage, lambda m: surgery.apply(m, mixout=0.3, msd=4, dropout=0.1), 4,
                                          **full)
    d = os.path.join(out, "trainer3")
    res["resumed"] = trainer_run(os.path.join(out, "resumed3"), 3,
                                 lambda m: surgery.apply(m, mixout=0.3, msd=4, dropout=0.1), 4,
                                 resume=os.path.join(d, "checkpoint-2"), **full)
    res["plain"] = trainer_run(os.path.join(out, "plain3"), 3, lambda m: m, 3)
    res["p0"] = trainer_run(os.path.join(out, "p03"), 3, lambda m: p0(surgery.apply(m, mixout=0.3, dropout=0.0)), 3)
    res["accelerate"] = accelerate_runs(out, rank)
    return res


def accelerate_runs(out: str, rank: int) -> dict:
    """Accelerate's DeepSpeed plugin (ZeRO-3) in an own loop: surgery with Mixout at p=0 trains bitwise like no
    surgery; Mixout on trains with partitioned targets; the plain export of the prepared model."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DeepSpeedPlugin
    from training_setup import dataset

    res = {}
    for name, build in (("plain", lambda m: m), ("p0", lambda m: p0(surgery.apply(m, mixout=0.3, dropout=0.0))),
                        ("mixout", lambda m: surgery.apply(m, mixout=0.3, msd=4, dropout=0.1))):
        AcceleratorState._reset_state()  # a fresh Accelerator with this plugin (the Trainer made one before)
        acc = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config={
            "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}))
        torch.manual_seed(0)
        m = build(pretrained(**NO_DROPOUT))
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        loader = torch.utils.data.DataLoader(dataset(8), batch_size=2)
        model, opt, loader = acc.prepare(m, opt, loader)
        torch.manual_seed(11 + rank)
        print("ACC", name, type(model).__name__, flush=True)
        losses = []
        for b in loader:
            loss = surgery.compute_loss(model, b, msd_loss=name == "mixout").loss
            acc.backward(loss)
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        targets = [p for n, p in m.named_parameters() if n.endswith(TARGET)]
        res[name] = {"losses": losses, "engine": type(model).__name__,
                     "target_local": sum(t.ds_tensor.numel() for t in targets if zero.is_zero3(t)),
                     "targets_whole": sum(t.numel() for t in targets if not zero.is_zero3(t))}
        if name == "mixout":
            surgery.exporting.export_sharded(model, os.path.join(out, "accelerate"), should_save=acc.is_main_process)
            if acc.is_main_process:
                torch.save(zero.full_state_dict(m), os.path.join(out, "accelerate.pt"))
            else:
                zero.full_state_dict(m)
        acc.free_memory()
    return res


def main():
    mode, out = sys.argv[1], sys.argv[2]
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    res = loop(out, rank) if mode == "loop" else trainer(out, rank)
    with open(os.path.join(out, f"{mode}{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
