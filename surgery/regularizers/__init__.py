"""The regularizers ``apply`` plans, in planning and install order (see :mod:`.base`).

A regularizer planned earlier can tell later ones what it resolved: the layer-weighted MSD head
freezes the layers it bypasses (Mixout leaves them alone), an MSD head names the task head
(``mixout_head=False`` leaves it a plain layer), the fused-experts plan takes its modules from the Linear
rule. ``Coverage`` comes last: it changes nothing and records what share of the trainable weights the
others cover. Adding a regularizer is one file and one line here.
"""

from .base import Plan, Regularizer
from .coverage import Coverage
from .experts import ExpertsMixout
from .layer_msd import LayerWeightedMSD
from .mixout import Mixout
from .msd import MSD
from .rates import Rates

__all__ = ["REGULARIZERS", "Plan", "Regularizer"]

REGULARIZERS: tuple[Regularizer, ...] = (LayerWeightedMSD(), MSD(), ExpertsMixout(), Mixout(), Rates(), Coverage())
