"""Non-finite gradients and losses: the policy of README's "Non-finite values".

For every transform and every alias (the CGFM ones with each strategy), with
NaN/Inf in one entry, in one leaf or in all leaves, for one step, several
steps in a row or the first step:

* the NaN/Inf reaches the output of the bad step (the caller sees it);
* the state stays finite, and the finite steps after it give finite updates;
* across the bad steps the state does not change, except step counters,
  the last step's telemetry (the modulation's ``norm``/``factor``/``finite``)
  and inner optimizers (Adam, momentum), which take a zero-gradient step;
* so the trajectory after recovery is that of a run where the bad steps were
  skipped, for the transforms whose behaviour does not depend on their step
  counter ("skip" below), and that of a run where the bad steps had a zero
  gradient, for those where a zero gradient changes nothing but the counter
  and the inner optimizer ("zeros"). Counters count *calls*, as Optax's own
  do: a bad step that falls on a low-rank refresh skips that refresh, and
  the temporal EMAs' bias correction counts it. `optax.apply_if_finite`
  gives exact skipping for everything, and counts the bad steps;
* a NaN or infinite loss (``value=``) never changes λ or the last loss.

Every case compiles one `update` and runs it on tiny trees.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cgf_optax

# NaN/Inf inputs on purpose, from import on: skipped in debug-NaN mode.
if jax.config.jax_debug_nans:
  pytest.skip("feeds NaN/Inf on purpose; jax_debug_nans turns them into "
              "errors by design", allow_module_level=True)
pytestmark = pytest.mark.nonfinite_inputs

PARAMS = {"b": jnp.linspace(-1.0, 1.0, 3), "w": jnp.ones((4, 3))}
CTX_SHAPE = (5, 4)        # the context of "w": 5 tokens of its fan-in 4
NAN = jnp.float32(jnp.nan)


def _grads(i: int) -> dict[str, jax.Array]:
  rng = np.random.default_rng(i)
  return jax.tree.map(
      lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), PARAMS)


def _bad(kind: str, i: int) -> dict[str, jax.Array]:
  g = _grads(1000 + i)
  if kind == "nan_entry":      # one entry of one leaf
    g["w"] = g["w"].at[1, 2].set(jnp.nan)
  elif kind == "inf_leaf":     # one whole leaf
    g["b"] = jnp.full_like(g["b"], jnp.inf)
  elif kind == "nan_all":
    g = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), g)
  elif kind == "inf_all":      # +inf and -inf in every leaf
    g = jax.tree.map(
        lambda x: jnp.where(jnp.arange(x.size).reshape(x.shape) % 2 == 0,
                            jnp.inf, -jnp.inf).astype(x.dtype), g)
  else:
    raise AssertionError(kind)
  return g


def _zeros(i: int) -> dict[str, jax.Array]:
  del i
  return jax.tree.map(jnp.zeros_like, PARAMS)


def _value(i: int) -> jax.Array:
  return jnp.float32(3.0 / (1.0 + i) + 0.5 * np.sin(i))


def _context(i: int) -> dict[str, jax.Array]:
  rng = np.random.default_rng(500 + i)
  return {"w": jnp.asarray(1.0 + rng.standard_normal(CTX_SHAPE), jnp.float32)}


# Where an inner optimizer's state sits in a case's state: a path of tuple
# indices and NamedTuple field names.
Loc = tuple[int | str, ...]


def _get(tree: Any, loc: Loc) -> Any:
  for k in loc:
    tree = getattr(tree, k) if isinstance(k, str) else tree[k]
  return tree


def _set(tree: Any, loc: Loc, value: Any) -> Any:
  if not loc:
    return value
  k, rest = loc[0], loc[1:]
  if isinstance(k, str):
    return tree._replace(**{k: _set(getattr(tree, k), rest, value)})
  return tree[:k] + (_set(tree[k], rest, value),) + tree[k + 1:]


class Case(NamedTuple):
  make: Callable[[], optax.GradientTransformation]
  value: bool = False        # takes the loss as `value=`
  context: bool = False      # takes `context=`
  skip: bool = False         # bad steps == skipped steps
  zeros: bool = False        # bad steps == zero-gradient steps
  # The inner optimizer fed zeros on a bad step: (where, the transform).
  inner: tuple[Loc, optax.GradientTransformation] | None = None


ADAM = optax.scale_by_adam()   # the aliases' Adam, with their defaults
CHAIN_ADAM = ((2, "inner"), ADAM)   # cgfm_adamw: decompose, scale, modulate_step

CASES: dict[str, Case] = {
    # The transforms.
    "decompose-lowrank": Case(lambda: cgf_optax.decompose(
        "lowrank", num_scales=3, rank=1, refresh_every=1), zeros=True),
    "decompose-temporal": Case(lambda: cgf_optax.decompose(
        "temporal", num_scales=3)),
    "decompose-mean": Case(lambda: cgf_optax.decompose("mean", num_scales=3),
                           skip=True, zeros=True),
    "scale_by_scales": Case(lambda: optax.chain(
        cgf_optax.decompose("mean"),
        cgf_optax.scale_by_scales(local=1.0, global_=0.3)),
                            skip=True, zeros=True),
    "modulate-first-global": Case(lambda: cgf_optax.modulate_by_gradient_norm(
        max_factor=3.0), skip=True, zeros=True),
    "modulate-ema-leaf": Case(lambda: cgf_optax.modulate_by_gradient_norm(
        "ema", scope="leaf"), skip=True),
    "modulate_step-adam": Case(lambda: cgf_optax.modulate_step(ADAM),
                               zeros=True, inner=(("inner",), ADAM)),
    "modulate_step-sign": Case(lambda: cgf_optax.modulate_step(
        optax.scale_by_sign()), skip=True, zeros=True),
    "entangle": Case(lambda: cgf_optax.entangle(0.7, adapt_rate=0.3),
                     value=True, skip=True),
    "context_align": Case(lambda: cgf_optax.context_align(2, gamma=0.5),
                          context=True, skip=True),
    "normalize-leaf": Case(lambda: cgf_optax.normalize("leaf"), skip=True),
    "normalize-global": Case(lambda: cgf_optax.normalize("global"), skip=True),
    # The aliases.
    "cgfm-lowrank": Case(lambda: cgf_optax.cgfm(
        0.1, rank=1, refresh_every=2), zeros=True),
    "cgfm-temporal": Case(lambda: cgf_optax.cgfm(0.1, strategy="temporal")),
    "cgfm-mean": Case(lambda: cgf_optax.cgfm(0.1, strategy="mean"),
                      skip=True, zeros=True),
    "cgfm-momentum": Case(lambda: cgf_optax.cgfm(
        0.1, strategy="mean", momentum=0.9), zeros=True,
                          inner=((3,), optax.trace(decay=0.9))),
    "cgfm_adamw-lowrank": Case(lambda: cgf_optax.cgfm_adamw(
        0.1, rank=1, refresh_every=2), zeros=True, inner=CHAIN_ADAM),
    "cgfm_adamw-temporal": Case(lambda: cgf_optax.cgfm_adamw(
        0.1, strategy="temporal"), inner=CHAIN_ADAM),
    "cgfm_adamw-mean": Case(lambda: cgf_optax.cgfm_adamw(
        0.1, strategy="mean"), zeros=True, inner=CHAIN_ADAM),
    "cgfm_adamw-unmodulated": Case(lambda: cgf_optax.cgfm_adamw(
        0.1, strategy="mean", modulate=False), zeros=True,
                                   inner=((2,), ADAM)),
    "cegm": Case(lambda: cgf_optax.cegm(0.1, num_heads=2, adapt_rate=0.3),
                 value=True, context=True, skip=True),
    "cegm_adamw": Case(lambda: cgf_optax.cegm_adamw(
        0.1, num_heads=2, adapt_rate=0.3), value=True, context=True,
                       inner=((3,), ADAM)),
}
# apply_if_finite wraps any chain alike: one configuration of each alias.
WRAPPED = ["cgfm-temporal", "cgfm_adamw-lowrank", "cegm", "cegm_adamw"]

KINDS = ("nan_entry", "inf_leaf", "nan_all", "inf_all")
WHOLE_KINDS = ("nan_all", "inf_all")   # every leaf bad: the whole step is
# F: a finite step, B: a bad one. A bad first step, one bad step, and three
# in a row, each followed by finite steps.
SEQ = "BFFBFBBBFF"


def _bad_blocks(seq: str) -> list[tuple[int, int]]:
  """[start, end) of every run of bad steps."""
  blocks, start = [], None
  for k, ch in enumerate(seq + "F"):
    if ch == "B" and start is None:
      start = k
    elif ch != "B" and start is not None:
      blocks.append((start, k))
      start = None
  return blocks


@functools.cache
def _compiled(name: str):
  """The case's transform and its update: jitted where the low-rank refresh
  (a `lax.cond` over subspace iterations) is traced, eager elsewhere (cheaper
  than one compilation per case: JAX caches eager ops across cases)."""
  tx = CASES[name].make()
  return tx, jax.jit(tx.update) if "lowrank" in name else tx.update


def _extra(case: Case, i: int, bad: bool) -> dict[str, Any]:
  """The extra arguments of a step: a NaN loss and context on a bad one."""
  extra: dict[str, Any] = {}
  if case.value:
    extra["value"] = NAN if bad else _value(i)
  if case.context:
    ctx = _context(i)
    extra["context"] = (jax.tree.map(lambda c: jnp.full_like(c, jnp.nan), ctx)
                        if bad else ctx)
  return extra


class Run(NamedTuple):
  outs: list[Any]       # updates of every step
  states: list[Any]     # states[0] the initial one, states[k+1] after step k


def _run(name: str, seq: str, kind: str, wrap=None) -> Run:
  """Runs `seq` (F finite, B bad of `kind`, Z zero gradient, with the
  extra arguments of a bad step). The finite steps use the same gradients,
  losses and contexts, in order, whatever the rest of `seq`."""
  case = CASES[name]
  if wrap is None:
    tx, update = _compiled(name)
  else:
    tx, update = wrap
  state = tx.init(PARAMS)
  run = Run([], [state])
  i = j = 0
  for ch in seq:
    if ch == "F":
      g, extra = _grads(i), _extra(case, i, bad=False)
      i += 1
    else:
      g = _bad(kind, j) if ch == "B" else _zeros(j)
      extra = _extra(case, j, bad=True)
      j += 1
    u, state = update(g, state, PARAMS, **extra)
    run.outs.append(u)
    run.states.append(state)
  return run


@functools.cache
def _cached_run(name: str, seq: str, kind: str) -> Run:
  return _run(name, seq, kind if "B" in seq else "")


def _nonfinite(tree: Any, *, allow: tuple[str, ...] = ()) -> list[str]:
  """Paths of floating leaves of `tree` with a NaN/Inf."""
  bad = []
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    key = jax.tree_util.keystr(path)
    x = np.asarray(x)
    if (jnp.issubdtype(x.dtype, jnp.floating)
        and not np.isfinite(x.astype(np.float32)).all()
        and not key.endswith(allow)):
      bad.append(key)
  return bad


def _all_finite(tree: Any) -> bool:
  return not _nonfinite(tree)


_TELEMETRY = {cgf_optax.ModulateState: ("count", "norm", "factor", "finite")}


def _strip(tree: Any) -> Any:
  """`tree` without step counters and last-step telemetry (set to None)."""
  if isinstance(tree, tuple) and hasattr(tree, "_fields"):
    drop = _TELEMETRY.get(type(tree), ("count",))
    return type(tree)(**{f: None if f in drop else _strip(getattr(tree, f))
                         for f in tree._fields})
  if isinstance(tree, (tuple, list)):
    return type(tree)(_strip(x) for x in tree)
  if isinstance(tree, dict):
    return {k: _strip(x) for k, x in tree.items()}
  return tree


def _assert_equal(a: Any, b: Any, what: str) -> None:
  la, ta = jax.tree_util.tree_flatten_with_path(a)
  lb, tb = jax.tree_util.tree_flatten_with_path(b)
  assert ta == tb, f"{what}: different structures"
  for (path, x), (_, y) in zip(la, lb, strict=True):
    np.testing.assert_array_equal(
        np.asarray(x), np.asarray(y),
        err_msg=f"{what}: {jax.tree_util.keystr(path)}")


# --------------------------------------------------------------------------
# The state stays finite; the bad step's output is not; recovery.


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", CASES)
def test_bad_steps_leave_the_state_finite(name, kind):
  seq = SEQ
  run = _cached_run(name, seq, kind)
  for step, (ch, u, s) in enumerate(
      zip(seq, run.outs, run.states[1:], strict=True)):
    # No exception: `entangle` says "no loss yet" with a flag, not a NaN.
    bad = _nonfinite(s)
    assert not bad, f"step {step} ({ch}): non-finite state at {bad}"
    if ch == "B":
      assert not _all_finite(u), f"step {step}: the NaN/Inf was hidden"
    else:
      assert _all_finite(u), f"step {step}: non-finite update after recovery"


@pytest.mark.parametrize("kind", WHOLE_KINDS)
@pytest.mark.parametrize("name", CASES)
def test_bad_steps_change_only_counters_and_inner_optimizers(name, kind):
  """Across a run of bad steps the state is what it was, but for counters,
  telemetry, and the inner optimizer, which took zero-gradient steps."""
  case = CASES[name]
  run = _cached_run(name, SEQ, kind)
  zeros = jax.tree.map(jnp.zeros_like, PARAMS)
  for start, end in _bad_blocks(SEQ):
    before, after = run.states[start], run.states[end]
    what = f"steps {start}..{end - 1}"
    if case.inner is not None:
      loc, inner = case.inner
      expected = _get(before, loc)
      for _ in range(end - start):
        _, expected = inner.update(zeros, expected, PARAMS)
      _assert_equal(_get(after, loc), expected, f"inner optimizer, {what}")
      before = _set(before, loc, expected)
    _assert_equal(_strip(after), _strip(before), f"state, {what}")


@pytest.mark.parametrize("kind", WHOLE_KINDS)
@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.skip])
def test_trajectory_equals_skipping_the_bad_steps(name, kind):
  seq = SEQ
  bad = _cached_run(name, seq, kind)
  skipped = _cached_run(name, seq.replace("B", ""), kind)
  keep = [k for k, ch in enumerate(seq) if ch == "F"]
  for k_skip, k in enumerate(keep):
    _assert_equal(bad.outs[k], skipped.outs[k_skip], f"update {k}")
    _assert_equal(_strip(bad.states[k + 1]), _strip(skipped.states[k_skip + 1]),
                  f"state after step {k}")


@pytest.mark.parametrize("kind", WHOLE_KINDS)
@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.zeros])
def test_trajectory_equals_zero_gradient_steps(name, kind):
  seq = SEQ
  bad = _cached_run(name, seq, kind)
  zeros = _cached_run(name, seq.replace("B", "Z"), kind)
  for k, ch in enumerate(seq):
    if ch == "F":
      _assert_equal(bad.outs[k], zeros.outs[k], f"update {k}")
    _assert_equal(_strip(bad.states[k + 1]), _strip(zeros.states[k + 1]),
                  f"state after step {k}")


def test_a_bad_step_is_counted():
  """Counters count calls (as Optax's do): a bad step that falls on a
  refresh keeps the old basis, and the next refresh is a period later."""
  run = _run("cgfm-lowrank", "FFBFFF", "nan_all")    # refresh_every=2
  counts = [int(s[0].count) for s in run.states[1:]]
  assert counts == [1, 2, 3, 4, 5, 6]
  basis = [s[0].basis["w"] for s in run.states]
  np.testing.assert_array_equal(basis[3], basis[2])   # step 2 (bad): kept
  np.testing.assert_array_equal(basis[4], basis[3])   # step 3: no refresh
  assert not np.array_equal(basis[5], basis[4])       # step 4: refresh


# --------------------------------------------------------------------------
# A bad step's context, and the context of a bad step.


def test_finite_context_on_a_bad_step_still_enters_the_context_ema():
  """The context EMA follows the context, not the gradient: a NaN gradient
  with a finite context folds the context in (and returns NaN)."""
  tx, update = _compiled("context_align")
  state = tx.init(PARAMS)
  _, state = update(_grads(0), state, PARAMS, context=_context(0))
  u, new = update(_bad("nan_all", 0), state, PARAMS, context=_context(1))
  assert not _all_finite(u)
  assert _all_finite(new)
  assert int(new.steps["w"]) == 2
  assert not np.array_equal(new.context["w"], state.context["w"])


def test_nan_context_leaves_the_context_ema():
  tx, update = _compiled("context_align")
  state = tx.init(PARAMS)
  _, state = update(_grads(0), state, PARAMS, context=_context(0))
  nan_ctx = {"w": jnp.full(CTX_SHAPE, jnp.nan)}
  u, new = update(_grads(1), state, PARAMS, context=nan_ctx)
  assert _all_finite(u)   # the gradient is finite: amplified along the EMA
  _assert_equal(_strip(new), _strip(state), "state")


# --------------------------------------------------------------------------
# The loss: a NaN/Inf `value` never makes λ NaN, and changes nothing.


def _lam(name: str, state: Any) -> Any:
  ent = state if name == "entangle" else state[0]
  return ent.lam, ent.prev_loss


@pytest.mark.parametrize("name", ["entangle", "cegm", "cegm_adamw"])
def test_non_finite_loss_never_reaches_lambda(name):
  tx, update = _compiled(name)
  state = tx.init(PARAMS)
  values = [jnp.nan, 2.0, jnp.nan, jnp.inf, 1.0, -jnp.inf, jnp.nan, 1.5, 0.0,
            jnp.nan, 3.0]
  last = None
  for i, value in enumerate(values):
    lam0, loss0 = _lam(name, state)
    extra = {"value": jnp.float32(value)}
    if CASES[name].context:
      extra["context"] = _context(i)
    u, state = update(_grads(i), state, PARAMS, **extra)
    lam, loss = _lam(name, state)
    assert np.isfinite(float(lam)) and 0.05 <= float(lam) <= 1.0, (i, lam)
    assert _all_finite(u), i
    if not np.isfinite(value):
      assert float(lam) == float(lam0), f"step {i}: λ moved on a bad loss"
      np.testing.assert_array_equal(loss, loss0)
    else:
      if last is not None:   # λ moved by the clipped log ratio (0 unless
        # both losses are positive)
        rel = (np.clip(np.log(last / value), -1, 1) if last > 0 and value > 0
               else 0.0)
        np.testing.assert_allclose(
            float(lam), np.clip(float(lam0) + 0.3 * rel, 0.05, 1.0), rtol=1e-6)
      last = value
      assert float(loss) == value


def test_injected_nan_adapt_rate_does_not_make_lambda_nan():
  """Injected hyper-parameters are not range-checked; λ keeps its value."""
  tx = optax.inject_hyperparams(cgf_optax.entangle)(lam=0.5, adapt_rate=0.1)
  state = tx.init(PARAMS)
  state.hyperparams["adapt_rate"] = jnp.float32(jnp.nan)
  update = jax.jit(tx.update)   # traced: not checked by the factory
  for i, value in enumerate([1.0, 0.5, 2.0]):
    _, state = update(_grads(i), state, PARAMS, value=jnp.float32(value))
    assert float(state.inner_state.lam) == 0.5


# --------------------------------------------------------------------------
# optax.apply_if_finite: exact skipping, and the count of bad steps.


MAX_ERRORS = 2


@functools.cache
def _wrapped(name: str):
  tx = optax.apply_if_finite(CASES[name].make(),
                             max_consecutive_errors=MAX_ERRORS)
  return tx, jax.jit(tx.update)


@pytest.mark.parametrize("kind", ["nan_entry", "inf_all"])
@pytest.mark.parametrize("name", WRAPPED)
def test_apply_if_finite_skips_and_counts(name, kind):
  seq = "FBBFBFF"   # at most MAX_ERRORS bad steps in a row: all skipped
  run = _run(name, seq, kind, wrap=_wrapped(name))
  skipped = _run(name, seq.replace("B", ""), kind, wrap=_wrapped(name))
  consecutive = total = 0
  k_skip = 0
  for k, ch in enumerate(seq):
    s = run.states[k + 1]
    if ch == "B":
      consecutive, total = consecutive + 1, total + 1
      for leaf in jax.tree.leaves(run.outs[k]):    # no step
        np.testing.assert_array_equal(leaf, 0.0)
      _assert_equal(s.inner_state, run.states[k].inner_state, "inner state")
    else:
      consecutive = 0
      # Exactly the run without the bad steps, counters included.
      _assert_equal(run.outs[k], skipped.outs[k_skip], f"update {k}")
      _assert_equal(s.inner_state, skipped.states[k_skip + 1].inner_state,
                    f"state after step {k}")
      k_skip += 1
    assert int(s.notfinite_count) == consecutive
    assert int(s.total_notfinite) == total
    assert bool(s.last_finite) == (ch == "F")


@pytest.mark.parametrize("name", WRAPPED)
def test_apply_if_finite_giving_up_still_keeps_our_state_finite(name):
  """After `max_consecutive_errors` bad steps apply_if_finite lets the next
  one through: the NaN reaches the update, not the state."""
  seq = "FBBBFF"
  run = _run(name, seq, "nan_all", wrap=_wrapped(name))
  for k in (1, 2):                                 # skipped
    for leaf in jax.tree.leaves(run.outs[k]):
      np.testing.assert_array_equal(leaf, 0.0)
  assert not _all_finite(run.outs[3])              # let through: NaN step
  assert int(run.states[4].notfinite_count) == 3
  assert int(run.states[4].total_notfinite) == 3
  for k in range(len(seq)):
    assert not _nonfinite(run.states[k + 1]), f"state after step {k}"
  assert _all_finite(run.outs[4]) and _all_finite(run.outs[5])


@pytest.mark.parametrize("name", ["cegm", "cegm_adamw"])
def test_apply_if_finite_ignores_a_bad_loss_alone(name):
  """apply_if_finite looks at the gradients: a NaN loss with finite
  gradients is a step (λ ignores the loss), not a skipped one."""
  tx, update = _wrapped(name)
  state = tx.init(PARAMS)
  _, state = update(_grads(0), state, PARAMS, value=jnp.float32(2.0),
                    context=_context(0))
  lam = float(state.inner_state[0].lam)
  u, state = update(_grads(1), state, PARAMS, value=NAN, context=_context(1))
  assert _all_finite(u) and any(np.any(x != 0) for x in jax.tree.leaves(u))
  assert int(state.total_notfinite) == 0
  assert float(state.inner_state[0].lam) == lam


# --------------------------------------------------------------------------
# Finite input that overflows a narrow state dtype, and 0 / 0.


def test_entangle_float16_state_does_not_overflow_to_inf():
  tx = cgf_optax.entangle(0.5, state_dtype=jnp.float16)
  params = {"w": jnp.zeros(3)}
  state = tx.init(params)
  _, state = tx.update({"w": jnp.array([1.0, 2.0, 3.0])}, state)
  big = {"w": jnp.array([1e6, 2.0, 3.0])}   # 5e5 > float16's max (65504)
  u, new = tx.update(big, state)
  assert _all_finite(u) and _all_finite(new.prev)
  assert float(new.prev["w"][0]) == float(state.prev["w"][0])   # kept
  assert float(new.prev["w"][1]) == 1.5                          # updated


def test_temporal_float16_ema_does_not_overflow_to_inf():
  tx = cgf_optax.decompose("temporal", num_scales=3, ema_dtype=jnp.float16)
  params = {"w": jnp.zeros((2, 2))}
  state = tx.init(params)
  _, state = tx.update({"w": jnp.ones((2, 2))}, state)
  big = {"w": jnp.array([[1e6, 1.0], [1.0, 1.0]])}
  _, new = tx.update(big, state)
  assert _all_finite(new)
  assert float(new.slow["w"][0, 0]) == float(state.slow["w"][0, 0])
  assert float(new.slow["w"][1, 1]) != float(state.slow["w"][1, 1])


@pytest.mark.parametrize("scope", ["leaf", "global"])
def test_normalize_with_eps_zero_keeps_a_zero_leaf_at_zero(scope):
  tx = cgf_optax.normalize(scope, eps=0.0)
  g = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
  u, state = tx.update(g, tx.init(g))
  _assert_equal(u, g, "updates")
  assert _all_finite(state)
  g["b"] = jnp.array([[3.0, 0.0], [0.0, 4.0]])
  u, _ = tx.update(g, state)
  np.testing.assert_allclose(u["b"], g["b"] / 5.0)
  np.testing.assert_array_equal(u["a"], 0.0)
