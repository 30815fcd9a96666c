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


def static_int(
    name: str,
    value: Any,
    *,
    minimum: int | None = None,
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
