"""Fuzzing every public constructor (the aliases and the transforms).

Each call either works — ``init`` and two ``update`` steps give finite
updates of the params' shapes and dtypes (and a finite state) for finite
input, on empty, scalar, 1-D, 0-size, 1×n / n×1 and 4-D leaves in float32,
bfloat16 and float16 — or raises a ``ValueError``/``TypeError`` whose message
names the argument: never an obscure error from inside JAX, never a silent
NaN. Hyper-parameters are checked by the constructor; the parameter tree
(complex, integer or non-array leaves) by ``init``/``update``, naming the leaf.

Each valid example compiles its `update` once for its two steps (cheaper
than running the low-rank refresh and the context pooling eagerly). The
``*_long`` variants run many more examples (``-m slow``).
"""

from __future__ import annotations

import inspect
import math
import types
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cgf_optax

# --------------------------------------------------------------------------
# The constructors and their arguments.

NAN, INF = float("nan"), float("inf")
STRATEGIES = ("lowrank", "temporal", "mean")

# Wrong for any number.
NOT_NUMBERS = ["0.1", None, [0.1], (0.1,), {"a": 0.1}, True, False, 1j,
               np.ones(2), object()]
NON_FINITE = [NAN, INF, -INF, 1e39, -1e300]   # 1e39 overflows float32
NOT_INTS = ["2", None, [2], True, 2.5, NAN, INF, 1j, object(),
            np.float32(1.5), np.ones(2, np.int32)]
NOT_CHOICES = ["", "nope", None, 3, True, ["leaf"], "LEAF", "Global "]
NOT_BOOLS = ["yes", "False", 1, 0, None, 1.0, [True]]
NOT_DTYPES = ["float17", "int8", jnp.int32, jnp.complex64, bool, 3, object()]


ADAM = optax.scale_by_adam()


def _schedule_or(numbers: st.SearchStrategy) -> st.SearchStrategy:
  return st.one_of(numbers, st.just(optax.linear_schedule(1.0, 0.1, 10)))


