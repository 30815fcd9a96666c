"""cgf_optax: Optax gradient transformations from the CGFM and CEGM papers.

Every step is a small, composable :class:`optax.GradientTransformation`; the
aliases build the papers' Algorithm 1 chains. :mod:`cgf_optax.flow` is
CGFM's activation-level gradient flow (a layer for models);
:mod:`cgf_optax.sharding` places optimizer states on device meshes;
:mod:`cgf_optax.nnx` (Flax context capture) is imported on first use.
"""

import importlib
from typing import Any

from cgf_optax import flow, losses, sharding
from cgf_optax._validation import HyperparameterTypeError
from cgf_optax.aliases import (
    CEGM_STATIC_ARGS,
    CGFM_STATIC_ARGS,
    cegm,
    cegm_adamw,
    cgfm,
    cgfm_adamw,
    cgfm_decompose,
)
from cgf_optax.transforms import (
    AxisName,
    ContextAlignState,
    DecomposeState,
    EntangleState,
    LeafAxisName,
    LeafRule,
    LossSignal,
    MatrixAxes,
    ModulateReference,
    ModulateScope,
    ModulateState,
    ModulateStepState,
    NormalizeScope,
    NormalizeState,
    Overrides,
    ScaleByScalesState,
    Scales,
    ScaleWeight,
    Strategy,
    WholeScale,
    context_align,
    decompose,
    entangle,
    modulate_by_gradient_norm,
    modulate_step,
    normalize,
    scale_by_scales,
)

__version__ = "0.1.0"

__all__ = [
    "AxisName",
    "CEGM_STATIC_ARGS",
    "CGFM_STATIC_ARGS",
    "ContextAlignState",
    "DecomposeState",
    "EntangleState",
    "HyperparameterTypeError",
    "LeafAxisName",
    "LeafRule",
    "LossSignal",
    "MatrixAxes",
    "ModulateReference",
    "ModulateScope",
    "ModulateState",
    "ModulateStepState",
    "NormalizeScope",
    "NormalizeState",
    "Overrides",
    "ScaleByScalesState",
    "ScaleWeight",
    "Scales",
    "Strategy",
    "WholeScale",
    "cegm",
    "cegm_adamw",
    "cgfm",
    "cgfm_adamw",
    "cgfm_decompose",
    "context_align",
    "decompose",
    "entangle",
    "flow",
    "losses",
    "modulate_by_gradient_norm",
    "modulate_step",
    "normalize",
    "scale_by_scales",
    "sharding",
]


def __getattr__(name: str) -> Any:
  if name == "nnx":
    return importlib.import_module("cgf_optax.nnx")
  raise AttributeError(f"module 'cgf_optax' has no attribute {name!r}")
