"""The model as ``apply`` sees it, read in one walk of the module tree.

:class:`View` walks ``root.named_modules(remove_duplicate=False)`` once and keeps what every
regularizer plans from: the modules by name (and every name a shared module has), the
parameters by name (every name of a tied one), the buffers, the configs the modules hold, and
what is frozen. Nothing else in ``apply`` walks the model; regularizers read the view.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterator

import torch
from torch import nn

from .configs import is_config, nested

__all__ = ["View"]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


class View:
    """One walk of ``root``'s module tree.

    Attributes:
        root: the model.
        title: its class name, for messages.
        modules: dotted name -> module, each module once under its first name, in walk order.
        names: ``id(module)`` -> every name the module is registered under.
        params: dotted name -> Parameter, every name of a tied Parameter included.
        param_names: ``id(Parameter)`` -> its names.
        buffers: dotted name -> buffer.
        held: ``(module name, module, attribute, config)`` for every transformers config a module
            holds directly, in module order.
    """

    def __init__(self, root: nn.Module):
        self.root = root
        self.title = type(root).__name__
        self.modules: dict[str, nn.Module] = {}
        self.names: dict[int, list[str]] = defaultdict(list)
        self.params: dict[str, nn.Parameter] = {}
        self.param_names: dict[int, list[str]] = defaultdict(list)
        self.buffers: dict[str, torch.Tensor] = {}
        self.held: list[tuple[str, nn.Module, str, Any]] = []
        for name, m in root.named_modules(remove_duplicate=False):
            first = id(m) not in self.names
            self.names[id(m)].append(name)
            for pname, prm in m._parameters.items():
                if prm is not None:
                    full = _join(name, pname)
                    self.params[full] = prm
                    self.param_names[id(prm)].append(full)
            for bname, buf in m._buffers.items():
                if buf is not None:
                    self.buffers[_join(name, bname)] = buf
            if first:
                self.modules[name] = m
                self.held += [(name, m, k, v) for k, v in vars(m).items() if is_config(v)]

    # ---- reading it ------------------------------------------------------------------------
    def under(self, prefix: str) -> Iterator[tuple[str, nn.Module]]:
        """``(name, module)`` of ``prefix`` and every module inside it."""
        dotted = prefix + "."
        for n, m in self.modules.items():
            if not prefix or n == prefix or n.startswith(dotted):
                yield n, m

    def params_under(self, prefix: str) -> list[nn.Parameter]:
        """The Parameters of the module ``prefix`` and its submodules, each once."""
        dotted, seen, out = prefix + ".", set(), []
        for n, p in self.params.items():
            if (not prefix or n.startswith(dotted)) and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    def tied(self, param_name: str) -> list[str]:
        """The other names of the Parameter ``param_name`` (tied weights), in walk order."""
        return [n for n in self.param_names[id(self.params[param_name])] if n != param_name]

    def configs(self) -> list[tuple[str, list[str], Any]]:
        """``(module name, path, config)`` for every distinct config, nested ones included (``path``
        leads from ``<module>.config`` to it; ``[]`` for the config itself)."""
        seen: set[int] = set()
        out = []
        for name, _, attr, cfg in self.held:
            if attr != "config":
                continue
            for path, c in nested(cfg):
                if id(c) not in seen:
                    seen.add(id(c))
                    out.append((name, path, c))
        return out

    def tensors(self) -> Iterator[tuple[str, str, torch.Tensor]]:
        """``(kind, name, tensor)`` of every parameter and buffer."""
        yield from (("parameter", n, p) for n, p in self.params.items())
        yield from (("buffer", n, b) for n, b in self.buffers.items())
