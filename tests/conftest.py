"""Shared fixtures for the cgf_optax tests."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import settings

# Property tests are reproducible by default: Hypothesis draws the same
# examples on every run (and in CI), so a red run is a real regression, not
# a new random draw. `HYPOTHESIS_PROFILE=explore make test` searches new
# examples; a failure it finds is then pinned with `@example`.
settings.register_profile("default", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# A small transformer-shaped parameter tree: a 1-D bias, a 2-D kernel, a
# stacked ``[layers, in, out]`` kernel and a scalar. Keys sort in this order,
# so the flattening order is bias, embed, layers/kernel, scale.
TREE_SHAPES = {
    "bias": (8,),
    "embed": (16, 8),
    "layers": {"kernel": (3, 8, 8)},
    "scale": (),
}


def transformer_tree(dtype=jnp.float32, seed=0, scale=1.0):
  """Random normal leaves with the shapes of `TREE_SHAPES`."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: jnp.asarray(scale * rng.standard_normal(s), dtype),
      TREE_SHAPES,
      is_leaf=lambda x: isinstance(x, tuple),
  )


@pytest.fixture
def make_tree():
  """`make_tree(dtype=jnp.float32, seed=0, scale=1.0)` -> a param-like tree."""
  return transformer_tree
