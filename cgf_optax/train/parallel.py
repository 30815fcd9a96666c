"""Sharded training: the ``(data, model)`` mesh of ``--mesh`` and what lives on it.

``--mesh data=D,model=M`` runs one training process over ``D * M`` devices:

* **params**: the :class:`~cgf_optax.train.GPT` is built under the mesh with
  ``partitioned=True``, so Flax creates every kernel already sharded: FSDP
  along ``data`` (each kernel's other axis), tensor parallel (Megatron) along
  ``model`` (column-parallel ``qkv``/``up``, row-parallel ``out``/``down``,
  vocabulary-parallel embedding). Norm scales and the ``down`` bias are
  replicated; ``data=N`` alone is FSDP (ZeRO-3), ``model=N`` alone tensor
  parallelism.
* **optimizer state**: initialised under :func:`jax.jit` with the shardings
  :func:`cgf_optax.sharding.state_shardings` derives from the params' (Adam's
  moments, EMAs and the entangled history like their parameter, low-rank
  bases and context EMAs along the matrix axis they span); the train step
  keeps params and state on those shardings.
* **batches**: split along ``data`` (replicated along ``model``).

With several processes (``--coordinator``, one process per host) the mesh
spans the devices of all of them, and each process builds only the rows of
each global batch that its devices hold (:func:`batch_rows`,
:func:`place_batch`); the global batch is the single-process run's.

The arithmetic is that of the single-device run up to the order of
floating-point reductions (``tests/test_sharded_training.py`` checks losses
and params against it). The mesh's axes are ``Auto`` (XLA's sharding
propagation places activations and inserts the collectives).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from cgf_optax import sharding
from cgf_optax.train.config import parse_mesh
from cgf_optax.train.model import GPT, GPTConfig

__all__ = ["AXES", "batch_rows", "check_divisible", "init_partitioned",
           "place_batch", "run_mesh"]

AXES = ("data", "model")


def run_mesh(mesh: str, devices: Any = None) -> Mesh | None:
  """The mesh of ``--mesh`` (``"data=4,model=2"``; a missing axis has size
  1), or ``None`` for ``""`` (one device, no sharding)."""
  axes = parse_mesh(mesh)
  if not axes:
    return None
  return sharding.make_mesh({a: axes.get(a, 1) for a in AXES},
                            devices=devices)


def check_divisible(cfg: GPTConfig, mesh: Mesh, batch_size: int) -> None:
  """Raises ``ValueError`` if a sharded axis is not divisible by its mesh
  axis (JAX shards evenly only)."""
  d, f = cfg.d_model, cfg.mlp_ratio * cfg.d_model
  n_data, n_model = mesh.shape["data"], mesh.shape["model"]
  checks = [("--batch-size", batch_size, n_data, "data"),
            ("d_model", d, n_data, "data"), ("d_model", d, n_model, "model"),
            ("mlp width", f, n_model, "model"),
            ("vocab_size", cfg.vocab_size, n_model, "model")]
  for what, size, n, axis in checks:
    if size % n:
      raise ValueError(f"--mesh: {what} = {size} is not divisible by the "
                       f"'{axis}' axis size {n}")


def init_partitioned(cfg: GPTConfig, seed: int, mesh: Mesh
                     ) -> tuple[nnx.GraphDef, nnx.State]:
  """The model's graph and parameters, created sharded on ``mesh``.

  The values equal those of the unsharded model of the same seed (JAX's
  random numbers do not depend on the sharding).
  """
  cfg = dataclasses.replace(cfg, partitioned=True)
  with jax.set_mesh(mesh):
    model = GPT(cfg, rngs=nnx.Rngs(seed))
  return nnx.split(model, nnx.Param)


def batch_rows(mesh: Mesh | None, batch_size: int) -> slice:
  """The rows of each global batch of ``batch_size`` that this process
  builds (all of them without a mesh or with one process)."""
  if mesh is None:
    return slice(None)
  return sharding.process_rows(mesh, batch_size, "data")


def place_batch(mesh: Mesh | None, batch_size: int,
                *arrays: np.ndarray) -> tuple[Any, ...]:
  """This process's rows (:func:`batch_rows`) of global batches ``[batch,
  ...]``, placed as global arrays split along ``data`` (on the default
  device without a mesh)."""
  if mesh is None:
    return tuple(jax.device_put(arrays))
  return tuple(sharding.global_batch(a, mesh, batch_size, "data")
               for a in arrays)
