"""Training over several processes (JAX's multi-process runtime) against one
process, on CPU: `cgf-optax` launched as 2 processes x 2 devices (and
4 x 1) on localhost, Gloo collectives, a free port, a timeout.

* The losses and final params of a few steps on a ``(data=2, model=2)``
  mesh spanning the processes equal those of one process with 4 devices and
  the same mesh, within the tolerances of ``test_sharded_training.py`` (the
  arithmetic is the same; only where XLA splits a reduction may differ).
  The default suite runs adamw on 2 x 2; ``-m slow`` runs adamw, cgfm_adamw
  and cegm_adamw on 2 x 2 and 4 x 1.
* ``examples/multihost_lm.py`` (the library without the CLI: cgfm,
  cgfm_adamw, cegm, cegm_adamw, the params gathered from every process)
  prints the losses and the params' norm of one process (``-m slow``).
* One process killed (SIGKILL) mid-run: the other exits within seconds,
  with a one-line error, instead of waiting in a collective or in JAX's
  shutdown barrier; ``--resume`` on all processes then continues from the last
  checkpoint, and the log and the final checkpoint are bit-identical to an
  uninterrupted run of the same processes (``-m slow``).
* SIGINT to one process stops all after the same step (``-m slow``).

Each run's processes write their output to files (a full pipe would block
them) and are killed if the test fails or a timeout passes.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_kill_resume import _assert_same_state, _records, last_logged_step
from test_sharded_training import LOSS_RTOL, PARAM_MAX_RTOL, PARAM_RTOL

REPO = Path(__file__).resolve().parents[1]
CLI = ["-m", "cgf_optax.train.cli"]
EXAMPLE = [str(REPO / "examples" / "multihost_lm.py")]
MESH = "data=2,model=2"
BASE = ["--d-model", "64", "--num-layers", "1", "--num-heads", "2",
        "--seq-len", "16", "--batch-size", "8", "--eval-batches", "1",
        "--telemetry-every", "0", "--no-progress", "--mesh", MESH]
OPTIMIZERS = ("adamw", "cgfm_adamw:rank=2,num_scales=3",
              "cegm_adamw:num_heads=2,adapt_rate=0.5")
TIMEOUT = 300


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int, cache: Path | None) -> dict[str, str]:
  env = dict(os.environ)
  # Optimisation level 0: XLA compiles about twice as fast, and the runs
  # compared are compiled alike.
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                      + f" --xla_force_host_platform_device_count={devices}"
                      + " --xla_backend_optimization_level=0").strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(
      [str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                     if p])
  if cache is not None:
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  return env


class Launch:
  """``python ARGS`` (the CLI, or the example) as ``processes`` processes of
  ``devices`` CPU devices each (one process: no ``--coordinator``); output
  in ``logs/<name>.<i>.out|err``."""

  def __init__(self, args: list[str], processes: int, devices: int,
               logs: Path, name: str, cache: Path | None = None):
    logs.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    self.files = [(logs / f"{name}.{i}.out", logs / f"{name}.{i}.err")
                  for i in range(processes)]
    self.procs = []
    for i, (out, err) in enumerate(self.files):
      joint = ([] if processes == 1 else
               ["--coordinator", f"127.0.0.1:{port}", "--num-processes",
                str(processes), "--process-id", str(i),
                # A death no collective notices (a checkpoint barrier)
                # ends the others within this, not JAX's default 100 s.
                "--heartbeat-timeout", "10"])
      with open(out, "w") as fo, open(err, "w") as fe:
        self.procs.append(subprocess.Popen(
            [sys.executable, *args, *joint],
            stdout=fo, stderr=fe, env=_env(devices, cache), cwd=REPO))

  def wait(self, timeout: float = TIMEOUT) -> list[int]:
    """Every process's exit status; kills them all if one is still running
    after ``timeout`` seconds (and fails)."""
    deadline = time.monotonic() + timeout
    try:
      return [p.wait(timeout=max(deadline - time.monotonic(), 0.1))
              for p in self.procs]
    except subprocess.TimeoutExpired:
      self.kill()
      pytest.fail(f"processes still running after {timeout} s:\n"
                  + self.stderr(2000))

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()

  def stderr(self, tail: int = 4000) -> str:
    return "\n".join(f"--- process {i}:\n{err.read_text()[-tail:]}"
                     for i, (_, err) in enumerate(self.files))

  def stdout(self, i: int) -> str:
    return self.files[i][0].read_text()

  def __enter__(self) -> "Launch":
    return self

  def __exit__(self, *exc) -> None:
    self.kill()


def _run(args: list[str], processes: int, devices: int, logs: Path,
         name: str, cache: Path | None = None) -> Launch:
  """Runs to the end; asserts every process succeeded."""
  with Launch(args, processes, devices, logs, name, cache) as launch:
    rcs = launch.wait()
    assert rcs == [0] * processes, (rcs, launch.stderr())
  return launch


def _losses(run_dir: Path) -> list[float]:
  return [r["loss"] for r in _records(run_dir / "metrics.jsonl")]


def _state(ckpt_dir: Path, step: int) -> dict:
  """Checkpoint ``step``'s arrays as NumPy, read into one device (the
  checkpoint's own topology may differ)."""
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  meta = ocp.StandardCheckpointHandler().metadata(
      ckpt_dir / str(step) / "state").tree
  target = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), meta)
  mgr = ocp.CheckpointManager(
      ckpt_dir, options=ocp.CheckpointManagerOptions(read_only=True),
      item_names=("state", "meta"))
  try:
    got = mgr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))
    return jax.tree.map(np.asarray, dict(got["state"]))
  finally:
    mgr.close()


