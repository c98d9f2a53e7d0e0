"""Shared test helpers: the tiny BERT most test files build, the "model untouched" check every bad-input
test makes, the walk counter, and the limits on every process the suite starts.

tests/ mirrors the package: ``tests/test_<module>.py`` for a module of ``surgery/`` (engine, options,
record, view, configs, exporting, loading, noise, distributed, wrappers ...), ``tests/<package>/`` for a
package (``layers/``, ``checkpoint/``, ``cli/``, ``training/``, and ``regularizers/<name>/`` for each
regularizer); the project's own checks (structure, docs, examples, the architecture zoo) sit at the top.
Helpers shared across folders are modules here: ``zoo.py`` (architectures), ``agreement.py``,
``fake_checkpoint.py``, ``training_setup.py`` (the tiny model, dataset and Trainer arguments).

Test modules import the builders directly (``from conftest import tiny_bert``; pytest puts
``tests/`` on the path, as for ``zoo``), so they also work in parametrize tables built at import
time; the fixtures of the same names serve tests that prefer fixtures. The architecture zoo
lives in ``zoo.py``.
"""

from __future__ import annotations

import datetime
import json
import importlib.abc
import importlib.machinery
import os
import signal
import subprocess
import sys
import tempfile
import time
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification

import surgery

__all__ = ["tiny_bert_config", "tiny_bert", "snapshot", "assert_untouched", "run_python", "spawn", "init_gloo",
           "finish_worker", "import_timm", "ROOT"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_bert_config(*, layers: int = 1, num_labels: int = 3, **cfg):
    """BERT config: vocabulary 50, hidden 16, 2 heads, FFN 20, 32 positions (``cfg`` overrides)."""
    kw = dict(vocab_size=50, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=20,
              max_position_embeddings=32, num_labels=num_labels)
    kw.update(cfg)
    return AutoConfig.for_model("bert", **kw)


def tiny_bert(seed: int = 0, *, layers: int = 1, num_labels: int = 3, **cfg) -> nn.Module:
    """A freshly initialised tiny ``BertForSequenceClassification``, the same weights for the same seed."""
    config = tiny_bert_config(layers=layers, num_labels=num_labels, **cfg)
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(config)


def snapshot(model: nn.Module) -> dict:
    """Everything a refused ``apply`` must leave as it was."""
    return {
        "classes": [(n, type(m)) for n, m in model.named_modules()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "params": [id(p) for p in model.parameters()],
        "dropout": [m.p for m in model.modules() if isinstance(m, nn.Dropout)],
        "config": model.config.to_dict() if hasattr(model, "config") else None,
        "dict": set(vars(model)),
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
        "record": _record_json(model),
    }


def _record_json(model: nn.Module):
    rec = surgery.get_record(model, required=False)
    return None if rec is None else rec.to_json()


def assert_untouched(model: nn.Module, snap: dict) -> None:
    """``model`` is as ``snap`` saw it: classes, bitwise state_dict, Parameters, dropout, config, hooks, record."""
    now = snapshot(model)
    assert now["classes"] == snap["classes"]
    assert now["state"].keys() == snap["state"].keys()
    for k, v in snap["state"].items():
        w = now["state"][k]
        assert w.dtype == v.dtype and w.device == v.device and w.shape == v.shape, k
        assert v.is_meta or torch.equal(w, v), k  # meta tensors hold no data to compare
    assert now["params"] == snap["params"]
    assert now["dropout"] == snap["dropout"] and now["config"] == snap["config"]
    assert now["dict"] == snap["dict"] and now["hooks"] == snap["hooks"]
    assert now["record"] == snap["record"]  # a plain model stays without a record


@pytest.fixture(name="tiny_bert")
def _tiny_bert_fixture():
    """The :func:`tiny_bert` builder."""
    return tiny_bert


@pytest.fixture
def walks(monkeypatch):
    """The walks of a module tree that start at a model's root, by the root's class name (a walk's recursion
    into submodules is not counted; a walk of a submodule is)."""
    calls = []
    real = nn.Module.named_modules

    def counting(self, memo=None, prefix="", remove_duplicate=True):
        if memo is None and not prefix:
            calls.append(type(self).__name__)
        return real(self, memo, prefix, remove_duplicate)

    monkeypatch.setattr(nn.Module, "named_modules", counting)
    return calls


@pytest.fixture(name="untouched")
def _untouched_fixture():
    """``check = untouched(model)`` before a call that must be refused; ``check()`` after it."""
    def take(model):
        snap = snapshot(model)
        return lambda: assert_untouched(model, snap)
    return take


# ---- processes: every one the suite starts has a wall-clock limit ------------------------------------

def run_python(args, timeout=300, env=None):
    """Run ``python *args`` from the project root in its own process group; on timeout the whole group
    (torchrun's workers too) is killed. Returns ``(returncode, the last 3000 characters of stderr)``."""
    p = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, env=env)
    try:
        _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        _, err = p.communicate()
        return -1, f"timed out after {timeout} s\n{err[-3000:]}"
    return p.returncode, err[-3000:]


def spawn(fn, args=(), nprocs: int = 2, timeout: float = 240) -> None:
    """``torch.multiprocessing.spawn(fn, args, nprocs)`` under a wall-clock limit: past ``timeout`` seconds
    every worker is killed and the test fails (a stall in rendezvous, a collective or a destructor
    cannot hang the suite). A worker's exception fails the test as with ``mp.spawn``."""
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{fn.__name__}: {nprocs} workers still running after {timeout} s; killed")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(10)


def spawn_ranks(fn, name: str, world: int = 2) -> list[dict]:
    """:func:`spawn` ``fn(rank, world, tmp)`` in ``world`` workers, each writing ``tmp/<name><rank>.json``;
    what the ranks wrote, in rank order."""
    with tempfile.TemporaryDirectory() as tmp:
        spawn(fn, args=(world, tmp), nprocs=world)
        return [json.load(open(os.path.join(tmp, f"{name}{r}.json"))) for r in range(world)]


def init_gloo(rank: int, world: int, tmp: str) -> None:
    """A gloo process group for a spawned test worker; a collective that waits past 180 s raises."""
    dist.init_process_group("gloo", init_method="file://" + os.path.join(tmp, "rendezvous"), rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=180))


