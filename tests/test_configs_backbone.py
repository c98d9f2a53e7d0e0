"""Custom models holding a transformers backbone (the seed blog's CommonLitModel shape:
``self.bert = AutoModel...; self.regressor = nn.Linear``): export, ``save_pretrained``,
``surgery convert`` and the reload guard of the backbone at any depth; teacher and student
built from one config object; ``mixout_head=False`` without a head found by name."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch import nn
import zoo
from zoo import HIDDEN, ZOO

import surgery
from surgery.checkpoint import convert
from surgery.layers.mixout import MixLinear
from surgery.record import TARGET_SUFFIX

BACKBONES = ["bert", "gpt2", "t5", "x-clip"]  # plain, Conv1D (transposed), encoder-decoder, nested sub-configs


class Regressor(nn.Module):
    """CommonLitModel: a backbone, no config of its own, and a head not named like a task head."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.bert = backbone
        self.regressor = nn.Linear(HIDDEN, 1)

    def forward(self, input_ids):
        return self.regressor(self.bert(input_ids=input_ids).last_hidden_state[:, 0])


class Outer(nn.Module):
    """The backbone two levels down: ``model.encoder.bert``."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.encoder = Regressor(backbone)
        self.out = nn.Linear(1, 1)


def backbone(name: str, seed: int = 0, config=None) -> nn.Module:
    torch.manual_seed(seed)
    return transformers.AutoModel.from_config(config if config is not None else zoo.config(name)).eval()


def wrap(bb: nn.Module, depth: int) -> tuple[nn.Module, str]:
    """A custom model holding ``bb`` at ``depth`` (1: ``bert``, 2: ``encoder.bert``) and that name."""
    return (Regressor(bb), "bert") if depth == 1 else (Outer(bb), "encoder.bert")


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def untouched(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return (not surgery.is_surgered(model) and set(now) == set(before)
            and all(torch.equal(now[k], v) for k, v in before.items())
            and not any(isinstance(m, MixLinear) for m in model.modules()))


def read_json(path):
    return json.loads(path.read_text())


# ---- export, save_pretrained, convert and the reload guard of the backbone -----------------

@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("name", BACKBONES)
def test_export_of_backbone_writes_the_original_config(name, depth, tmp_path):
    plain = backbone(name)
    plain.save_pretrained(tmp_path / "plain")
    model, prefix = wrap(backbone(name), depth)
    surgery.apply(model, mixout=0.1, dropout=0.0)
    sub = model.get_submodule(prefix)
    surgery.export(sub, tmp_path / "exported")
    assert read_json(tmp_path / "exported" / "config.json") == read_json(tmp_path / "plain" / "config.json")
    got, ref = load_file(tmp_path / "exported" / "model.safetensors"), load_file(tmp_path / "plain" / "model.safetensors")
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    assert surgery.is_surgered(model) and sub.config.surgery["scope"] == prefix  # export changed nothing
    surgery.revert(model)
    assert "surgery" not in sub.config.to_dict()


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_save_pretrained_carries_its_part_of_the_record(name, depth, tmp_path):
    plain = backbone(name)
    plain.save_pretrained(tmp_path / "plain")
    model, prefix = wrap(backbone(name), depth)
    surgery.apply(model, mixout=0.1, dropout=0.0, msd=2, head=prefix.replace("bert", "regressor"))
    root = surgery.get_record(model)
    sub = model.get_submodule(prefix)
    sub.save_pretrained(tmp_path / "surgered")

    saved = read_json(tmp_path / "surgered" / "config.json")
    rec = surgery.Record.from_dict(saved["surgery"])
    assert rec.scope == prefix and rec.args == root.args and rec.msd == []  # the head is outside the backbone
    assert [m.name for m in rec.mixout] == [m.name[len(prefix) + 1:] for m in root.mixout
                                               if m.name.startswith(prefix + ".")]
    outside = {m.name for m in root.mixout if not m.name.startswith(prefix + ".")}
    assert outside == ({"regressor"} if depth == 1 else {"encoder.regressor", "out"})
    targets = {k for k in load_file(tmp_path / "surgered" / "model.safetensors") if k.endswith(TARGET_SUFFIX)}
    assert set(rec.target_keys) == targets
    assert any(c.module == "" for c in rec.config)  # what maps onto config.json (T5 stacks hold copies too)
    assert describe_title(rec).endswith(f"the part inside module {prefix!r} of the model it was applied to")

    # the reload guard, for the backbone alone and inside a fresh custom model: refused, nothing changed
    reloaded = transformers.AutoModel.from_pretrained(tmp_path / "surgered")
    before = state(reloaded)
    with pytest.raises(surgery.AlreadySurgeredError, match="surgery convert"):
        surgery.apply(reloaded, mixout=0.1)
    again, _ = wrap(reloaded, depth)
    with pytest.raises(surgery.AlreadySurgeredError, match=f"its module {prefix!r}"):
        surgery.apply(again, mixout=0.1, dropout=0.0)
    assert untouched(reloaded, before) and untouched(again, state(again))

    # convert of that directory: every target dropped by the record, the config of a plain save
    plan = convert(tmp_path / "surgered", tmp_path / "converted")
    assert plan.warnings == [] and sorted(plan.dropped) == sorted(rec.target_keys)
    assert read_json(tmp_path / "converted" / "config.json") == read_json(tmp_path / "plain" / "config.json")
    got, ref = load_file(tmp_path / "converted" / "model.safetensors"), load_file(tmp_path / "plain" / "model.safetensors")
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    surgery.revert(model)


def describe_title(rec) -> str:
    return surgery.describe(rec.to_dict()).splitlines()[0]


def test_the_backbone_of_a_transformers_task_model_shares_its_config_and_record(tmp_path):
    """``BertForSequenceClassification.bert`` owns no config: it carries the model's record."""
    model = zoo.build("bert")
    surgery.apply(model, mixout=0.1, dropout=0.0)
    assert model.bert.config is model.config and model.config.surgery == surgery.get_record(model).to_dict()
    surgery.export(model.bert, tmp_path / "exported")
    saved = read_json(tmp_path / "exported" / "config.json")
    assert "surgery" not in saved and saved["hidden_dropout_prob"] == zoo.P
    surgery.revert(model)
    assert "surgery" not in model.bert.config.to_dict()


