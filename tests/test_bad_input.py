"""Bad hyper-parameters, edge-case shapes and non-finite gradients.

Every bad value must raise a `ValueError` (cgf_optax's
`HyperparameterTypeError` is one) whose message names the argument; a rank
larger than a matrix is clamped (documented in `decompose`); a NaN gradient
must not leave NaN in the state for ever.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cgf_optax

STRATEGIES = ("lowrank", "temporal", "mean")

# Factories that take the argument under test, each with what else it needs.
DECOMPOSE_FACTORIES = [
    pytest.param(cgf_optax.decompose, id="decompose"),
    pytest.param(functools.partial(cgf_optax.cgfm, 0.1), id="cgfm"),
    pytest.param(functools.partial(cgf_optax.cgfm_adamw, 0.1),
                 id="cgfm_adamw"),
]
SCALE_FACTORIES = [
    pytest.param(cgf_optax.scale_by_scales, id="scale_by_scales"),
    pytest.param(functools.partial(cgf_optax.cgfm, 0.1), id="cgfm"),
    pytest.param(functools.partial(cgf_optax.cgfm_adamw, 0.1),
                 id="cgfm_adamw"),
]
MODULATE_FACTORIES = [
    pytest.param(cgf_optax.modulate_by_gradient_norm,
                 id="modulate_by_gradient_norm"),
    pytest.param(functools.partial(cgf_optax.modulate_step,
                                   optax.scale_by_adam()),
                 id="modulate_step"),
    pytest.param(functools.partial(cgf_optax.cgfm, 0.1), id="cgfm"),
    pytest.param(functools.partial(cgf_optax.cgfm_adamw, 0.1),
                 id="cgfm_adamw"),
]


def _build_and_use(factory, params, **kwargs):
  """Builds, inits and updates: an error may come at any of the three."""
  tx = factory(**kwargs)
  state = tx.init(params)
  return tx.update(params, state, params)


def _all_finite(tree):
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


# --------------------------------------------------------------------------
# Hyper-parameters: ValueError naming the argument, at construction.


@pytest.mark.parametrize("rank", [0, -1, -8])
@pytest.mark.parametrize("factory", DECOMPOSE_FACTORIES)
def test_non_positive_rank(factory, rank):
  with pytest.raises(ValueError, match="`rank`"):
    factory(rank=rank)


@pytest.mark.parametrize("rank", [2.5, "8", None, True, [4]])
@pytest.mark.parametrize("factory", DECOMPOSE_FACTORIES)
def test_rank_of_wrong_type(factory, rank):
  with pytest.raises(ValueError, match="`rank`"):
    factory(rank=rank)


@pytest.mark.parametrize("value", [0, -1])
@pytest.mark.parametrize("factory", DECOMPOSE_FACTORIES)
def test_non_positive_intermediate_rank(factory, value):
  with pytest.raises(ValueError, match="intermediate_rank"):
    factory(num_scales=3, intermediate_rank=value)


@pytest.mark.parametrize("strategy", ["svd", "LowRank", "", None, 3])
@pytest.mark.parametrize("factory", DECOMPOSE_FACTORIES)
def test_unknown_strategy(factory, strategy):
  with pytest.raises(ValueError, match="strategy"):
    factory(strategy=strategy)


@pytest.mark.parametrize("refresh_every", [0, -1, 1.5])
@pytest.mark.parametrize("factory", DECOMPOSE_FACTORIES)
def test_bad_refresh_every(factory, refresh_every):
  with pytest.raises(ValueError, match="refresh_every"):
    factory(refresh_every=refresh_every)


@pytest.mark.parametrize("num_scales", [1, 4, 0, "2"])
@pytest.mark.parametrize("factory", DECOMPOSE_FACTORIES)
def test_bad_num_scales(factory, num_scales):
  with pytest.raises(ValueError, match="num_scales"):
    factory(num_scales=num_scales)


@pytest.mark.parametrize("fast, slow", [(0.99, 0.9), (0.9, 0.9), (0.5, 0.0)])
def test_temporal_slow_decay_not_above_fast_decay(fast, slow):
  with pytest.raises(ValueError, match="slow_decay"):
    cgf_optax.decompose("temporal", fast_decay=fast, slow_decay=slow)


@pytest.mark.parametrize("name, value", [
    ("fast_decay", 1.5), ("fast_decay", -0.1), ("slow_decay", 2.0),
    ("fast_decay", "0.9"),
])
def test_temporal_decay_out_of_range(name, value):
  with pytest.raises(ValueError, match=name):
    cgf_optax.decompose("temporal", **{name: value})


@pytest.mark.parametrize("name", ["local", "intermediate", "global_"])
@pytest.mark.parametrize("value", ["big", [0.5], (1.0,), {"a": 1.0}, None,
                                   float("nan"), jnp.ones(2)])
@pytest.mark.parametrize("factory", SCALE_FACTORIES)
def test_scale_weight_of_wrong_type(factory, name, value):
  with pytest.raises(ValueError, match=name):
    factory(**{name: value})


def test_scale_weight_path_callable_returning_wrong_type(make_tree):
  # A callable of the path is only called at trace time, per leaf.
  tx = optax.chain(cgf_optax.decompose("mean"),
                   cgf_optax.scale_by_scales(local=lambda path: "big"))
  params = make_tree()
  with pytest.raises(ValueError, match="local"):
    tx.update(params, tx.init(params), params)


@pytest.mark.parametrize("max_factor", [0.5, 0.0, -1.0, 0.999])
@pytest.mark.parametrize("factory", MODULATE_FACTORIES)
def test_max_factor_below_one(factory, max_factor):
  with pytest.raises(ValueError, match="max_factor"):
    factory(max_factor=max_factor)


@pytest.mark.parametrize("max_factor", ["2", [2.0], float("nan")])
@pytest.mark.parametrize("factory", MODULATE_FACTORIES)
def test_max_factor_of_wrong_type(factory, max_factor):
  with pytest.raises(ValueError, match="max_factor"):
    factory(max_factor=max_factor)


@pytest.mark.parametrize("reference", ["last", "FIRST", "", None])
@pytest.mark.parametrize("factory", MODULATE_FACTORIES)
def test_unknown_reference(factory, reference):
  with pytest.raises(ValueError, match="reference"):
    factory(reference=reference)


@pytest.mark.parametrize("scope", ["layer", "Global", "", None])
@pytest.mark.parametrize("factory", MODULATE_FACTORIES)
def test_unknown_scope(factory, scope):
  with pytest.raises(ValueError, match="scope"):
    factory(scope=scope)


@pytest.mark.parametrize("factory", [cgf_optax.cgfm, cgf_optax.cgfm_adamw])
@pytest.mark.parametrize("learning_rate", ["0.1", [0.1], None, float("nan")])
def test_learning_rate_of_wrong_type(factory, learning_rate):
  with pytest.raises(ValueError, match="learning_rate"):
    factory(learning_rate)


@pytest.mark.parametrize("momentum", [-0.1, 1.5, "0.9"])
def test_cgfm_bad_momentum(momentum):
  with pytest.raises(ValueError, match="momentum"):
    cgf_optax.cgfm(0.1, momentum=momentum)


@pytest.mark.parametrize("weight_decay", [-1e-4, "0.01"])
def test_cgfm_adamw_bad_weight_decay(weight_decay):
  with pytest.raises(ValueError, match="weight_decay"):
    cgf_optax.cgfm_adamw(0.1, weight_decay=weight_decay)


# --------------------------------------------------------------------------
# Per-leaf overrides (checked when the tree is seen, i.e. at init at latest).


@pytest.mark.parametrize("overrides", [
    {"embed": "svd"},
    {"embed": cgf_optax.LeafRule(strategy="svd")},
    lambda path, leaf: "svd" if "embed" in path else None,
])
def test_override_with_unknown_strategy(overrides, make_tree):
  with pytest.raises(ValueError, match="overrides"):
    _build_and_use(cgf_optax.decompose, make_tree(), overrides=overrides)


@pytest.mark.parametrize("overrides", [{"embed": 3}, 3, "embed"])
def test_override_of_wrong_type(overrides, make_tree):
  with pytest.raises(ValueError, match="overrides"):
    _build_and_use(cgf_optax.decompose, make_tree(), overrides=overrides)


@pytest.mark.parametrize("leaf", ["bias", "scale"])
@pytest.mark.parametrize("factory", DECOMPOSE_FACTORIES)
def test_lowrank_override_on_vector_or_scalar(factory, leaf, make_tree):
  with pytest.raises(ValueError, match="overrides") as info:
    _build_and_use(factory, make_tree(), overrides={f"^{leaf}$": "lowrank"})
  assert "lowrank" in str(info.value)


def test_intermediate_override_needs_three_scales(make_tree):
  with pytest.raises(ValueError, match="intermediate"):
    _build_and_use(cgf_optax.decompose, make_tree(), num_scales=2,
                   overrides={"embed": "intermediate"})


# --------------------------------------------------------------------------
# A rank larger than the matrix is clamped to min(m, n).


@pytest.mark.parametrize("rank, num_scales", [(8, 2), (100, 3)])
def test_rank_larger_than_matrix_is_clamped(rank, num_scales, make_tree):
  # embed is 16x8 and layers/kernel 3 x (8x8): min(m, n) = 8 for both, so
  # rank >= 8 projects onto everything: global is the whole gradient.
  tx = cgf_optax.decompose("lowrank", num_scales=num_scales, rank=rank)
  params = make_tree()
  grads = make_tree(seed=1)
  state = tx.init(params)
  assert state.basis["embed"].shape == (1, 8, 8)
  assert state.basis["layers"]["kernel"].shape == (3, 8, 8)
  update = jax.jit(tx.update)
  for g in (grads, make_tree(seed=2)):
    parts, state = update(g, state, params)
    for p, want in ((parts["embed"], g["embed"]),
                    (parts["layers"]["kernel"], g["layers"]["kernel"])):
      np.testing.assert_allclose(p.global_, want, rtol=1e-4, atol=1e-4)
      np.testing.assert_allclose(p.local, 0.0, atol=1e-4)
      if p.intermediate is not None:
        np.testing.assert_allclose(p.intermediate, 0.0, atol=1e-4)


# --------------------------------------------------------------------------
# NaN gradients: the documented policy is that they never enter the state
# (decompose keeps the previous basis / EMA entries, the modulation keeps its
# reference). After finite -> NaN -> finite (or NaN first), every state leaf
# must be finite again. refresh_every=1 makes the NaN step refresh the basis.


# cgfm-<strategy> holds decompose (two scales) and the modulation
# (reference="first", scope="global"); the other variants are added alone.
NAN_CASES = {
    "decompose-lowrank-3scales": lambda: cgf_optax.decompose(
        "lowrank", num_scales=3, rank=2, refresh_every=1),
    "decompose-temporal": lambda: cgf_optax.decompose("temporal"),
    "decompose-temporal-3scales": lambda: cgf_optax.decompose(
        "temporal", num_scales=3),
    "modulate-ema-leaf": lambda: cgf_optax.modulate_by_gradient_norm(
        "ema", scope="leaf"),
    **{f"cgfm-{s}": functools.partial(cgf_optax.cgfm, 0.1, strategy=s,
                                      rank=2, refresh_every=1)
       for s in STRATEGIES},
    "cgfm-lowrank-momentum": lambda: cgf_optax.cgfm(
        0.1, rank=2, refresh_every=1, momentum=0.9),
    **{f"cgfm_adamw-{s}": functools.partial(
        cgf_optax.cgfm_adamw, 0.1, strategy=s, rank=2, refresh_every=1)
       for s in STRATEGIES},
}


@functools.cache
def _nan_case(name):
  tx = NAN_CASES[name]()
  return tx, jax.jit(tx.update)


# The aliases' own parts (modulation, momentum, Adam) do not depend on the
# strategy, and decompose's are tested alone: the temporal and mean aliases
# run with -m slow.
NAN_PARAMS = [
    pytest.param(n, marks=[pytest.mark.slow] if n.startswith("cgfm") and (
        n.endswith("temporal") or n.endswith("mean")) else [])
    for n in NAN_CASES
]


@pytest.mark.parametrize("sequence", ["finite-nan-finite", "nan-finite-finite"])
@pytest.mark.parametrize("name", NAN_PARAMS)
def test_nan_gradient_does_not_stay_in_state(name, sequence, make_tree):
  tx, update = _nan_case(name)
  params = make_tree()
  nan = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), params)
  grads = {"finite": iter([make_tree(seed=1), make_tree(seed=2)]),
           "nan": iter([nan])}
  state = tx.init(params)
  for kind in sequence.split("-"):
    updates, state = update(next(grads[kind]), state, params)
  bad = [jax.tree_util.keystr(path) for path, x in
         jax.tree_util.tree_flatten_with_path(state)[0]
         if not bool(jnp.all(jnp.isfinite(x)))]
  assert not bad, f"non-finite state after {sequence}: {bad}"
  assert _all_finite(updates)


def _basis(state):
  if isinstance(state, cgf_optax.DecomposeState):
    return state.basis
  return state[0].basis  # the chain of an alias starts with decompose


@pytest.mark.parametrize("name", ["cgfm-lowrank", "decompose-lowrank-3scales"])
def test_nan_refresh_keeps_lowrank_basis(name, make_tree):
  tx, update = _nan_case(name)
  params = make_tree()
  state = tx.init(params)
  _, state = update(make_tree(seed=1), state, params)
  before = _basis(state)
  nan = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), params)
  out, state = update(nan, state, params)  # refresh_every=1: refreshes
  for b, a in zip(jax.tree.leaves(before), jax.tree.leaves(_basis(state)),
                  strict=True):
    np.testing.assert_array_equal(a, b)
  # The NaN is passed on (for apply_if_finite), not hidden.
  assert not _all_finite(out)


def test_partial_nan_keeps_only_that_ema_entry(make_tree):
  tx, update = _nan_case("decompose-temporal-3scales")
  params = make_tree()
  state = tx.init(params)
  _, state = update(make_tree(seed=1), state, params)
  g = make_tree(seed=2)
  g["embed"] = g["embed"].at[3, 5].set(jnp.nan)
  _, new = update(g, state, params)
  for ema in ("slow", "fast"):
    old_e, new_e = getattr(state, ema)["embed"], getattr(new, ema)["embed"]
    assert float(new_e[3, 5]) == float(old_e[3, 5])
    changed = np.array(new_e != old_e)
    changed[3, 5] = True
    assert changed.all(), f"{ema}: finite entries were not updated"


# --------------------------------------------------------------------------
# A shape-fixing hyper-parameter traced by inject_hyperparams.


def test_traced_rank_without_static_args(make_tree):
  params = make_tree()
  opt = optax.inject_hyperparams(cgf_optax.cgfm)(learning_rate=0.1, rank=2)
  with pytest.raises(ValueError, match="static_args"):
    state = opt.init(params)
    jax.jit(opt.update)(make_tree(seed=1), state, params)
  with pytest.raises(ValueError, match="static_args"):
    jax.jit(opt.init)(params)
