"""Orbax checkpoints of a training run: atomic, the last few kept, exact resume.

A checkpoint holds the model parameters, the optimizer state and, as JSON,
the step, the cumulative training time and what the run was (model config,
optimizer label, data seed). The batch order is a function of
``(data_seed, step)`` (:func:`cgf_optax.train.data.batch_at`), so the step is
the whole data position and RNG state. Orbax writes each checkpoint to a
temporary directory and renames it when complete, so a crash mid-save leaves
the previous checkpoint as the latest good one.

Checkpoints are restored into a target built from the run's own
initialisation (shapes, dtypes, shardings); nothing is unpickled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

__all__ = ["CheckpointError", "RunCheckpointer"]


class CheckpointError(ValueError):
  """A checkpoint that is missing, corrupt or from a different run."""


class RunCheckpointer:
  """Saves and restores ``(params, opt_state)`` plus run metadata.

  Args:
    directory: where checkpoints go (one sub-folder per step).
    every: save at steps that are multiples of this (0: only when asked
      with ``force``).
    keep: number of most recent checkpoints kept.
  """

  def __init__(self, directory: str | Path, every: int, keep: int):
    self.directory = Path(directory).absolute()
    self.every = every
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=False,
        cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, meta: dict[str, Any],
           force: bool = False) -> bool:
    """Saves if ``step`` is a multiple of ``every`` (or ``force``)."""
    if not force and not (self.every and step % self.every == 0):
      return False
    if step in self._manager.all_steps():
      return False
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave(meta)), force=True)
    self._manager.wait_until_finished()
    return True

  def restore(self, target: Any, expect: dict[str, Any]
              ) -> tuple[int, Any, dict[str, Any]]:
    """Restores the latest checkpoint into the structure of ``target``.

    Args:
      target: a pytree like the saved state (arrays or
        :class:`jax.ShapeDtypeStruct`\\ s); shardings are taken from it.
      expect: metadata entries that must equal the saved ones (model config,
        optimizer), so a checkpoint of another run is refused.

    Returns:
      ``(step, state, meta)``.

    Raises:
      CheckpointError: no checkpoint, a corrupt one, or one of another run.
    """
    step = self._manager.latest_step()
    if step is None:
      raise CheckpointError(f"--resume: no checkpoint in {self.directory}")
    where = self.directory / str(step)
    try:
      meta = self._manager.restore(
          step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # noqa: BLE001 - report any Orbax failure plainly
      raise CheckpointError(f"checkpoint {where} is unreadable (metadata): "
                            f"{type(e).__name__}: {e}") from None
    for key, value in expect.items():
      if meta.get(key) != value:
        raise CheckpointError(
            f"checkpoint {where} is from a different run: {key} is "
            f"{meta.get(key)!r} there, {value!r} here")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
      state = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract)))["state"]
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f"checkpoint {where} is corrupt or does not "
                            f"match this model/optimizer: "
                            f"{type(e).__name__}: {str(e)[:500]}") from None
    return step, state, meta

  def close(self) -> None:
    self._manager.close()
