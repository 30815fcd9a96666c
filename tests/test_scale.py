"""`cgf_optax.scale_by_scales` against the NumPy reference, and its properties."""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cgf_optax
from cgf_optax import Scales

TOL = dict(rtol=1e-4, atol=1e-5)
SHAPES = {
    "dense/kernel": (6, 6),
    "dense/bias": (6,),
    "stack/kernel": (3, 4, 5),
    "scale": (),
    "tall": (10, 4),
    "wide": (4, 9),
}


def scales_tree(rng, step):
  """A hand-made tree of Scales (parts missing in places) and a plain leaf."""
  n = lambda *s: ref.f32(rng.standard_normal(s) * (1 + step))
  flat = {
      "dense/kernel": dict(local=n(3, 4), intermediate=n(3, 4), global_=n(3, 4)),
      "dense/bias": dict(local=None, intermediate=None, global_=n(4)),
      "two": dict(local=n(2, 2, 3), intermediate=None, global_=n(2, 2, 3)),
      "s": dict(local=n(), intermediate=None, global_=None),
      "plain": n(5),                              # not decomposed: passes through
  }
  to_j = lambda x: None if x is None else jnp.asarray(x, jnp.float32)
  tree = ref.unflatten({
      p: Scales(**{k: to_j(v) for k, v in x.items()}) if isinstance(x, dict)
      else to_j(x) for p, x in flat.items()})
  return flat, tree


WEIGHTS = {
    "numbers": dict(local=0.7, intermediate=-0.3, global_=2.0),
    "schedules": dict(local=optax.linear_schedule(1.0, 0.0, 4),
                      intermediate=lambda count: 0.5 * count,
                      global_=optax.exponential_decay(2.0, 1, 0.5)),
    "path": dict(local=lambda path: 2.0 if "bias" in path else 1.0,
                 intermediate=0.25,
                 # a path callable may return a schedule, too
                 global_=lambda path: ((lambda count: 1.0 + count)
                                       if path.startswith("dense") else 0.5)),
}


@pytest.mark.parametrize("weights", list(WEIGHTS))
def test_matches_reference_over_steps(weights):
  rng = np.random.default_rng(list(WEIGHTS).index(weights))
  tx = cgf_optax.scale_by_scales(**WEIGHTS[weights])
  rtx = ref.ScaleRef(**WEIGHTS[weights])
  update = jax.jit(tx.update)
  _, tree = scales_tree(rng, 0)
  state = tx.init(tree)
  for step in range(6):
    flat, tree = scales_tree(rng, step)
    out, state = update(tree, state)
    want = rtx.update(flat)
    got = ref.as_flat(out)
    assert set(got) == set(want)
    for path in want:
      np.testing.assert_allclose(got[path], want[path], err_msg=f"{step} {path}",
                                 **TOL)
    assert int(state.count) == step + 1


@pytest.mark.parametrize("strategy,num_scales", [("lowrank", 3), ("temporal", 3),
                                                 ("mean", 2)])
def test_decompose_then_scale_matches_reference(strategy, num_scales):
  rng = np.random.default_rng(num_scales)
  kw = dict(rank=2, refresh_every=2, intermediate_rank=1)
  weights = dict(local=1.0, intermediate=lambda count: 0.5 + 0.1 * count,
                 global_=lambda path: 0.5 if "kernel" in path else 2.0)
  tx = optax.chain(cgf_optax.decompose(strategy, num_scales, **kw),
                   cgf_optax.scale_by_scales(**weights))
  rdec = ref.DecomposeRef(strategy, num_scales, **kw)
  rscale = ref.ScaleRef(**weights)
  seq = ref.grad_sequence(rng, 5, SHAPES)
  params = ref.unflatten({p: jnp.asarray(x, jnp.float32) for p, x in seq[0].items()})
  state = tx.init(params)
  rdec.init(seq[0], basis=ref.as_flat(state[0].basis))
  update = jax.jit(tx.update)
  for step, g in enumerate(seq):
    out, state = update(ref.unflatten({p: jnp.asarray(x) for p, x in g.items()}),
                        state)
    want = rscale.update(rdec.update(g))
    got = ref.as_flat(out)
    for path in want:
      np.testing.assert_allclose(got[path], want[path], err_msg=f"{step} {path}",
                                 **TOL)


def test_schedule_is_evaluated_at_the_transforms_step_count():
  calls = []

  def sched(count):
    calls.append(count)
    return 1.0 + count

  tx = cgf_optax.scale_by_scales(local=sched, global_=0.0)
  update = jax.jit(tx.update)
  part = {"w": Scales(local=jnp.ones(3), global_=jnp.full(3, 7.0))}
  state = tx.init(part)
  for step in range(4):
    out, state = update(part, state)
    np.testing.assert_allclose(out["w"], np.full(3, 1.0 + step))
  assert calls     # called (at trace time, with the traced count)

  # The count is the transform's own: behind another stateful transform whose
  # count is ahead, the schedule still starts at 0.
  chain = optax.chain(optax.scale_by_schedule(lambda c: 1.0),
                      cgf_optax.decompose("mean"),
                      cgf_optax.scale_by_scales(local=lambda count: count,
                                                global_=0.0))
  g = {"w": jnp.array([[1.0, 2.0], [3.0, 6.0]])}
  state = chain.init(g)
  state = (state[0]._replace(count=jnp.asarray(100, jnp.int32)),) + state[1:]
  out, state = chain.update(g, state)
  np.testing.assert_allclose(out["w"], 0.0)
  out, state = chain.update(g, state)
  np.testing.assert_allclose(out["w"], [[-1.0, -2.0], [1.0, 2.0]])


