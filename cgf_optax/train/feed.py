"""The engine's data feed: batches built ahead of the step, moved to the
device asynchronously.

A background thread draws the batches of the coming steps
(:func:`cgf_optax.train.data.batch_at`, a pure function of the seed and the
step) and starts their transfer to the device (:func:`jax.device_put` returns
before the copy is done), ``prefetch`` steps ahead of the training loop. The
loop then only takes the next :class:`~cgf_optax.train.step.Batch` from a
queue; the device never waits for the host to slice bytes.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from cgf_optax import sharding
from cgf_optax.train.data import batch_at
from cgf_optax.train.parallel import batch_rows, place_batch
from cgf_optax.train.step import Batch

__all__ = ["BatchFeed", "host_batch"]

_DONE = object()


def host_batch(data: np.ndarray, step: int, batch_size: int, seq_len: int,
               seed: int, chunk: int = 1, rows: slice = slice(None)) -> Batch:
  """The NumPy batch of 0-based step ``step`` (with ``chunk`` > 1: of steps
  ``step .. step + chunk - 1``, stacked on a leading axis); ``rows``: only
  those rows of it."""
  if chunk == 1:
    x, y = batch_at(data, step, batch_size, seq_len, seed, rows)
    return Batch(x, y, np.int32(step))
  xy = [batch_at(data, i, batch_size, seq_len, seed, rows)
        for i in range(step, step + chunk)]
  return Batch(np.stack([x for x, _ in xy]), np.stack([y for _, y in xy]),
               np.arange(step, step + chunk, dtype=np.int32))


class BatchFeed:
  """Iterates over the device batches of steps ``start .. stop - 1``.

  Args:
    data: the training bytes (uint8).
    batch_size: sequences per step.
    seq_len: bytes per sequence.
    seed: the batch order's seed.
    start: first 0-based step (a resumed run's step).
    stop: one past the last step.
    mesh: place batches split along its ``"data"`` axis (``None``: the
      default device); with several processes each builds only its rows.
    prefetch: how many batches are prepared ahead (0: none, built in the
      loop's thread).
    chunk: steps per item (stacked on a leading axis, for a scanned step).

  Use it as a context manager, or call :meth:`close`, so the thread stops
  when the loop ends early.
  """

  def __init__(self, data: np.ndarray, *, batch_size: int, seq_len: int,
               seed: int, start: int, stop: int, mesh: Mesh | None = None,
               prefetch: int = 2, chunk: int = 1):
    if chunk > 1 and mesh is not None:
      raise ValueError("BatchFeed: chunk > 1 is for unsharded runs")
    if (stop - start) % chunk:
      raise ValueError(f"BatchFeed: {stop - start} steps are not a multiple "
                       f"of chunk={chunk}")
    self._args = (data, batch_size, seq_len, seed, chunk,
                  batch_rows(mesh, batch_size))
    self._steps = range(start, stop, chunk)
    self._mesh = mesh
    self._prefetch = prefetch
    self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(prefetch, 1))
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def _device(self, step: int) -> Batch:
    b = host_batch(self._args[0], step, *self._args[1:])
    if self._mesh is None:
      return Batch(*jax.device_put(tuple(b)))
    x, y = place_batch(self._mesh, self._args[1], b.x, b.y)
    return Batch(x, y, sharding.replicated(b.step, self._mesh))

  def _produce(self) -> None:
    try:
      for step in self._steps:
        item = self._device(step)
        while not self._stop.is_set():
          try:
            self._queue.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
        if self._stop.is_set():
          return
    except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
      self._queue.put(e)
      return
    self._queue.put(_DONE)

  def __iter__(self) -> Iterator[Batch]:
    if self._prefetch == 0:
      for step in self._steps:
        yield self._device(step)
      return
    self._thread = threading.Thread(target=self._produce, daemon=True,
                                    name="cgf-optax-feed")
    self._thread.start()
    while True:
      item = self._queue.get()
      if item is _DONE:
        return
      if isinstance(item, BaseException):
        raise item
      yield item

  def close(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)

  def __enter__(self) -> BatchFeed:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()
