"""Orbax checkpoints of a training run: atomic, the last few kept, exact resume.

A checkpoint holds the model parameters, the optimizer state and, as JSON,
the step, the cumulative training time and what the run was (model config,
optimizer label, data seed). The batch order is a function of
``(data_seed, step)`` (:func:`cgf_optax.train.data.batch_at`), so the step is
the whole data position and RNG state.

Crash safety (tested by killing ``cgf-optax train`` with SIGKILL at random
points, ``tests/test_kill_resume.py``):

* Orbax writes each checkpoint to ``<step>.orbax-checkpoint-tmp`` and renames
  it to ``<step>`` when complete; a folder named by a bare step number is
  therefore always whole, and a crash mid-save leaves the previous checkpoint
  as the latest. Temporary folders of a crashed save are removed when the
  next run opens the folder.
* Old checkpoints beyond ``keep`` are first *renamed* into ``_deleted/``
  (one atomic rename) and only then removed, so a crash while deleting never
  leaves a half-deleted ``<step>`` folder behind; ``_deleted/`` is emptied
  after every save and when a run opens the folder.

Integrity: before a checkpoint is committed (renamed to its step name), the
size and CRC-32C of every file in it are written to ``checksums.json`` inside it
(Orbax's post-finalization hook, run once all processes have written their
files). A restore re-hashes every listed file and refuses a missing file or
a mismatch, naming the file, so a flipped bit in compressed array data is
caught before it reaches training. Hashing runs on a thread pool
(``crc32c``, hardware-accelerated, releases the GIL); a restore verifies
before Orbax reads.
A checkpoint written before checksums were recorded is restored with a
warning that it is unverified.

Several processes (one per host, a mesh over all their devices): every
process calls :meth:`RunCheckpointer.save` and :meth:`RunCheckpointer.restore`
alike, on one folder they all see (a shared filesystem). Each writes the
shards of its own devices; process 0 writes the metadata, records the
checksums once every process has written, commits, and removes old
checkpoints. On restore every process verifies the checksums and reads what
its devices hold.

Checkpoints are restored into a target built from the run's own
initialisation (shapes, dtypes, shardings); nothing is unpickled: the arrays
are TensorStore (zarr/OCDBT) data and the rest is JSON.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import re
import shutil
import struct
import sys
import warnings
from pathlib import Path
from typing import Any

import crc32c
import jax
import orbax.checkpoint as ocp

__all__ = ["CheckpointError", "RunCheckpointer"]

# Old checkpoints are renamed into this sub-folder, then deleted.
TRASH = "_deleted"
# Files a checkpoint's restore reads: (path, is JSON, required).
_FILES = (("meta/metadata", True, True), ("state/_METADATA", True, True),
          ("state/manifest.ocdbt", False, True),
          ("state/array_metadatas/process_0", True, False),
          ("_CHECKPOINT_METADATA", True, False))


# Size and CRC-32C (Castagnoli) of every file of a checkpoint, written into
# it before its commit. CRC-32C (as iSCSI, ext4 metadata and cloud object
# stores use) detects every burst of up to 32 flipped bits and misses random
# damage with odds of 2^-32. The ``crc32c`` package computes it with the
# CPU's CRC instruction at ~10 GB/s per core, 5x zlib's CRC-32, which keeps
# a restore within 10% (benchmarks/checkpoint_overhead.py).
CHECKSUMS = "checksums.json"
ALGORITHM = "crc32c"
# Orbax rewrites these top-level files as it commits, after the checksums:
# they are not listed (the step metadata is checked as JSON instead).
_UNLISTED = {CHECKSUMS, CHECKSUMS + ".tmp", "_CHECKPOINT_METADATA",
             "commit_success.txt"}
_CHUNK = 1 << 22


def _crc32c(path: Path) -> tuple[int, str]:
  """``(bytes, CRC-32C as 8 hex digits)`` of the file at ``path``."""
  crc, size = 0, 0
  buf = bytearray(_CHUNK)
  view = memoryview(buf)
  with open(path, "rb", buffering=0) as f:
    while n := f.readinto(buf):
      crc = crc32c.crc32c(view[:n], crc)
      size += n
  return size, f"{crc:08x}"


def _hash_files(root: Path, names: list[str]) -> dict[str, tuple[int, str]]:
  """``{name: (bytes, crc32c)}`` of the files ``root / name``, hashed on a
  thread pool (largest first, so the pool ends together)."""
  order = sorted(names, key=lambda n: -(root / n).stat().st_size)
  workers = min(8, os.cpu_count() or 1, max(len(order), 1))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return dict(zip(order, pool.map(lambda n: _crc32c(root / n), order),
                    strict=True))


def write_checksums(root: Path) -> None:
  """Writes ``root/checksums.json``: size and CRC-32C of every file below
  ``root`` (relative POSIX paths), through a temporary file and a rename."""
  names = sorted(n for n in (p.relative_to(root).as_posix()
                             for p in root.rglob("*") if p.is_file())
                 if n not in _UNLISTED)
  files = {n: {"bytes": size, ALGORITHM: digest}
           for n, (size, digest) in sorted(_hash_files(root, names).items())}
  tmp = root / (CHECKSUMS + ".tmp")
  tmp.write_text(json.dumps({"algorithm": ALGORITHM, "files": files},
                            indent=1))
  tmp.replace(root / CHECKSUMS)


def _checksum_problem(root: Path) -> str | None:
  """Why the files of checkpoint ``root`` do not match its
  ``checksums.json`` (naming the first bad file), or None if they match.

  Raises:
    FileNotFoundError: the checkpoint has no ``checksums.json``.
  """
  listing = root / CHECKSUMS
  try:
    listed = json.loads(listing.read_bytes())
    if listed["algorithm"] != ALGORITHM:
      return (f"{listing} lists {listed['algorithm']!r} checksums; this "
              f"version of cgf_optax checks {ALGORITHM!r}")
    expected = {str(n): (int(v["bytes"]), str(v[ALGORITHM]))
                for n, v in listed["files"].items()}
  except FileNotFoundError:
    raise
  except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
    return f"{listing} is unreadable or not a checksum list ({e})"
  missing = [n for n in expected if not (root / n).is_file()]
  if missing:
    return f"{root / missing[0]} is missing (listed in {CHECKSUMS})"
  got = _hash_files(root, list(expected))
  for name in sorted(expected):
    if got[name][0] != expected[name][0]:
      return (f"{root / name} has {got[name][0]} bytes, {expected[name][0]} "
              f"when saved")
    if got[name][1] != expected[name][1]:
      return f"{root / name} fails its CRC-32C checksum (changed since saved)"
  return None


# An OCDBT manifest starts with this magic number (big-endian) followed by
# the file's total length (little-endian uint64); TensorStore checks a CRC
# at the end, but its error for a short file does not always name the file.
_OCDBT_MAGIC = 0x0CDB3A2A


def _manifest_problem(f: Path) -> str | None:
  """Why the OCDBT manifest ``f`` is unusable, or None if its header and
  length are consistent."""
  data = f.read_bytes()
  if len(data) < 12:
    return f"is truncated ({len(data)} bytes, shorter than its header)"
  magic, = struct.unpack(">I", data[:4])
  if magic != _OCDBT_MAGIC:
    return "is not an OCDBT manifest (bad magic number)"
  length, = struct.unpack("<Q", data[4:12])
  if length != len(data):
    return f"is truncated or damaged ({len(data)} bytes, header says {length})"
  return None


def _quiet_abandoned_reads() -> None:
  """Silences the reads a failed restore leaves behind.

  When one TensorStore read fails, Orbax closes its event loop while the
  other reads are still in flight; their completion callbacks then raise
  ``RuntimeError('Event loop is closed')`` in TensorStore's threads, and
  Orbax's never-awaited read coroutines are collected with their errors.
  Python reports both through :func:`sys.unraisablehook` as a page of
  tracebacks after our one-line error. Only these two are dropped; anything
  else goes to the previous hook.
  """
  _quiet_abandoned_tasks()
  previous = sys.unraisablehook
  if getattr(previous, "_cgf_optax_quiet", False):
    return

  def hook(unraisable: Any) -> None:
    e = unraisable.exc_value
    if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
      return
    code = getattr(unraisable.object, "cr_code", None)   # a coroutine
    if code is not None and "orbax" in code.co_filename:
      return
    previous(unraisable)

  hook._cgf_optax_quiet = True  # type: ignore[attr-defined]
  sys.unraisablehook = hook


def _abandoned_orbax_task(record: logging.LogRecord) -> bool:
  """Whether ``record`` is asyncio's report of an Orbax read task whose
  error nobody retrieved (the loop was closed under it)."""
  msg = record.getMessage()
  if not msg.startswith("Task exception was never retrieved"):
    return False
  e = record.exc_info[1] if record.exc_info else None
  return "orbax" in msg or (isinstance(e, RuntimeError)
                            and str(e) == "Event loop is closed")


class _AbandonedTaskFilter(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return not _abandoned_orbax_task(record)


def _quiet_abandoned_tasks() -> None:
  """Silences asyncio's report of the same abandoned reads.

  The read coroutines of a failed restore may also be wrapped in asyncio
  *tasks*; when such a task is collected with its error unretrieved, asyncio
  logs ``Task exception was never retrieved`` (with a traceback) on its
  ``asyncio`` logger, e.g. ``ERROR:asyncio:...`` under a busy machine where
  the task outlives the loop. A filter on that logger drops those records
  (an Orbax task, or the closed loop's error) and nothing else.
  """
  logger = logging.getLogger("asyncio")
  if not any(isinstance(f, _AbandonedTaskFilter) for f in logger.filters):
    logger.addFilter(_AbandonedTaskFilter())


def _key_name(key: Any) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _array_names(tree: Any) -> set[str]:
  """Orbax's names of the arrays of ``tree`` (``opt_state.0.lam``)."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {".".join(_key_name(k) for k in path) for path, _ in flat}


# Arrays added to a state's layout, and what a checkpoint without them is.
_ADDED = {"has_loss": "EntangleState.has_loss (cgf_optax replaced the NaN "
                      "'no loss yet' of prev_loss by this flag, issue 18)"}


def _layout_problem(saved: set[str], here: set[str]) -> str | None:
  """Why a checkpoint holding arrays ``saved`` cannot restore ``here``."""
  missing, extra = sorted(here - saved), sorted(saved - here)
  if not missing and not extra:
    return None
  parts = []
  if missing:
    parts.append(f"this run's state has {len(missing)} array(s) the "
                 f"checkpoint lacks ({', '.join(missing[:4])}"
                 f"{', ...' if len(missing) > 4 else ''})")
  if extra:
    parts.append(f"the checkpoint has {len(extra)} array(s) this run's state "
                 f"lacks ({', '.join(extra[:4])}"
                 f"{', ...' if len(extra) > 4 else ''})")
  text = "its layout differs: " + "; ".join(parts)
  added = sorted({v for m in missing for k, v in _ADDED.items()
                  if m.rsplit(".", 1)[-1] == k})
  if added:
    text += (f"; it was written by an older cgf_optax, before "
             f"{', '.join(added)}: resume it with that version, or start anew")
  return text


class CheckpointError(ValueError):
  """A checkpoint that is missing, corrupt or from a different run."""


def _reason(e: BaseException, limit: int = 400) -> str:
  """The most telling line of an Orbax / TensorStore error chain.

  TensorStore errors end with a long JSON spec of the array; Orbax wraps
  them in a generic "error while reading array index". The innermost cause
  names the array and the file and says what is wrong.
  """
  chain = []
  while e is not None and len(chain) < 10:
    chain.append(e)
    e = e.__cause__ or e.__context__
  text = ""
  for err in reversed(chain):        # innermost first
    msg = str(err)
    if msg and "See full TensorStore details" not in msg:
      text = f"{type(err).__name__}: {msg}"
      break
  if not text:
    text = f"{type(chain[0]).__name__}: {chain[0]}"
  text = re.split(r" \[tensorstore_spec|\. See full TensorStore", text)[0]
  text = " ".join(text.split())
  return text if len(text) <= limit else text[:limit] + " ..."


def _diff(saved: Any, here: Any, key: str) -> str:
  """``key.sub is A there, B here`` for the entries that differ."""
  if isinstance(saved, dict) and isinstance(here, dict):
    parts = [_diff(saved.get(k), here.get(k), f"{key}.{k}")
             for k in sorted(set(saved) | set(here), key=str)
             if saved.get(k) != here.get(k)]
    return "; ".join(parts)
  return f"{key} is {saved!r} there, {here!r} here"


class RunCheckpointer:
  """Saves and restores ``(params, opt_state)`` plus run metadata.

  Args:
    directory: where checkpoints go (one sub-folder per step).
    every: save at steps that are multiples of this (0: only when asked
      with ``force``).
    keep: number of most recent checkpoints kept.
    checksums: record the CRC-32C of every file when saving and verify them
      when restoring (``False`` only to measure what they cost).
  """

  def __init__(self, directory: str | Path, every: int, keep: int,
               checksums: bool = True):
    self.directory = Path(directory).absolute()
    self.every = every
    self._saving: int | None = None
    self._checksums = checksums
    self._empty_trash()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=True,
        cleanup_tmp_directories=True, todelete_subdir=TRASH,
        async_options=ocp.AsyncOptions(
            post_finalization_callback=self._write_checksums if checksums
            else None))
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "meta"))

  def _write_checksums(self) -> None:
    """Orbax's post-finalization hook (primary process, all files written,
    not yet renamed): checksums of the temporary folder of the step being
    saved."""
    tmp = [p for p in self.directory.glob(f"{self._saving}.orbax-checkpoint-"
                                          "tmp*") if p.is_dir()]
    if len(tmp) != 1:
      raise CheckpointError(f"cannot find the temporary folder of checkpoint "
                            f"{self._saving} in {self.directory} to record "
                            f"its checksums (found {len(tmp)})")
    write_checksums(tmp[0])

  def _empty_trash(self) -> None:
    """Removes checkpoints already renamed away for deletion (process 0
    only, as Orbax deletes there too)."""
    trash = self.directory / TRASH
    if jax.process_index() == 0 and trash.is_dir():
      shutil.rmtree(trash, ignore_errors=True)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, meta: dict[str, Any],
           force: bool = False) -> bool:
    """Saves if ``step`` is a multiple of ``every`` (or ``force``).

    The save is asynchronous: this returns once the arrays are copied off
    the device, and the files are written in the background (the previous
    save is waited for first). It is still atomic: the folder gets its step
    name only when whole. :meth:`wait` or :meth:`close` waits for it.
    """
    if not force and not (self.every and step % self.every == 0):
      return False
    if step in self._manager.all_steps():
      return False
    self._manager.wait_until_finished()
    self._empty_trash()
    self._saving = step
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave(meta)), force=True)
    return True

  def wait(self) -> int | None:
    """Waits for a save in progress; returns the latest complete step."""
    self._manager.wait_until_finished()
    self._empty_trash()
    return self._manager.latest_step()

  def _check_files(self, where: Path) -> None:
    """Refuses a checkpoint with a missing, empty or unparsable file."""
    for name, is_json, required in _FILES:
      f = where / name
      if not required and not f.exists():
        continue
      if not f.is_file():
        raise CheckpointError(f"checkpoint {where} is incomplete: {f} is "
                              "missing")
      if f.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {where} is corrupt: {f} is empty")
      if name.endswith(".ocdbt"):
        problem = _manifest_problem(f)
        if problem:
          raise CheckpointError(f"checkpoint {where} is corrupt: {f} {problem}")
      if is_json:
        try:
          json.loads(f.read_bytes())
        except (ValueError, OSError) as e:
          raise CheckpointError(f"checkpoint {where} is corrupt: {f} is not "
                                f"valid JSON ({e})") from None
    for f in sorted((where / "state").glob("ocdbt.process_*/manifest.ocdbt")):
      problem = ("is empty" if f.stat().st_size == 0
                 else _manifest_problem(f))
      if problem:
        raise CheckpointError(f"checkpoint {where} is corrupt: {f} {problem}")

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
      CheckpointError: no checkpoint, a corrupt one, or one of another run;
        the message names the checkpoint folder and, where one is at fault,
        the file.
    """
    step = self._manager.latest_step()
    if step is None:
      raise CheckpointError(f"--resume: no checkpoint in {self.directory}")
    where = self.directory / str(step)
    older = [s for s in self._manager.all_steps() if s < step]
    hint = (f" (remove {where} to resume from step {max(older)} instead)"
            if older else "")
    try:
      self._check_files(where)
    except CheckpointError as e:
      raise CheckpointError(f"{e}{hint}") from None
    # Verified before Orbax reads, not alongside: on a busy CPU the two
    # contend (x1.25 restore time at 300M parameters on 2 cores, x1.05 one
    # after the other), and the hash pass leaves the files in the page cache.
    try:
      problem = self._checksums and _checksum_problem(where)
    except FileNotFoundError:
      problem = None
      warnings.warn(f"checkpoint {where} has no {CHECKSUMS} (written before "
                    "cgf_optax recorded checksums): restored unverified",
                    stacklevel=2)
    if problem:
      raise CheckpointError(f"checkpoint {where} is corrupt: {problem}{hint}")
    return self._read(step, where, target, expect, hint)

  def _read(self, step: int, where: Path, target: Any,
            expect: dict[str, Any], hint: str
            ) -> tuple[int, Any, dict[str, Any]]:
    """Reads checkpoint ``step`` (``where``) into the structure of
    ``target``, after checking its metadata against ``expect``."""
    _quiet_abandoned_reads()   # before: a failing read reports mid-restore
    try:
      meta = self._manager.restore(
          step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # noqa: BLE001 - report any Orbax failure plainly
      raise CheckpointError(f"checkpoint {where} is unreadable (metadata "
                            f"{where / 'meta' / 'metadata'}): "
                            f"{_reason(e)}{hint}") from None
    if not isinstance(meta, dict):
      raise CheckpointError(f"checkpoint {where} is corrupt: "
                            f"{where / 'meta' / 'metadata'} is not a JSON "
                            "object")
    for key, value in expect.items():
      if meta.get(key) != value:
        raise CheckpointError(
            f"checkpoint {where} is from a different run: "
            f"{_diff(meta.get(key), value, key)}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
      saved = _array_names(
          ocp.StandardCheckpointHandler().metadata(where / "state").tree)
    except Exception:  # noqa: BLE001 - the restore below reports it
      saved = None
    problem = saved and _layout_problem(saved, _array_names(abstract))
    if problem:
      raise CheckpointError(f"checkpoint {where} does not match this "
                            f"model/optimizer: {problem}{hint}")
    try:
      state = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract)))["state"]
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f"checkpoint {where} is corrupt or does not "
                            f"match this model/optimizer: "
                            f"{_reason(e)}{hint}") from None
    return step, state, meta

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
    self._empty_trash()
