"""The one swap mechanism of every Mixout layer family: how a Mixout layer takes a module's place and
gives it back.

A Mixout layer (:class:`MixoutLayer`: :class:`~surgery.layers.mixout.MixLinear` for ``nn.Linear`` and
``Conv1D``, :class:`~surgery.layers.mixout.LoraMixout` for a LoRA adapter's ``lora_A``,
:class:`~surgery.layers.experts.MixoutParams` for modules whose forward reads its Parameters: fused
experts, routers) is built by ``from_module(module, p, ...)`` sharing the module's Parameter objects
(state_dict keys and optimizer references survive), its hook dictionaries and the attributes libraries
put on it (:func:`carry_over`); ``to_module()`` gives back the original object holding the current
Parameters. Every family has ``mixout_p``, ``orig`` (the dotted class ``to_module`` gives back, the
record's ``orig``) and ``mixout_low_memory``. :func:`unswappable` says why a module cannot be swapped
exactly (the checks every family makes before ``apply`` changes anything).
"""

from __future__ import annotations

import functools
import inspect
import types
import warnings

from torch import nn
from torch.nn.utils import parametrize

from ..record import TARGET_SUFFIX

__all__ = ["MixoutLayer", "carry_over", "rebindable", "unswappable", "MODULE_STATE"]

# what every nn.Module holds in its instance dict: parameters, buffers, children, hook dictionaries, flags
MODULE_STATE = frozenset(vars(nn.Module()))
_HOOK_DICTS = tuple(k for k in sorted(MODULE_STATE) if "hook" in k and isinstance(vars(nn.Module())[k], dict))


def rebindable(value, original: nn.Module) -> bool:
    """Whether :func:`carry_over` can point ``value`` (an instance attribute of ``original``) at the
    module that replaces it: a method bound to ``original``, or a ``functools.partial`` whose first
    argument is ``original`` (how accelerate's ``add_hook_to_module`` wraps ``forward``)."""
    if inspect.ismethod(value):
        return value.__self__ is original
    return isinstance(value, functools.partial) and bool(value.args) and value.args[0] is original


def _rebind(value, original: nn.Module, new: nn.Module):
    if inspect.ismethod(value) and value.__self__ is original:
        return types.MethodType(getattr(type(new), value.__func__.__name__), new)
    if isinstance(value, functools.partial) and value.args and value.args[0] is original:
        bound = functools.partial(value.func, new, *value.args[1:], **value.keywords)
        wrapped = getattr(value, "__wrapped__", None)
        return functools.update_wrapper(bound, _rebind(wrapped, original, new)) if wrapped is not None else bound
    return value


def carry_over(original: nn.Module, new: nn.Module) -> None:
    """``new`` takes ``original``'s place with what hangs on it.

    * Hooks (forward, pre-forward, backward, state-dict, load-state-dict; registered by the user or a
      library): the two modules share the hook dictionaries, so a hook registered on either while
      ``new`` stands in is on both, its handle removes it from both, and ``to_module`` hands them back.
    * Instance attributes a library put on ``original`` (accelerate's ``_hf_hook`` and the
      ``forward`` wrapper its device hooks install, ``_is_hf_initialized`` ...) are set on ``new``;
      methods and partials bound to ``original`` are bound to ``new`` (:func:`rebindable`).
    """
    for key in _HOOK_DICTS:
        vars(new)[key] = vars(original)[key]
    new._is_full_backward_hook = original._is_full_backward_hook
    for key, value in list(vars(original).items()):
        if key in MODULE_STATE or key in vars(new) or key == "_compiled_call_impl":
            continue
        vars(new)[key] = _rebind(value, original, new)


