"""Parameter paths, one spelling for the whole package (private).

A leaf's path is written ``'blocks/0/attn/qkv/kernel'``: the keys from the
root, joined by ``/``. The transforms match overrides and contexts against
it, :mod:`cgf_optax.nnx` keys the captured activations by it, and
:mod:`cgf_optax.sharding` maps partition specs to it; errors name leaves by
it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

SEPARATOR = "/"


def path_str(path: Sequence[Any]) -> str:
  """A key path (from :func:`jax.tree_util.tree_flatten_with_path`) as a string.

  A trailing ``.value`` attribute (how a Flax ``nnx.Variable`` holds its
  array in a raw ``nnx.State``) is not part of the name, so raw and pure
  states give the same paths.
  """
  path = tuple(path)
  if (path and isinstance(path[-1], jax.tree_util.GetAttrKey)
      and path[-1].name == "value"):
    path = path[:-1]
  return jax.tree_util.keystr(path, simple=True, separator=SEPARATOR)


def join(*parts: Any) -> str:
  """Path components (module attribute names, list indices) joined; empty
  components (the root) are left out: ``join('', 'kernel') == 'kernel'``."""
  return SEPARATOR.join(str(p) for p in parts if str(p))


def flatten(tree: Any, is_leaf: Any = None) -> tuple[list[Any], list[str], Any]:
  """The leaves of ``tree`` (or sub-trees at ``is_leaf``), their paths and
  the tree definition."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return [x for _, x in flat], [path_str(p) for p, _ in flat], treedef
