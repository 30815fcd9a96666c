"""Issue 18, item 4: the λ rule of `entangle` (`loss_signal`).

The relative change g = (L_{t-1} − L_t)/|L_{t-1}| is asymmetric: over one
period of a loss alternating a, b it sums to −(a − b)²/(ab) < 0, so a loss
that oscillates without trending pushes λ down to its lower bound. The log
ratio g = clip(log(L_{t-1}/L_t), ±1) sums to 0 over a period: λ is unchanged.
Both are checked against these closed forms, for any a, b > 0.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cgf_optax

G = jnp.ones(3)
POS = st.floats(1e-3, 1e3, allow_nan=False, allow_infinity=False)
SETTINGS = settings(max_examples=25, deadline=None)


def _lam_after(rule, losses, lam=0.5, adapt_rate=0.05, bounds=(0.0, 1.0)):
  tx = cgf_optax.entangle(lam, adapt_rate, bounds, loss_signal=rule)
  state = tx.init(G)
  lams = []
  for loss in losses:
    _, state = tx.update(G, state, value=jnp.float32(loss))
    lams.append(float(state.lam))
  return lams


@SETTINGS
@given(a=POS, b=POS, lam=st.floats(0.2, 0.8), periods=st.integers(1, 5))
def test_log_ratio_is_neutral_over_a_period(a, b, lam, periods):
  """A loss alternating a, b leaves λ where it was after every whole period
  (the first loss only sets L_{t-1}), and it moves by ± the clipped log
  ratio in between."""
  losses = [a] + [b, a] * periods
  lams = _lam_after("log_ratio", losses, lam=lam)
  step = 0.05 * float(np.clip(math.log(np.float32(a) / np.float32(b)), -1, 1))
  for k in range(periods):
    np.testing.assert_allclose(lams[2 * k + 1], lam + step, atol=1e-5)
    np.testing.assert_allclose(lams[2 * k + 2], lam, atol=1e-5)


@SETTINGS
@given(a=POS, b=POS, lam=st.floats(0.3, 0.8))
def test_relative_drifts_down_by_its_closed_form(a, b, lam):
  """The defect the log ratio fixes, as a reference: one period of the
  relative rule moves λ by Δλ·(clip((a−b)/a) + clip((b−a)/b)) ≤ 0."""
  lams = _lam_after("relative", [a, b, a], lam=lam)
  a32, b32 = float(np.float32(a)), float(np.float32(b))
  drift = (float(np.clip((a32 - b32) / a32, -1, 1))
           + float(np.clip((b32 - a32) / b32, -1, 1)))
  assert drift <= 0
  np.testing.assert_allclose(lams[-1], max(lam + 0.05 * drift, 0.0),
                             atol=1e-5)


def test_oscillating_loss_end_point():
  """Doubling and halving 100 times from λ=0.5: the relative rule sinks to
  the lower bound 0.05 (the issue's observation), the log ratio ends where
  it started."""
  losses = [1.0] + [2.0, 1.0] * 100
  relative = _lam_after("relative", losses, bounds=(0.05, 1.0))
  assert min(relative) == pytest.approx(0.05)
  assert relative[-1] <= 0.05 + 0.05 * 0.5 + 1e-6
  log_ratio = _lam_after("log_ratio", losses, bounds=(0.05, 1.0))
  np.testing.assert_allclose(log_ratio[-1], 0.5, atol=1e-5)
  assert min(log_ratio) > 0.45


@SETTINGS
@given(losses=st.lists(POS, min_size=2, max_size=12))
def test_log_ratio_matches_its_formula(losses):
  """λ_t = clip(λ_{t-1} + Δλ·clip(log(L_{t-1}/L_t), ±1), lo, hi)."""
  lams = _lam_after("log_ratio", losses, lam=0.5, adapt_rate=0.2,
                    bounds=(0.1, 0.9))
  lam, prev = 0.5, None
  for loss, got in zip(losses, lams, strict=True):
    loss = float(np.float32(loss))
    if prev is not None:
      lam = min(max(lam + 0.2 * max(min(math.log(prev / loss), 1), -1), 0.1),
                0.9)
    prev = loss
    np.testing.assert_allclose(got, lam, atol=1e-5)


def test_log_ratio_needs_positive_losses():
  """A zero or negative loss, or a sign change, leaves λ unchanged (and is
  remembered as the last loss); no NaN is computed (debug-NaN mode)."""
  with jax.debug_nans(True):
    lams = _lam_after("log_ratio", [1.0, 0.0, -1.0, -2.0, 1.0, 2.0])
  assert lams[:5] == [0.5] * 5
  np.testing.assert_allclose(lams[5], 0.5 - 0.05 * math.log(2), atol=1e-6)


@pytest.mark.parametrize("alias", [cgf_optax.cegm, cgf_optax.cegm_adamw])
def test_aliases_take_the_rule(alias):
  tx = alias(1e-2, adapt_rate=0.1, loss_signal="log_ratio",
             require_context=False)
  params = {"w": jnp.ones((2, 2))}
  state = tx.init(params)
  for loss in (1.0, 2.0):
    _, state = tx.update(params, state, params, value=jnp.float32(loss))
  np.testing.assert_allclose(float(state[0].lam), 0.9 - 0.1 * math.log(2),
                             rtol=1e-6)
  with pytest.raises(ValueError, match="loss_signal"):
    alias(1e-2, loss_signal="log")
