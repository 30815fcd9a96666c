"""How a parameter leaf is viewed as a (batch of) matrices (private).

The decomposition strategies work on matrices ``G[m, n]`` whose first axis is
the *fan-in* (input) axis and second the *fan-out* axis, the layout of a Flax
``Dense`` kernel ``W[in, out]``. A leaf of any rank is brought to the shape
``[batch, m, n]`` by a :class:`MatrixAxes` spec and brought back afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp


class MatrixAxes(NamedTuple):
  """Which axes of a leaf form the matrix ``G[fan_in, fan_out]``.

  Axes named in neither field are batch axes: the leaf is treated as a batch
  of independent matrices (e.g. the layer axis of stacked/scanned layers).
  Several axes in one field are flattened together, in order (e.g. a conv
  kernel ``[h, w, in, out]`` is ``MatrixAxes(fan_in=(0, 1, 2), fan_out=3)``,
  an attention kernel ``[embed, heads, head_dim]`` is
  ``MatrixAxes(fan_in=0, fan_out=(1, 2))``).

  Attributes:
    fan_in: axis or axes of the input dimension.
    fan_out: axis or axes of the output dimension.
  """

  fan_in: int | Sequence[int] = -2
  fan_out: int | Sequence[int] = -1


def _as_axes(axes: int | Sequence[int], ndim: int, what: str) -> tuple[int, ...]:
  if isinstance(axes, int):
    axes = (axes,)
  out = []
  for a in axes:
    if not isinstance(a, int) or not -ndim <= a < ndim:
      raise ValueError(
          f"MatrixAxes.{what}={axes!r} is out of range for a leaf with "
          f"{ndim} dimensions."
      )
    out.append(a % ndim)
  if not out:
    raise ValueError(f"MatrixAxes.{what} must name at least one axis.")
  return tuple(out)


class MatrixView(NamedTuple):
  """A leaf's shape and the permutation that makes it ``[batch, m, n]``."""

  shape: tuple[int, ...]
  perm: tuple[int, ...]
  batch: int
  m: int
  n: int

  @classmethod
  def create(cls, shape: tuple[int, ...], axes: MatrixAxes) -> MatrixView:
    ndim = len(shape)
    fan_in = _as_axes(axes.fan_in, ndim, "fan_in")
    fan_out = _as_axes(axes.fan_out, ndim, "fan_out")
    if set(fan_in) & set(fan_out) or len(set(fan_in + fan_out)) != len(
        fan_in + fan_out
    ):
      raise ValueError(
          f"MatrixAxes fan_in={fan_in} and fan_out={fan_out} must be disjoint "
          f"and without repeats (leaf shape {shape})."
      )
    batch_axes = tuple(a for a in range(ndim) if a not in fan_in + fan_out)
    perm = batch_axes + fan_in + fan_out
    batch = math.prod(shape[a] for a in batch_axes)
    m = math.prod(shape[a] for a in fan_in)
    n = math.prod(shape[a] for a in fan_out)
    return cls(tuple(shape), perm, batch, m, n)

  @property
  def permuted_shape(self) -> tuple[int, ...]:
    return tuple(self.shape[a] for a in self.perm)

  def to_matrix(self, x: jax.Array) -> jax.Array:
    """``x`` (the leaf's shape) -> ``[batch, m, n]``."""
    if self.perm != tuple(range(len(self.shape))):
      x = jnp.transpose(x, self.perm)
    return x.reshape(self.batch, self.m, self.n)

  def from_matrix(self, x: jax.Array) -> jax.Array:
    """``[batch, m, n]`` (or broadcastable to it) -> the leaf's shape."""
    x = jnp.broadcast_to(x, (self.batch, self.m, self.n))
    x = x.reshape(self.permuted_shape)
    if self.perm != tuple(range(len(self.shape))):
      x = jnp.transpose(x, _inverse(self.perm))
    return x


def _inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
  inv = [0] * len(perm)
  for i, p in enumerate(perm):
    inv[p] = i
  return tuple(inv)