# kind -> (valid values, invalid values). A kind's name is what it checks.
KINDS: dict[str, tuple[st.SearchStrategy, list[Any]]] = {
    "learning_rate": (_schedule_or(st.floats(-1.0, 1.0)),
                      NOT_NUMBERS + NON_FINITE),
    "unit": (st.floats(0.0, 1.0), NOT_NUMBERS + NON_FINITE + [-0.1, 1.5, 1e9]),
    "unit_open": (st.floats(0.0, 0.99),
                  NOT_NUMBERS + NON_FINITE + [-0.1, 1.0, 1.5]),
    "nonneg": (st.floats(0.0, 10.0), NOT_NUMBERS + NON_FINITE + [-1e-3, -1e9]),
    "small_nonneg": (st.sampled_from([0.0, 1e-12, 1e-8, 1e-3]),
                     NOT_NUMBERS + NON_FINITE + [-1e-8]),
    "positive": (st.sampled_from([1e-12, 1e-8, 1e-3]),
                 NOT_NUMBERS + NON_FINITE + [0.0, -1e-8]),
    "max_factor": (st.one_of(st.none(), st.floats(1.0, 100.0)),
                   NOT_NUMBERS[:1] + NOT_NUMBERS[2:] + NON_FINITE
                   + [0.999, 0.0, -2.0]),
    "weight": (st.one_of(
        st.floats(-10.0, 10.0),
        st.sampled_from([optax.linear_schedule(1.0, 0.0, 10),
                         lambda path: 0.5,
                         lambda path: optax.constant_schedule(0.25)])),
               NOT_NUMBERS + NON_FINITE),
    "pos_int": (st.integers(1, 3), NOT_INTS + [0, -1]),
    "int32": (st.integers(1, 3), NOT_INTS + [0, -1, 2**31, 2**40]),
    "iters": (st.integers(1, 3), NOT_INTS + [0, -1, 65, 2**31]),
    "big_int": (st.one_of(st.integers(1, 4), st.just(2**40)),
                NOT_INTS + [0, -3]),
    "seed": (st.one_of(st.integers(-2**63, 2**63 - 1)),
             ["0", None, 1.5, True, 2**63, -2**63 - 1, [0]]),
    "bool": (st.booleans(), NOT_BOOLS),
    "num_scales": (st.sampled_from([2, 3]), [1, 4, 0, "2", None, 2.5, True]),
    "float_dtype": (st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16,
                                     "float32"]), NOT_DTYPES + [None]),
    "dtype_or_none": (st.sampled_from([None, jnp.float32, jnp.bfloat16,
                                       jnp.float16]), NOT_DTYPES),
    "lam_bounds": (st.just((0.05, 1.0)),
                   [0.5, "ab", (0.1,), (0.1, 0.5, 0.9), (0.9, 0.1),
                    (-0.1, 1.0), (0.1, 1.5), (NAN, 1.0), None, ("0", 1.0)]),
    "mask": (st.sampled_from([None, True,
                              lambda p: jax.tree.map(lambda x: x.ndim > 1, p)]),
             ["abc", 3, [1, 2], {"a": "x"}, 1.5]),
    "inner": (st.sampled_from([ADAM, optax.identity(),
                               optax.scale_by_sign(), optax.sgd(0.1)]),
              ["adam", None, 3, optax.adam, [optax.identity()]]),
    "overrides": (st.sampled_from([
        None, {"m": "mean"}, {"^v$": "temporal"}, {"m": "global"},
        {"k4": cgf_optax.MatrixAxes(fan_in=(0, 1, 2), fan_out=3)},
        lambda path, leaf: "mean" if leaf.ndim == 2 else None]),
                  [3, "m", ["m"], {"(": "mean"}, {3: "mean"}]),
    # shard_map axis names: only None is valid outside shard_map (the
    # collectives are tested in test_sharded_training.py).
    "axis": (st.none(), [3, "", ("data", "data"), ("data", 3), 1.5, b"x"]),
    "leaf_axis": (st.none(), [3, "", ("data", "data"), ("data", 3), 1.5]),
}


def _choice(*options: str) -> tuple[st.SearchStrategy, list[Any]]:
  return st.sampled_from(options), NOT_CHOICES + [o.upper() for o in options]


DECOMPOSE_ARGS = {
    "strategy": _choice(*STRATEGIES), "num_scales": "num_scales",
    "rank": "big_int", "refresh_every": "int32",
    "intermediate_rank": "big_int", "power_iters": "iters",
    "init_power_iters": "iters",
    "stagger": "bool", "overrides": "overrides", "seed": "seed",
}
SCALE_ARGS = {"local": "weight", "intermediate": "weight", "global_": "weight"}
MODULATE_ARGS = {"reference": _choice("first", "ema"), "max_factor": "max_factor",
                 "scope": _choice("global", "leaf")}
ADAM_ARGS = {"b1": "unit_open", "b2": "unit_open", "adam_eps": "positive",
             "weight_decay": "nonneg", "mu_dtype": "dtype_or_none",
             "mask": "mask"}
ENTANGLE_ARGS = {"lam": "unit", "adapt_rate": "nonneg",
                 "lam_bounds": "lam_bounds",
                 "loss_signal": _choice("relative", "log_ratio")}
ALIGN_ARGS = {"num_heads": "pos_int", "gamma": "nonneg", "rho": "unit_open",
              "require_context": "bool"}

CEGM_AXES = {"axis_name": "axis", "norm_axis_name": "leaf_axis"}

