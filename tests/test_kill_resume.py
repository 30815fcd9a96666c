"""Kill `cgf-optax train` with SIGKILL at random points, resume, compare.

A reference run trains uninterrupted. The same run is then started in a
subprocess and killed with SIGKILL again and again — at a random moment of
start-up (imports, compilation, restoring, rewriting the log), after a
random training step, while Orbax writes a checkpoint (as soon as its
temporary folder appears), and just after a checkpoint is committed (while
old ones are deleted) — and resumed with ``--resume`` each time, until it
finishes. Checked:

* after every kill, every checkpoint folder named by a step is complete
  (its files present and their JSON valid); anything else is an unfinished
  save (``<step>.orbax-checkpoint-tmp``) or a checkpoint being deleted
  (``_deleted/``), which the next run removes; Orbax's latest step is the
  newest complete folder, and it restores to exactly the reference run's
  checkpoint of that step;
* a kill before the first checkpoint makes ``--resume`` fail with "no
  checkpoint" (exit 2), and the run is then started afresh;
* the final parameters and optimizer state, and every line of
  ``metrics.jsonl`` but the wall-clock ``time``, are **bit-identical** to the
  reference run (CPU); the log has each step once.

The default test kills twice (before the first checkpoint, and in the
middle of a save; about a minute on an idle 2-core CPU); ``-m slow`` kills
twenty times at random, for each of three optimizers (about 4 minutes
each). Subprocesses share a JAX compilation cache so that each start costs
seconds, not a recompilation. Two in-process tests cover what a crash
leaves behind (an unfinished save, a checkpoint renamed away for deletion)
and ``compare --resume`` after a crash before an optimizer's first
checkpoint.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

STEPS = 30
CKPT_EVERY = 3
BASE = ["-m", "cgf_optax.train.cli", "train",
        "--d-model", "32", "--num-layers", "1", "--num-heads", "2",
        "--seq-len", "32", "--batch-size", "4", "--eval-batches", "1",
        "--eval-every", "5", "--telemetry-every", "0", "--no-progress",
        "--checkpoint-every", str(CKPT_EVERY), "--steps", str(STEPS)]
TMP = ".orbax-checkpoint-tmp"
TRASH = "_deleted"
# Files a complete checkpoint holds (JSON ones are parsed).
COMPLETE = ("commit_success.txt", "_CHECKPOINT_METADATA", "meta/metadata",
            "state/_METADATA", "state/manifest.ocdbt")
JSON_FILES = ("_CHECKPOINT_METADATA", "meta/metadata", "state/_METADATA")


def _env(cache: Path) -> dict[str, str]:
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  return env



def last_logged_step(log: Path) -> int:
  """The last step in the ``metrics.jsonl`` at ``log`` (0 if none; a line
  being written is skipped)."""
  try:
    lines = log.read_text().splitlines()
  except FileNotFoundError:
    return 0
  for line in reversed(lines):
    try:
      return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
      continue
  return 0


class Run:
  """One run folder driven by subprocesses of the CLI."""

  def __init__(self, out: Path, optimizer: str, env: dict[str, str],
               keep: int = 2):
    self.out = out
    self.env = env
    self.argv = [sys.executable, *BASE, "--optimizer", optimizer,
                 "--keep-checkpoints", str(keep), "--out", str(out)]
    self.ckpts = out / "checkpoints"
    self.log = out / "metrics.jsonl"

  def start(self, resume: bool) -> subprocess.Popen:
    self.out.mkdir(parents=True, exist_ok=True)
    self.stderr = self.out.parent / f"{self.out.name}.stderr"
    with open(os.devnull, "w") as null, open(self.stderr, "w") as err:
      return subprocess.Popen(self.argv + (["--resume"] if resume else []),
                              stdout=null, stderr=err, env=self.env)

  def finish(self, resume: bool, timeout: float = 600) -> int:
    p = self.start(resume)
    return p.wait(timeout=timeout)

  def log_inode(self) -> int | None:
    try:
      return self.log.stat().st_ino
    except FileNotFoundError:
      return None

  def last_logged_step(self) -> int:
    return last_logged_step(self.log)

  def entries(self) -> list[Path]:
    try:
      return list(self.ckpts.iterdir())
    except FileNotFoundError:
      return []


def _complete_steps(run: Run) -> list[int]:
  """Steps of the checkpoint folders, each asserted complete; anything else
  must be an unfinished save or a checkpoint being deleted."""
  steps = []
  for p in run.entries():
    if p.name.isdigit():
      for name in COMPLETE:
        f = p / name
        assert f.is_file() and f.stat().st_size > 0, f"{f} missing or empty"
      for name in JSON_FILES:
        json.loads((p / name).read_text())
      steps.append(int(p.name))
    else:
      assert TMP in p.name or p.name == TRASH, f"unexpected {p}"
  return sorted(steps)


def _restore(ckpt_dir: Path, step: int | None = None) -> tuple[int, dict]:
  """Orbax's latest (or given) step and its arrays, read-only."""
  mgr = ocp.CheckpointManager(
      ckpt_dir, options=ocp.CheckpointManagerOptions(read_only=True),
      item_names=("state", "meta"))
  try:
    step = mgr.latest_step() if step is None else step
    got = mgr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    state = jax.tree.map(np.asarray, dict(got["state"]))
    return step, {"state": state, "meta": dict(got["meta"])}
  finally:
    mgr.close()


