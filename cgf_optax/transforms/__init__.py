"""The transforms, one module per paper step (jax and optax only)."""

from cgf_optax.transforms._leaves import MatrixAxes
from cgf_optax.transforms._scales import Scales
from cgf_optax.transforms.decompose import DecomposeState, LeafRule, decompose
from cgf_optax.transforms.modulate import (
    ModulateState,
    ModulateStepState,
    modulate_by_gradient_norm,
    modulate_step,
)
from cgf_optax.transforms.scale import ScaleByScalesState, scale_by_scales

__all__ = [
    "DecomposeState", "LeafRule", "MatrixAxes", "ModulateState",
    "ModulateStepState", "ScaleByScalesState", "Scales", "decompose",
    "modulate_by_gradient_norm", "modulate_step", "scale_by_scales",
]
