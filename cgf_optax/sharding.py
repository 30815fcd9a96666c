"""Mesh and sharding-spec helpers for params, optimizer state and batches.

Two ways to run an optimizer on several devices:

* **Under** :func:`jax.jit` **on** :class:`~jax.sharding.NamedSharding`-placed
  params (FSDP, tensor parallel, or both). XLA inserts the collectives; every
  transform's global reduction (norms, the context pooling, the loss) is then
  over the whole, logically unsharded arrays. What this module adds is the
  state's placement: :func:`state_shardings` derives, from the params'
  shardings, a sharding for every leaf of an optimizer state, and
  :func:`init_sharded` initialises the state under ``jax.jit`` with those
  output shardings, so that no state array is materialised whole on one
  device.
* **Inside** :func:`jax.shard_map`, where the transforms that reduce across
  leaves or tokens take an ``axis_name`` for their collectives (see
  :func:`cgf_optax.modulate_by_gradient_norm`, :func:`cgf_optax.normalize`,
  :func:`cgf_optax.entangle` and :func:`cgf_optax.context_align`).
  :func:`split_axes` turns the params' partition specs into the per-leaf
  ``axis_name`` that the norm transforms accept.

The rule of :func:`state_shardings`, for each state array that belongs to a
parameter (found where a sub-tree of the state has the params' tree
structure, as Optax's ``mu``, ``nu`` and cgf_optax's per-leaf states do):

* the parameter's shape: the parameter's sharding (moments, EMAs, the
  entangled history);
* a scalar: replicated;
* otherwise each of its axes takes the mesh axes of the first remaining
  parameter axis (in order) of the same size, or of the parameter axis it is
  a major slice of when two consecutive axes multiply to that axis' size.
  The low-rank basis ``[batch, side, k]`` of :func:`cgf_optax.decompose` thus
  lands on the layer axes and the side of the matrix it spans, and the
  per-head context EMA ``[heads, fan_in / heads]`` of
  :func:`cgf_optax.context_align` on the kernel's fan-in sharding when the
  number of heads is divisible by the mesh axes (each device then holds the
  heads of its block of the fan-in). Axes that match nothing, or whose size
  the mesh axes do not divide, are replicated (such arrays are small: a
  matrix side, times the rank for a basis, at most).

State arrays of no parameter (step counts, λ, injected hyper-parameters) are
replicated scalars.

**Several processes** (one per host, JAX's multi-process runtime): after
:func:`initialize` (:func:`jax.distributed.initialize`) a mesh of
:func:`make_mesh` spans the devices of every process, and everything above
works on it unchanged: each process runs the same program, and
:func:`init_sharded` creates on each process only the shards of its own
devices. What differs is the host side. No process holds a global array
whole, so a batch is built from each process's own rows
(:func:`process_rows`, :func:`global_batch`), and values come back to the
host through :func:`to_host` (a local shard of a replicated array, a gather
across processes otherwise), never :func:`jax.device_get` of an array split
over processes.

This module uses JAX and Optax only (no Flax); :mod:`cgf_optax.train` uses it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cgf_optax import _paths

__all__ = [
    "batch_sharding",
    "global_batch",
    "init_sharded",
    "initialize",
    "make_mesh",
    "mesh_of",
    "parse_mesh_axes",
    "process_rows",
    "replicated",
    "shard_batch",
    "spec_of",
    "split_axes",
    "state_shardings",
    "to_host",
]

AxisEntry = str | tuple[str, ...] | None


def parse_mesh_axes(text: str) -> dict[str, int]:
  """``"data=4,model=2"`` → ``{"data": 4, "model": 2}`` (``""`` → ``{}``).

  Any axis names are accepted; sizes must be positive integers and names
  must not repeat.
  """
  axes: dict[str, int] = {}
  for item in filter(None, (p.strip() for p in text.split(","))):
    key, eq, value = item.partition("=")
    key, value = key.strip(), value.strip()
    if (not eq or not key.isidentifier() or not value.isdigit()
        or int(value) < 1 or key in axes):
      raise ValueError(f"mesh {text!r}: expected name=size[,name=size...] "
                       "with positive sizes and distinct names")
    axes[key] = int(value)
  return axes


def make_mesh(
    axes: Mapping[str, int] | str,
    *,
    devices: Sequence[jax.Device] | None = None,
    explicit: bool = False,
) -> Mesh:
  """A device mesh from ``{"data": 4, "model": 2}`` or ``"data=4,model=2"``.

  Uses the first ``prod(sizes)`` of ``devices`` (default :func:`jax.devices`),
  so a mesh smaller than the machine is allowed (e.g. one GPU of two, to
  measure scaling). With several processes the default devices are those of
  every process (process 0's first), and the mesh must use them all.

  Args:
    axes: axis names and sizes, in mesh order.
    devices: the devices to use (default: all).
    explicit: make the axes :attr:`jax.sharding.AxisType.Explicit` (shardings
      in the types, checked by JAX) instead of ``Auto`` (XLA's propagation,
      which FSDP and tensor-parallel models need no annotations for).

  Returns:
    A :class:`jax.sharding.Mesh`.

  Raises:
    ValueError: no axes, more devices asked for than there are, or (several
      processes) fewer than all of them.
  """
  if isinstance(axes, str):
    axes = parse_mesh_axes(axes)
  if not axes:
    raise ValueError("make_mesh needs at least one axis")
  devices = list(jax.devices() if devices is None else devices)
  n = math.prod(axes.values())
  if n > len(devices):
    raise ValueError(f"mesh {dict(axes)} needs {n} devices; {len(devices)} "
                     "are available")
  if jax.process_count() > 1 and n < len(devices):
    raise ValueError(f"mesh {dict(axes)} has {n} devices; the "
                     f"{jax.process_count()} processes have {len(devices)}, "
                     "and a mesh over several processes must use them all")
  kind = (jax.sharding.AxisType.Explicit if explicit
          else jax.sharding.AxisType.Auto)
  return jax.make_mesh(tuple(axes.values()), tuple(axes),
                       axis_types=(kind,) * len(axes), devices=devices[:n])


def batch_sharding(mesh: Mesh, ndim: int = 2,
                   batch_axes: AxisEntry = "data") -> NamedSharding:
  """Sharding of a batch ``[batch, ...]``: the batch axis on ``batch_axes``.

  Mesh axes not in ``batch_axes`` (e.g. ``"model"``) replicate the batch.
  """
  return NamedSharding(mesh, PartitionSpec(batch_axes, *([None] * (ndim - 1))))


def shard_batch(x: Any, mesh: Mesh, batch_axes: AxisEntry = "data") -> Any:
  """Places a host batch (a NumPy array or a tree of them) on the mesh.

  Each leaf's leading axis is split over ``batch_axes``; its size must be
  divisible by their total size. Every process passes the whole batch and
  transfers only its own rows (:func:`global_batch` builds the batch from
  those rows alone).
  """
  def put(a):
    a = np.asarray(a)
    return global_batch(a[process_rows(mesh, len(a), batch_axes)], mesh,
                        len(a), batch_axes)
  return jax.tree.map(put, x)


def initialize(coordinator: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None, *,
               heartbeat_timeout: int = 100) -> None:
  """Starts JAX's multi-process runtime (:func:`jax.distributed.initialize`).

  Call it first, before anything else uses JAX, in every process (one per
  host). ``coordinator`` is ``"HOST:PORT"`` of process 0, with
  ``num_processes`` and this ``process_id``; all ``None`` lets JAX detect a
  managed cluster (SLURM, Open MPI, Kubernetes, Cloud TPU) from its
  environment variables. CPU devices exchange their collectives through
  Gloo (it has no effect on GPUs), so the same program runs several
  processes on one machine.

  ``heartbeat_timeout`` (seconds, JAX's default 100) bounds how long the
  others wait on a process that died where no collective notices it (in a
  checkpoint barrier, say) before they stop with an error.
  """
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator, num_processes, process_id,
                             heartbeat_timeout_seconds=heartbeat_timeout)


def process_rows(mesh: Mesh, batch_size: int,
                 batch_axes: AxisEntry = "data") -> slice:
  """The rows of a global batch ``[batch_size, ...]`` that this process's
  devices hold under :func:`batch_sharding` (all of them with one process).

  Raises:
    ValueError: ``batch_size`` is not divisible by the ``batch_axes`` size,
      this process holds no device of the mesh, or its rows are not one
      contiguous block (a mesh whose device order interleaves processes
      along ``batch_axes``).
  """
  n = math.prod(mesh.shape[a] for a in _names(batch_axes))
  if batch_size % n:
    raise ValueError(f"batch size {batch_size} is not divisible by the "
                     f"{_names(batch_axes)} mesh axes' size {n}")
  spans = sorted({s.indices(batch_size)[:2] for s, in batch_sharding(
      mesh, 1, batch_axes).addressable_devices_indices_map(
          (batch_size,)).values()})
  if not spans:
    raise ValueError(f"process {jax.process_index()} holds no device of the "
                     "mesh")
  start, stop = spans[0][0], spans[-1][1]
  if sum(b - a for a, b in spans) != stop - start:
    raise ValueError(f"process {jax.process_index()} holds rows {spans} of "
                     "the batch, not one block: order the mesh's devices by "
                     "process along the batch axes")
  return slice(start, stop)


def global_batch(local: Any, mesh: Mesh, batch_size: int,
                 batch_axes: AxisEntry = "data") -> Any:
  """The global batch, from this process's rows of it.

  Args:
    local: this process's rows (:func:`process_rows`) of the batch, a NumPy
      array or a tree of them, each ``[rows, ...]``.
    mesh: the mesh (it may span several processes).
    batch_size: the global batch's size.
    batch_axes: the mesh axes the batch axis is split over.

  Returns:
    Arrays ``[batch_size, ...]`` on ``batch_sharding(mesh, ndim,
    batch_axes)``, built with :func:`jax.make_array_from_process_local_data`
    (each process transfers only its rows, to its own devices).
  """
  def put(a):
    a = np.asarray(a)
    return jax.make_array_from_process_local_data(
        batch_sharding(mesh, a.ndim, batch_axes), a,
        (batch_size, *a.shape[1:]))
  return jax.tree.map(put, local)


def replicated(x: Any, mesh: Mesh) -> Any:
  """A host value (a tree of NumPy arrays or scalars, equal on every
  process) replicated on every device of the mesh."""
  def put(a):
    a = np.asarray(a)
    return jax.make_array_from_process_local_data(
        NamedSharding(mesh, PartitionSpec()), a, a.shape)
  return jax.tree.map(put, x)


def to_host(tree: Any) -> Any:
  """NumPy values of a tree of arrays, on every process.

  An array this process holds whole (one process, or replicated, as a loss
  or a norm is) is copied from a local shard; one split over processes is
  gathered from all of them
  (:func:`jax.experimental.multihost_utils.process_allgather`, a collective:
  every process must call it alike). :func:`jax.device_get` of such an
  array fails.
  """
  from jax.experimental import multihost_utils

  def get(x):
    if not isinstance(x, jax.Array):
      return x
    if x.is_fully_addressable:
      return np.asarray(x)
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return jax.tree.map(get, tree)


def mesh_of(tree: Any) -> Mesh | None:
  """The mesh of the first leaf with a :class:`NamedSharding`, else ``None``."""
  for leaf in jax.tree.leaves(tree):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding):
      return sharding.mesh
  return None


def spec_of(x: Any) -> PartitionSpec:
  """The partition spec of an array or :class:`jax.ShapeDtypeStruct`,
  padded with ``None`` to its rank (``P()`` without a NamedSharding)."""
  sharding = getattr(x, "sharding", None)
  spec = (tuple(sharding.spec) if isinstance(sharding, NamedSharding)
          else ())
  return PartitionSpec(*spec, *([None] * (len(x.shape) - len(spec))))


def _names(entry: AxisEntry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def _fits(size: int, entry: AxisEntry, mesh: Mesh, used: set[str]) -> bool:
  names = _names(entry)
  if not names or used & set(names):
    return False
  return size % math.prod(mesh.shape[a] for a in names) == 0


def _derive(shape: tuple[int, ...], pshape: tuple[int, ...],
            pspec: PartitionSpec, mesh: Mesh) -> PartitionSpec:
  """The spec of a state array of ``shape`` that belongs to a parameter."""
  if tuple(shape) == tuple(pshape):
    return pspec
  out: list[AxisEntry] = [None] * len(shape)
  used: set[str] = set()
  start, i = 0, 0
  while i < len(shape):
    for j in range(start, len(pshape)):
      entry = pspec[j]
      if shape[i] == pshape[j]:
        if _fits(shape[i], entry, mesh, used):
          out[i] = entry
          used |= set(_names(entry))
        start = j + 1
        break
      if i + 1 < len(shape) and shape[i] * shape[i + 1] == pshape[j] \
          and shape[i] > 1 and shape[i + 1] > 1:
        # A split [major, minor] of this parameter axis (per-head state):
        # the major axis takes its sharding if the blocks stay contiguous.
        if _fits(shape[i], entry, mesh, used):
          out[i] = entry
          used |= set(_names(entry))
        start = j + 1
        i += 1
        break
    i += 1
  return PartitionSpec(*out)


def _is_array(x: Any) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype")


def state_shardings(state: Any, params: Any) -> Any:
  """A :class:`NamedSharding` for every array of an optimizer state.

  Args:
    state: the state or its shapes (e.g. ``jax.eval_shape(tx.init, params)``).
    params: the parameters (arrays or :class:`jax.ShapeDtypeStruct`\\ s) with
      their :class:`NamedSharding`\\ s, all on one mesh.

  Returns:
    A tree like ``state`` with a :class:`NamedSharding` in place of each
    array, by the rule in this module's docstring.

  Raises:
    ValueError: no parameter carries a :class:`NamedSharding`.
  """
  mesh = mesh_of(params)
  if mesh is None:
    raise ValueError("state_shardings: the params carry no NamedSharding "
                     "(place them on a mesh first)")
  pleaves, ptreedef = jax.tree.flatten(params)
  replicated = NamedSharding(mesh, PartitionSpec())

  def of_param(p: Any, sub: Any) -> Any:
    pspec, pshape = spec_of(p), tuple(p.shape)

    def leaf(x):
      if not _is_array(x) or len(x.shape) == 0:
        return replicated
      return NamedSharding(mesh, _derive(tuple(x.shape), pshape, pspec, mesh))
    return jax.tree.map(leaf, sub)

  def walk(node: Any) -> Any:
    if node is None:
      return None
    try:
      subs = ptreedef.flatten_up_to(node)
    except (ValueError, TypeError):
      subs = None
    if subs is not None:      # a sub-tree shaped like the params
      return jax.tree.unflatten(
          ptreedef, [of_param(p, s) for p, s in zip(pleaves, subs,
                                                    strict=True)])
    if _is_array(node):
      return replicated
    children, treedef = jax.tree_util.tree_flatten(
        node, is_leaf=lambda x: x is not node)
    if treedef.num_nodes == 1 and not children:   # an empty node
      return node
    return jax.tree.unflatten(treedef, [walk(c) for c in children])

  return walk(state)


def init_sharded(tx: optax.GradientTransformation, params: Any) -> Any:
  """``tx.init(params)`` under :func:`jax.jit`, sharded by :func:`state_shardings`.

  No state array is built whole on one device: each is created in place,
  on its shards. Without a mesh in the params' shardings this is plain
  ``jax.jit(tx.init)(params)``.
  """
  if mesh_of(params) is None:
    return jax.jit(tx.init)(params)
  shapes = jax.eval_shape(tx.init, params)
  return jax.jit(tx.init, out_shardings=state_shardings(shapes, params))(
      params)


def split_axes(specs: Any) -> Callable[[str], tuple[str, ...]]:
  """Per-leaf ``axis_name`` for the norm transforms inside ``jax.shard_map``.

  Args:
    specs: the params' :class:`PartitionSpec`\\ s (the ``in_specs`` of the
      params in the ``shard_map``), or arrays/shape structs carrying
      :class:`NamedSharding`\\ s.

  Returns:
    ``path -> axes``: the mesh axes each leaf is split over (``()`` for a
    replicated leaf), for :func:`cgf_optax.modulate_by_gradient_norm` and
    :func:`cgf_optax.normalize`, so that a tree mixing split (FSDP) and
    replicated leaves gets each squared norm summed over exactly the devices
    that hold a different part of it.
  """
  is_spec = lambda x: isinstance(x, PartitionSpec)
  table: dict[str, tuple[str, ...]] = {}
  for spec, path in zip(*_paths.flatten(specs, is_spec)[:2], strict=True):
    if not is_spec(spec):
      spec = spec_of(spec)
    table[path] = tuple(
        a for entry in spec for a in _names(entry))

  def axes(path: str) -> tuple[str, ...]:
    if path not in table:
      raise KeyError(f"split_axes: no partition spec for leaf '{path}' "
                     f"(known: {sorted(table)[:8]}...)")
    return table[path]
  return axes