def _assert_same_state(a: dict, b: dict, what: str) -> None:
  la, ta = jax.tree.flatten_with_path(a)[0], jax.tree.structure(a)
  lb, tb = jax.tree.flatten_with_path(b)[0], jax.tree.structure(b)
  assert ta == tb, what
  for (path, x), (_, y) in zip(la, lb, strict=True):
    assert x.dtype == y.dtype and x.shape == y.shape, (what, path)
    assert np.array_equal(x, y), f"{what}: {jax.tree_util.keystr(path)} differs"


def _records(log: Path) -> list[dict]:
  recs = [json.loads(x) for x in log.read_text().splitlines()]
  for r in recs:
    r.pop("time")                 # wall clock: the only field allowed to differ
  return recs


def _wait_and_kill(p: subprocess.Popen, run: Run, kind: str, resumed_from: int,
                   rng: np.random.Generator, startup_s: float) -> bool:
  """Kills ``p`` at a ``kind`` of moment; False if it finished first.

  ``kind`` is ``startup``, ``step``, ``save`` or ``commit``, optionally with
  a step: ``step:8`` kills after step 8 is logged, ``save:6`` during the
  save of step 6 or later; without one the step is random.
  """
  kind, _, at = kind.partition(":")
  t0 = time.monotonic()
  inode0 = run.log_inode()
  stale = {p_.stat().st_ino for p_ in run.entries() if TMP in p_.name}
  # "startup": a random moment before the training loop (imports,
  # compilation, restoring, rewriting the log), or its very start.
  startup_at = t0 + rng.uniform(0.05, 1.0) * startup_s
  deadline = t0 + 300.0
  target = int(at) if at else (int(rng.integers(resumed_from + 1, STEPS))
                               if kind == "step" else 0)
  delay = float(rng.uniform(0.0, 0.02))

  def due() -> bool:
    if run.log_inode() == inode0:   # the new process has not reached its loop
      return kind == "startup" and time.monotonic() >= startup_at
    if kind == "startup":           # reached it: kill now, before step 1
      return True
    if kind == "step":
      return run.last_logged_step() >= target
    for e in run.entries():
      try:
        if (kind == "save" and TMP in e.name and e.stat().st_ino not in stale
            and int(e.name.split(".")[0]) >= target):
          return True
      except FileNotFoundError:
        continue
      if (kind == "commit" and e.name.isdigit()
          and int(e.name) > max(resumed_from, target - 1)):
        return True
    return False

  while p.poll() is None and not due():
    if time.monotonic() > deadline:
      break
    time.sleep(0.001)
  if kind in ("step", "save"):
    time.sleep(delay)            # a little further into the step / the save
  if p.poll() is not None:
    return False
  p.send_signal(signal.SIGKILL)
  p.wait()
  return True


