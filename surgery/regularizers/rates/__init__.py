"""Dropout control: every dropout probability (``dropout=``), stochastic-depth rate (``drop_path=``) and
router-noise level (``router_noise=``) set to one value; the unit's face, without torch.

Its record sections: ``dropout`` (:class:`AttrChange`: a module attribute), ``config`` (:class:`ConfigChange`:
a config field, restored by ``revert``, ``export`` and ``surgery convert`` through
:func:`surgery.configs.restore_config`) and ``left_on`` (:class:`LeftOn`: the non-zero rates of a kind
whose option was not given, and randomness no option controls). Entries without a ``kind`` are
dropout. Which numbers are which kind, and how they are found: :mod:`.kinds`, :mod:`.plan`.
"""

from __future__ import annotations

from ...entry import Entry, Field
from ...options import Option, check_p, optional
from ...schema import CONFIG_PATH, COUNT, NUMBER, PROB, STR, VALUES, Check, either, one_of, or_null
from ...wording import count, values
from ..unit import Regularizer

__all__ = ["Rates", "AttrChange", "ConfigChange", "LeftOn", "DROPOUT", "DROP_PATH", "ROUTER_NOISE", "SAMPLING",
           "KINDS"]

DROPOUT, DROP_PATH = "dropout", "drop_path"  # the kinds of probability ("kind" of dropout/config entries)
ROUTER_NOISE = "router_noise"  # train-time noise on a mixture-of-experts router's input
SAMPLING = "sampling"  # the left-on kind no option of apply controls (a router that samples its experts)
KINDS = (DROPOUT, DROP_PATH, ROUTER_NOISE)  # each kind is also the name of its option
KIND = one_of(*KINDS)
_LABEL = {DROPOUT: "dropout", DROP_PATH: "drop-path", ROUTER_NOISE: "router noise"}
_NONE = {DROP_PATH: "the model has no stochastic depth", ROUTER_NOISE: "the model has no router noise"}


class AttrChange(Entry):
    """A module attribute apply set: ``module``, ``attr``, ``old``, ``new``, ``kind`` (absent: dropout)."""

    NAME = "module"
    module = Field(STR, required=True)
    attr = Field(STR, required=True)
    old = Field(NUMBER, required=True)
    new = Field(or_null(NUMBER))
    kind = Field(KIND, default=DROPOUT)


class ConfigChange(Entry):
    """A config field apply set: ``path`` into the config of ``module`` (``""``: the model's own, what
    ``config.json`` holds), ``old``, ``new``, ``kind`` (absent: dropout)."""

    NAME = "module"
    module = Field(STR, default="")
    path = Field(CONFIG_PATH, required=True)
    old = Field(NUMBER, required=True)
    new = Field(or_null(NUMBER))
    kind = Field(KIND, default=DROPOUT)


class LeftOn(Entry):
    """Train-time randomness of a kind whose option was not given: its non-zero ``values``, on how many
    ``modules`` and ``config`` fields; ``"sampling"`` with ``what`` for randomness no option controls."""

    NAME = None  # a count over the whole model: not projected onto sub-models
    kind = Field(one_of(*KINDS, SAMPLING), required=True)
    values = Field(either(VALUES, Check(lambda v: v == [], "[]")), required=True)
    modules = Field(COUNT, required=True)
    config = Field(COUNT, required=True)
    what = Field(STR)


def _option(kind: str, doc: str, **kw) -> Option:
    return Option(kind, None, optional(check_p), json=or_null(PROB), doc=doc, **kw)


OPTIONS = (
    _option(DROPOUT, "when not None, every dropout probability in the model (dropout modules, dropout attributes "
                     "read at call time, config fields) is set to this value. Stochastic depth is not dropout: see "
                     "``drop_path``."),
    _option(DROP_PATH, "when not None, every stochastic-depth rate (DropPath modules, LayerDrop and drop-path "
                       "attributes read at call time, config fields such as ``drop_path_rate``, ``layerdrop``, "
                       "``encoder_layerdrop``) is set to this value."),
    _option(ROUTER_NOISE, "when not None, every train-time noise level of a mixture-of-experts router (the "
                          "multiplicative jitter U(1-e, 1+e) on the router's input: Mixtral's and MiniMax's "
                          "``router_jitter_noise``, DBRX's ``moe_jitter_eps``, PhiMoE's ``input_jitter_noise``, as "
                          "module attributes and config fields) is set to this value. ``dropout=0.0, drop_path=0.0, "
                          "router_noise=0.0`` makes a training forward deterministic.",
            recorded=lambda opts: opts.router_noise is not None),  # later than the first records: only when given
)


class Rates(Regularizer):
    """Every dropout probability, stochastic-depth rate and router-noise level, set (see the module doc)."""

    name = "rates"
    options = OPTIONS
    sections = {"dropout": AttrChange, "config": ConfigChange, "left_on": LeftOn}
    sections_always = True
    planner = "surgery.regularizers.rates.plan"

    def describe(self, rec, measured=None) -> list[str]:
        drop = [c for c in rec.dropout if c.kind == DROPOUT]
        fields = [c for c in rec.config if c.kind == DROPOUT]
        lines = []
        if drop or fields:
            new = rec.args.get(DROPOUT)
            olds = sorted({c.old for c in drop + fields})
            mods = sum(1 for c in drop if c.attr == "p")
            lines.append(f"  dropout -> {new}: {mods} dropout modules, {len(drop) - mods} attributes, "
                         f"{len(fields)} config fields (were {', '.join(map(str, olds))})")
        elif rec.args.get(DROPOUT) is not None:
            lines.append(f"  dropout -> {rec.args[DROPOUT]}: the model has no dropout")
        return lines + self._other_kinds(rec) + self._left_on(rec)

    @staticmethod
    def _other_kinds(rec) -> list[str]:
        lines = []
        for kind in (DROP_PATH, ROUTER_NOISE):
            changed = [c for c in rec.dropout if c.kind == kind]
            fields = [c for c in rec.config if c.kind == kind]
            new = rec.args.get(kind)
            if new is None:
                continue
            if changed or fields:
                lines.append(f"  {_LABEL[kind]} -> {new}: {count(len(changed), 'module attribute')}, "
                             f"{count(len(fields), 'config field')} (were {values([c.old for c in changed + fields])})")
            else:
                lines.append(f"  {_LABEL[kind]} -> {new}: {_NONE[kind]}")
        return lines

    @staticmethod
    def _left_on(rec) -> list[str]:
        lines = []
        for on in rec.left_on:
            where = [count(on.modules, "module")] if on.modules else []
            where += [count(on.config, "config field")] if on.config else []
            if on.kind not in _LABEL:  # randomness no option of apply controls (a router that samples)
                lines.append(f"  left on in training: {on.kind if on.what is None else on.what}, on {', '.join(where)}: no option "
                             "turns it off")
                continue
            lines.append(f"  left on in training: {_LABEL[on.kind]} {values(on.values)} on {', '.join(where)}: "
                         f"pass {on.kind}=0.0 to turn it off")
        return lines

    def config_changes(self, rec) -> list[ConfigChange]:
        return list(rec.config)
