"""`jnp.einsum` under JAX's explicit sharding (private)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def _explicit_spec(x: jax.Array) -> tuple[Any, ...] | None:
  """The partition spec of ``x`` under explicit sharding, else ``None``."""
  spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
  if spec is None or all(a is None for a in spec):
    return None
  return tuple(spec) + (None,) * (x.ndim - len(spec))


def einsum(subscripts: str, *operands: jax.Array) -> jax.Array:
  """`jnp.einsum`, with the output sharding spelled out under explicit sharding.

  A contraction over a sharded axis is ambiguous in JAX's explicit-sharding
  mode; the output keeps, for each of its axes, the sharding that axis has in
  the operands (contracted axes are summed across devices).
  """
  specs = [_explicit_spec(x) for x in operands]
  if all(sp is None for sp in specs):
    return jnp.einsum(subscripts, *operands)
  inputs, output = subscripts.split("->")
  by_letter: dict[str, Any] = {}
  for term, sp in zip(inputs.split(","), specs, strict=True):
    for letter, axis in zip(term, sp or (None,) * len(term), strict=True):
      if by_letter.get(letter) is None:
        by_letter[letter] = axis
  out = jax.sharding.PartitionSpec(*(by_letter.get(ch) for ch in output))
  return jnp.einsum(subscripts, *operands, out_sharding=out)