def unswappable(module: nn.Module, what: str = "weight") -> tuple[str, str] | None:
    """``(why, what to do)`` when swapping ``module`` for a Mixout layer could not be exact, else None.

    ``what``: the words for the mixed tensors, ``"weight"`` (a Linear layer) or ``"Parameters"``.
    """
    if parametrize.is_parametrized(module):
        if what == "weight":
            return ("its weight is parametrized (torch.nn.utils.parametrize: parametrizations.weight_norm, "
                    "spectral_norm, orthogonal ...), recomputed from other tensors at every forward",
                    "remove the parametrization first (parametrize.remove_parametrizations(layer, 'weight'))")
        return ("its Parameters are parametrized (torch.nn.utils.parametrize), recomputed from other tensors at "
                "every forward", "remove the parametrization first")
    if what == "weight" and "weight" not in module._parameters:
        return ("its weight is not a Parameter of the layer but a tensor recomputed before every forward "
                "(torch.nn.utils.prune: weight_orig * weight_mask, or the old torch.nn.utils.weight_norm: "
                "weight_g, weight_v)", "make the pruning or weight norm permanent first (prune.remove(layer, "
                "'weight'), torch.nn.utils.remove_weight_norm(layer))")
    thing = "layer" if what == "weight" else "module"
    if vars(module).get("_compiled_call_impl") is not None:
        return (f"it was compiled on its own with {thing}.compile(), whose compiled call runs the {thing} being "
                "replaced", "apply surgery first, then compile (or compile the whole model)")
    forward = vars(module).get("forward")
    if forward is not None and not rebindable(forward, module):
        detail = f" ({type(forward).__name__} {getattr(forward, '__name__', '')!s})" if what == "weight" else ""
        return (f"its forward is replaced on the instance{detail} by code that surgery cannot point at the new "
                f"{thing}", "remove that override before apply")
    return None


class MixoutLayer:
    """What every Mixout layer family shares (see the module doc). A mixin in front of the module class."""

    mixout_p: float = 0.0
    mixout_low_memory: bool = False

    def _adopt(self, original: nn.Module) -> None:
        """Take ``original``'s place: remember it (not a submodule: keys stay), share what hangs on it."""
        vars(self)["_original"] = original
        carry_over(original, self)
        self.train(original.training)

    def _hand_back(self, original: nn.Module) -> nn.Module:
        """``original``, in this layer's training mode and backward-hook flag."""
        original._is_full_backward_hook = self._is_full_backward_hook
        original.train(self.training)
        return original

    @property
    def orig(self) -> str:
        """Dotted class name of the module :meth:`to_module` gives back (the record's ``orig``)."""
        cls = type(vars(self).get("_original"))
        return f"{cls.__module__}.{cls.__qualname__}"

    def to_module(self) -> nn.Module:
        """The original module (same object and class) holding this layer's current Parameters."""
        raise NotImplementedError

    def loaded_target(self, state_dict, prefix: str):
        """The target a plain state dict (one without this layer's target) gives: what its weights are, or
        None when it does not hold them all. A family with a target copy overrides it."""
        return None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A state dict loaded into the surgered model that holds this layer's weight but not its target is a
        plain one (pretrained weights loaded after ``apply``, ``load_state_dict(sd, strict=False)``): the target
        follows the weight it loads, as if ``apply`` had run after the load. A surgered state dict (a
        checkpoint, resume) brings its own target. ``state_dict`` is torch's copy of the caller's."""
        key = prefix + TARGET_SUFFIX
        if key not in state_dict and TARGET_SUFFIX in self._parameters:
            target = self.loaded_target(state_dict, prefix)
            if target is not None:
                state_dict[key] = target
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _warn_frozen(self, fix: str) -> None:
        """Once per ``apply`` (all its layers share the flag): a Mixout layer is training with a frozen weight."""
        state = vars(self).setdefault("_frozen_warning", {})
        if not state:
            state["warned"] = True
            warnings.warn(
                f"surgery: Mixout layer {vars(self).get('_record_name', '?')!r} (and maybe others) holds a frozen "
                "weight (requires_grad=False): Mixout does not train it, and on an untrained weight it is the "
                f"identity. {fix}", UserWarning, stacklevel=3)
