"""Which random operations does one training forward run? A check by what the model does.

Dropout control finds probabilities by name (``dropout.py``); :func:`train_noise` checks the
result by behaviour: it runs one ``train()`` forward under a ``TorchFunctionMode`` that
records every dropout-family call with a non-zero probability (``F.dropout*``,
``F.alpha_dropout``, ``torch.dropout``, ``scaled_dot_product_attention(dropout_p=...)``,
``F.multi_head_attention_forward``) and every random draw (``torch.rand``,
``Tensor.bernoulli_`` ... as DropPath and LayerDrop use), and reports a draw from the
torch, numpy or Python generator that no recorded call explains. ``[]`` means two training
forwards of the same input are deterministic as far as these generators go.

The generators' states are restored afterwards and the model's train/eval mode is put back.
"""

from __future__ import annotations

import inspect
import random
import sys
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["train_noise"]

# dropout-family functions: name -> (probability argument, its position, position of the train flag or None)
_DROPOUT = {name: ("p", 1, 2) for name in (
    "dropout", "dropout1d", "dropout2d", "dropout3d", "feature_dropout", "alpha_dropout", "feature_alpha_dropout",
    "native_dropout", "_fused_dropout", "dropout_", "alpha_dropout_", "feature_dropout_", "feature_alpha_dropout_")}
_DROPOUT["scaled_dot_product_attention"] = ("dropout_p", 4, None)  # no flag: callers pass 0.0 in eval
_DROPOUT["multi_head_attention_forward"] = ("dropout_p", 10, 13)
_RANDOM = {"rand", "rand_like", "randn", "randn_like", "randint", "randint_like", "randperm", "bernoulli",
           "bernoulli_", "multinomial", "normal", "normal_", "uniform_", "random_", "exponential_", "geometric_",
           "cauchy_", "log_normal_", "poisson", "rrelu", "rrelu_", "rrelu_with_noise"}


def _arguments(func, args, kwargs) -> dict[str, Any] | None:
    try:
        bound = inspect.signature(func).bind(*args, **kwargs)
    except (TypeError, ValueError):  # builtins without a Python signature
        return None
    bound.apply_defaults()
    return bound.arguments


class _Recorder(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _DROPOUT:
            p_name, p_pos, train_pos = _DROPOUT[name]
            bound = _arguments(func, args, kwargs)  # Python functions: their defaults apply (F.alpha_dropout: eval)
            if bound is None:  # builtins: torch.dropout(input, p, train), SDPA(q, k, v, mask, dropout_p)
                bound = dict(kwargs)
                for pos, key in ((p_pos, p_name), (train_pos, "train")):
                    if pos is not None and len(args) > pos:
                        bound[key] = args[pos]
            p = bound.get(p_name, 0.0)
            train = bound.get("training", bound.get("train", True))
            if train and float(p) > 0:
                self.calls.append(f"{name}({p_name}={float(p):g})")
        elif name in _RANDOM:
            self.calls.append(name)
        return func(*args, **kwargs)


def _states() -> dict[str, Any]:
    states: dict[str, Any] = {"torch generator": torch.get_rng_state(), "random": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["torch.cuda generator"] = torch.cuda.get_rng_state_all()
    np = sys.modules.get("numpy")
    if np is not None:
        states["numpy.random"] = np.random.get_state()
    return states


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if hasattr(a, "shape") and hasattr(a, "dtype"):  # numpy array
        return a.shape == b.shape and bool((a == b).all())
    return a == b


def train_noise(model: nn.Module, *args: Any, **kwargs: Any) -> list[str]:
    """The random operations one ``train()`` forward ``model(*args, **kwargs)`` runs, in call order.

    Each entry names a dropout-family call with its probability (``"dropout(p=0.1)"``,
    ``"scaled_dot_product_attention(dropout_p=0.1)"``), a random draw (``"rand"``,
    ``"bernoulli_"``) or a generator advanced by an operation not listed
    (``"torch generator advanced"``, ``"numpy.random advanced"``, ``"random advanced"``).
    After ``surgery.apply(model, dropout=0.0, drop_path=0.0)`` it is ``[]`` for every model
    of the test zoo. Runs without autograd; the generators and the model's mode are restored.
    """
    was = {m: m.training for m in model.modules()}
    np = sys.modules.get("numpy")
    np_state = np.random.get_state() if np is not None else None
    py_state = random.getstate()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    recorder = _Recorder()
    try:
        with torch.random.fork_rng(devices=devices):
            before = _states()
            model.train()
            with torch.no_grad(), recorder:
                model(*args, **kwargs)
            after = _states()
    finally:
        for m, mode in was.items():
            m.training = mode
        random.setstate(py_state)
        if np_state is not None:
            np.random.set_state(np_state)
    calls = list(recorder.calls)
    explained = {"torch generator", "torch.cuda generator"} if calls else set()  # torch draws are recorded
    calls += [f"{n} advanced" for n in before if n not in explained and not _same(before[n], after[n])]
    return calls
