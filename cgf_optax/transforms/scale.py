"""CGFM step 2: recombine the scale components with one weight per scale."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cgf_optax import _paths
from cgf_optax import _validation as v
from cgf_optax.transforms._scales import SCALE_NAMES, is_scales

__all__ = ["ScaleByScalesState", "ScaleWeight", "scale_by_scales"]

ScaleWeight = float | jax.Array | optax.Schedule | Callable[[str], Any]
"""A scale weight: a number, a schedule, or a function of the leaf's path
(its first parameter named ``path``) giving either."""


class ScaleByScalesState(NamedTuple):
  """State of :func:`scale_by_scales`: the step count that schedules read."""

  count: jax.Array


def _is_path_fn(fn: Callable[..., Any]) -> bool:
  try:
    params = list(inspect.signature(fn).parameters.values())
  except (TypeError, ValueError):
    return False
  return bool(params) and params[0].name == "path"


def _check_weight(name: str, value: Any) -> Any:
  if callable(value):
    return value
  if not v.is_number(value):
    raise v.HyperparameterTypeError(
        f"`{name}` must be a float, an optax.Schedule or a callable of the "
        f"leaf's path `path -> weight`; got {type(value).__name__} {value!r}.")
  return v.number(name, value)


def scale_by_scales(
    local: ScaleWeight = 1.0,
    intermediate: ScaleWeight = 1.0,
    global_: ScaleWeight = 1.0,
) -> optax.GradientTransformationExtraArgs:
  r"""Recombines :class:`Scales` into one gradient with a weight per scale.

  CGFM's Algorithm 1, line 12 ("adjust gradients through structured
  scaling"):

  .. math::
    \nabla_\text{adj} = \lambda_\text{local} G_\text{local}
      + \lambda_\text{int} G_\text{intermediate}
      + \lambda_\text{global} G_\text{global}.

  Each weight is

  * a number;
  * an :class:`optax.Schedule` (a callable of the step count), evaluated at
    this transform's own step count;
  * a callable whose first parameter is named ``path``: it receives the
    leaf's path (``'layers/3/mlp/kernel'``) and returns a number or a schedule
    — the paper's per-depth, "hierarchical" adjustment. It is called at trace
    time, once per leaf.

  With every weight 1 the output equals the gradient that
  :func:`cgf_optax.decompose` split. Leaves that are plain arrays (not
  :class:`Scales`, e.g. masked out of ``decompose``) pass through unchanged,
  but a tree with no :class:`Scales` at all is an error: ``decompose`` must
  come first.

  With :func:`optax.inject_hyperparams`, numeric weights and schedules can be
  injected; list a path callable in ``static_args``.

  Args:
    local: weight of the local part, :math:`\lambda_\text{local}`.
    intermediate: weight of the intermediate part (three scales only).
    global_: weight of the global part, :math:`\lambda_\text{global}`.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose updates are plain
    gradient leaves again, of the gradient's dtype.

  Example:
    >>> import jax.numpy as jnp, optax, cgf_optax
    >>> tx = optax.chain(cgf_optax.decompose("mean"),
    ...                  cgf_optax.scale_by_scales(local=1.0, global_=0.0))
    >>> g = {"w": jnp.array([[1.0, 2.0], [3.0, 6.0]])}
    >>> tx.update(g, tx.init(g))[0]["w"]   # gradient centralization
    Array([[-1., -2.],
           [ 1.,  2.]], dtype=float32)

  References:
    Quillington et al., *Contextual Gradient Flow Modeling for Large
    Language Model Generalization in Multi-Scale Feature Spaces*,
    Section 3.3, Algorithm 1 line 12.
  """
  weights = {
      "local": _check_weight("local", local),
      "intermediate": _check_weight("intermediate", intermediate),
      "global_": _check_weight("global_", global_),
  }

  def weight(name: str, path: str, count: jax.Array) -> Any:
    w = weights[name]
    if callable(w) and _is_path_fn(w):
      w = w(path)
      if not (callable(w) or v.is_number(w)):
        raise v.HyperparameterTypeError(
            f"`{name}` returned {type(w).__name__} {w!r} for leaf '{path}'; "
            "expected a number or a schedule.")
    if callable(w):
      w = w(count)
    return w

  def init_fn(params: Any) -> ScaleByScalesState:
    v.real_float_leaves("scale_by_scales", params)
    return ScaleByScalesState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    v.real_float_leaves("scale_by_scales", updates, "updates")
    leaves, paths, treedef = _paths.flatten(updates, is_scales)
    if leaves and not any(map(is_scales, leaves)):
      raise ValueError(
          "scale_by_scales found no cgf_optax.Scales in its updates: put "
          "cgf_optax.decompose(...) before it in the chain.")
    out = []
    for path, x in zip(paths, leaves, strict=True):
      if not is_scales(x):
        out.append(x)
        continue
      dtype = next(part.dtype for part in x if part is not None)
      acc = None
      for name in SCALE_NAMES:
        part = getattr(x, name)
        if part is None:
          continue
        term = weight(name, path, state.count) * part
        acc = term if acc is None else acc + term
      out.append(acc.astype(dtype))
    return (jax.tree_util.tree_unflatten(treedef, out),
            ScaleByScalesState(count=optax.safe_increment(state.count)))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)

