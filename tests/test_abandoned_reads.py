"""Issue 18, item 8: a failed restore prints one line, whatever the load.

Under load, an Orbax read task of a failed restore can outlive its event
loop; asyncio then logs ``Task exception was never retrieved`` on its
``asyncio`` logger (seen as ``ERROR:asyncio:...`` beside the CLI's one-line
error). Here a real asyncio task whose coroutine is defined in an ``orbax``
file fails unobserved and is collected, as in that run: after
`_quiet_abandoned_reads` nothing is logged; another task's report still is.
"""

import asyncio
import gc
import logging

import pytest

from cgf_optax.train import checkpoint

_ORBAX_SOURCE = '''
async def _read_array_index_and_device_put():
  raise RuntimeError("Event loop is closed")
'''


def _coroutine_fn(filename: str, error: str = "Event loop is closed"):
  namespace: dict = {}
  exec(compile(_ORBAX_SOURCE.replace("Event loop is closed", error),
               filename, "exec"), namespace)
  return namespace["_read_array_index_and_device_put"]


def _abandon_failed_task(fn) -> None:
  """Runs ``fn()`` as a task that fails, never retrieves its error, closes
  the loop and drops the task: asyncio reports it when it is collected."""
  loop = asyncio.new_event_loop()
  task = loop.create_task(fn())
  loop.run_until_complete(asyncio.sleep(0.01))
  assert task.done()
  loop.close()
  del task
  gc.collect()


class _Records(logging.Handler):
  def __init__(self):
    super().__init__()
    self.messages: list[str] = []

  def emit(self, record):
    self.messages.append(record.getMessage())


@pytest.fixture
def asyncio_log(monkeypatch):
  logger = logging.getLogger("asyncio")
  # Start without the filter (a restore earlier in this process installs
  # it); monkeypatch puts the original list back afterwards.
  monkeypatch.setattr(logger, "filters", [
      f for f in logger.filters
      if not isinstance(f, checkpoint._AbandonedTaskFilter)])
  handler = _Records()
  logger.addHandler(handler)
  yield handler
  logger.removeHandler(handler)


def test_unretrieved_orbax_task_error_is_reported_without_the_filter(
    asyncio_log):
  """The control: asyncio does report such a task (the extra stderr line)."""
  _abandon_failed_task(_coroutine_fn("/x/orbax/checkpoint/serialization.py"))
  assert any(m.startswith("Task exception was never retrieved")
             for m in asyncio_log.messages), asyncio_log.messages


def test_restore_silences_unretrieved_orbax_task_errors(asyncio_log):
  checkpoint._quiet_abandoned_reads()
  checkpoint._quiet_abandoned_reads()           # one filter, not two
  _abandon_failed_task(_coroutine_fn("/x/orbax/checkpoint/serialization.py"))
  # A non-Orbax task failing on the closed loop: the same read, not Orbax's.
  _abandon_failed_task(_coroutine_fn("/x/tensorstore_reader.py"))
  assert asyncio_log.messages == []
  assert sum(isinstance(f, checkpoint._AbandonedTaskFilter)
             for f in logging.getLogger("asyncio").filters) == 1


def test_other_task_errors_are_still_reported(asyncio_log):
  checkpoint._quiet_abandoned_reads()
  _abandon_failed_task(_coroutine_fn("/x/mine.py", error="my own bug"))
  assert len(asyncio_log.messages) == 1
  assert "my own bug" in asyncio_log.messages[0], asyncio_log.messages