SPECS: dict[str, dict[str, Any]] = {
    "cgfm": {"learning_rate": "learning_rate", **DECOMPOSE_ARGS, **SCALE_ARGS,
             **MODULATE_ARGS, "momentum": "unit", "nesterov": "bool",
             "norm_axis_name": "leaf_axis"},
    "cgfm_adamw": {"learning_rate": "learning_rate", **ADAM_ARGS,
                   **DECOMPOSE_ARGS, **SCALE_ARGS, **MODULATE_ARGS,
                   "modulate": "bool", "norm_axis_name": "leaf_axis"},
    "cegm": {"learning_rate": "learning_rate", **ENTANGLE_ARGS, **ALIGN_ARGS,
             "normalize_scope": _choice("leaf", "global"),
             "normalize_eps": "small_nonneg", "state_dtype": "dtype_or_none",
             **CEGM_AXES},
    "cegm_adamw": {"learning_rate": "learning_rate", **ADAM_ARGS,
                   **ENTANGLE_ARGS, **ALIGN_ARGS,
                   "normalize_scope": _choice("leaf", "global"),
                   "normalize_eps": "small_nonneg",
                   "state_dtype": "dtype_or_none", **CEGM_AXES},
    "cgfm_decompose": DECOMPOSE_ARGS,
    "decompose": {**DECOMPOSE_ARGS,
                  "fast_decay": "unit", "slow_decay": "unit",
                  "vector_scale": _choice("local", "global", "global_"),
                  "nd_rule": _choice("batch", "flatten"),
                  "basis_dtype": "float_dtype", "ema_dtype": "dtype_or_none"},
    "scale_by_scales": SCALE_ARGS,
    "modulate_by_gradient_norm": {**MODULATE_ARGS, "eps": "small_nonneg",
                                  "ema_decay": "unit_open",
                                  "axis_name": "leaf_axis"},
    "modulate_step": {"inner": "inner", **MODULATE_ARGS, "eps": "small_nonneg",
                      "ema_decay": "unit_open", "axis_name": "leaf_axis"},
    "entangle": {**ENTANGLE_ARGS, "state_dtype": "dtype_or_none",
                 "axis_name": "axis"},
    "context_align": {**ALIGN_ARGS, "eps": "small_nonneg", "axis_name": "axis"},
    "normalize": {"scope": _choice("leaf", "global"), "eps": "small_nonneg",
                  "axis_name": "leaf_axis"},
}
# Arguments that may also be None.
NONE_OK = {"intermediate_rank", "momentum", "overrides", "axis_name",
           "norm_axis_name"}
# What the factory needs to be called at all.
REQUIRED = {"cgfm": {"learning_rate": 0.1}, "cgfm_adamw": {"learning_rate": 0.1},
            "cegm": {"learning_rate": 0.1}, "cegm_adamw": {"learning_rate": 0.1},
            "modulate_step": {"inner": ADAM}}
TAKES_VALUE = {"cgfm": False, "cgfm_adamw": False, "cegm": True,
               "cegm_adamw": True, "entangle": True}
TAKES_CONTEXT = {"cegm", "cegm_adamw", "context_align"}


def _none_ok(name: str, arg: str) -> bool:
  return arg in NONE_OK or (name, arg) == ("cegm_adamw", "normalize_scope")


def _kind(spec: Any) -> tuple[st.SearchStrategy, list[Any]]:
  return KINDS[spec] if isinstance(spec, str) else spec


def _invalid(name: str, arg: str) -> list[Any]:
  bad = _kind(SPECS[name][arg])[1]
  return [b for b in bad if not (b is None and _none_ok(name, arg))]


def _factory(name: str) -> Callable[..., optax.GradientTransformation]:
  return getattr(cgf_optax, name)


def test_every_public_constructor_is_fuzzed():
  """Every function of `cgf_optax.__all__` that builds a transformation, and
  every argument of each, has a spec here."""
  built = set()
  for name in cgf_optax.__all__:
    obj = getattr(cgf_optax, name)
    if isinstance(obj, types.FunctionType) and obj.__module__.startswith(
        ("cgf_optax.aliases", "cgf_optax.transforms")):
      built.add(name)
  assert built == set(SPECS)
  for name, spec in SPECS.items():
    params = {p.name for p in inspect.signature(_factory(name)).parameters.values()
              if p.kind is not p.VAR_KEYWORD}   # cgfm_decompose's **ignored
    assert params == set(spec), (name, params ^ set(spec))


