"""Optimizers of a training run, built from :class:`OptimizerSpec`s."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import optax

import cgf_optax
from cgf_optax.train.config import ConfigError, OptimizerSpec, TrainConfig

__all__ = ["build_optimizer", "decompose_of", "schedule_of", "telemetry_of",
           "uses_context"]

_CONSTRUCTORS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "adamw": optax.adamw,
    "muon": optax.contrib.muon,
    "cgfm": cgf_optax.cgfm,
    "cgfm_adamw": cgf_optax.cgfm_adamw,
    "cegm": cgf_optax.cegm,
    "cegm_adamw": cgf_optax.cegm_adamw,
}
# Arguments the run sets itself.
_RESERVED = {"learning_rate", "mask", "weight_decay_mask"}


def uses_context(spec: OptimizerSpec) -> bool:
  """Whether the optimizer takes the model's context and the loss."""
  return spec.name in ("cegm", "cegm_adamw")


def _decay_mask(params: Any) -> Any:
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def _kwargs(spec: OptimizerSpec) -> dict[str, Any]:
  fn = _CONSTRUCTORS[spec.name]
  params = inspect.signature(fn).parameters
  kwargs = dict(spec.kwargs)
  kwargs.pop("lr", None)
  for key in kwargs:
    if key not in params or key in _RESERVED:
      allowed = sorted(set(params) - _RESERVED - {"learning_rate"})
      raise ConfigError(f"optimizer {spec.name!r} has no option {key!r}; "
                       f"options: lr, {', '.join(allowed)}")
  for key, value in kwargs.items():   # tuples arrive as JSON lists
    if isinstance(value, list):
      kwargs[key] = tuple(value)
  return kwargs


def schedule_of(spec: OptimizerSpec, cfg: TrainConfig) -> optax.Schedule:
  """The run's learning rate: linear warm-up to the peak (``lr`` of the spec,
  else ``cfg.lr``), then cosine decay to ``peak * cfg.min_lr_ratio``."""
  peak = float(dict(spec.kwargs).get("lr", cfg.lr))
  return optax.warmup_cosine_decay_schedule(
      0.0, peak, max(cfg.warmup, 1) if cfg.warmup else 0,
      max(cfg.steps, cfg.warmup + 1), end_value=peak * cfg.min_lr_ratio)


def build_optimizer(spec: OptimizerSpec, cfg: TrainConfig
                    ) -> optax.GradientTransformationExtraArgs:
  """clip → the optimizer with the learning rate of :func:`schedule_of`.

  ``lr`` in the spec overrides ``cfg.lr``; ``weight_decay`` in the spec
  overrides ``cfg.weight_decay``. Weight decay applies to matrices only.

  Raises:
    ConfigError: an unknown option, or one the constructor refuses (the
      message names the optimizer).
  """
  kwargs = _kwargs(spec)
  schedule = schedule_of(spec, cfg)
  params = inspect.signature(_CONSTRUCTORS[spec.name]).parameters
  if "weight_decay" in params:
    kwargs.setdefault("weight_decay", cfg.weight_decay)
  if "mask" in params:
    kwargs["mask"] = _decay_mask
  elif "weight_decay_mask" in params:
    kwargs["weight_decay_mask"] = _decay_mask
  try:
    tx = _CONSTRUCTORS[spec.name](schedule, **kwargs)
  except (ValueError, TypeError) as e:
    raise ConfigError(f"optimizer {spec.label!r}: {e}") from None
  parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm else []
  return optax.chain(*parts, tx)


def decompose_of(spec: OptimizerSpec) -> optax.GradientTransformation | None:
  """The ``decompose`` step a CGFM optimizer runs (:func:`cgf_optax.
  cgfm_decompose` of the spec's options), for telemetry: given the
  optimizer's :class:`DecomposeState` it returns the same
  :class:`cgf_optax.Scales` the optimizer saw."""
  if spec.name not in ("cgfm", "cgfm_adamw"):
    return None
  return cgf_optax.cgfm_decompose(**_kwargs(spec))


def telemetry_of(spec: OptimizerSpec):
  """``(grads, opt_state) -> {"scale_norm/<scale>": norm}``: the norms of
  the gradient's scale components as a CGFM optimizer splits them (its own
  ``decompose``, given its state before the update), or None for the
  optimizers without a decomposition."""
  dec = decompose_of(spec)
  if dec is None:
    return None

  def scale_norms(grads: Any, opt_state: Any) -> dict[str, jax.Array]:
    states = [s for s in jax.tree.leaves(
        opt_state, is_leaf=lambda x: isinstance(x, cgf_optax.DecomposeState))
              if isinstance(s, cgf_optax.DecomposeState)]
    if not states:
      return {}
    scales, _ = dec.update(grads, states[0])
    found = [s for s in jax.tree.leaves(
        scales, is_leaf=lambda x: isinstance(x, cgf_optax.Scales))
             if isinstance(s, cgf_optax.Scales)]
    out = {}
    for name in ("local", "intermediate", "global_"):
      parts = [getattr(s, name) for s in found if getattr(s, name) is not None]
      if parts:
        out[f"scale_norm/{name.rstrip('_')}"] = optax.tree.norm(parts)
    return out
  return scale_norms
