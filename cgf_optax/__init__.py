"""cgf_optax: Optax gradient transformations from the CGFM and CEGM papers.

Every step is a small, composable :class:`optax.GradientTransformation`; the
aliases build the papers' Algorithm 1 chains.
"""

from cgf_optax._validation import HyperparameterTypeError
from cgf_optax.aliases import CGFM_STATIC_ARGS, cgfm, cgfm_adamw
from cgf_optax.transforms import (
    DecomposeState,
    LeafRule,
    MatrixAxes,
    ModulateState,
    ModulateStepState,
    ScaleByScalesState,
    Scales,
    decompose,
    modulate_by_gradient_norm,
    modulate_step,
    scale_by_scales,
)

__version__ = "0.1.0"

__all__ = [
    "CGFM_STATIC_ARGS",
    "DecomposeState",
    "HyperparameterTypeError",
    "LeafRule",
    "MatrixAxes",
    "ModulateState",
    "ModulateStepState",
    "ScaleByScalesState",
    "Scales",
    "cgfm",
    "cgfm_adamw",
    "decompose",
    "modulate_by_gradient_norm",
    "modulate_step",
    "scale_by_scales",
]
