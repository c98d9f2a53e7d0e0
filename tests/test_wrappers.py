"""Model wrappers are recognised by type, never by attribute name; the record lives on the
model inside every wrapper, so it is found from the wrapper and survives unwrapping."""

import os

import pytest
import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch import nn
from zoo import batch, build

import surgery
from surgery.layers.mixout import MixLinear
from surgery.wrappers import unwrap


class Owner(nn.Module):
    """A custom model whose own layers are called ``module``, ``model`` and ``_orig_mod``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.module = nn.Linear(4, 4)
        self.model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.2))
        self._orig_mod = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.drop(self._orig_mod(self.model(self.module(x)))))


def test_attributes_named_like_wrappers_are_the_models_own_layers():
    net = Owner()
    assert unwrap(net) is net
    classes = [(n, type(m)) for n, m in net.named_modules()]
    state = {k: v.clone() for k, v in net.state_dict().items()}
    surgery.apply(net, mixout=0.1, dropout=0.0)
    rec = surgery.get_record(net)
    assert [m.name for m in rec.mixout] == ["module", "model.0", "_orig_mod", "head"]
    assert [(c.module, c.old) for c in rec.dropout] == [("model.1", 0.2), ("drop", 0.1)]
    assert "_surgery" in vars(net) and "_surgery" not in vars(net.module)
    assert type(net.module) is MixLinear and net.drop.p == 0.0 and net.model[1].p == 0.0
    surgery.revert(net)
    assert [(n, type(m)) for n, m in net.named_modules()] == classes
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    assert net.drop.p == 0.1 and net.model[1].p == 0.2


@pytest.fixture
def gloo_group(tmp_path):
    dist.init_process_group("gloo", init_method="file://" + os.path.join(tmp_path, "rendezvous"), rank=0,
                            world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _lora(model):
    return get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]))


WRAPS = {
    "DataParallel": nn.DataParallel,
    "DistributedDataParallel": lambda m: nn.parallel.DistributedDataParallel(m),
    "torch.compile": torch.compile,
    "PeftModel": _lora,
    "DataParallel(compile(PeftModel))": lambda m: nn.DataParallel(torch.compile(_lora(m))),
}


@pytest.mark.parametrize("kind", list(WRAPS))
def test_apply_and_revert_through_a_wrapper(kind, request):
    if "Distributed" in kind:
        request.getfixturevalue("gloo_group")
    model = build("bert")
    wrapped = WRAPS[kind](model)
    assert unwrap(wrapped) is model  # get_peft_model wraps the model object itself
    classes = [(n, type(m)) for n, m in wrapped.named_modules()]
    surgery.apply(wrapped, mixout=0.1, dropout=0.0)
    assert "_surgery" in vars(model) and surgery.get_record(wrapped) is surgery.get_record(model)
    assert surgery.is_surgered(wrapped) and model.config.hidden_dropout_prob == 0.0
    mixed = [m.name for m in surgery.get_record(model).mixout]
    # PEFT freezes the backbone: only its adapters and the head copy train, so only they are mixed
    assert len(mixed) == (5 if "Peft" in kind else 14)
    surgery.revert(wrapped)
    assert [(n, type(m)) for n, m in wrapped.named_modules()] == classes
    assert not surgery.is_surgered(wrapped) and model.config.hidden_dropout_prob == 0.15


def test_data_parallel_on_cpu_trains_the_surgered_model():
    model = build("bert")
    dp = nn.DataParallel(model)
    surgery.apply(dp, mixout=0.1)
    b = batch("bert")
    dp.train()
    torch.manual_seed(3)
    out = dp(**b).logits
    torch.manual_seed(3)
    assert torch.equal(out, model(**b).logits)  # the same masks: DataParallel on CPU runs the module itself
    dp.eval()
    surgery.revert(dp)
    assert not any(isinstance(m, MixLinear) for m in model.modules())


def test_record_survives_ddp_unwrapping(gloo_group):
    model = build("bert")
    ddp = nn.parallel.DistributedDataParallel(model)
    surgery.apply(ddp, mixout=0.1)
    assert surgery.get_record(ddp.module) is surgery.get_record(ddp)
    ddp.train()
    ddp(**batch("bert")).loss.backward()  # the wrapped model trains: DDP reduces the shared Parameters' gradients
    assert model.classifier.weight.grad is not None
    surgery.revert(ddp.module)
    assert not surgery.is_surgered(ddp)


def _fsdp1(model, **kw):
    from torch.distributed.fsdp import FullyShardedDataParallel
    return FullyShardedDataParallel(model, device_id=torch.device("cpu"), **kw)


@pytest.mark.slow
def test_fsdp1_is_refused_after_wrapping_and_when_applied_first(gloo_group):
    model = build("bert")
    wrapped = _fsdp1(model)
    classes = [(n, type(m)) for n, m in wrapped.named_modules()]
    with pytest.raises(surgery.SurgeryError) as e:
        surgery.apply(wrapped, mixout=0.1)
    assert str(e.value) == (
        "cannot apply inside FullyShardedDataParallel (FSDP1): it flattened the Parameters when it wrapped the model, "
        "so swapped layers would not hold them; apply surgery to the plain model, then wrap it (or use FSDP2: "
        "surgery.apply first, then fully_shard; see docs/training.md)")
    assert [(n, type(m)) for n, m in wrapped.named_modules()] == classes and not surgery.is_surgered(wrapped)

    model = surgery.apply(build("bert"), mixout=0.1, dropout=0.0)
    # the Mixout targets are frozen Parameters: FSDP1 refuses to flatten them with the trainable weights
    # (use_orig_params=False) or hands Mixout views that require grad (use_orig_params=True), which surgery refuses
    # at the first training forward naming the supported engines (docs/training.md, Distributed)
    with pytest.raises(ValueError, match="uniform `requires_grad`"):
        _fsdp1(model)
    wrapped = _fsdp1(model, use_orig_params=True)
    assert surgery.get_record(wrapped) is surgery.get_record(model)
    wrapped.train()
    with pytest.raises(surgery.SurgeryError, match=r"FSDP1 .*surgery supports .*FSDP2"):
        wrapped(**batch("bert"))
    with pytest.raises(surgery.SurgeryError) as e:
        surgery.revert(wrapped)
    assert str(e.value).startswith("cannot revert inside FullyShardedDataParallel (FSDP1)") and \
        str(e.value).endswith("revert the model before wrapping it, or run `surgery convert` on a full (gathered) "
                              "checkpoint (or use FSDP2: surgery.apply first, then fully_shard; see docs/training.md)")
    assert surgery.is_surgered(wrapped)