def _kill_resume(tmp: Path, optimizer: str, plan: list[str], seed: int
                 ) -> dict:
  env = _env(tmp / "jax-cache")
  rng = np.random.default_rng(seed)
  ref = Run(tmp / "ref", optimizer, env, keep=STEPS)   # keeps every step
  t0 = time.monotonic()
  p = ref.start(resume=False)
  while p.poll() is None and ref.log_inode() is None:
    time.sleep(0.005)
  startup_s = time.monotonic() - t0     # to the start of the training loop
  assert p.wait(timeout=600) == 0, ref.stderr.read_text()[-3000:]
  report = {"reference_s": round(time.monotonic() - t0, 1),
            "reference_startup_s": round(startup_s, 1)}
  ref_steps = _complete_steps(ref)
  assert ref_steps == list(range(CKPT_EVERY, STEPS + 1, CKPT_EVERY))

  run = Run(tmp / "run", optimizer, env)
  report.update(kills=[], no_checkpoint_refusals=0, tmp_seen=0, trash_seen=0,
                tmp_at=[])
  resumed_from, started = 0, False
  for kind in [*plan, "finish"]:
    steps = _complete_steps(run)
    resume = bool(steps) or started
    if resume and not steps:
      # Killed before the first checkpoint: --resume is refused, by name.
      rc = run.finish(resume=True)
      err = run.stderr.read_text()
      assert rc == 2 and "no checkpoint in" in err and str(run.ckpts) in err, err
      report["no_checkpoint_refusals"] += 1
      resume = False
    started = True
    resumed_from = steps[-1] if steps else 0
    t_start = time.monotonic()
    p = run.start(resume)
    if kind == "finish" or not _wait_and_kill(p, run, kind, resumed_from, rng,
                                              startup_s):
      assert p.wait(timeout=600) == 0, run.stderr.read_text()[-3000:]
      report["last_s"] = round(time.monotonic() - t_start, 1)
      break
    # After the kill: only complete checkpoints; the latest is Orbax's and
    # equals the reference run's checkpoint of that step.
    steps = _complete_steps(run)
    names = [e.name for e in run.entries()]
    report["tmp_at"].append(any(TMP in n for n in names))
    report["tmp_seen"] += report["tmp_at"][-1]
    report["trash_seen"] += TRASH in names
    report["kills"].append((kind, run.last_logged_step(), steps,
                            round(time.monotonic() - t_start, 1)))
    if steps:
      latest, got = _restore(run.ckpts)
      assert latest == steps[-1]
      _, want = _restore(ref.ckpts, latest)
      _assert_same_state(got["state"], want["state"], f"checkpoint {latest}")
      assert got["meta"]["step"] == latest
  else:
    raise AssertionError("unreachable")

  # The interrupted run ended where the reference did, bit for bit.
  assert _complete_steps(run)[-1] == STEPS
  assert not [e for e in run.entries() if not e.name.isdigit()], run.entries()
  _, got = _restore(run.ckpts, STEPS)
  _, want = _restore(ref.ckpts, STEPS)
  _assert_same_state(got["state"], want["state"], "final state")
  got_recs, want_recs = _records(run.log), _records(ref.log)
  assert [r["step"] for r in got_recs] == list(range(1, STEPS + 1))
  assert got_recs == want_recs
  return report