# ---- teacher and student built from one config object --------------------------------------

TEACHER = ["bert", "falcon", "x-clip", "backbone"]  # falcon reads config.attention_dropout in forward


def teacher_student(kind: str):
    if kind == "backbone":
        cfg = zoo.config("bert")
        return cfg, Regressor(backbone("bert", config=cfg)), Regressor(backbone("bert", config=cfg))
    cfg = zoo.config(kind)
    cls = getattr(transformers, ZOO[kind].cls)
    return cfg, cls(cfg), cls(cfg)


def configs_held(model: nn.Module) -> list:
    return [v for m in model.modules() for v in vars(m).values() if isinstance(v, transformers.PretrainedConfig)]


def reachable(cfg) -> set[int]:
    out, todo = set(), [cfg]
    while todo:
        c = todo.pop()
        out.add(id(c))
        todo += [v for v in vars(c).values() if isinstance(v, transformers.PretrainedConfig)]
    return out


@pytest.mark.parametrize("kind", TEACHER)
def test_teacher_and_student_from_one_config(kind):
    cfg, teacher, student = teacher_student(kind)
    original = json.dumps(cfg.to_dict(), sort_keys=True)
    shared = reachable(cfg)
    held_before = {id(c) for c in configs_held(student)}
    teacher_held = [id(c) for c in configs_held(teacher)]
    surgery.apply(student, mixout=0.1, dropout=0.0)
    # the config object both were built from is untouched and carries no record
    assert json.dumps(cfg.to_dict(), sort_keys=True) == original and "surgery" not in cfg.to_dict()
    assert [id(c) for c in configs_held(teacher)] == teacher_held
    # the student got its own copies, sharing kept inside it
    copies = configs_held(student)
    assert not {id(c) for c in copies} & shared and len({id(c) for c in copies}) == len(held_before)
    if kind != "backbone":
        assert student.base_model.config is student.config
    if kind == "x-clip":
        assert student.text_model.config is student.config.text_config
        assert student.config.text_config.dropout == 0.0 and cfg.text_config.dropout == zoo.P
    # the teacher is a plain model: apply is not refused, revert gives it back as it was
    surgery.apply(teacher, mixout=0.1)
    surgery.revert(teacher)
    surgery.revert(student)
    assert json.dumps(cfg.to_dict(), sort_keys=True) == original
    student_cfg = student.bert.config if kind == "backbone" else student.config
    assert json.dumps(student_cfg.to_dict(), sort_keys=True) == original
    assert student_cfg is cfg  # revert hands the original object back: the sharing is as before apply
    assert {id(c) for c in configs_held(student)} == held_before


