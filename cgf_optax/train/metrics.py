"""The engine's metrics sink: one JSON line per step, fetched without
stalling the device.

The train step returns its metrics as device arrays. The sink keeps the last
``lag`` steps' metrics pending and fetches a step's only once ``lag`` newer
steps have been dispatched: by then that step has finished on the device, so
the fetch does not wait for it and the device's queue never runs dry. Every
step still gets its line in ``metrics.jsonl`` (the loss curve is complete);
:meth:`MetricsSink.drain` fetches the rest (before a checkpoint, an
evaluation, the end).

``time`` in a record is the training clock when the step's metrics were
fetched: wall time since the run began, less the time spent evaluating and
checkpointing (:class:`TrainClock`). Throughput (tokens/s) is measured from
the ``warmup``-th step fetched in this invocation to the last one, so
compilation, start-up and the first executions (allocations, kernel
loading) are not in it.
"""

from __future__ import annotations

import collections
import json
import math
import time
from typing import IO, Any

import numpy as np

from cgf_optax import sharding

__all__ = ["LN2", "MetricsSink", "TrainClock", "finite_or_none"]

LN2 = math.log(2.0)


def finite_or_none(x: Any) -> float | None:
  """``float(x)``, or ``None`` for NaN and ±inf (JSON has no NaN)."""
  x = float(x)
  return x if math.isfinite(x) else None


class TrainClock:
  """Training seconds: wall time, less the intervals spent in :meth:`paused`."""

  def __init__(self, offset: float = 0.0):
    self._start = time.perf_counter() - offset
    self._paused_s = 0.0

  def now(self) -> float:
    return time.perf_counter() - self._start - self._paused_s

  def paused(self) -> _Pause:
    return _Pause(self)


class _Pause:
  def __init__(self, clock: TrainClock):
    self.clock = clock

  def __enter__(self) -> None:
    self.t0 = time.perf_counter()

  def __exit__(self, *exc: Any) -> None:
    self.clock._paused_s += time.perf_counter() - self.t0


class MetricsSink:
  """Turns each step's device metrics into a JSON line, ``lag`` steps late.

  Args:
    log: an open text file the lines go to (flushed after each), or None.
    clock: the run's training clock.
    tokens_per_step: tokens of one step, for the throughput.
    lag: steps dispatched ahead of the oldest unfetched one (0: fetch each
      step at once, which waits for it).
    diverged_after: this many non-finite losses in a row mark the run
      diverged (:attr:`diverged`).
    nonfinite: non-finite steps counted before (a resumed run's).
    on_record: called with each record once written (e.g. a progress bar).
    warmup: steps fetched before the throughput's clock starts (when the
      invocation has fewer, it starts at the first).
  """

  def __init__(self, log: IO[str] | None, clock: TrainClock, *,
               tokens_per_step: int, lag: int = 2, diverged_after: int = 20,
               nonfinite: int = 0, on_record: Any = None, warmup: int = 5):
    self.log, self.clock, self.lag = log, clock, lag
    self.tokens_per_step = tokens_per_step
    self.diverged_after = diverged_after
    self.nonfinite = nonfinite
    self.on_record = on_record
    self.records: list[dict[str, Any]] = []
    self.diverged = False
    self._bad_run = 0
    self._pending: collections.deque[tuple[int, Any, dict[str, Any]]] = (
        collections.deque())
    self._fetched: list[tuple[int, float]] = []   # (step, time), first few
    self._last: tuple[int, float] | None = None
    self._warmup = warmup

  def push(self, step: int, metrics: dict[str, Any],
           **host: Any) -> None:
    """Queues step ``step``'s device ``metrics`` (plus host values such as
    ``val_bits``) and writes the records that are ``lag`` steps old."""
    self._pending.append((step, metrics, host))
    while len(self._pending) > self.lag:
      self._write(*self._pending.popleft())

  def drain(self) -> None:
    """Fetches and writes every pending step (waits for the device)."""
    while self._pending:
      self._write(*self._pending.popleft())

  def _write(self, step: int, metrics: dict[str, Any],
             host: dict[str, Any]) -> None:
    m = sharding.to_host(metrics)
    now = self.clock.now()
    if len(self._fetched) <= self._warmup:
      self._fetched.append((step, now))
    self._last = (step, now)
    loss = float(m.pop("loss"))
    rec: dict[str, Any] = {"step": step, "loss": finite_or_none(loss),
                           "bits": finite_or_none(loss / LN2), "time": now}
    rec.update({k: finite_or_none(v) for k, v in m.items()
                if np.ndim(v) == 0})
    if math.isfinite(loss):
      self._bad_run = 0
    else:
      self.nonfinite += 1
      self._bad_run += 1
      self.diverged |= self._bad_run >= self.diverged_after
    rec["nonfinite_steps"] = self.nonfinite
    rec.update({k: finite_or_none(v) if isinstance(v, float) else v
                for k, v in host.items()})
    if self.log is not None:
      self.log.write(json.dumps(rec) + "\n")
      self.log.flush()
    self.records.append(rec)
    if self.on_record is not None:
      self.on_record(rec)

  def timed(self) -> tuple[int, float]:
    """``(tokens, seconds)`` from the ``warmup``-th step fetched (or the
    first, if fewer were) to the last."""
    if self._last is None:
      return 0, 0.0
    first = (self._fetched[self._warmup] if len(self._fetched) > self._warmup
             else self._fetched[0])
    steps = self._last[0] - first[0]
    return steps * self.tokens_per_step, self._last[1] - first[1]