def test_kill_and_resume_is_exact(tmp_path):
  """Two kills: after step 1 (before the first checkpoint, so --resume is
  refused and the run starts afresh), then during the save of step 6."""
  report = _kill_resume(tmp_path, "cgfm_adamw", ["step:1", "save:6"], seed=0)
  kinds = [k[0] for k in report["kills"]]
  assert kinds == ["step:1", "save:6"], report
  assert report["no_checkpoint_refusals"] == 1, report
  # Killed mid-save: step 3 complete, step 6 still a temporary folder. (On
  # a loaded machine the first kill can land later, during the save of step
  # 3: that one may leave a temporary folder too.)
  assert report["kills"][1][2] == [3] and report["tmp_at"][1], report
  print(report)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer, seed", [("adamw", 1),
                                             ("cgfm_adamw:rank=4", 2),
                                             ("cegm_adamw:adapt_rate=0.1", 3)])
def test_kill_and_resume_many_times(tmp_path, optimizer, seed):
  """Twenty random kills (a random kind, step and delay each)."""
  rng = np.random.default_rng(seed)
  plan = ["startup"] + list(rng.choice(["startup", "step", "save", "save",
                                        "commit"], size=20))
  report = _kill_resume(tmp_path, optimizer, [str(k) for k in plan],
                        seed=100 + seed)
  assert len(report["kills"]) >= 10
  assert report["tmp_seen"] >= 1         # at least one save was cut short
  print(report)


def test_compare_resume_restarts_an_optimizer_killed_before_its_first_checkpoint(
    tmp_path, capsys):
  """`compare --resume` after a crash in the second optimizer's first steps
  (its log exists, no checkpoint): that optimizer starts again from step 0
  instead of failing with "no checkpoint"."""
  from cgf_optax.train import cli
  out = tmp_path / "cmp"
  args = ["compare", *BASE[BASE.index("--d-model"):], "--out", str(out)]
  args[args.index("--steps") + 1] = "4"
  args[args.index("--checkpoint-every") + 1] = "2"
  # adamw reached its checkpoint at step 2; cgfm was killed after logging
  # its first step (a log, no checkpoint).
  assert cli.main([*args, "--optimizers", "adamw", "--stop-after", "2"]) == 0
  (out / "cgfm").mkdir()
  (out / "cgfm" / "metrics.jsonl").write_text(
      (out / "adamw" / "metrics.jsonl").read_text().splitlines()[0]
      + '\n{"step": 2, "lo')
  assert cli.main([*args, "--optimizers", "adamw", "cgfm", "--resume"]) == 0
  assert "cgfm: not started before (no checkpoint)" in capsys.readouterr().out
  for name in ("adamw", "cgfm"):
    steps = [json.loads(x)["step"] for x in
             (out / name / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4], name


def test_leftovers_of_a_crash_are_removed_on_resume(tmp_path):
  """What a crash can leave besides complete checkpoints — an unfinished
  save (``<step>.orbax-checkpoint-tmp``) and a checkpoint renamed away but
  not yet deleted (``_deleted/<step>``) — is removed when the run resumes,
  and the latest complete checkpoint is the one restored."""
  from cgf_optax.train import cli
  out = tmp_path / "run"
  args = [*BASE[BASE.index("train"):], "--optimizer", "adamw", "--out",
          str(out)]
  args[args.index("--steps") + 1] = "6"
  args[args.index("--checkpoint-every") + 1] = "2"
  assert cli.main([*args, "--stop-after", "4"]) == 0
  ckpts = out / "checkpoints"
  partial = ckpts / f"6{TMP}" / "state"
  partial.mkdir(parents=True)
  (partial / "_METADATA").write_text('{"tree_metadata": {"par')
  (ckpts / TRASH / "2" / "state").mkdir(parents=True)
  (ckpts / TRASH / "2" / "state" / "_METADATA").write_text("{}")
  assert cli.main([*args, "--resume"]) == 0
  assert sorted(p.name for p in ckpts.iterdir()) == ["4", "6"]
  steps = [json.loads(x)["step"] for x in
           (out / "metrics.jsonl").read_text().splitlines()]
  assert steps == list(range(1, 7))
