"""The `Scales` container that `decompose` emits for every leaf."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax

SCALE_NAMES = ("local", "intermediate", "global_")


class Scales(NamedTuple):
  """The scale components of one gradient leaf: ``g = local + intermediate + global_``.

  A pytree container (a NamedTuple, so JAX registers it) that
  :func:`cgf_optax.decompose` puts where each gradient leaf was. A part that a
  leaf does not have is ``None`` (an empty pytree): with ``num_scales=2``
  ``intermediate`` is ``None``; a leaf that goes whole into one scale has
  ``None`` in the other two.

  Attributes:
    local: the fine-grained residual (what the coarser scales do not explain).
    intermediate: the middle band (three-scale decompositions only).
    global_: the coarse, shared structure of the gradient.
  """

  local: Any = None
  intermediate: Any = None
  global_: Any = None

  def total(self) -> jax.Array:
    """The sum of the parts present: the gradient they were split from."""
    parts = [p for p in self if p is not None]
    out = parts[0]
    for p in parts[1:]:
      out = out + p
    return out


def is_scales(x: Any) -> bool:
  return isinstance(x, Scales)


def whole(g: jax.Array, scale: str) -> Scales:
  """A leaf placed whole into one scale."""
  return Scales(**{scale: g})

