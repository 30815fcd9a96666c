"""The arms of the quality benchmark: name -> optimizer, in one place.

Every arm is ``clip_by_global_norm`` → its optimizer, built with a
learning-rate schedule of *peak 1* (linear warm-up, then cosine decay to
``min_lr_ratio``): every chain here is linear in the learning rate, so the
training step multiplies the update by the peak learning rate, a traced
scalar, and one compilation serves the whole sweep. Weight decay (where the
optimizer has one) is decoupled, ``weight_decay`` on matrices only, the same
policy for every arm.

Peers are written independently of :mod:`cgf_optax` so that they are real
baselines, not our own transforms with other settings:

* ``gc_adamw`` — gradient centralization (Yong et al., 2020): subtract the
  mean over the fan-in axis of every matrix, then AdamW.
* ``galore_adamw`` — a GaLore-style projection (Zhao et al., 2024): project
  every matrix gradient on its top-r left/right singular subspace (an SVD
  every ``refresh`` steps), then AdamW (in the full space; GaLore's memory
  trick is not the point here).
* ``ema_adamw`` — plain EMA of the gradient (``optax.ema``, no bias
  correction), then AdamW: what ``entangle`` with a fixed λ is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import cgf_optax

Schedule = Callable[[Any], Any]


@dataclasses.dataclass(frozen=True)
class Arm:
  """One optimizer of the benchmark.

  Attributes:
    name: short name (JSON keys, plots).
    build: ``(schedule, weight_decay) -> GradientTransformation``, without
      clipping (the harness adds it).
    lr_center: centre of the learning-rate grid (fixed a priori from each
      family's usual scale, never from test results).
    group: ``main``, ``peer``, ``cgfm-ablation`` or ``cegm-ablation``.
    context: the optimizer takes the model's context and the loss.
    reg_beta: weight of CEGM's entanglement regularizer in the loss (0: off).
    flow: activation-level gradient flow after every block, as
      ``(mode, (λ_local, λ_global) of the first block, (λ_local, λ_global)
      of the last)`` for :func:`cgf_optax.flow.gradient_flow` with a linear
      :func:`cgf_optax.flow.depth_schedule`; None: off.
    doc: what the arm is, for the report.
  """

  name: str
  build: Callable[[Schedule, float], optax.GradientTransformation]
  lr_center: float
  group: str
  context: bool = False
  reg_beta: float = 0.0
  flow: tuple[str, tuple[float, float], tuple[float, float]] | None = None
  doc: str = ""


def decay_mask(params: Any) -> Any:
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def _tail(sched: Schedule, wd: float) -> list[optax.GradientTransformation]:
  return [optax.add_decayed_weights(wd, decay_mask),
          optax.scale_by_learning_rate(sched)]


def _adamw(sched: Schedule, wd: float, *pre: optax.GradientTransformation
           ) -> optax.GradientTransformationExtraArgs:
  return optax.chain(*pre, optax.scale_by_adam(), *_tail(sched, wd))


# ---------------------------------------------------------------- peers


def centralize() -> optax.GradientTransformation:
  """Gradient centralization: ``g - mean(g, axis=fan_in)`` for matrices."""

  def update(updates, state, params=None):
    del params
    return jax.tree.map(
        lambda g: g - jnp.mean(g, axis=0, keepdims=True) if g.ndim == 2 else g,
        updates), state

  return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


class ProjectState(NamedTuple):
  count: jax.Array
  bases: Any      # per leaf: [m, r] or [n, r] orthonormal basis, or ()


def project_topr(rank: int = 8, refresh: int = 10
                 ) -> optax.GradientTransformation:
  """GaLore-style: ``P Pᵀ G`` (or ``G Q Qᵀ``) with ``P`` the top-``rank``
  singular vectors of the gradient on its smaller side, recomputed by an SVD
  every ``refresh`` steps. Non-matrix leaves pass through."""

  def side(g):
    return 0 if g.shape[0] <= g.shape[1] else 1

  def init(params):
    def one(p):
      if p.ndim != 2:
        return jnp.zeros((0,), p.dtype)
      n = p.shape[side(p)]
      return jnp.zeros((n, min(rank, n)), p.dtype)
    return ProjectState(jnp.zeros([], jnp.int32), jax.tree.map(one, params))

  def update(updates, state, params=None):
    del params
    fresh = state.count % refresh == 0

    def one(g, b):
      if g.ndim != 2:
        return g, b
      s = side(g)
      a = g if s == 0 else g.T

      def svd_basis(_):
        u, _, _ = jnp.linalg.svd(a, full_matrices=False)
        return u[:, :b.shape[1]]

      b = jax.lax.cond(fresh, svd_basis, lambda _: b, None)
      proj = b @ (b.T @ a)
      return (proj if s == 0 else proj.T), b

    flat_g, tdef = jax.tree.flatten(updates)
    flat_b = tdef.flatten_up_to(state.bases)
    out = [one(g, b) for g, b in zip(flat_g, flat_b, strict=True)]
    new_g = tdef.unflatten([o[0] for o in out])
    new_b = tdef.unflatten([o[1] for o in out])
    return new_g, ProjectState(state.count + 1, new_b)

  return optax.GradientTransformation(init, update)


# ---------------------------------------------------------------- muon

MUON_LR = 0.02      # optax.contrib.muon's usual peak learning rate


def hidden_matrices(params: Any) -> Any:
  """Muon's dimension numbers for the hidden matrices (2-D, not the
  embedding or an output head); None (AdamW) for the rest."""
  def one(path, p):
    name = jax.tree_util.keystr(path)
    hidden = p.ndim == 2 and "embed" not in name and "head" not in name
    return optax.contrib.MuonDimensionNumbers() if hidden else None
  return jax.tree_util.tree_map_with_path(one, params)


def muon_direction(adam_ratio: float) -> optax.GradientTransformation:
  """Muon configured the standard way, as a descent direction at learning
  rate 1: Newton–Schulz-orthogonalised momentum for the hidden matrices,
  Adam for the embedding, the head, norms and biases at ``adam_ratio``
  times the Muon rate (``optax.contrib.muon``; the sign flip undoes its
  ``scale_by_learning_rate`` so that the shared tail adds weight decay and
  the schedule)."""
  return optax.chain(
      optax.contrib.muon(1.0, adam_learning_rate=adam_ratio,
                         muon_weight_dimension_numbers=hidden_matrices),
      optax.scale(-1.0))


def muon_arm(name: str, adam_lr: float, lr: float) -> Arm:
  """Muon (standard configuration) at peak learning rate ``lr`` with its own
  Adam peak learning rate ``adam_lr`` (the harness multiplies the whole
  update by the peak ``lr``, so the arm is built for one pair: Adam runs at
  ``adam_lr / lr`` times the Muon rate)."""
  ratio = adam_lr / lr
  return Arm(name, lambda s, wd: optax.chain(muon_direction(ratio),
                                             *_tail(s, wd)),
             MUON_LR, "main", doc=f"optax.contrib.muon on hidden matrices; "
             f"AdamW on embedding/head/norms at {ratio:.3g}× the Muon rate")


def cgfm_muon_arm(name: str, adam_lr: float, lr: float) -> Arm:
  """Beyond the papers: CGFM's decompose → scale_by_scales (local 1, global
  0.5) → modulate_step around standard Muon (max factor 2)."""
  ratio = adam_lr / lr
  return Arm(name, lambda s, wd: optax.chain(
      cgf_optax.cgfm_decompose(), cgf_optax.scale_by_scales(1.0, 1.0, 0.5),
      cgf_optax.modulate_step(muon_direction(ratio), max_factor=2.0),
      *_tail(s, wd)), MUON_LR, "beyond",
      doc="cgfm_decompose → scale_by_scales(1, 1, 0.5) → modulate_step("
          "muon, max 2)")


def cegm_muon_arm(name: str, adam_lr: float, lr: float) -> Arm:
  """Beyond the papers: CEGM's entangle (λ 0.9, adaptive) → normalize(leaf)
  → standard Muon (normalize is nearly a no-op before Muon and Adam, both
  invariant to a leaf's scale; the arm tests entangle in front of Muon)."""
  ratio = adam_lr / lr
  return Arm(name, lambda s, wd: optax.chain(
      cgf_optax.entangle(0.9, adapt_rate=0.1), cgf_optax.normalize("leaf"),
      muon_direction(ratio), *_tail(s, wd)), MUON_LR, "beyond",
      context=True, doc="entangle(0.9, adapt 0.1) → normalize(leaf) → muon")


#: Arms built per (Adam learning rate, peak learning rate), the study
#: sweeping both: name -> factory.
MUON_FAMILY: dict[str, Callable[[str, float, float], Arm]] = {
    "muon": muon_arm, "cgfm_muon": cgfm_muon_arm,
    "cegm_muon": cegm_muon_arm,
}


# ---------------------------------------------------------------- registry

ADAM_LR = 3e-3      # TrainConfig's default peak learning rate for Adam chains


def _arms() -> dict[str, Arm]:
  c = cgf_optax
  a: list[Arm] = [
      # The six optimizers of the issue.
      Arm("adamw", lambda s, wd: optax.adamw(s, weight_decay=wd,
                                             mask=decay_mask),
          ADAM_LR, "main", doc="optax.adamw"),
      Arm("muon", lambda s, wd: optax.contrib.muon(
          s, weight_decay=wd, weight_decay_mask=decay_mask),
          0.02, "main", doc="optax.contrib.muon (Adam on non-matrices)"),
      Arm("cgfm", lambda s, wd: c.cgfm(s), 0.3, "main",
          doc="cgfm: lowrank decompose → scale → modulate → SGD "
              "(Algorithm 1 as written, no momentum, no weight decay)"),
      Arm("cgfm_adamw", lambda s, wd: c.cgfm_adamw(
          s, weight_decay=wd, mask=decay_mask), ADAM_LR, "main",
          doc="cgfm_adamw defaults: lowrank r=8, local 1, global 0.5, "
              "modulation ≤ 2"),
      Arm("cegm", lambda s, wd: c.cegm(s, num_heads=4, adapt_rate=0.1), 0.01,
          "main", context=True,
          doc="cegm: entangle(λ adaptive, log ratio) → context_align(4 "
              "heads) → normalize(leaf) → SGD (Algorithm 1 as written)"),
      Arm("cegm_adamw", lambda s, wd: c.cegm_adamw(
          s, weight_decay=wd, mask=decay_mask, num_heads=4, adapt_rate=0.1),
          ADAM_LR, "main", context=True,
          doc="cegm_adamw: entangle → context_align → normalize → AdamW "
              "(the CLI's default CEGM spec)"),
      # The λ rule (issue 18): the main CEGM arms with the paper's relative
      # loss change instead of the default log ratio.
      Arm("cegm_relative", lambda s, wd: c.cegm(
          s, num_heads=4, adapt_rate=0.1, loss_signal="relative"), 0.01,
          "cegm-ablation", context=True,
          doc="cegm, λ adapted by the relative loss change"),
      Arm("cegm_adamw_relative", lambda s, wd: c.cegm_adamw(
          s, weight_decay=wd, mask=decay_mask, num_heads=4, adapt_rate=0.1,
          loss_signal="relative"), ADAM_LR, "cegm-ablation", context=True,
          doc="cegm_adamw, λ adapted by the relative loss change"),
      # Peers: the closest known relatives of our steps.
      Arm("gc_adamw", lambda s, wd: _adamw(s, wd, centralize()), ADAM_LR,
          "peer", doc="gradient centralization then AdamW (peer of "
          "strategy=mean)"),
      Arm("galore_adamw", lambda s, wd: _adamw(s, wd, project_topr(8, 10)),
          ADAM_LR, "peer", doc="top-8 SVD projection every 10 steps then "
          "AdamW (peer of strategy=lowrank)"),
      Arm("ema_adamw", lambda s, wd: _adamw(
          s, wd, optax.ema(0.1, debias=False)), ADAM_LR, "peer",
          doc="EMA of the gradient (decay 0.1 = entangle's λ=0.9) then "
          "AdamW (peer of entangle)"),
      # CGFM ablations (cgfm_adamw = decompose lowrank + modulate).
      Arm("cgfm_decompose_only", lambda s, wd: c.cgfm_adamw(
          s, weight_decay=wd, mask=decay_mask, modulate=False), ADAM_LR,
          "cgfm-ablation", doc="cgfm_adamw, modulate=False"),
      Arm("cgfm_modulate_only", lambda s, wd: optax.chain(
          c.modulate_step(optax.scale_by_adam(), max_factor=2.0),
          *_tail(s, wd)), ADAM_LR, "cgfm-ablation",
          doc="modulate_step(Adam, max_factor=2), no decomposition"),
      Arm("cgfm_refresh1", lambda s, wd: c.cgfm_adamw(
          s, weight_decay=wd, mask=decay_mask, refresh_every=1,
          init_power_iters=1), ADAM_LR, "cgfm-ablation",
          doc="cgfm_adamw, basis refreshed every step by one iteration (no "
              "conditional in the compiled step: the GPU-friendly setting)"),
      Arm("cgfm_mean", lambda s, wd: c.cgfm_adamw(
          s, weight_decay=wd, mask=decay_mask, strategy="mean"), ADAM_LR,
          "cgfm-ablation", doc="cgfm_adamw, strategy=mean"),
      Arm("cgfm_temporal", lambda s, wd: c.cgfm_adamw(
          s, weight_decay=wd, mask=decay_mask, strategy="temporal"), ADAM_LR,
          "cgfm-ablation", doc="cgfm_adamw, strategy=temporal"),
      # The model side of CGFM (cgf_optax.flow), with the λs of the
      # optimizer side's defaults (local 1, global 0.5), chosen a priori.
      Arm("cgfm_flow_only", lambda s, wd: optax.adamw(
          s, weight_decay=wd, mask=decay_mask), ADAM_LR, "cgfm-ablation",
          flow=("causal", (1.0, 0.5), (1.0, 0.5)),
          doc="AdamW + gradient_flow(causal, λ_local 1, λ_global 0.5) "
              "after every block (activation-level decomposition only)"),
      # CEGM ablations.
      Arm("cegm_entangle_only", lambda s, wd: _adamw(
          s, wd, c.entangle(0.9, adapt_rate=0.1)), ADAM_LR, "cegm-ablation",
          context=True, doc="entangle(λ=0.9, adapt 0.1) then AdamW"),
      Arm("cegm_align_only", lambda s, wd: _adamw(
          s, wd, c.context_align(num_heads=4)), ADAM_LR, "cegm-ablation",
          context=True, doc="context_align(4 heads) then AdamW"),
      Arm("cegm_normalize_only", lambda s, wd: _adamw(
          s, wd, c.normalize("leaf")), ADAM_LR, "cegm-ablation",
          doc="normalize(leaf) then AdamW"),
      Arm("cegm_regularizer", lambda s, wd: optax.adamw(
          s, weight_decay=wd, mask=decay_mask), ADAM_LR, "cegm-ablation",
          reg_beta=0.01, doc="AdamW + entanglement_penalty(β=0.01, λ=1) on "
          "the last block's hidden states (double backprop)"),
  ]
  return {x.name: x for x in a}


ARMS: dict[str, Arm] = _arms()
MAIN = ("adamw", "muon", "cgfm", "cgfm_adamw", "cegm", "cegm_adamw")


def lr_grid(arm: Arm, n: int, factor: float = 3.0) -> list[float]:
  """``n`` log-spaced values centred on ``arm.lr_center`` (× ``factor``
  apart): the same budget and the same relative span for every arm."""
  half = (n - 1) / 2
  return [float(arm.lr_center * factor ** (i - half)) for i in range(n)]
