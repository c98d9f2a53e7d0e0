"""Method specs of ``surgery compare``: short strings on the command line, each one regularizer setup.

A spec is knobs joined by ``+``; a knob is ``name`` or ``name=value``; one knob may list several
values (``mixout=0.1,0.3,0.5``), which makes one method per value (a sweep of that knob)::

    baseline                      the model as it is (always run: every difference is to it)
    no_dropout                    = dropout=0: every dropout probability set to 0
    no_drop_path                  = drop_path=0: stochastic depth / LayerDrop off
    mixout / mixout=P             Mixout toward the pretrained weights, p=P (default 0.1)
    msd / msd=K, msd_p=P          multi-sample-dropout head, K samples (default 8), p (default 0.2), the paper's loss
    msd_layers                    the layer-weighted MSD head (K=5, p=0.5, layer p=0.2 unless msd=, msd_p=,
                                  msd_layer_p= say otherwise), the paper's loss
    rdrop / rdrop=A               R-Drop with alpha A (default 1)
    dropout=P, drop_path=P        set every dropout / stochastic-depth rate to P
    mixout=0.1+no_dropout         a combination: Mixout replacing dropout (the Mixout paper's setting)

Parsing needs no model; whether a method fits the model (a head to put MSD on, dropout to switch
off) is checked on the model before any training (:mod:`surgery.compare.models`).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field

from .settings import CompareError

__all__ = ["Method", "parse_methods", "KNOBS", "ALIASES", "DEFAULT_METHODS"]

DEFAULT_METHODS = ("baseline", "no_dropout", "mixout=0.1", "msd=8", "msd_layers", "rdrop=1")


@dataclass(frozen=True)
class Knob:
    kind: str  # "prob" (0 <= p <= 1), "open_prob" (0 < p < 1), "count" (int >= 1), "positive", "flag"
    default: float | int | None  # used for a bare name; None: a value is required
    help: str
    example: str


KNOBS: dict[str, Knob] = {
    "mixout": Knob("open_prob", 0.1, "Mixout probability p toward the pretrained weights", "mixout=0.1"),
    "dropout": Knob("prob", None, "every dropout probability set to this value", "dropout=0"),
    "drop_path": Knob("prob", None, "every stochastic-depth (DropPath / LayerDrop) rate set to this value",
                      "drop_path=0"),
    "msd": Knob("count", 8, "multi-sample-dropout head with K samples (the paper's loss)", "msd=8"),
    "msd_p": Knob("prob", None, "dropout probability of each MSD sample (with msd or msd_layers)", "msd=8+msd_p=0.5"),
    "msd_layers": Knob("flag", None, "the layer-weighted MSD head (QUEST 2nd place)", "msd_layers"),
    "msd_layer_p": Knob("prob", None, "dropout of each layer's summary vector (with msd_layers)",
                        "msd_layers+msd_layer_p=0.1"),
    "rdrop": Knob("positive", 1.0, "R-Drop consistency weight alpha", "rdrop=1"),
}

ALIASES: dict[str, dict[str, float]] = {"baseline": {}, "no_dropout": {"dropout": 0.0},
                                        "no_drop_path": {"drop_path": 0.0}}

# the layer-weighted head's defaults (the QUEST solution's): K=5 samples of p=0.5, each layer's vector at p=0.2
LAYERS_DEFAULTS = {"msd": 5, "msd_p": 0.5, "msd_layer_p": 0.2}
ORDER = ("dropout", "drop_path", "mixout", "msd", "msd_p", "msd_layers", "msd_layer_p", "rdrop")


def _fmt(v) -> str:
    if isinstance(v, bool):
        return ""
    if isinstance(v, int):
        return str(v)
    return f"{v:g}"


@dataclass(frozen=True)
class Method:
    """One regularizer setup: ``knobs`` (name -> value), shown as ``label``."""

    label: str
    knobs: dict = field(default_factory=dict, hash=False)

    @property
    def is_baseline(self) -> bool:
        return not self.knobs

    def apply_kwargs(self, *, last_token: bool = False, head: str | None = None) -> dict:
        """The ``surgery.apply`` keyword arguments (empty for baseline and R-Drop alone); ``head`` names the
        task head for an MSD head (found by name when None)."""
        k = self.knobs
        out = {}
        for name in ("mixout", "dropout", "drop_path"):
            if name in k:
                out[name] = k[name]
        if k.get("msd_layers"):
            out.update(msd=k.get("msd", LAYERS_DEFAULTS["msd"]), msd_p=k.get("msd_p", LAYERS_DEFAULTS["msd_p"]),
                       msd_layers=True, msd_layer_p=k.get("msd_layer_p", LAYERS_DEFAULTS["msd_layer_p"]))
            if last_token:  # a decoder-only backbone: its summary token is the last one, not position 0
                out["msd_pool"] = "last"
        elif "msd" in k:
            out.update(msd=k["msd"], msd_p=k.get("msd_p", 0.2))
        if head is not None and "msd" in out:
            out["head"] = head
        return out

    @property
    def rdrop_alpha(self) -> float:
        return float(self.knobs.get("rdrop", 0.0))

    @property
    def msd_loss(self) -> bool:
        return "msd" in self.knobs or bool(self.knobs.get("msd_layers"))

    def describe(self, *, last_token: bool = False, head: str | None = None) -> str:
        """What the method does, as the calls that make it."""
        parts = []
        kw = self.apply_kwargs(last_token=last_token, head=head)
        if kw:
            parts.append("surgery.apply(model, " + ", ".join(f"{n}={v!r}" for n, v in kw.items()) + ")")
        opts = []
        if self.msd_loss:
            opts.append("msd_loss=True")
        if self.rdrop_alpha:
            opts.append(f"rdrop_alpha={self.rdrop_alpha:g}")
        if opts:
            parts.append("SurgeryTrainer(" + ", ".join(opts) + ")")
        return "; ".join(parts) if parts else "the model as it is"


def _names() -> list[str]:
    return sorted(set(KNOBS) | set(ALIASES))


def _unknown(spec: str, name: str) -> CompareError:
    close = difflib.get_close_matches(name, _names(), n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    return CompareError(f"method {spec!r}: unknown knob {name!r}; {hint}known: {', '.join(_names())}")


def _value(spec: str, name: str, text: str):
    knob = KNOBS[name]
    try:
        v = float(text)
    except ValueError:
        raise CompareError(f"method {spec!r}: {name}={text!r} is not a number (e.g. {knob.example})") from None
    if math.isnan(v) or math.isinf(v):
        raise CompareError(f"method {spec!r}: {name}={text} is not a finite number (e.g. {knob.example})")
    if knob.kind == "count":
        if v != int(v) or v < 1:
            raise CompareError(f"method {spec!r}: {name}={text} must be a whole number >= 1 (e.g. {knob.example})")
        return int(v)
    if knob.kind == "prob" and not 0.0 <= v <= 1.0:
        raise CompareError(f"method {spec!r}: {name}={text} must be a probability in [0, 1] (e.g. {knob.example})")
    if knob.kind == "open_prob" and not 0.0 < v < 1.0:
        raise CompareError(f"method {spec!r}: {name}={text} must be in (0, 1) (e.g. {knob.example}; 0 is baseline)")
    if knob.kind == "positive" and not v > 0:
        raise CompareError(f"method {spec!r}: {name}={text} must be > 0 (e.g. {knob.example}; 0 is baseline)")
    return v


def _parse_one(spec: str) -> list[Method]:
    """The methods of one spec (several for a sweep)."""
    text = spec.strip()
    if not text:
        raise CompareError("an empty method spec; give e.g. 'mixout=0.1' or 'no_dropout'")
    fixed: dict = {}
    shown: list[tuple[str, str | None]] = []  # (label part, knob swept) in the user's order
    sweep: tuple[str, list] | None = None
    for part in text.split("+"):
        name, eq, values = (s.strip() for s in part.partition("="))
        if not name:
            raise CompareError(f"method {spec!r}: an empty part between '+' signs")
        if name in ALIASES:
            if eq:
                raise CompareError(f"method {spec!r}: {name!r} takes no value")
            for k, v in ALIASES[name].items():
                if k in fixed or (sweep and sweep[0] == k):
                    raise CompareError(f"method {spec!r}: {k} is set twice")
                fixed[k] = v
            if name != "baseline":
                shown.append((name, None))
            continue
        if name not in KNOBS:
            raise _unknown(spec, name)
        if name in fixed or (sweep and sweep[0] == name):
            raise CompareError(f"method {spec!r}: {name} is set twice")
        knob = KNOBS[name]
        if knob.kind == "flag":
            if eq:
                raise CompareError(f"method {spec!r}: {name!r} takes no value (write it alone: {knob.example})")
            fixed[name] = True
            shown.append((name, None))
            continue
        if not eq:
            if knob.default is None:
                raise CompareError(f"method {spec!r}: {name} needs a value, e.g. {knob.example}")
            fixed[name] = knob.default
            shown.append((f"{name}={_fmt(knob.default)}", None))
            continue
        vals = [_value(spec, name, v.strip()) for v in values.split(",")]
        if len(vals) > 1:
            if sweep is not None:
                raise CompareError(f"method {spec!r}: sweep one knob at a time ({sweep[0]} and {name} both list "
                                   "several values); write separate methods")
            if len(set(vals)) != len(vals):
                raise CompareError(f"method {spec!r}: {name} lists a value twice")
            sweep = (name, vals)
            shown.append((name, name))
        else:
            fixed[name] = vals[0]
            shown.append((f"{name}={_fmt(vals[0])}", None))
    methods = []
    for v in (sweep[1] if sweep else [None]):
        knobs = dict(fixed)
        if sweep:
            knobs[sweep[0]] = v
        _check_combination(spec, knobs)
        label = "+".join(f"{p}={_fmt(v)}" if swept else p for p, swept in shown) or "baseline"
        methods.append(Method(label, {k: knobs[k] for k in ORDER if k in knobs}))
    return methods


def _check_combination(spec: str, knobs: dict) -> None:
    if "msd_p" in knobs and "msd" not in knobs and not knobs.get("msd_layers"):
        raise CompareError(f"method {spec!r}: msd_p needs an MSD head: add msd=K or msd_layers (e.g. msd=8+msd_p=0.5)")
    if "msd_layer_p" in knobs and not knobs.get("msd_layers"):
        raise CompareError(f"method {spec!r}: msd_layer_p needs msd_layers (e.g. msd_layers+msd_layer_p=0.1)")


def parse_methods(specs) -> list[Method]:
    """The methods of ``specs`` (strings), baseline first (added when missing), each setup once.

    Raises:
        CompareError: a spec that does not parse (the message names the close knob names), a
            value out of range, two swept knobs, a knob that needs another, or the same setup twice.
    """
    if isinstance(specs, str):
        specs = [specs]
    methods: list[Method] = []
    seen: dict[tuple, str] = {}
    for spec in specs:
        if not isinstance(spec, str):
            raise CompareError(f"a method spec must be a string, got {type(spec).__name__}")
        for m in _parse_one(spec):
            key = tuple(sorted(m.knobs.items()))
            if key in seen:
                if m.is_baseline:
                    continue
                raise CompareError(f"methods {seen[key]!r} and {m.label!r} are the same setup; give it once")
            seen[key] = m.label
            methods.append(m)
    if not any(m.is_baseline for m in methods):
        methods.insert(0, Method("baseline", {}))
    else:
        methods.sort(key=lambda m: not m.is_baseline)
    if len(methods) < 2:
        raise CompareError("only baseline to run: name at least one method to compare with it (e.g. --methods "
                           "no_dropout mixout=0.1)")
    return methods
