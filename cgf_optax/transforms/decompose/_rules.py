"""Which strategy decomposes each leaf, and how it is seen as a matrix.

The leaf rules of :func:`cgf_optax.decompose` (overrides first, then the
defaults for vectors, matrices and leaves of 3+ dimensions) turn every leaf
into a :class:`Plan`, fixed at trace time from its path and shape.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple

from cgf_optax import _paths
from cgf_optax import _validation as v
from cgf_optax.transforms._leaves import MatrixAxes, MatrixView

__all__ = ["LeafRule", "Overrides", "Strategy", "WholeScale"]

Strategy = Literal["lowrank", "temporal", "mean"]
"""A decomposition strategy of :func:`cgf_optax.decompose`."""

WholeScale = Literal["local", "intermediate", "global"]
"""A scale that a leaf goes to whole (``"global_"`` is accepted too)."""

STRATEGIES: tuple[str, ...] = ("lowrank", "temporal", "mean")
# Scale names (as rules and `vector_scale` spell them) -> `Scales` fields.
WHOLE = {"local": "local", "intermediate": "intermediate", "global": "global_",
         "global_": "global_"}


class LeafRule(NamedTuple):
  """A per-leaf override for :func:`decompose`.

  Attributes:
    strategy: ``"lowrank"``, ``"temporal"`` or ``"mean"`` to decompose the
      leaf with that strategy, or ``"local"``, ``"intermediate"``,
      ``"global"`` to put the leaf whole into that scale; ``None`` keeps the
      transform's ``strategy``.
    axes: the leaf's :class:`MatrixAxes`; ``None`` keeps the default rule.
  """

  strategy: Strategy | WholeScale | None = None
  axes: MatrixAxes | None = None


Overrides = (
    Mapping[str, "str | MatrixAxes | LeafRule"]
    | Callable[[str, Any], "str | MatrixAxes | LeafRule | None"]
)
"""Per-leaf rules of :func:`cgf_optax.decompose`: a mapping from regular
expressions of leaf paths to rules, or a callable ``(path, leaf) -> rule``."""


class Plan(NamedTuple):
  """How one leaf is decomposed (fixed at trace time)."""

  kind: str                        # "whole" | "lowrank" | "temporal" | "mean"
  scale: str | None = None         # for "whole"
  view: MatrixView | None = None   # for "lowrank" and matrix "mean"
  left: bool = True                # lowrank: basis on the fan-in side
  rank: int = 0                    # lowrank: size of the global band
  k: int = 0                       # lowrank: size of the whole tracked basis


def _as_rule(value: Any, path: str) -> LeafRule:
  if value is None:
    return LeafRule()
  if isinstance(value, LeafRule):
    rule = value
  elif isinstance(value, MatrixAxes):
    rule = LeafRule(axes=value)
  elif isinstance(value, str):
    rule = LeafRule(strategy=value)
  else:
    raise v.HyperparameterTypeError(
        f"`overrides` gave {type(value).__name__} {value!r} for leaf '{path}'; "
        "expected a strategy or scale name, a MatrixAxes, a LeafRule or None."
    )
  if rule.strategy is not None and rule.strategy not in STRATEGIES + tuple(WHOLE):
    raise ValueError(
        f"`overrides` gave strategy {rule.strategy!r} for leaf '{path}'; expected "
        f"one of {STRATEGIES + ('local', 'intermediate', 'global')}."
    )
  if rule.axes is not None and not isinstance(rule.axes, MatrixAxes):
    raise v.HyperparameterTypeError(
        f"`overrides` gave axes {rule.axes!r} for leaf '{path}'; expected a "
        "MatrixAxes."
    )
  return rule


def compile_overrides(overrides: Overrides | None
                      ) -> Callable[[str, Any], LeafRule]:
  """Checks ``overrides`` at construction; returns ``(path, leaf) -> rule``."""
  if overrides is None:
    return lambda path, leaf: LeafRule()
  if callable(overrides):
    return lambda path, leaf: _as_rule(overrides(path, leaf), path)
  if not isinstance(overrides, Mapping):
    raise v.HyperparameterTypeError(
        "`overrides` must be a mapping {path regex: rule} or a callable "
        f"(path, leaf) -> rule, got {type(overrides).__name__}.")
  patterns = []
  for k, val in overrides.items():
    try:
      patterns.append((re.compile(k), val))
    except (TypeError, re.error) as e:
      raise ValueError(
          f"`overrides` has key {k!r}, which is not a regular expression "
          f"of leaf paths ({e}).") from None

  def lookup(path: str, leaf: Any) -> LeafRule:
    del leaf
    for pattern, value in patterns:   # first match wins
      if pattern.search(path):
        return _as_rule(value, path)
    return LeafRule()
  return lookup


class Planner(NamedTuple):
  """The leaf rules of one :func:`decompose`: ``planner(path, leaf) -> Plan``."""

  strategy: str
  num_scales: int
  rank: int
  intermediate_rank: int
  vector_scale: str
  nd_rule: str
  lookup: Callable[[str, Any], LeafRule]

  def __call__(self, path: str, leaf: Any) -> Plan:
    rule = self.lookup(path, leaf)
    strat = rule.strategy or self.strategy
    shape = tuple(leaf.shape)
    if strat in WHOLE:
      scale = WHOLE[strat]
      if scale == "intermediate" and self.num_scales == 2:
        raise ValueError(
            f"`overrides` sends leaf '{path}' to 'intermediate', which needs "
            "num_scales=3.")
      return Plan("whole", scale=scale)
    size_zero = any(d == 0 for d in shape)
    if len(shape) < 2 and rule.axes is None:
      if rule.strategy is None or size_zero:
        return Plan("whole", scale=WHOLE[self.vector_scale])
      if strat == "lowrank":
        raise ValueError(
            f"`overrides` asks 'lowrank' for leaf '{path}' of shape {shape}; "
            "lowrank needs a matrix (give MatrixAxes for a leaf of 2+ dims).")
      return Plan(strat)
    if strat == "temporal":
      return Plan("temporal")
    view = MatrixView.create(shape, self._axes(rule, shape))
    if size_zero or view.m == 0 or view.n == 0:
      return Plan("whole", scale=WHOLE[self.vector_scale])
    if strat == "mean":
      return Plan("mean", view=view)
    s = min(view.m, view.n)
    r = min(self.rank, s)
    k = min(r + (self.intermediate_rank if self.num_scales == 3 else 0), s)
    return Plan("lowrank", view=view, left=view.m <= view.n, rank=r, k=k)

  def _axes(self, rule: LeafRule, shape: tuple[int, ...]) -> MatrixAxes:
    if rule.axes is not None:
      return rule.axes
    if len(shape) == 2 or self.nd_rule == "batch":
      return MatrixAxes(-2, -1)
    return MatrixAxes(tuple(range(len(shape) - 1)), len(shape) - 1)

  def plans(self, tree: Any) -> tuple[list[Any], list[Plan], Any]:
    """The leaves of ``tree``, their plans and the tree definition."""
    leaves, paths, treedef = _paths.flatten(tree)
    return (leaves, [self(p, x) for p, x in zip(paths, leaves, strict=True)],
            treedef)