def test_path_callable_weight():
  tx = optax.chain(
      cgf_optax.decompose("mean"),
      cgf_optax.scale_by_scales(local=lambda path: 2.0 if "bias" in path else 1.0,
                                global_=lambda path: 2.0 if "bias" in path
                                else 1.0))
  g = {"layer": {"bias": jnp.array([1.0, -2.0]),
                 "kernel": jnp.array([[1.0, 2.0], [3.0, 6.0]])}}
  out, _ = jax.jit(tx.update)(g, tx.init(g))
  np.testing.assert_allclose(out["layer"]["bias"], [2.0, -4.0])
  np.testing.assert_allclose(out["layer"]["kernel"], g["layer"]["kernel"],
                             **TOL)


def test_path_is_the_slash_joined_key_path():
  seen = []

  def weight(path):
    seen.append(path)
    return 1.0

  tx = cgf_optax.scale_by_scales(local=weight)
  tree = {"layers": {"0": {"attn": {"kernel": Scales(local=jnp.ones(2))}}},
          "head": Scales(local=jnp.ones(2))}
  tx.update(tree, tx.init(tree))
  assert sorted(seen) == ["head", "layers/0/attn/kernel"]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dtype_is_preserved(dtype):
  tx = cgf_optax.scale_by_scales(local=0.5, global_=lambda count: 2.0)
  tree = {"w": Scales(local=jnp.ones((2, 3), dtype), global_=jnp.ones((2, 3), dtype))}
  out, _ = tx.update(tree, tx.init(tree))
  assert out["w"].dtype == dtype
  np.testing.assert_allclose(np.asarray(out["w"], np.float32), 2.5)


def test_needs_scales_in_the_tree():
  tx = cgf_optax.scale_by_scales()
  g = {"w": jnp.ones(3)}
  with pytest.raises(ValueError, match="decompose"):
    tx.update(g, tx.init(g))


@pytest.mark.parametrize("name", ["local", "intermediate", "global_"])
def test_weight_of_a_wrong_type_names_the_argument(name):
  with pytest.raises(ValueError, match=name):
    cgf_optax.scale_by_scales(**{name: "big"})
  tx = cgf_optax.scale_by_scales(**{name: lambda path: "big"})
  tree = {"w": Scales(local=jnp.ones(2), intermediate=jnp.ones(2),
                      global_=jnp.ones(2))}
  with pytest.raises(ValueError, match=name):
    tx.update(tree, tx.init(tree))


# ----------------------------------------------------------------------------
# Property: with every weight 1, decompose -> scale_by_scales is the identity.

FINITE = st.floats(-100, 100, width=32, allow_nan=False, allow_infinity=False,
                   allow_subnormal=False)
_LEAVES = {"r0": (), "r1": (3,), "r2": (3, 5), "r2t": (5, 2), "r3": (2, 3, 4),
           "r4": (2, 2, 3, 2)}
ID_SHAPES = {f"{s}/{p}": shape for s in ("lowrank", "mean", "temporal")
             for p, shape in _LEAVES.items()}
_ID = {}


def identity_chain(num_scales):
  if num_scales not in _ID:
    tx = optax.chain(
        cgf_optax.decompose("lowrank", num_scales, rank=2, refresh_every=1,
                            overrides={"^mean/": "mean",
                                       "^temporal/": "temporal"}),
        cgf_optax.scale_by_scales(1.0, 1.0, 1.0))
    _ID[num_scales] = (tx, jax.jit(tx.update))
  return _ID[num_scales]


@settings(max_examples=25, deadline=None)
@given(data=st.data(), num_scales=st.sampled_from([2, 3]), bf16=st.booleans())
def test_unit_weights_return_the_gradient(data, num_scales, bf16):
  tx, update = identity_chain(num_scales)
  dtype = jnp.bfloat16 if bf16 else jnp.float32
  state = tx.init(ref.unflatten({p: jnp.zeros(s, dtype)
                                 for p, s in ID_SHAPES.items()}))
  scale = dict.fromkeys(ID_SHAPES, 0.0)
  for _ in range(2):
    g = {p: jnp.asarray(data.draw(hnp.arrays(np.float32, s, elements=FINITE),
                                  label=p), dtype)
         for p, s in ID_SHAPES.items()}
    out, state = update(ref.unflatten(g), state)
    for path, x in ref.flatten(out).items():
      assert x.dtype == dtype
      g64 = np.asarray(g[path], np.float64)
      scale[path] = max(scale[path], float(np.linalg.norm(g64)))
      # A few roundings, relative to the largest gradient seen (the temporal
      # parts carry past gradients).
      tol = (3e-2 if bf16 else 3e-6) * scale[path] + 1e-30
      np.testing.assert_allclose(np.asarray(x, np.float64), g64, rtol=0,
                                 atol=tol, err_msg=path)
