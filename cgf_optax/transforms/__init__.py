"""The transforms, one module per paper step (jax and optax only)."""

from cgf_optax.transforms._collectives import AxisName, LeafAxisName
from cgf_optax.transforms._leaves import MatrixAxes
from cgf_optax.transforms._scales import Scales
from cgf_optax.transforms.context_align import ContextAlignState, context_align
from cgf_optax.transforms.decompose import (
    DecomposeState,
    LeafRule,
    Overrides,
    Strategy,
    WholeScale,
    decompose,
)
from cgf_optax.transforms.entangle import EntangleState, LossSignal, entangle
from cgf_optax.transforms.modulate import (
    ModulateReference,
    ModulateScope,
    ModulateState,
    ModulateStepState,
    modulate_by_gradient_norm,
    modulate_step,
)
from cgf_optax.transforms.normalize import NormalizeScope, NormalizeState, normalize
from cgf_optax.transforms.scale import ScaleByScalesState, ScaleWeight, scale_by_scales

__all__ = [
    "AxisName", "ContextAlignState", "DecomposeState", "EntangleState",
    "LeafAxisName", "LeafRule", "LossSignal", "MatrixAxes", "ModulateReference",
    "ModulateScope", "ModulateState", "ModulateStepState", "NormalizeScope",
    "NormalizeState", "Overrides", "ScaleByScalesState", "ScaleWeight",
    "Scales", "Strategy", "WholeScale", "context_align", "decompose",
    "entangle", "modulate_by_gradient_norm", "modulate_step", "normalize",
    "scale_by_scales",
]
