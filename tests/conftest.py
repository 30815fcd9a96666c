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



# Debug-NaN mode (issue 18): `JAX_DEBUG_NANS=True make test` runs the suite
# with jax_debug_nans on; the tests that feed NaN/Inf on purpose (marked
# `nonfinite_inputs`) are skipped then, as debug-NaN mode turns a NaN into an
# error by design. `--debug-nans-expected` fails the run unless the mode is
# really on (tests/test_debug_nans.py launches a subset so).


def pytest_addoption(parser):
  parser.addoption("--debug-nans-expected", action="store_true",
                   help="fail unless jax_debug_nans is on (JAX_DEBUG_NANS)")


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "nonfinite_inputs: feeds NaN/Inf on purpose; skipped when "
      "jax_debug_nans is on")
  if (config.getoption("--debug-nans-expected")
      and not jax.config.jax_debug_nans):
    raise pytest.UsageError("--debug-nans-expected: jax_debug_nans is off "
                            "(set JAX_DEBUG_NANS=True)")


def pytest_collection_modifyitems(config, items):
  if not jax.config.jax_debug_nans:
    return
  skip = pytest.mark.skip(reason="feeds NaN/Inf on purpose; jax_debug_nans "
                          "turns them into errors by design")
  for item in items:
    if "nonfinite_inputs" in item.keywords:
      item.add_marker(skip)


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