# --------------------------------------------------------------------------
# Invalid hyper-parameters: an error naming the argument, at construction.


def _run_invalid(data: st.DataObject, name: str) -> None:
  spec = SPECS[name]
  arg = data.draw(st.sampled_from(sorted(spec)), label="argument")
  bad = data.draw(st.sampled_from(_invalid(name, arg)), label="value")
  kwargs = {**REQUIRED.get(name, {}), arg: bad}
  if name == "decompose" and arg in ("fast_decay", "slow_decay"):
    kwargs["strategy"] = "temporal"
  tree = {"m": jnp.ones((4, 3)), "v": jnp.ones(3)}
  with pytest.raises((ValueError, TypeError)) as info:
    tx = _factory(name)(**kwargs)
    if arg == "overrides":   # a rule is only checked against the tree
      tx.init(tree)
  message = str(info.value)
  assert arg in message, f"{name}({arg}={bad!r}) raised {message!r}"


FAST = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
LONG = settings(max_examples=2000, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("name", SPECS)
@FAST
@given(data=st.data())
def test_invalid_hyperparameter_raises_naming_it(name, data):
  _run_invalid(data, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", SPECS)
@LONG
@given(data=st.data())
def test_invalid_hyperparameter_raises_naming_it_long(name, data):
  _run_invalid(data, name)


def test_every_invalid_value_of_every_argument():
  """The exhaustive version of the above (construction only: cheap)."""
  for name, spec in SPECS.items():
    for arg in spec:
      for bad in _invalid(name, arg):
        kwargs = {**REQUIRED.get(name, {}), arg: bad}
        if name == "decompose" and arg in ("fast_decay", "slow_decay"):
          kwargs["strategy"] = "temporal"
        try:
          tx = _factory(name)(**kwargs)
          if arg == "overrides":
            tx.init({"m": jnp.ones((4, 3)), "v": jnp.ones(3)})
        except (ValueError, TypeError) as e:
          assert arg in str(e), f"{name}({arg}={bad!r}) raised {e!r}"
        else:
          raise AssertionError(f"{name}({arg}={bad!r}) did not raise")


# --------------------------------------------------------------------------
# Valid hyper-parameters and odd trees: finite output of the right shapes.

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
TREES: list[Any] = [
    {},
    {"s": ()},
    {"v": (3,), "z": (0,), "m": (4, 6)},
    {"k4": (2, 2, 4, 3), "e": (0, 5), "b": (2, 0, 3)},
    (6, 4),                                   # a bare array, not a dict
    {"row": (1, 5), "col": (5, 1), "s": ()},
]


@st.composite
def trees(draw: Any) -> Any:
  shapes = draw(st.sampled_from(TREES))
  is_shape = lambda x: isinstance(x, tuple) and all(isinstance(d, int)
                                                    for d in x)
  n = len(jax.tree.leaves(shapes, is_leaf=is_shape))
  dtypes = iter(draw(st.lists(st.sampled_from(DTYPES), min_size=n,
                              max_size=n)))
  return jax.tree.map(lambda s: jnp.zeros(s, next(dtypes)), shapes,
                      is_leaf=is_shape)


def _random_like(tree: Any, seed: int) -> Any:
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), tree)


F32_TINY = float(np.finfo(np.float32).tiny)


@st.composite
def valid_kwargs(draw: Any, name: str) -> dict[str, Any]:
  spec = SPECS[name]
  args = draw(st.lists(st.sampled_from(sorted(spec)), unique=True,
                       max_size=6))
  kwargs = dict(REQUIRED.get(name, {}))
  for arg in args:
    kwargs[arg] = draw(_kind(spec[arg])[0])
    if _none_ok(name, arg) and draw(st.booleans()):
      kwargs[arg] = None
  # Constraints between arguments.
  if "lam" in kwargs or "lam_bounds" in kwargs:
    # float32 subnormals are refused (they flush to 0): map them to 0.
    normal = st.floats(0.0, 1.0).map(lambda x: x if x >= F32_TINY else 0.0)
    lo, lam, hi = sorted(draw(st.lists(normal, min_size=3, max_size=3)))
    kwargs.update(lam=lam, lam_bounds=(lo, hi))
  if name == "decompose":
    fast = kwargs.get("fast_decay", 0.9)
    slow = kwargs.get("slow_decay", 0.99)
    if kwargs.get("strategy", "lowrank") == "temporal" and not slow > fast:
      kwargs["fast_decay"], kwargs["slow_decay"] = 0.5, 0.9
  if kwargs.get("reference") == "ema" and "ema_decay" in kwargs:
    kwargs["ema_decay"] = min(kwargs["ema_decay"], 0.99)
  return kwargs


