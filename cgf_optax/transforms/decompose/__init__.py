"""CGFM step 1, :func:`decompose`: the gradient split into scale components.

* ``_transform``: the factory, its argument checks and its state;
* ``_rules``: which strategy each leaf gets (overrides, defaults by rank)
  and how it is viewed as a matrix;
* ``_lowrank``: the tracked singular subspace and its refresh schedule;
* ``_splits``: the ``"mean"`` and ``"temporal"`` splits.
"""

from cgf_optax.transforms.decompose._rules import (
    LeafRule,
    Overrides,
    Strategy,
    WholeScale,
)
from cgf_optax.transforms.decompose._transform import (
    STATIC_ARGS,
    DecomposeState,
    decompose,
)

__all__ = ["STATIC_ARGS", "DecomposeState", "LeafRule", "Overrides", "Strategy",
           "WholeScale", "decompose"]
