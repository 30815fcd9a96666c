"""The λ rule of `entangle` on an oscillating loss (issue 18, item 4).

``python examples/lambda_rule.py`` runs, for each ``loss_signal``:

* a loss alternating 1, 2, 1, 2, ... (no trend) for 200 steps: λ at the end;
* Rosenbrock from (0, 0), 10,000 steps in a jitted ``lax.scan``, with
  ``cegm_adamw(adapt_rate=0.1)`` at the test suite's cosine 3e-2 and at a
  large step (cosine 0.1), and the adaptive ``cegm`` of the test suite
  (``cosine 0.3, adapt_rate=0.05``, global norm): the final
  point and loss, the final λ and the share of steps spent at the lower
  bound ``lam_bounds[0] = 0.05``.

It prints one table (CPU, a few seconds).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import cgf_optax

STEPS = 10_000
RULES = ("relative", "log_ratio")


def rosenbrock(p: jax.Array) -> jax.Array:
  return (1 - p[0]) ** 2 + 100 * (p[1] - p[0] ** 2) ** 2


def _lam(state) -> jax.Array:
  return state[0].lam        # entangle is the first link of both chains


def run(tx: optax.GradientTransformation) -> dict[str, float]:
  @jax.jit
  def go(x):
    def step(carry, _):
      x, state = carry
      loss, g = jax.value_and_grad(rosenbrock)(x)
      u, state = tx.update(g, state, x, value=loss)
      return (optax.apply_updates(x, u), state), _lam(state)
    (x, state), lams = jax.lax.scan(step, (x, tx.init(x)), length=STEPS)
    return x, rosenbrock(x), lams
  x, loss, lams = go(jnp.zeros(2))
  return {"x": tuple(round(float(v), 3) for v in x), "loss": float(loss),
          "lam_final": float(lams[-1]),
          "at_lower_bound": float(jnp.mean(lams <= 0.05 + 1e-6))}


def oscillating(rule: str, periods: int = 100) -> float:
  tx = cgf_optax.entangle(0.5, adapt_rate=0.05, loss_signal=rule)
  g = jnp.ones(3)
  state = tx.init(g)
  for loss in [1.0, 2.0] * periods + [1.0]:     # whole periods
    _, state = tx.update(g, state, value=jnp.float32(loss))
  return float(state.lam)


def main() -> None:
  print(f"{'rule':<10} {'optimizer':<28} {'final x':<18} {'loss':>10} "
        f"{'λ final':>8} {'at 0.05':>8}")
  for rule in RULES:
    print(f"{rule:<10} {'entangle, loss 1,2,1,2..':<28} {'':<18} {'':>10} "
          f"{oscillating(rule):>8.3f} {'':>8}   (λ0 = 0.5, 100 periods)")
    arms = {
        "cegm_adamw(3e-2, adapt=0.1)": cgf_optax.cegm_adamw(
            optax.cosine_decay_schedule(3e-2, STEPS), weight_decay=0.0,
            adapt_rate=0.1, loss_signal=rule, require_context=False),
        "cegm_adamw(0.1, adapt=0.1)": cgf_optax.cegm_adamw(
            optax.cosine_decay_schedule(0.1, STEPS), weight_decay=0.0,
            adapt_rate=0.1, loss_signal=rule, require_context=False),
        "cegm(adapt=0.05, global)": cgf_optax.cegm(
            optax.cosine_decay_schedule(0.3, STEPS), adapt_rate=0.05,
            normalize_scope="global", loss_signal=rule,
            require_context=False),
    }
    for name, tx in arms.items():
      r = run(tx)
      print(f"{rule:<10} {name:<28} {str(r['x']):<18} {r['loss']:>10.2e} "
            f"{r['lam_final']:>8.3f} {r['at_lower_bound']:>8.1%}")


if __name__ == "__main__":
  main()
