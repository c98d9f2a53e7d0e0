"""timm models: real timm 1.0 (imported with a torchvision stand-in, ``conftest.import_timm``) with
every drop rate it has, and timm-style models written here: classifier heads keeping a float
``drop_rate`` passed to ``F.dropout``, ``DropPath(drop_prob)`` modules on a linear depth schedule,
blocks keeping a float ``drop_path_rate`` for a functional ``drop_path``. ``dropout=`` turns off the
dropout only (``nn.Dropout``, ``PatchDropout``, ``DropBlock2d``, float ``drop_rate``), ``drop_path=``
the stochastic depth only (``DropPath``, EfficientNet's drop-connect); both give the exact model
built without them, and ``describe``'s left-on list agrees with ``train_noise`` on every model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import pytest
from agreement import check_agreement
from conftest import import_timm

import surgery
from surgery.regularizers.rates import DROP_PATH, DROPOUT
from surgery.regularizers.rates.kinds import find_probs
from surgery import train_noise


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False, scale_by_keep: bool = True):
    """timm.layers.drop_path: drop whole examples of a residual branch."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    random_tensor = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        random_tensor.div_(keep_prob)
    return x * random_tensor


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)


class Attention(nn.Module):  # timm.models.vision_transformer.Attention, fused path
    def __init__(self, dim: int, heads: int, attn_drop: float, proj_drop: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


class Block(nn.Module):
    def __init__(self, dim: int, drop: float, attn_drop: float, path: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, 2, attn_drop, drop)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(drop), nn.Linear(2 * dim, dim),
                                 nn.Dropout(drop))
        self.drop_path1 = DropPath(path) if path > 0.0 else nn.Identity()
        self.drop_path2 = DropPath(path) if path > 0.0 else nn.Identity()

    def forward(self, x):
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class ViT(nn.Module):
    """timm VisionTransformer: pos_drop, head_drop (drop_rate), DropPath on 0 .. drop_path_rate."""

    def __init__(self, drop_rate=0.0, pos_drop_rate=0.0, proj_drop_rate=0.0, attn_drop_rate=0.0,
                 drop_path_rate=0.0, depth=3, dim=16):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 4, 4)
        self.pos_embed = nn.Parameter(torch.randn(1, 16, dim) * 0.02)
        self.pos_drop = nn.Dropout(pos_drop_rate)
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.Sequential(*[Block(dim, proj_drop_rate, attn_drop_rate, dpr[i]) for i in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.pos_drop(self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed)
        return self.head(self.head_drop(self.norm(self.blocks(x)).mean(1)))


class BasicBlock(nn.Module):
    """A residual block keeping its stochastic-depth rate as a float, read at call time."""

    def __init__(self, ch: int, drop_path_rate: float):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(ch, ch, 3, padding=1), nn.Conv2d(ch, ch, 3, padding=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(ch), nn.BatchNorm2d(ch)
        self.drop_path_rate = drop_path_rate

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(x + drop_path(y, self.drop_path_rate, self.training))


class ResNet(nn.Module):
    """timm ResNet: BatchNorm, and ``forward_head`` passes the float ``self.drop_rate`` to F.dropout."""

    def __init__(self, drop_rate=0.0, drop_path_rate=0.0):
        super().__init__()
        self.drop_rate = drop_rate
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.layers = nn.Sequential(*[BasicBlock(8, drop_path_rate * i / 2) for i in range(3)])
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.layers(self.stem(x)).mean((2, 3))
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return self.fc(x)


class MobileNetHead(nn.Module):
    """timm MobileNetV3 / EfficientNet head: a float ``drop_rate``, no dropout module anywhere."""

    def __init__(self, drop_rate=0.0):
        super().__init__()
        self.conv_stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.norm = nn.GroupNorm(2, 8)
        self.conv_head = nn.Linear(8, 16)
        self.drop_rate = drop_rate
        self.classifier = nn.Linear(16, 3)

    def forward(self, x):
        x = F.hardswish(self.conv_head(self.norm(self.conv_stem(x)).mean((2, 3))))
        if self.drop_rate > 0.0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return self.classifier(x)


RATES = dict(drop_rate=0.25, pos_drop_rate=0.1, proj_drop_rate=0.1, attn_drop_rate=0.1, drop_path_rate=0.2)
MODELS = {  # name -> (class, its rate arguments, has BatchNorm (train differs from eval))
    "vit": (ViT, RATES, False),
    "resnet": (ResNet, dict(drop_rate=0.25, drop_path_rate=0.2), True),
    "mobilenet-head": (MobileNetHead, dict(drop_rate=0.25), False),
}


TIMM_VIT = dict(drop_rate=0.25, pos_drop_rate=0.1, patch_drop_rate=0.25, proj_drop_rate=0.1, attn_drop_rate=0.1,
                drop_path_rate=0.2)  # every rate timm's VisionTransformer takes


def _real_timm() -> dict:
    """Real timm models; EfficientNet's drop-connect is its ``drop_path_rate`` (timm 1.0 dropped the
    old ``drop_connect_rate`` name), ResNet's DropBlock its ``drop_block_rate``."""
    timm = import_timm()

    def make(arch, **fixed):
        return lambda **kw: timm.create_model(arch, pretrained=False, num_classes=3, **fixed, **kw)
    rates = dict(drop_rate=0.25, drop_path_rate=0.2)
    return {"timm-vit": (make("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=2), TIMM_VIT, False),
            "timm-convnext": (make("convnext_atto"), rates, False),
            "timm-efficientnet": (make("efficientnet_b0"), rates, True),
            "timm-resnet": (make("resnet10t"), dict(rates, drop_block_rate=0.2), True),
            "timm-mobilenetv3": (make("mobilenetv3_small_100"), rates, True)}


MODELS.update(_real_timm())
SLOW = {"timm-convnext", "timm-efficientnet", "timm-mobilenetv3"}  # first CPU forwards take seconds
PARAMS = [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in sorted(MODELS)]


def build(name: str, zero: bool = False) -> nn.Module:
    cls, rates, _ = MODELS[name]
    torch.manual_seed(0)
    return cls(**{k: 0.0 for k in rates} if zero else rates)


SIZE = {"timm-convnext": 32}  # input side: ConvNeXt downsamples 32x


def x_(name: str = "") -> torch.Tensor:
    side = SIZE.get(name, 16)
    return torch.randn(4, 3, side, side, generator=torch.Generator().manual_seed(1))


def values(model: nn.Module, kind: str) -> list[tuple[str, str, float]]:
    return list(find_probs(model, kind))


@pytest.mark.parametrize("name", PARAMS)
def test_both_off_is_exactly_the_model_built_without_them(name):
    model, reference, x = build(name), build(name, zero=True), x_(name)
    drop, depth = values(model, DROPOUT), values(model, DROP_PATH)
    assert any(v > 0 for _, _, v in drop)
    assert train_noise(model, x)
    surgery.apply(model, dropout=0.0, drop_path=0.0)
    assert train_noise(model, x) == []
    a, b = model.train()(x), model(x)
    assert torch.equal(a, b) and torch.equal(a, reference.train()(x))  # bitwise the model built with rates 0
    if not MODELS[name][2]:
        assert torch.equal(a, model.eval()(x))
    surgery.revert(model)
    assert values(model, DROPOUT) == drop and values(model, DROP_PATH) == depth
    assert all(type(v) is float for _, _, v in drop + depth)


def test_float_drop_rate_head():
    model = build("mobilenet-head")
    surgery.apply(model, dropout=0.0)
    assert [c.to_json() for c in surgery.get_record(model).dropout] == [{"module": "", "attr": "drop_rate", "old": 0.25, "new": 0.0}]
    x = x_()
    assert torch.equal(model.train()(x), model.eval()(x))
    surgery.revert(model)
    assert model.drop_rate == 0.25
    assert train_noise(model, x) == ["dropout(p=0.25)"]


def test_dropout_leaves_drop_path_alone_and_back():
    model, x = build("vit"), x_()
    depth = values(model, DROP_PATH)
    assert depth == [("blocks.1.drop_path1", "drop_prob", 0.10000000149011612),
                     ("blocks.1.drop_path2", "drop_prob", 0.10000000149011612),
                     ("blocks.2.drop_path1", "drop_prob", 0.20000000298023224),
                     ("blocks.2.drop_path2", "drop_prob", 0.20000000298023224)]
    surgery.apply(model, dropout=0.0)
    assert values(model, DROP_PATH) == depth
    assert train_noise(model, x) == ["bernoulli_"] * 4  # the DropPath draws, nothing else
    assert "left on in training: drop-path 0.1, 0.2 on 4 modules: pass drop_path=0.0" in surgery.describe(model)
    surgery.revert(model)
    surgery.apply(model, drop_path=0.0)
    assert sorted(set(train_noise(model, x))) == ["dropout(p=0.1)", "dropout(p=0.25)",
                                                  "scaled_dot_product_attention(dropout_p=0.1)"]
    surgery.revert(model)
    assert values(model, DROP_PATH) == depth


def test_block_rate_read_at_call_time():
    model = build("resnet")
    surgery.apply(model, drop_path=0.0)
    rec = surgery.get_record(model)
    assert [(c.module, c.attr, c.old, c.kind) for c in rec.dropout] == [
        ("layers.0", "drop_path_rate", 0.0, "drop_path"), ("layers.1", "drop_path_rate", 0.1, "drop_path"),
        ("layers.2", "drop_path_rate", 0.2, "drop_path")]
    assert model.drop_rate == 0.25 and [m.drop_path_rate for m in model.layers] == [0.0, 0.0, 0.0]
    surgery.revert(model)
    assert [m.drop_path_rate for m in model.layers] == [0.0, 0.1, 0.2]


def test_drop_path_one_drops_every_branch_that_has_droppath():
    """``drop_path=1.0`` reaches every DropPath: each such residual branch is dropped, so the
    training output is exactly the model without those blocks (block 0, rate 0, has none)."""
    model, x = build("vit"), x_()
    surgery.apply(model, dropout=0.0, drop_path=1.0)
    out = model.train()(x)
    model.blocks = model.blocks[:1]
    assert torch.equal(out, model.eval()(x))


@pytest.mark.parametrize("name", PARAMS)
def test_describe_and_train_noise_agree(name):
    """Each kind left on alone (the others at 0.0) is noisy exactly when the record says it is left on."""
    model, x = build(name), x_(name)
    kinds = {DROPOUT} | ({DROP_PATH} if "drop_path_rate" in MODELS[name][1] else set())
    assert check_agreement(model, lambda: train_noise(model, x)) == kinds


@pytest.mark.parametrize("rate, module, attr", [("patch_drop_rate", "patch_drop", "prob"),
                                                ("drop_block_rate", "layer3.0.drop_block", "drop_prob")])
def test_token_and_block_dropout_are_dropout(rate, module, attr):
    """timm's PatchDropout (drops tokens, rate ``prob``) and DropBlock2d (drops blocks of a feature map,
    rate ``drop_prob``) zero parts of one example's activations as nn.Dropout does: ``dropout=`` sets
    them, ``describe`` names them, revert restores them."""
    arch = "timm-vit" if rate == "patch_drop_rate" else "timm-resnet"
    cls, _, batchnorm = MODELS[arch]
    torch.manual_seed(0)
    model, x = cls(**{rate: 0.25}), x_()
    assert train_noise(model, x) == (["randn"] if rate == "patch_drop_rate" else ["bernoulli_"] * 2)
    surgery.apply(model, drop_path=0.0)
    assert "left on in training: dropout 0.25 on 1 module" in surgery.describe(model) or \
        "left on in training: dropout 0.25 on 2 modules" in surgery.describe(model)
    surgery.revert(model)
    surgery.apply(model, dropout=0.0)
    assert {(c.module, c.attr, c.old) for c in surgery.get_record(model).dropout} >= {(module, attr, 0.25)}
    assert train_noise(model, x) == []
    a, b = model.train()(x), model(x)
    assert torch.equal(a, b) and (batchnorm or torch.equal(a, model.eval()(x)))
    surgery.revert(model)
    assert getattr(model.get_submodule(module), attr) == 0.25
    assert train_noise(model, x)
