"""The package's shape, read from its source: imports run one way (no circle, no import of a higher
layer, lazy imports included) and ``apply``/``revert`` walk the module tree once."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
from torch import nn
from conftest import tiny_bert

import surgery

PKG = Path(surgery.__file__).parent

# lower layers never import higher ones; a module may import its own layer and below
LAYERS = [
    ("ground", ["errors", "schema", "patterns", "record", "arguments", "wrappers", "configs", "outputs", "interrupts",
                "describing", "view", "remote_code"]),
    ("layers", ["layers"]),
    ("regularizers", ["regularizers"]),
    ("engine", ["engine", "distributed", "noise"]),
    ("checkpoint I/O and export", ["checkpoint", "exporting", "loading"]),
    ("training", ["training"]),
    ("comparison", ["compare"]),  # surgery compare: built on the public API (import surgery) and the errors
    ("face", ["cli", "__init__", "__main__"]),
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(mod: str, path: Path, known: set[str]) -> set[str]:
    """Every package module ``mod`` imports, at any depth of its code (lazy imports count)."""
    is_pkg = path.name == "__init__.py"
    base = mod.split(".") if is_pkg and mod != "__init__" else mod.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            anchor = base[:len(base) - (node.level - 1)] if node.level > 1 else base
            stem = ".".join(anchor + ([node.module] if node.module else []))
            targets = [stem] + [f"{stem}.{a.name}" if stem else a.name for a in node.names]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            targets = [n[len("surgery."):] for n in names if n.startswith("surgery.")]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != mod:
                out.add(t)
    return out


def _layer(mod: str) -> int:
    head = mod.split(".")[0]
    return next(i for i, (_, tops) in enumerate(LAYERS) if head in tops)


def test_every_module_has_a_layer_and_imports_run_one_way():
    mods = _modules()
    graph = {m: _imports(m, p, set(mods)) for m, p in mods.items()}
    upward = [f"{m} ({LAYERS[_layer(m)][0]}) imports {t} ({LAYERS[_layer(t)][0]})"
              for m, ts in graph.items() for t in ts if _layer(t) > _layer(m)]
    assert not upward, "\n".join(upward)
    # no circle, lazy imports included: a depth-first search finds no back edge
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_a_regularizer_is_one_file_listed_once():
    from surgery.regularizers import REGULARIZERS
    from surgery.regularizers.base import Regularizer

    files = {type(r).__module__ for r in REGULARIZERS}
    assert len(files) == len(REGULARIZERS) and all(isinstance(r, Regularizer) for r in REGULARIZERS)
    on_disk = {f"surgery.regularizers.{p.stem}" for p in (PKG / "regularizers").glob("*.py")
               # lora.py: Mixout's rule for LoRA adapters; selection.py: what every Mixout rule selects from
               if p.stem not in ("__init__", "base", "lora", "selection")}
    assert files == on_disk


@pytest.fixture
def walks(monkeypatch):
    """Counts the walks of the module tree that start at the model's root (a walk's recursion into
    submodules is not counted; a walk of a submodule is)."""
    calls = []
    real = nn.Module.named_modules

    def counting(self, memo=None, prefix="", remove_duplicate=True):
        if memo is None and not prefix:
            calls.append(type(self).__name__)
        return real(self, memo, prefix, remove_duplicate)

    monkeypatch.setattr(nn.Module, "named_modules", counting)
    return calls


@pytest.mark.parametrize("kwargs", [dict(mixout=0.1, dropout=0.0, msd=4), dict(mixout=0.1, drop_path=0.0),
                                    dict(msd=2, msd_layers=True)], ids=str)
def test_apply_and_revert_walk_the_module_tree_once(walks, kwargs):
    model = tiny_bert(layers=2)
    surgery.apply(model, **kwargs)
    assert walks == ["BertForSequenceClassification"]
    walks.clear()
    surgery.revert(model, drop_layer_weights=True)
    assert walks == ["BertForSequenceClassification"]


def test_the_face_is_small_and_old_names_still_resolve():
    assert len(surgery.__all__) <= 16
    for name in ("MixLinear", "rdrop_loss", "SurgeryTrainer", "export", "msd_loss", "param_groups", "Record"):
        assert getattr(surgery, name) is not None
    assert callable(surgery.checkpoint.save)
    assert os.path.basename(surgery.__file__) == "__init__.py"
