"""cgf_optax.sharding and cgf_optax.train.parallel on one device: the spec
rule, mesh parsing, axis_name validation, the multi-process batch and fetch
helpers as one process sees them. (Several devices:
test_sharded_training.py; several processes: test_multiprocess.py.)"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import cgf_optax
from cgf_optax import sharding
from cgf_optax.train import TrainConfig, gpt_config, parallel

MESH = types.SimpleNamespace(shape={"data": 4, "model": 2})


@pytest.mark.parametrize("shape, pshape, pspec, expect", [
    # Params-shaped: the param's spec.
    ((64, 192), (64, 192), P("data", "model"), P("data", "model")),
    # Low-rank basis [batch, side, k] on the fan-in side (m <= n) ...
    ((1, 64, 8), (64, 192), P("data", "model"), P(None, "data", None)),
    # ... a square matrix: the fan-in side ...
    ((1, 64, 8), (64, 64), P("model", "data"), P(None, "model", None)),
    # ... on the fan-out side (m > n) ...
    ((1, 64, 8), (256, 64), P("model", "data"), P(None, "data", None)),
    # ... and stacked layers [L, m, n].
    ((4, 64, 8), (4, 256, 64), P(None, "model", "data"),
     P(None, "data", None)),
    # Per-head context EMA [H, d] of the fan-in: heads divisible ...
    ((2, 128), (256, 64), P("model", "data"), P("model", None)),
    # ... not divisible: replicated (the blocks would not be contiguous) ...
    ((2, 32), (64, 192), P("data", "model"), P(None, None)),
    # ... one head: the whole fan-in.
    ((1, 64), (64, 192), P("data", "model"), P(None, "data")),
    # A mesh axis used once only; sizes the axis does not divide: replicated.
    ((64, 64), (64, 64, 3), P("data", None, None), P("data", None)),
    ((6, 8), (6, 10), P("data", None), P(None, None)),
])
def test_derive(shape, pshape, pspec, expect):
  assert sharding._derive(shape, pshape, pspec, MESH) == expect


def test_state_shardings_on_one_device_mesh():
  mesh = sharding.make_mesh({"data": 1, "model": 1})
  spec = jax.sharding.NamedSharding(mesh, P("data", "model"))
  params = {"b": jax.device_put(jnp.zeros(4), jax.sharding.NamedSharding(
      mesh, P())), "w": jax.device_put(jnp.zeros((4, 8)), spec)}
  tx = cgf_optax.cgfm_adamw(1e-3, rank=2)
  state = sharding.init_sharded(tx, params)
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  for path, x in flat:
    assert x.sharding.mesh == mesh
    if x.shape == (4, 8):
      assert x.sharding.spec == P("data", "model"), path
    if x.ndim == 0:
      assert x.sharding.spec == P(), path
  with pytest.raises(ValueError, match="NamedSharding"):
    sharding.state_shardings(tx.init({"w": jnp.zeros((4, 8))}),
                             {"w": jnp.zeros((4, 8))})


def test_split_axes():
  axes = sharding.split_axes({"a": P(("data", "model"), None), "b": P(),
                              "c": {"k": P(None, "model")}})
  assert axes("a") == ("data", "model")
  assert axes("b") == ()
  assert axes("c/k") == ("model",)
  with pytest.raises(KeyError, match="no partition spec"):
    axes("d")


def test_parse_and_make_mesh():
  assert sharding.parse_mesh_axes("data=4, model=2") == {"data": 4,
                                                         "model": 2}
  assert sharding.parse_mesh_axes("") == {}
  for bad in ("data", "data=0", "data=2,data=2", "da-ta=2", "data=x"):
    with pytest.raises(ValueError, match="mesh"):
      sharding.parse_mesh_axes(bad)
  with pytest.raises(ValueError, match="devices"):
    sharding.make_mesh({"data": jax.device_count() + 1})
  with pytest.raises(ValueError, match="at least one axis"):
    sharding.make_mesh({})
  mesh = sharding.make_mesh("data=1", explicit=True)
  assert mesh.axis_types == (jax.sharding.AxisType.Explicit,)


def test_process_helpers_on_one_process():
  """One process holds every row; global_batch, shard_batch and replicated
  place the host values; to_host returns them."""
  mesh = sharding.make_mesh({"data": 1})
  x = np.arange(24, dtype=np.int32).reshape(8, 3)
  assert sharding.process_rows(mesh, 8) == slice(0, 8)
  g = sharding.global_batch({"x": x}, mesh, 8)["x"]
  assert g.shape == (8, 3) and g.sharding.spec == P("data", None)
  np.testing.assert_array_equal(sharding.to_host(g), x)
  np.testing.assert_array_equal(sharding.to_host(sharding.shard_batch(x, mesh)),
                                x)
  r = sharding.replicated(np.int32(5), mesh)
  assert r.sharding.spec == P() and sharding.to_host({"r": r})["r"] == 5
  assert parallel.batch_rows(None, 8) == slice(None)
  with pytest.raises(ValueError, match="not divisible"):
    sharding.process_rows(types.SimpleNamespace(shape={"data": 3}), 8)


def test_train_mesh_and_divisibility():
  assert parallel.run_mesh("") is None
  mesh = parallel.run_mesh("data=1")
  assert dict(mesh.shape) == {"data": 1, "model": 1}
  with pytest.raises(ValueError, match="--mesh"):
    TrainConfig(mesh="data=2,pipe=2")
  fake = types.SimpleNamespace(shape={"data": 4, "model": 2})
  with pytest.raises(ValueError, match="batch-size = 6 .* 'data' axis"):
    parallel.check_divisible(gpt_config("tiny"), fake, 6)
  with pytest.raises(ValueError, match="d_model = 36 .* 'data'"):
    parallel.check_divisible(gpt_config("tiny", d_model=36, num_heads=2),
                             types.SimpleNamespace(shape={"data": 8,
                                                          "model": 1}), 8)
  parallel.check_divisible(gpt_config("tiny"), fake, 8)


@pytest.mark.parametrize("make", [
    lambda a: cgf_optax.normalize(axis_name=a),
    lambda a: cgf_optax.modulate_by_gradient_norm(axis_name=a),
    lambda a: cgf_optax.entangle(axis_name=a),
    lambda a: cgf_optax.context_align(axis_name=a),
    lambda a: cgf_optax.cegm_adamw(1e-3, axis_name=a),
    lambda a: cgf_optax.cgfm(1e-3, norm_axis_name=a),
])
def test_axis_name_is_validated(make):
  make(None)
  make("data")
  make(("data", "model"))
  with pytest.raises(cgf_optax.HyperparameterTypeError, match="axis"):
    make(3)
  with pytest.raises(ValueError, match="axis"):
    make("")
  with pytest.raises(ValueError, match="repeats"):
    make(("data", "data"))


def test_axis_name_without_shard_map_is_an_error():
  tx = cgf_optax.normalize("global", axis_name="data")
  g = {"w": jnp.ones((2, 2))}
  with pytest.raises(NameError, match="data"):
    tx.update(g, tx.init(g))


def test_vmap_axis_acts_like_devices():
  """Under jax.vmap with an axis_name, the split norm is the whole one."""
  g = jnp.arange(1.0, 9.0).reshape(4, 2)   # 4 "devices", a block each
  tx = cgf_optax.normalize("global", eps=0.0, axis_name="i")
  state = tx.init(g[0])
  out, _ = jax.vmap(lambda b: tx.update(b, state), axis_name="i")(g)
  assert jnp.allclose(out, g / jnp.linalg.norm(g))