def _runnable(name: str, tx: optax.GradientTransformation
              ) -> optax.GradientTransformation:
  """scale_by_scales needs the Scales that decompose makes."""
  if name == "scale_by_scales":
    return optax.chain(cgf_optax.decompose("mean", num_scales=3), tx)
  return tx


def _context_shapes(name: str, kwargs: dict[str, Any], tree: Any,
                    draw: Any) -> dict[str, tuple[tuple[int, ...], Any]]:
  """Contexts (shape, dtype) for some kernels whose fan-in num_heads divides."""
  if name not in TAKES_CONTEXT:
    return {}
  heads = kwargs.get("num_heads", 1)
  shapes = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    key = jax.tree_util.keystr(path, simple=True, separator="/")
    if (leaf.ndim >= 2 and leaf.shape[0] > 0 and leaf.shape[0] % heads == 0
        and draw(st.booleans())):
      tokens = draw(st.sampled_from([0, 1, 3]))   # 0 tokens: an empty batch
      shapes[key] = ((tokens, leaf.shape[0]), leaf.dtype)
  return shapes


def _extra(name: str, contexts: dict[str, Any], step: int) -> dict[str, Any]:
  extra: dict[str, Any] = {}
  if TAKES_VALUE.get(name, False):
    extra["value"] = jnp.float32(2.0 / (1 + step))
  if name in TAKES_CONTEXT:
    rng = np.random.default_rng(step)
    extra["context"] = {
        k: jnp.asarray(1 + rng.standard_normal(shape), dtype)
        for k, (shape, dtype) in contexts.items()}
  return extra


def _uses_adam(name: str, kwargs: dict[str, Any]) -> bool:
  return name.endswith("adamw") or kwargs.get("inner") is ADAM


def _check_outputs(name: str, kwargs: dict[str, Any], params: Any,
                   updates: Any, state: Any) -> None:
  is_scales = lambda x: isinstance(x, cgf_optax.Scales)
  assert (jax.tree.structure(updates, is_leaf=is_scales)
          == jax.tree.structure(params)), "updates not shaped like the params"
  adam = _uses_adam(name, kwargs)
  mu_dtype = kwargs.get("mu_dtype")

  def check(u: Any, p: jax.Array) -> None:
    parts = [x for x in u if x is not None] if is_scales(u) else [u]
    for x in parts:
      assert x.shape == p.shape, (x.shape, p.shape)
      ok = {p.dtype} if mu_dtype is None else {
          p.dtype, jnp.promote_types(p.dtype, mu_dtype)}
      assert x.dtype in ok, (x.dtype, p.dtype)
      # Adam's own float16 arithmetic (optax.scale_by_adam's, as in
      # optax.adamw) underflows its second moment for small entries.
      if not (adam and jnp.float16 in (p.dtype, x.dtype)):
        assert np.isfinite(np.asarray(x, np.float32)).all(), "non-finite update"

  jax.tree.map(check, updates, params, is_leaf=is_scales)
  for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
    x = np.asarray(x)
    key = jax.tree_util.keystr(path)
    if np.issubdtype(x.dtype, np.floating) or x.dtype == jnp.bfloat16:
      if adam and (".mu" in key or ".nu" in key):
        continue   # Adam's moments: float16 as above
      assert np.isfinite(x.astype(np.float32)).all(), f"non-finite state {key}"