def _flat(tree) -> np.ndarray:
  return np.concatenate([np.ravel(np.asarray(x, np.float64))
                         for x in jax.tree.leaves(tree)])


def _initial_params() -> np.ndarray:
  """The runs' initial parameters (the unsharded model of the seed)."""
  from cgf_optax.train import TrainConfig, loop

  cfg = TrainConfig(d_model=64, num_layers=1, num_heads=2, seq_len=16)
  return _flat(loop.init_model(cfg)[1])


def _check_same_run(run: Path, ref: Path, steps: int, what: str) -> None:
  """Losses and final params of ``run`` against ``ref``."""
  a, b = _losses(run), _losses(ref)
  assert len(a) == len(b) == steps, (what, len(a), len(b))
  loss_rel = max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))
  assert loss_rel < LOSS_RTOL, (what, a, b)
  p = _flat(_state(run / "checkpoints", steps)["params"])
  q = _flat(_state(ref / "checkpoints", steps)["params"])
  p0 = _initial_params()
  assert p.shape == q.shape == p0.shape, what
  rel = np.linalg.norm(p - q) / np.linalg.norm(q - p0)
  max_rel = np.max(np.abs(p - q)) / np.max(np.abs(q - p0))
  assert rel < PARAM_RTOL and max_rel < PARAM_MAX_RTOL, (what, rel, max_rel)


def test_two_processes_train_as_one(tmp_path):
  """`cgf-optax train` (adamw, 3 steps) as 2 processes x 2 devices equals
  one process with 4 devices; only process 0 reports; the checkpoint's
  checksums cover both processes' files."""
  steps = 3
  args = [*CLI, "train", "--optimizer", "adamw", *BASE, "--steps", str(steps),
          "--eval-every", str(steps), "--checkpoint-every", str(steps)]
  logs = tmp_path / "logs"
  _run([*args, "--out", str(tmp_path / "one")], 1, 4, logs, "one")
  multi = _run([*args, "--out", str(tmp_path / "two")], 2, 2, logs, "two")
  _check_same_run(tmp_path / "two", tmp_path / "one", steps, "adamw")
  results = json.loads((tmp_path / "two" / "results.json").read_text())
  assert results["processes"] == 2 and results["mesh"] == {
      "data": 2, "model": 2}, results
  assert "wrote" in multi.stdout(0) and "wrote" not in multi.stdout(1)
  assert "optimizer" not in multi.stdout(1)        # no table
  # Process 0 recorded the checksums of every process's files.
  listed = json.loads((tmp_path / "two" / "checkpoints" / str(steps)
                       / "checksums.json").read_text())["files"]
  assert any("process_1" in name for name in listed), sorted(listed)


@pytest.mark.slow
@pytest.mark.parametrize("processes,devices", [(2, 2), (4, 1)],
                         ids=["2x2", "4x1"])
def test_processes_compare_as_one(tmp_path, processes, devices):
  """`cgf-optax compare` of adamw, cgfm_adamw and cegm_adamw (4 steps) over
  several processes equals one process with 4 devices."""
  steps = 4
  args = [*CLI, "compare", "--optimizers", *OPTIMIZERS, *BASE, "--steps",
          str(steps), "--eval-every", str(steps), "--checkpoint-every",
          str(steps)]
  logs = tmp_path / "logs"
  _run([*args, "--out", str(tmp_path / "one")], 1, 4, logs, "one")
  _run([*args, "--out", str(tmp_path / "multi")], processes, devices, logs,
       "multi")
  for spec in OPTIMIZERS:
    slug = "".join(c if c.isalnum() or c in "._-" else "_" for c in spec)
    _check_same_run(tmp_path / "multi" / slug, tmp_path / "one" / slug,
                    steps, spec)