def test_teacher_keeps_its_config_dropout_at_call_time():
    """Falcon reads ``config.attention_dropout`` in forward: the teacher's must stay as it was."""
    cfg, teacher, student = teacher_student("falcon")
    surgery.apply(student, dropout=0.0)
    assert teacher.config.attention_dropout == zoo.P and student.config.attention_dropout == 0.0
    assert all(m.config is teacher.config for m in teacher.modules() if "config" in vars(m))
    assert all(m.config is student.config for m in student.modules() if "config" in vars(m))


# ---- mixout_head=False needs a head ----------------------------------------------------------

class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Sequential(), nn.Sequential()
        self.a.classifier, self.b.classifier = nn.Linear(4, 2), nn.Linear(4, 2)


@pytest.mark.parametrize("make, why", [
    (lambda: Regressor(backbone("bert")), "no task head found in Regressor.*'bert', 'regressor'"),
    (TwoHeads, "ambiguous task head in TwoHeads: candidates 'a.classifier', 'b.classifier'"),
])
def test_mixout_head_false_without_a_head_is_refused(make, why):
    model = make()
    before = state(model)
    with pytest.raises(surgery.HeadError, match=f"mixout_head=False leaves the task head a plain layer, but {why}"):
        surgery.apply(model, mixout=0.1, dropout=0.0, mixout_head=False)
    assert untouched(model, before)


def test_mixout_head_false_with_head_named():
    model = Regressor(backbone("bert"))
    surgery.apply(model, mixout=0.1, mixout_head=False, head="regressor")
    assert type(model.regressor) is nn.Linear and isinstance(model.bert.pooler.dense, MixLinear)
    assert {"name": "regressor", "reason": "task head (mixout_head=False)"} in [s.to_json() for s in surgery.get_record(model).skipped]
    surgery.revert(model)
    # without Mixout, mixout_head=False has no effect: refused like every option without the one it needs
    with pytest.raises(surgery.SurgeryError, match=r"^mixout_head=False only matters with Mixout, which is off"):
        surgery.apply(model, dropout=0.0, mixout_head=False)
    assert not surgery.is_surgered(model)


# ---- revert reads the record's orig / transposed ----------------------------------------------

def test_revert_refuses_a_layer_that_is_not_the_recorded_one():
    from transformers.pytorch_utils import Conv1D

    model = Regressor(backbone("bert"))
    surgery.apply(model, mixout=0.1)
    model.bert.pooler.dense = MixLinear.from_module(Conv1D(HIDDEN, HIDDEN), 0.1)  # transposed, another class
    before = state(model)
    with pytest.raises(surgery.SurgeryError, match=r"'bert.pooler.dense' .*recorded torch.nn.modules.linear.Linear, "
                                                   r"transposed=False; found transformers.pytorch_utils.Conv1D"):
        surgery.revert(model)
    assert surgery.is_surgered(model) and all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_mixlinear_without_its_original_reverts_to_the_recorded_class():
    from transformers.pytorch_utils import Conv1D

    for orig in (nn.Linear(3, 5), Conv1D(5, 3)):
        layer = MixLinear.from_module(orig, 0.1)
        vars(layer)["_original"] = None  # as if the original object were lost
        assert layer.orig == f"{type(orig).__module__}.{type(orig).__qualname__}"
        back = layer.to_module()
        x = torch.randn(2, 3)
        assert type(back) is type(orig) and torch.equal(back(x), orig(x))


def test_a_config_that_cannot_be_copied_is_refused_before_anything_changes():
    class Locked(transformers.BertConfig):
        def __deepcopy__(self, memo):
            raise RuntimeError("holds a lock")

    model = Regressor(transformers.BertModel(Locked(**zoo.config("bert").to_dict())))
    before = state(model)
    with pytest.raises(surgery.SurgeryError, match="cannot copy the config Locked of module 'bert'.*holds a lock"):
        surgery.apply(model, mixout=0.1, dropout=0.0)
    assert untouched(model, before) and model.bert.config.hidden_dropout_prob == zoo.P