def finish_worker() -> None:
    """End a spawned worker once its results are written: wait for the other ranks, then leave without
    running destructors (torch's gloo group can deadlock tearing down a DDP reducer at exit)."""
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---- timm without torchvision ----------------------------------------------------------------------

class _TorchvisionStandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves ``torchvision`` and every ``torchvision.*`` module as an empty package whose names are
    placeholder classes that refuse to be instantiated.

    ``import timm`` reads these torchvision names at import time, and no model's forward uses them:
    ``torchvision.ops.misc.FrozenBatchNorm2d`` (timm.layers' BatchNorm freezing helpers),
    ``torchvision.transforms(.functional)`` with ``InterpolationMode`` and ``torchvision.datasets``
    (timm.data, which the model files import for the ImageNet mean/std constants), and
    ``torchvision.models.feature_extraction`` (optional). A placeholder's attributes are strings, so
    ``InterpolationMode.BILINEAR`` works as a dict key.
    """

    class _Placeholder(type):
        def __getattr__(cls, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return f"{cls.__module__}.{cls.__name__}.{name}"

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module, made = types.ModuleType(spec.name), {}

        def placeholder(name, module_name=spec.name):
            if name.startswith("__"):
                raise AttributeError(name)

            def refuse(self, *args, **kwargs):
                raise RuntimeError(f"{module_name}.{name} is a test stand-in (torchvision is not importable here)")
            return made.setdefault(name, self._Placeholder(name, (), {"__init__": refuse, "__module__": module_name}))
        module.__getattr__, module.__path__ = placeholder, []
        return module

    def exec_module(self, module):
        pass


def import_timm():
    """``timm``, imported with the torchvision stand-in (:class:`_TorchvisionStandIn`) when torchvision is
    not already loaded: the registry's torchvision wheel is a CUDA build whose compiled ops fail to load
    with CPU torch, and timm imports torchvision at import time. The stand-in is removed from
    ``sys.modules`` once timm is imported, so nothing else in the session sees it."""
    if "timm" in sys.modules or "torchvision" in sys.modules:
        import timm
        return timm
    finder = _TorchvisionStandIn()
    sys.meta_path.insert(0, finder)
    try:
        import timm
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
    return timm


# ---- tiny models train faster on one thread --------------------------------------------------------

@pytest.fixture(name="one_torch_thread")
def _one_torch_thread():
    """torch on one intra-op thread for the test, restored after: tiny models lose more to thread
    hand-offs than they gain (several times over on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