@pytest.mark.slow
def test_example_aliases_over_processes(tmp_path):
  """Every alias through cgf_optax.sharding, 2 processes x 2 devices,
  against one process of 4."""
  def results(launch: Launch) -> dict[str, list[float]]:
    return {ln.split()[1]: [float(v) for v in ln.split()[2:]]
            for ln in launch.stdout(0).splitlines()
            if ln.startswith("RESULT ")}
  one = results(_run(EXAMPLE, 1, 4, tmp_path, "one"))
  two = results(_run(EXAMPLE, 2, 2, tmp_path, "two"))
  assert set(one) == set(two) == {"cgfm", "cgfm_adamw", "cegm", "cegm_adamw"}
  for name in one:
    a, b = np.asarray(two[name]), np.asarray(one[name])
    assert np.all(np.abs(a - b) <= LOSS_RTOL * np.abs(b)), (name, a, b)


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0])
def test_killed_process_stops_all_and_resume_is_exact(tmp_path, victim):
  """SIGKILL of one process mid-run (1, or 0 that also hosts the
  coordinator) ends the other with an error (no hang); `--resume` on both
  continues bit-exactly from the last checkpoint."""
  steps, every = 40, 10
  args = [*CLI, "train", "--optimizer", "cgfm_adamw:rank=2,num_scales=3",
          *BASE,
          "--steps", str(steps), "--eval-every", str(every),
          "--checkpoint-every", str(every)]
  logs, cache = tmp_path / "logs", tmp_path / "cache"
  ref, run = tmp_path / "ref", tmp_path / "run"
  _run([*args, "--out", str(ref)], 2, 2, logs, "ref", cache)

  with Launch([*args, "--out", str(run)], 2, 2, logs, "killed",
              cache) as launch:
    deadline = time.monotonic() + TIMEOUT
    while last_logged_step(run / "metrics.jsonl") <= every + 1:
      assert time.monotonic() < deadline and launch.procs[0].poll() is None, (
          "the run ended before it was killed:\n" + launch.stderr())
      time.sleep(0.01)
    launch.procs[victim].send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    rcs = launch.wait(timeout=120)
    stop_s = time.monotonic() - t0
  other = 1 - victim
  assert rcs[victim] == -signal.SIGKILL, rcs
  assert rcs[other] != 0, (rcs, launch.stderr())
  err = launch.files[other][1].read_text()
  # Ours, or JAX's when its coordination service ends the process first.
  assert (f"process {other} of 2 stopped" in err
          or "another task died" in err), launch.stderr()
  assert stop_s < 30, stop_s
  killed_at = last_logged_step(run / "metrics.jsonl")
  assert killed_at < steps, killed_at
  print(f"process {other} ended {stop_s:.1f} s after process {victim} was "
        f"killed at step {killed_at}")

  resumed = _run([*args, "--out", str(run), "--resume"], 2, 2, logs,
                 "resumed", cache)
  assert _records(run / "metrics.jsonl") == _records(
      ref / "metrics.jsonl"), resumed.stderr()
  _assert_same_state(_state(run / "checkpoints", steps),
                     _state(ref / "checkpoints", steps), "final checkpoint")


@pytest.mark.slow
def test_ctrl_c_of_one_process_stops_all(tmp_path):
  """SIGINT to process 1 alone stops both after the same step (the next
  evaluation or checkpoint), with status 130; `--resume` finishes the run
  with each step logged once."""
  steps, every = 200, 10
  args = [*CLI, "train", "--optimizer", "adamw", *BASE, "--steps",
          str(steps), "--eval-every", str(every), "--checkpoint-every",
          str(every)]
  run, logs = tmp_path / "run", tmp_path / "logs"
  with Launch([*args, "--out", str(run)], 2, 2, logs, "stopped") as launch:
    deadline = time.monotonic() + TIMEOUT
    while last_logged_step(run / "metrics.jsonl") < 2:
      assert time.monotonic() < deadline and launch.procs[0].poll() is None, (
          "the run ended before it was interrupted:\n" + launch.stderr())
      time.sleep(0.01)
    launch.procs[1].send_signal(signal.SIGINT)
    rcs = launch.wait(timeout=120)
  assert rcs == [130, 130], (rcs, launch.stderr())
  stopped = last_logged_step(run / "metrics.jsonl")
  assert stopped < steps and stopped % every == 0, stopped
  assert f"after step {stopped}" in launch.files[0][1].read_text()
  _run([*args, "--out", str(run), "--resume"], 2, 2, logs, "resumed")
  assert [r["step"] for r in _records(run / "metrics.jsonl")] == list(
      range(1, steps + 1))
