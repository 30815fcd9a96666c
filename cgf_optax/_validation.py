"""Argument checks shared by the transform factories (private).

Every public factory validates its hyper-parameters at construction and
raises an error that names the offending argument, so that a wrong value
never turns into a crash deep inside a traced computation or a silent NaN.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np

from cgf_optax import _paths


class HyperparameterTypeError(TypeError, ValueError):
  """A hyper-parameter of the wrong type.

  It is both a ``TypeError`` (what Python raises for wrong types) and a
  ``ValueError`` (what Optax raises for bad hyper-parameters), so either
  ``except`` clause catches it.
  """


_STATIC_HINT = (
    "It fixes array shapes or Python control flow, so it must be a concrete "
    "Python int. With optax.inject_hyperparams, list it in static_args, e.g. "
    "optax.inject_hyperparams(factory, static_args=({names}))."
)


def is_traced(value: Any) -> bool:
  return isinstance(value, jax.core.Tracer)


# Step counts are int32 in the states: a period or iteration count beyond it
# would overflow when compared with them.
INT32_MAX = int(np.iinfo(np.int32).max)
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def static_int(
    name: str,
    value: Any,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    static_names: Iterable[str] = (),
) -> int:
  """Returns `value` as a Python int, or raises an error naming `name`."""
  hint_names = ", ".join(repr(n) for n in (tuple(static_names) or (name,)))
  if is_traced(value):
    raise ValueError(
        f"`{name}` was given a traced value. "
        + _STATIC_HINT.format(names=hint_names + ",")
    )
  if isinstance(value, bool) or value is None:
    raise HyperparameterTypeError(
        f"`{name}` must be an int, got {type(value).__name__} {value!r}."
    )
  if isinstance(value, (np.ndarray, jax.Array)):
    if value.ndim != 0 or not np.issubdtype(value.dtype, np.integer):
      raise HyperparameterTypeError(
          f"`{name}` must be an int, got an array of shape {value.shape} and "
          f"dtype {value.dtype}."
      )
    value = int(value)
  elif isinstance(value, numbers.Integral):
    value = int(value)
  elif isinstance(value, float) and value.is_integer():
    value = int(value)
  else:
    raise HyperparameterTypeError(
        f"`{name}` must be an int, got {type(value).__name__} {value!r}."
    )
  if minimum is not None and value < minimum:
    raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")
  if maximum is not None and value > maximum:
    raise ValueError(f"`{name}` must be <= {maximum}, got {value}.")
  return value


def is_number(value: Any) -> bool:
  """True for real scalars: Python numbers (not bool) and 0-d arrays."""
  if isinstance(value, bool):
    return False
  if isinstance(value, numbers.Real):
    return True
  if isinstance(value, (np.ndarray, jax.Array, np.generic)):
    return value.ndim == 0 and (
        np.issubdtype(value.dtype, np.floating)
        or np.issubdtype(value.dtype, np.integer)
        or value.dtype == jax.numpy.bfloat16
    )
  return False


def number(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    strict_minimum: bool = False,
) -> Any:
  """Checks a real scalar hyper-parameter; range checks skip traced values."""
  if not is_number(value):
    raise HyperparameterTypeError(
        f"`{name}` must be a real number, got {type(value).__name__} "
        f"{value!r}."
    )
  if is_traced(value):
    return value
  v = float(value)
  if not np.isfinite(v):
    raise ValueError(f"`{name}` must be finite, got {v}.")
  if abs(v) > _FLOAT32_MAX:
    # The transforms compute in float32, where it would be inf.
    raise ValueError(
        f"`{name}` must be finite in float32 (|x| <= {_FLOAT32_MAX:.4g}), "
        f"got {v}.")
  if minimum is not None:
    if strict_minimum and not v > minimum:
      raise ValueError(f"`{name}` must be > {minimum}, got {v}.")
    if not strict_minimum and v < minimum:
      raise ValueError(f"`{name}` must be >= {minimum}, got {v}.")
  if maximum is not None and v > maximum:
    raise ValueError(f"`{name}` must be <= {maximum}, got {v}.")
  return value


def number_or_schedule(name: str, value: Any, **range_kwargs: Any) -> Any:
  """A real scalar or an `optax.Schedule` (any callable of the step count)."""
  if callable(value):
    return value
  return number(name, value, **range_kwargs)


def choice(name: str, value: Any, options: Iterable[str]) -> str:
  options = tuple(options)
  if not isinstance(value, str) or value not in options:
    raise ValueError(
        f"`{name}` must be one of {', '.join(map(repr, options))}; "
        f"got {value!r}."
    )
  return value


def boolean(name: str, value: Any) -> bool:
  """Checks a Python (or NumPy) bool flag."""
  if not isinstance(value, (bool, np.bool_)):
    raise HyperparameterTypeError(
        f"`{name}` must be a bool, got {type(value).__name__} {value!r}.")
  return bool(value)


def float_dtype(name: str, value: Any) -> Any:
  """A floating-point dtype (``None`` is for the caller to allow first)."""
  try:
    dtype = jax.numpy.dtype(value)
  except (TypeError, ValueError) as e:
    raise HyperparameterTypeError(
        f"`{name}` must be a floating-point dtype, got {value!r} ({e})."
    ) from None
  if value is None or not jax.numpy.issubdtype(dtype, jax.numpy.floating):
    raise HyperparameterTypeError(
        f"`{name}` must be a floating-point dtype (e.g. jnp.float32, "
        f"jnp.bfloat16), got {value!r}.")
  return dtype


def transformation(name: str, value: Any) -> Any:
  """An `optax.GradientTransformation` (anything with `init` and `update`)."""
  if not (callable(getattr(value, "init", None))
          and callable(getattr(value, "update", None))):
    raise HyperparameterTypeError(
        f"`{name}` must be an optax.GradientTransformation (with `init` and "
        f"`update`), got {type(value).__name__} {value!r}.")
  return value


def mask(name: str, value: Any) -> Any:
  """An Optax weight-decay mask: ``None``, a callable or a tree of bools."""
  if value is None or callable(value):
    return value
  for leaf in jax.tree.leaves(value):
    if not (isinstance(leaf, (bool, np.bool_))
            or (isinstance(leaf, (np.ndarray, jax.Array))
                and leaf.dtype == np.bool_)):
      raise HyperparameterTypeError(
          f"`{name}` must be None, a callable params -> tree of bools, or a "
          f"tree of bools shaped like the params; it holds "
          f"{type(leaf).__name__} {leaf!r}.")
  return value


def real_float_leaves(transform: str, tree: Any, what: str = "params") -> None:
  """Raises, naming the leaf, unless every leaf is a real floating array.

  The transforms compute norms, projections and EMAs of real numbers:
  complex leaves would lose their imaginary part and integer leaves be
  truncated, silently. (Trace-time check of dtypes only: free under jit.)
  """
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  for path, leaf in flat:
    dtype = getattr(leaf, "dtype", None)
    where = _paths.path_str(path) or "<root>"
    if dtype is None or not hasattr(leaf, "shape"):
      raise TypeError(
          f"cgf_optax.{transform}: the {what} leaf '{where}' is a "
          f"{type(leaf).__name__}, not an array; use jnp.asarray(...).")
    if jax.numpy.issubdtype(dtype, jax.numpy.complexfloating):
      raise TypeError(
          f"cgf_optax.{transform} does not support complex {what}: leaf "
          f"'{where}' has dtype {dtype}. Optimise the real and imaginary "
          "parts as separate real leaves.")
    if not jax.numpy.issubdtype(dtype, jax.numpy.floating):
      raise TypeError(
          f"cgf_optax.{transform} needs floating-point {what}: leaf "
          f"'{where}' has dtype {dtype}.")
