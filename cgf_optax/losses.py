"""Loss-side helpers: CEGM's entanglement regularizer."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from cgf_optax import _validation as v

__all__ = ["entanglement_penalty"]


def entanglement_penalty(
    loss_of_hidden: Callable[[jax.Array], jax.Array],
    hidden: jax.Array,
    *,
    beta: float | jax.Array = 0.01,
    lam: float | jax.Array = 1.0,
    eps: float | jax.Array = 1e-8,
) -> jax.Array:
  r"""CEGM's regularizer :math:`\beta\,\lambda \int \kappa(C(x), G(x))\,dx`.

  The paper adds to the loss :math:`\beta\cdot\mathcal{E}` with
  :math:`\mathcal{E} = \lambda\int_\mathcal{X}\kappa(C(x), G(x))\,dx`, a
  "context alignment kernel" between the hidden states :math:`C` and the
  gradients :math:`G`. Reading: :math:`G_i = \partial L/\partial C_i` is the
  loss gradient with respect to token :math:`i`'s hidden state and
  :math:`\kappa` their misalignment, one minus the cosine, averaged over the
  tokens (the integral over the input domain):

  .. math::
    \mathcal{P} = \beta\,\lambda\,\frac1N\sum_i
      \Big(1 - \frac{\langle C_i, G_i\rangle}{\|C_i\|\,\|G_i\| + \epsilon}\Big).

  :math:`G` is computed with :func:`jax.grad` inside, so differentiating the
  returned penalty (with respect to the parameters that produced ``hidden``
  and those inside ``loss_of_hidden``) is double backpropagation.

  Args:
    loss_of_hidden: the rest of the network and the loss, as a function of the
      hidden states (``h -> scalar loss``); it may close over parameters.
    hidden: the hidden states :math:`C`, shape ``[..., features]`` (leading
      axes are tokens).
    beta: :math:`\beta \ge 0`.
    lam: :math:`\lambda` (e.g. ``state.lam`` of :func:`cgf_optax.entangle`).
    eps: added to the cosine's denominator.

  Returns:
    The scalar penalty, to add to the loss.

  Example:
    >>> import jax, jax.numpy as jnp, cgf_optax
    >>> w = jnp.array([[1.0, -1.0], [0.5, 2.0]])
    >>> h = jnp.array([[1.0, 2.0], [3.0, -1.0]])
    >>> head = lambda h: jnp.sum(jnp.tanh(h @ w))
    >>> p = cgf_optax.losses.entanglement_penalty(head, h, beta=1.0)
    >>> bool(0.0 <= p <= 2.0)
    True

  References:
    Sisate et al., *Contextually Entangled Gradient Mapping for Optimized
    LLM Comprehension*,
    Section III.C ("Mathematical Framework"), the regularized loss
    :math:`\mathcal{L}_\text{CEGM} = \mathcal{L} + \beta\mathcal{E}`.
  """
  v.number("beta", beta, minimum=0.0)
  v.number("eps", eps, minimum=0.0)
  if not callable(loss_of_hidden):
    raise v.HyperparameterTypeError(
        "`loss_of_hidden` must be a function h -> loss, got "
        f"{type(loss_of_hidden).__name__}.")
  hidden = jnp.asarray(hidden)
  if hidden.ndim < 1:
    raise ValueError("`hidden` must have a feature axis, got a scalar.")
  dt = jnp.promote_types(hidden.dtype, jnp.float32)   # float32, or float64
  g = jax.grad(lambda h: jnp.asarray(loss_of_hidden(h)).astype(dt))(hidden)
  hc = hidden.astype(dt)
  gc = g.astype(dt)
  cos = jnp.sum(hc * gc, axis=-1) / (
      jnp.linalg.norm(hc, axis=-1) * jnp.linalg.norm(gc, axis=-1) + eps)
  return beta * lam * jnp.mean(1.0 - cos)
