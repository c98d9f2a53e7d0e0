"""Which random operations does one training forward run? A check by what the model does.

Dropout control finds probabilities by name (``regularizers/rates/kinds.py``); :func:`train_noise`
checks the result by behaviour: it runs one ``train()`` forward under a ``TorchFunctionMode`` that
records every dropout-family call with a non-zero probability (``F.dropout*``,
``F.alpha_dropout``, ``torch.dropout``, ``scaled_dot_product_attention(dropout_p=...)``,
``F.multi_head_attention_forward``) and every random draw (``torch.rand``,
``Tensor.bernoulli_`` ... as DropPath and LayerDrop use), and reports a draw from the
torch, numpy or Python generator that no recorded call explains. ``[]`` means two training
forwards of the same input are deterministic as far as these generators go. A draw from a
one-point distribution (``uniform_(1.0, 1.0)``, ``normal_(m, 0.0)``, ``bernoulli_(0.0 or 1.0)``:
router jitter set to 0 by a model that still draws it) gives a constant and is not listed.

A diagnostic leaves the model as it found it, bitwise (:class:`_Untouched`): a training forward
updates BatchNorm's running statistics and ``num_batches_tracked`` (no ``_version`` bump, no alias
annotation: these buffers are copied before the forward), fills module attributes and config
fields (``config.problem_type``, caches), may write parameters in place (``nn.Embedding(max_norm=)``
renormalises its weight: such writes are seen by a ``TorchDispatchMode`` that copies a parameter
before its first write), and advances generators. All of it is put back afterwards, also when the
forward raises.
"""

from __future__ import annotations

import inspect
import random
import sys
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from .configs import is_config, nested
from .errors import SurgeryError

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
# in-place draws whose distribution can be a single point: name -> (argument, default) after ``self``
_ONE_POINT = {"uniform_": (("from", 0.0), ("to", 1.0)), "normal_": (("mean", 0.0), ("std", 1.0)),
              "bernoulli_": (("p", 0.5),)}


def _arguments(func, args, kwargs) -> dict[str, Any] | None:
    try:
        bound = inspect.signature(func).bind(*args, **kwargs)
    except (TypeError, ValueError):  # builtins without a Python signature
        return None
    bound.apply_defaults()
    return bound.arguments


def _one_point(name: str, args, kwargs) -> bool:
    """A draw whose every value is the same constant (``uniform_(1.0, 1.0)``): not randomness."""
    values = [args[1 + i] if len(args) > 1 + i else kwargs.get(key, default)
              for i, (key, default) in enumerate(_ONE_POINT[name])]
    if not all(type(v) in (int, float) for v in values):
        return False
    if name == "uniform_":
        return values[0] == values[1]
    return values[-1] == 0 if name == "normal_" else values[0] in (0, 1)