def _run_valid(data: st.DataObject, name: str) -> None:
  kwargs = data.draw(valid_kwargs(name), label="kwargs")
  params = data.draw(trees(), label="params")
  contexts = _context_shapes(name, kwargs, params, data.draw)
  tx = _runnable(name, _factory(name)(**kwargs))
  state = tx.init(params)
  update = jax.jit(tx.update)   # one compilation for both steps
  for step in range(2):
    grads = _random_like(params, step)
    updates, state = update(grads, state, params,
                            **_extra(name, contexts, step))
    _check_outputs(name, kwargs, params, updates, state)


@pytest.mark.parametrize("name", SPECS)
@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_valid_hyperparameters_on_odd_trees(name, data):
  _run_valid(data, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", SPECS)
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_valid_hyperparameters_on_odd_trees_long(name, data):
  _run_valid(data, name)


@pytest.mark.parametrize("name", SPECS)
def test_empty_and_scalar_trees(name):
  """The smallest trees, for every scope (hypothesis draws them only now and
  then; per-leaf scopes on an empty tree once failed)."""
  variants = [{}]
  for arg in ("scope", "normalize_scope", "reference"):
    if arg in SPECS[name]:
      variants += [{arg: o} for o in _kind(SPECS[name][arg])[0].elements]
  for params in ({}, {"s": jnp.float32(2.0)}, jnp.zeros((0, 3), jnp.bfloat16)):
    for kw in variants:
      kwargs = {**REQUIRED.get(name, {}), **kw}
      tx = _runnable(name, _factory(name)(**kwargs))
      state = tx.init(params)
      for step in range(2):
        updates, state = tx.update(_random_like(params, step), state, params,
                                   **_extra(name, {}, step))
        _check_outputs(name, kwargs, params, updates, state)


# --------------------------------------------------------------------------
# Trees the transforms do not support: complex, integer, non-array leaves.

BAD_LEAVES = [
    (jnp.ones((2, 2), jnp.complex64), "complex"),
    (jnp.ones(3, jnp.int32), "floating"),
    (jnp.ones((), jnp.bool_), "floating"),
    (1.5, "not an array"),
]


@pytest.mark.parametrize("leaf, message", BAD_LEAVES,
                         ids=["complex", "int", "bool", "python-float"])
@pytest.mark.parametrize("name", SPECS)
def test_unsupported_leaves_raise_naming_the_leaf(name, leaf, message):
  params = {"ok": jnp.ones((4, 2)), "odd": leaf}
  kwargs = dict(REQUIRED.get(name, {}))
  if name in TAKES_CONTEXT:
    kwargs["require_context"] = False
  tx = _factory(name)(**kwargs)
  with pytest.raises(TypeError, match=message) as info:
    state = tx.init(params)
    tx.update(params, state, params)
  assert "'odd'" in str(info.value)


@pytest.mark.parametrize("name", ["normalize", "entangle", "cgfm"])
def test_complex_updates_raise_too(name):
  """A complex gradient for real params (not only complex params)."""
  kwargs = dict(REQUIRED.get(name, {}))
  tx = _factory(name)(**kwargs)
  params = {"w": jnp.ones((2, 2))}
  state = tx.init(params)
  with pytest.raises(TypeError, match="complex"):
    tx.update({"w": jnp.ones((2, 2), jnp.complex64)}, state, params)


def test_optax_adamw_supports_complex_and_we_say_we_do_not():
  """The contrast that makes the error worth raising: optax.adamw accepts
  complex params; ours would drop the imaginary part of norms silently."""
  p = {"w": jnp.full((2, 2), 1 + 1j, jnp.complex64)}
  u, _ = optax.adamw(1e-3).update(p, optax.adamw(1e-3).init(p), p)
  assert u["w"].dtype == jnp.complex64
  assert math.isfinite(float(jnp.abs(u["w"]).max()))
  with pytest.raises(TypeError, match="complex"):
    cgf_optax.cgfm_adamw(1e-3).init(p)
