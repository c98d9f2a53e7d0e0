"""What a multi-sample-dropout head must be: a module mapping one feature tensor to the outputs."""

from __future__ import annotations

import inspect

from torch import nn

from ...errors import HeadError

__all__ = ["check_msd_head", "head_weights"]


def _required_inputs(module: nn.Module) -> list[str] | None:
    """Names of the positional parameters of ``module.forward`` without a default (None: unknown)."""
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return None
    return [n for n, p in sig.parameters.items()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]


def check_msd_head(view, name: str) -> None:
    """Refuse a module that cannot be a multi-sample-dropout head.

    A valid head maps one feature tensor to the outputs: it holds parameters and its
    ``forward`` takes exactly one required positional input (``nn.Linear``, ``nn.Sequential``,
    transformers classification heads ``forward(hidden_states)``, a custom ``forward(x)``; other
    parameters need defaults). A backbone (``forward(input_ids=None, attention_mask=None, ...)``)
    or a module taking several inputs is not one: its K dropout samples would be token ids.

    Raises:
        HeadError: the module holds no parameters, or its forward does not take exactly one
            required input.
    """
    module = view.modules[name]
    if not view.params_under(name):
        raise HeadError(f"head {name!r} ({type(module).__name__}) holds no parameters, so it is not a task head; "
                        "point head= at the layer(s) that compute the outputs from the features, e.g. the final "
                        "nn.Linear")
    required = _required_inputs(module)
    if required is not None and len(required) != 1:
        got = "no required input" if not required else f"{len(required)} required inputs ({', '.join(required)})"
        raise HeadError(
            f"head {name!r} ({type(module).__name__}) is not a task head: a multi-sample-dropout head takes one "
            f"feature tensor and returns the outputs, but its forward takes {got}. Point head= at the module "
            "that maps the backbone's features to the outputs (e.g. 'classifier', or an inner nn.Linear)"
        )


def head_weights(view, head: str, trainable: dict[str, int], first: dict[str, str]) -> int:
    """The trainable weights of the head ``head`` (each Parameter once): what multi-sample dropout covers."""
    names = {first[n] for n in view.params if n.startswith(head + ".")}
    return sum(trainable[n] for n in names & trainable.keys())
