"""The engine's train step: loss, gradients, context, flow, telemetry, update.

One pure function ``step(state, batch, telemetry) -> (state, metrics)`` built
by :func:`make_train_step` serves the training CLI, the quality harness and
the benchmarks. Everything the host logs comes out of the step as device
arrays (loss, gradient norm, the learning rate of this step, the optimizer's
own telemetry), so the loop never has to wait for the device to know them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import cgf_optax
from cgf_optax import flow
from cgf_optax.nnx import capture_context

__all__ = ["Batch", "FlowSpec", "TrainState", "eval_losses", "lm_loss",
           "make_train_step", "scalar_telemetry"]


class Batch(NamedTuple):
  """One step's data: inputs and next-byte targets ``[batch, seq]`` (int32)
  and the step's 0-based index (int32 scalar, the schedules' count)."""

  x: Any
  y: Any
  step: Any


class TrainState(NamedTuple):
  """What a step carries: parameters, optimizer state and ``aux`` (anything
  a ``post_update`` hook keeps between steps; ``None`` by default)."""

  params: Any
  opt_state: Any
  aux: Any = None


@dataclasses.dataclass(frozen=True)
class FlowSpec:
  """:func:`cgf_optax.flow.gradient_flow` after every block: the mode, the
  window and one static (λ_local, λ_global) per block."""

  mode: str
  lam_local: tuple[float, ...]
  lam_global: tuple[float, ...]
  window: int | None = None

  @classmethod
  def linear(cls, mode: str, num_layers: int,
             first: tuple[float, float], last: tuple[float, float],
             window: int | None = None) -> FlowSpec:
    """λs linear in depth from ``first`` to ``last`` (Python floats, so a
    λ of 1 is exactly the identity)."""
    sched = flow.depth_schedule(num_layers, first, last, kind="linear")
    return cls(mode, tuple(float(v) for v in np.asarray(sched.local)),
               tuple(float(v) for v in np.asarray(sched.global_)), window)

  @property
  def num_layers(self) -> int:
    return len(self.lam_local)

  def hook(self, probes: jax.Array | None) -> Callable[[int, jax.Array],
                                                         jax.Array]:
    def hook(i: int, h: jax.Array) -> jax.Array:
      return flow.gradient_flow(
          h, self.lam_local[i], self.lam_global[i], mode=self.mode,
          window=self.window, probe=None if probes is None else probes[i])
    return hook


def lm_loss(graphdef: nnx.GraphDef, params: Any, x: jax.Array, y: jax.Array,
            *, with_context: bool, context_stride: int = 1,
            **model_kwargs: Any
            ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
  """Mean next-byte cross-entropy of the model ``(graphdef, params)`` and,
  with ``with_context``, the context its layers saw in the same forward pass
  (:func:`cgf_optax.nnx.capture_context`; with ``context_stride`` k, every
  k-th position only), else None.

  ``model_kwargs`` go to the model call (e.g. ``hidden_hook``).
  """
  model = nnx.merge(graphdef, params)
  if with_context:
    with capture_context(model) as ctx:
      logits = model(x, **model_kwargs)
    ctx = dict(ctx)
    if not ctx:
      raise ValueError("capture_context captured no layer input (a block "
                       "wrapped in nnx.remat rather than "
                       "cgf_optax.nnx.remat_call?): the optimizer would run "
                       "without context")
    if context_stride > 1:   # [batch, seq, features]: every k-th position
      ctx = {k: v[:, ::context_stride] for k, v in ctx.items()}
  else:
    logits, ctx = model(x, **model_kwargs), None
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss, ctx


def _find(tree: Any, cls: type) -> list[Any]:
  leaves = jax.tree_util.tree_leaves(
      tree, is_leaf=lambda x: isinstance(x, cls))
  return [x for x in leaves if isinstance(x, cls)]


def scalar_telemetry(opt_state: Any) -> dict[str, jax.Array]:
  """Scalars the optimizers keep in their state: the modulation factor and
  its reference (CGFM), the entanglement weight λ (CEGM)."""
  out = {}
  for st in _find(opt_state, cgf_optax.ModulateState):
    if jnp.ndim(st.factor) == 0:
      out["modulation_factor"] = st.factor
      out["modulation_reference"] = st.reference
  for st in _find(opt_state, cgf_optax.EntangleState):
    out["entangle_lambda"] = st.lam
  return out


# (params, x, y, hidden_hook or None) -> (objective, (loss, context or None))
LossFn = Callable[..., tuple[jax.Array, tuple[jax.Array, Any]]]
# (grads, opt_state) -> {name: scalar}: extra telemetry on telemetry steps
TelemetryFn = Callable[[Any, Any], dict[str, jax.Array]]
# (grads, updates, aux) -> (updates, aux, {name: scalar})
PostUpdateFn = Callable[[Any, Any, Any], tuple[Any, Any, dict[str, Any]]]


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    *,
    with_context: bool = False,
    context_stride: int = 1,
    flow_spec: FlowSpec | None = None,
    schedule: optax.Schedule | None = None,
    telemetry: TelemetryFn | None = None,
    loss_fn: LossFn | None = None,
    post_update: PostUpdateFn | None = None,
    shardings: Any = None,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
  """The train step ``step(state, batch, telemetry=False)``.

  Args:
    graphdef: the model's graph (:func:`flax.nnx.split`).
    tx: the optimizer. With ``with_context`` it gets the captured context
      and the loss (``context=``, ``value=``), as CEGM needs.
    with_context: capture the context of the model's layers in the forward
      pass (:func:`lm_loss`).
    context_stride: keep every k-th position's context only.
    flow_spec: activation-level gradient flow after every block; on
      telemetry steps its per-block local/global cotangent norms are logged
      (``flow_local/i``, ``flow_global/i``).
    schedule: the learning-rate schedule the optimizer was built with; the
      step's rate, ``schedule(batch.step)``, is logged as ``lr``.
    telemetry: extra scalars computed on telemetry steps from the step's
      gradient and the optimizer state *before* the update (e.g. the norms
      of CGFM's scale components).
    loss_fn: replaces the language-model loss: ``loss_fn(params, x, y,
      hidden_hook)`` returns ``(objective, (loss, context))``; the objective
      is differentiated, the loss logged and given to the optimizer.
    post_update: ``(grads, updates, aux) -> (updates, aux, metrics)``, run
      between the optimizer and the parameter update (e.g. to scale the
      updates, or to compare them with the previous step's).
    shardings: the shardings of ``(params, opt_state)`` to keep them on.

  Returns:
    ``step(state: TrainState, batch: Batch, telemetry: bool = False)``
    returning the new state and a dict of scalar metrics: ``loss``,
    ``grad_norm``, ``lr`` (with ``schedule``), the optimizer's
    :func:`scalar_telemetry`, and on telemetry steps the extra telemetry.
    Jit it with ``static_argnames="telemetry"`` and ``donate_argnums=0``.
  """
  def default_loss(params, x, y, hidden_hook):
    kw = {} if hidden_hook is None else {"hidden_hook": hidden_hook}
    loss, ctx = lm_loss(graphdef, params, x, y, with_context=with_context,
                        context_stride=context_stride, **kw)
    return loss, (loss, ctx)

  objective = loss_fn or default_loss

  def grad_of(params, probes, x, y):
    hook = None if flow_spec is None else flow_spec.hook(probes)
    return objective(params, x, y, hook)

  def step(state: TrainState, batch: Batch, telemetry: bool = False
           ) -> tuple[TrainState, dict[str, jax.Array]]:
    params, opt_state, aux = state
    probes = (flow.init_probes(flow_spec.num_layers)
              if telemetry and flow_spec is not None else None)
    (_, (loss, ctx)), (grads, probe_grads) = jax.value_and_grad(
        grad_of, argnums=(0, 1), has_aux=True)(params, probes, batch.x,
                                                batch.y)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    if schedule is not None:
      metrics["lr"] = jnp.asarray(schedule(batch.step), jnp.float32)
    if telemetry and telemetry_fn is not None:
      metrics.update(telemetry_fn(grads, opt_state))
    if probe_grads is not None:
      tel = flow.read_probes(probe_grads)
      for i in range(flow_spec.num_layers):
        metrics[f"flow_local/{i}"] = tel.local_norm[i]
        metrics[f"flow_global/{i}"] = tel.global_norm[i]
    extra = {"context": ctx, "value": loss} if with_context else {}
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    if post_update is not None:
      updates, aux, more = post_update(grads, updates, aux)
      metrics.update(more)
    params = optax.apply_updates(params, updates)
    if shardings is not None:
      params, opt_state = jax.lax.with_sharding_constraint(
          (params, opt_state), shardings)
    metrics.update(scalar_telemetry(opt_state))
    return TrainState(params, opt_state, aux), metrics

  telemetry_fn = telemetry
  return step


def eval_losses(graphdef: nnx.GraphDef, params: Any, xs: jax.Array,
                ys: jax.Array) -> jax.Array:
  """Per-position mean loss (nats) ``[seq]`` over batches ``xs, ys`` of
  shape ``[n, batch, seq]``, one batch at a time (jit it with
  ``static_argnums=0``)."""
  model = nnx.merge(graphdef, params)

  def one(_, b):
    logits = model(b[0])
    return None, optax.softmax_cross_entropy_with_integer_labels(
        logits, b[1]).mean(0)
  _, per = jax.lax.scan(one, None, (xs, ys))
  return per.mean(0)
