"""The regularizers of ``apply``, each one registered unit (:mod:`.unit`), and their registry (:mod:`.registry`).

Built in, in ``describe``'s and the record's order: :mod:`.mixout` (Mixout on Linear layers, LoRA
adapters, fused experts and routers), :mod:`.rates` (dropout, stochastic-depth and router-noise rates)
and :mod:`.msd` (the multi-sample-dropout head, plain or layer-weighted). Importing this package
imports no torch: each unit's face is torch-free, its torch part is imported when ``apply`` runs.

A new regularizer is one unit and one line: ``surgery.regularizers.register(MyRegularizer())``.
"""

from .mixout import Mixout
from .msd import MSD
from .rates import Rates
from .registry import (all_options, apply_kwargs, check_options, get, plan_order, record_args, register, registered,
                       section_types, units, unregister)
from .unit import Plan, Regularizer, Undo

__all__ = ["Regularizer", "Plan", "Undo", "register", "unregister", "registered", "units", "get", "plan_order",
           "all_options", "check_options", "record_args", "apply_kwargs", "section_types"]

register(Mixout())
register(Rates())
register(MSD())
