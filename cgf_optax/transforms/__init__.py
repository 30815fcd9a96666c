"""The transforms, one module per paper step (jax and optax only)."""

from cgf_optax.transforms._leaves import MatrixAxes
from cgf_optax.transforms._scales import Scales
from cgf_optax.transforms.context_align import ContextAlignState, context_align
from cgf_optax.transforms.decompose import DecomposeState, LeafRule, decompose
from cgf_optax.transforms.entangle import EntangleState, entangle
from cgf_optax.transforms.modulate import (
    ModulateState,
    ModulateStepState,
    modulate_by_gradient_norm,
    modulate_step,
)
from cgf_optax.transforms.normalize import NormalizeState, normalize
from cgf_optax.transforms.scale import ScaleByScalesState, scale_by_scales

__all__ = [
    "ContextAlignState", "DecomposeState", "EntangleState", "LeafRule",
    "MatrixAxes", "ModulateState", "ModulateStepState", "NormalizeState",
    "ScaleByScalesState", "Scales", "context_align", "decompose", "entangle",
    "modulate_by_gradient_norm", "modulate_step", "normalize",
    "scale_by_scales",
]