class _Recorder(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls: list[str] = []
        self.constant_draws = 0  # draws from one-point distributions: they advance the generator only

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
        elif name in _ONE_POINT and _one_point(name, args, kwargs):
            self.constant_draws += 1
        elif name in _RANDOM:
            self.calls.append(name)
        return func(*args, **kwargs)


# ---- generators -------------------------------------------------------------------------------

def _generator_state(obj: Any) -> Any:
    """The state of a random generator (torch, numpy, Python), or None for anything else."""
    if isinstance(obj, torch.Generator):
        return obj.get_state()
    if isinstance(obj, random.Random):
        return obj.getstate()
    np = sys.modules.get("numpy")
    if np is not None and isinstance(obj, np.random.RandomState):
        return obj.get_state()
    if np is not None and isinstance(obj, np.random.Generator):
        return obj.bit_generator.state
    return None


def _set_generator_state(obj: Any, state: Any) -> None:
    if isinstance(obj, torch.Generator):
        obj.set_state(state)
    elif isinstance(obj, random.Random):
        obj.setstate(state)
    elif hasattr(obj, "bit_generator"):
        obj.bit_generator.state = state
    else:
        obj.set_state(state)


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
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if hasattr(a, "shape") and hasattr(a, "dtype"):  # numpy array
        return a.shape == b.shape and bool((a == b).all())
    return a == b


# ---- leaving the model as it was ----------------------------------------------------------------

def _storage(t: torch.Tensor) -> int | None:
    """A key for the memory ``t`` lives in (None: no real memory: meta, fake or empty tensors)."""
    try:
        ptr = t.untyped_storage().data_ptr()
    except Exception:  # noqa: BLE001 - tensor subclasses without storage (DTensor wrappers, fakes)
        return None
    return ptr or None


def _where(t: torch.Tensor) -> tuple:
    """Where ``t``'s data lives: changed by ``t.data = other``."""
    try:
        return _storage(t), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device
    except (RuntimeError, NotImplementedError):  # sparse layouts have no strides
        return _storage(t), tuple(t.shape), t.dtype, t.device


_WRITES: dict[Any, list[str]] = {}  # op -> names of the arguments its schema says it writes


def _written(func, args, kwargs) -> list[torch.Tensor]:
    names = _WRITES.get(func)
    if names is None:
        schema = getattr(func, "_schema", None)
        names = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write] \
            if schema is not None else []
        _WRITES[func] = names
    if not names:
        return []
    positions = {a.name: i for i, a in enumerate(func._schema.arguments)}
    out = []
    for n in names:
        v = kwargs[n] if n in kwargs else (args[positions[n]] if positions[n] < len(args) else None)
        out += [t for t in (v if isinstance(v, (list, tuple)) else [v]) if isinstance(t, torch.Tensor)]
    return out


class _CopyBeforeWrite(TorchDispatchMode):
    """Copies a watched tensor (a parameter, a gradient) before the first operation that writes it."""

    def __init__(self, watched: dict[int, list[torch.Tensor]]):
        super().__init__()
        self.watched, self.saved = watched, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in _written(func, args, kwargs):
            key = _storage(t)
            if key in self.watched and key not in self.saved:
                self.saved[key] = [(w, w.detach().clone()) for w in self.watched[key]]
        return func(*args, **kwargs)


def _containers(obj: Any) -> list[tuple[Any, Any]]:
    """``(container, its contents)`` for the dict/list/set attributes of ``obj`` (one level)."""
    out = []
    for v in vars(obj).values():
        if isinstance(v, dict):
            out.append((v, list(v.items())))
        elif isinstance(v, (list, set)):
            out.append((v, list(v)))
    return out


def _unchanged(c: Any, items: list) -> bool:
    now = list(c.items()) if isinstance(c, dict) else list(c)
    if len(now) != len(items):
        return False
    if isinstance(c, dict):
        return all(k == j and v is w for (k, v), (j, w) in zip(now, items))
    return all(a is b for a, b in zip(now, items))


def _restore_container(c: Any, items: list) -> None:
    if _unchanged(c, items):
        return
    c.clear()
    if isinstance(c, list):
        c.extend(items)
    else:
        c.update(items)


