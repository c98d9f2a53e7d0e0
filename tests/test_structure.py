"""The package's shape, read from its source: imports run one way (no circle, no import of a higher
layer, lazy imports included), a regularizer is one registered unit whose face needs no torch,
``apply``/``revert`` walk the module tree once, and the public face is what the docs teach."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, tiny_bert

import surgery

PKG = Path(surgery.__file__).parent

# lower layers never import higher ones; a module may import its own layer and below. A regularizer's face
# (surgery/regularizers/<name>/__init__.py, torch-free) sits low, so every reader of a record can loop over
# the registry; its torch part (the other modules of its package) sits above the layers it installs.
LAYERS = [
    ("ground", ["errors", "schema", "patterns", "wording", "options", "entry", "outputs", "interrupts", "zero"]),
    ("regularizer faces", ["regularizers"]),
    ("the record", ["record", "configs", "describing", "wrappers", "view", "remote_code"]),
    ("layers", ["layers"]),
    ("regularizer plans", ["regularizers/plans"]),
    ("engine", ["engine", "coverage", "distributed", "noise"]),
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


def _is_face(mod: str) -> bool:
    """The registry, the unit interface and each unit's face (a unit package's ``__init__``)."""
    parts = mod.split(".")
    return parts[0] == "regularizers" and (len(parts) == 1 or parts[1] in ("registry", "unit") or (
        len(parts) == 2 and (PKG / "regularizers" / parts[1]).is_dir()))


def _layer(mod: str) -> int:
    head = mod.split(".")[0]
    if head == "regularizers" and not _is_face(mod):
        head = "regularizers/plans"
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


def test_a_regularizer_is_one_registered_unit():
    """Each registered unit: its face in ``regularizers/<name>/__init__.py``, its torch part a module of the same
    package, its options, sections and coverage key its own; every unit package on disk is registered."""
    from surgery import regularizers

    units = regularizers.units()
    assert len({u.name for u in units}) == len(units)
    for u in units:
        assert isinstance(u, regularizers.Regularizer)
        assert type(u).__module__ == f"surgery.regularizers.{u.name}", u
        assert u.planner.startswith(f"surgery.regularizers.{u.name}.") and u.torch_part().plan, u
    on_disk = {p.name for p in (PKG / "regularizers").iterdir() if (p / "__init__.py").is_file()}
    assert on_disk == {u.name for u in units}
    options = [o.name for u in units for o in u.options]
    assert len(options) == len(set(options))


def test_reading_a_record_imports_no_torch():
    """The faces, the record, describe and the CLI need no torch: ``surgery inspect``/``convert`` start fast."""
    code = ("import sys, surgery, surgery.regularizers, surgery.record, surgery.describing, surgery.cli, "
            "surgery.checkpoint; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": ROOT})


@pytest.mark.parametrize("kwargs", [dict(mixout=0.1, dropout=0.0, msd=4), dict(mixout=0.1, drop_path=0.0),
                                    dict(msd=2, msd_layers=True)], ids=str)
def test_apply_and_revert_walk_the_module_tree_once(walks, kwargs):
    model = tiny_bert(layers=2)
    surgery.apply(model, **kwargs)
    assert walks == ["BertForSequenceClassification"]
    walks.clear()
    surgery.revert(model, drop_layer_weights=True)
    assert walks == ["BertForSequenceClassification"]


TAUGHT = re.compile(r"(?<!from )(?<!import )surgery\.([A-Za-z][A-Za-z_]*)")  # what code uses, not what it imports


def _taught() -> set[str]:
    """The names the docs (README, docs/*.md) and examples use as ``surgery.<name>``."""
    texts = [Path(ROOT, "README.md"), *Path(ROOT, "docs").glob("*.md"), *Path(ROOT, "examples").rglob("*.py")]
    return {m.group(1) for p in texts for m in TAUGHT.finditer(p.read_text(encoding="utf-8"))}


def test_the_face_is_what_the_docs_teach():
    """``__all__`` holds every top-level name the docs teach, and nothing they do not; the subpackages they
    name resolve; nothing else does (no alias of an unreleased name)."""
    from surgery import errors

    subpackages = set(surgery._SUBMODULES)
    taught = _taught() - subpackages - {"json", "exe"}  # surgery.json (a file), surgery.exe (a console script)
    assert set(surgery.__all__) == taught | set(errors.__all__)  # the error types are named without the prefix
    for name in surgery.__all__:
        assert getattr(surgery, name) is not None
    for name in subpackages:
        assert getattr(surgery, name).__name__ == f"surgery.{name}"
    for gone in ("MixLinear", "RankSeedCallback", "TrainingLoss", "msd_forward", "rdrop_loss_fn"):
        with pytest.raises(AttributeError):
            getattr(surgery, gone)
    assert callable(surgery.checkpoint.save)
    assert os.path.basename(surgery.__file__) == "__init__.py"