def _check_materialised(model: nn.Module) -> None:
    """A lazy module would be materialised by the forward: the diagnostic cannot leave it as it was."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if isinstance(t, nn.parameter.UninitializedTensorMixin):
            raise SurgeryError(f"train_noise runs a forward, which would materialise the lazy module owning {name!r} "
                               "(its shapes are not known yet); run one forward first, then call train_noise")


class _Untouched:
    """Everything of ``model`` a forward can change, taken before it, put back by :meth:`restore`:
    module attributes (train flags, hooks, caches) and their dict/list/set contents, the fields of
    every config the modules hold, buffers and tensor attributes (copied), parameters and their
    gradients (copied before a write), the ``.data`` each tensor points at, and generators the
    modules hold."""

    def __init__(self, model: nn.Module):
        modules = list(model.modules())
        _check_materialised(model)
        configs = {id(c): c for m in modules for v in vars(m).values() if is_config(v) for _, c in nested(v)}
        self.objects = [(o, dict(vars(o))) for o in modules + list(configs.values())]
        self.containers = [pair for o, _ in self.objects for pair in _containers(o)]
        params = {id(p): p for m in modules for p in m._parameters.values() if p is not None}
        grads = [p.grad for p in params.values() if p.grad is not None]
        copied = {id(t): t for m in modules for t in list(m._buffers.values()) + list(vars(m).values())
                  if isinstance(t, torch.Tensor) and id(t) not in params}
        self.copies = [(t, t.detach().clone()) for t in copied.values() if _storage(t) is not None]
        self.grads = {id(p): p.grad for p in params.values()}
        tensors = list(params.values()) + grads + list(copied.values())
        self.places = [(t, _where(t), t.data) for t in tensors]
        watched: dict[int, list[torch.Tensor]] = {}
        for t in list(params.values()) + grads:
            key = _storage(t)
            if key is not None:
                watched.setdefault(key, []).append(t)
        self.guard = _CopyBeforeWrite(watched)
        self.params = params
        self.generators = [(m, k, v, _generator_state(v)) for m in modules for k, v in vars(m).items()
                           if _generator_state(v) is not None]

    def advanced(self, torch_draws: bool) -> list[str]:
        """Generators held by modules whose state changed since the snapshot; a torch generator's
        draws are listed already when ``torch_draws``."""
        return [f"{type(m).__name__}.{k} advanced" for m, k, g, s in self.generators
                if not (torch_draws and isinstance(g, torch.Generator)) and not _same(_generator_state(g), s)]

    def restore(self) -> None:
        with torch.no_grad():
            for t, where, data in self.places:  # ``t.data = other`` in forward
                if _where(t) != where:
                    t.data = data
            for pairs in self.guard.saved.values():
                for t, copy in pairs:
                    t.copy_(copy)
            for t, copy in self.copies:
                if not torch.equal(t, copy):  # NaN != NaN: a tensor holding NaN is copied back too
                    t.copy_(copy)
        for p in self.params.values():
            if p.grad is not self.grads[id(p)]:
                p.grad = self.grads[id(p)]
        for c, items in self.containers:
            _restore_container(c, items)
        for obj, attrs in self.objects:
            now = vars(obj)
            for k in [k for k in now if k not in attrs]:
                del now[k]
            for k, v in attrs.items():
                if now.get(k, attrs) is not v:
                    now[k] = v
        for _, _, g, state in self.generators:
            _set_generator_state(g, state)


def train_noise(model: nn.Module, *args: Any, **kwargs: Any) -> list[str]:
    """The random operations one ``train()`` forward ``model(*args, **kwargs)`` runs, in call order.

    Each entry names a dropout-family call with its probability (``"dropout(p=0.1)"``,
    ``"scaled_dot_product_attention(dropout_p=0.1)"``), a random draw (``"rand"``,
    ``"bernoulli_"``) or a generator advanced by an operation not listed
    (``"torch generator advanced"``, ``"numpy.random advanced"``, ``"random advanced"``, or a
    generator a module holds: ``"MyNoise.gen advanced"``).
    After ``surgery.apply(model, dropout=0.0, drop_path=0.0, router_noise=0.0)`` it is ``[]`` for
    every model of the test zoo. Runs without autograd, and leaves the model bitwise as it found it:
    parameters, gradients, buffers (BatchNorm statistics), module attributes, config fields,
    train/eval flags and the torch, numpy and Python generators.

    Raises:
        SurgeryError: the model holds lazy modules (the forward would materialise them).
        Whatever the forward raises; the model is put back first.
    """
    np = sys.modules.get("numpy")
    np_state = np.random.get_state() if np is not None else None
    py_state = random.getstate()
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    devices = list(range(torch.cuda.device_count())) if cuda else []
    recorder, untouched = _Recorder(), _Untouched(model)
    try:
        with torch.random.fork_rng(devices=devices):
            before = _states()
            model.train()
            with torch.no_grad(), recorder, untouched.guard:
                model(*args, **kwargs)
            after = _states()
            held = untouched.advanced(bool(recorder.calls or recorder.constant_draws))
    finally:
        untouched.restore()
        random.setstate(py_state)
        if np_state is not None:
            np.random.set_state(np_state)
    calls = list(recorder.calls)
    explained = {"torch generator", "torch.cuda generator"} if calls or recorder.constant_draws else set()
    calls += [f"{n} advanced" for n in before if n not in explained and not _same(before[n], after[n])]
    return calls + held
