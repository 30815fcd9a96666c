"""The training engine: its pieces (feed, metrics sink, step) against
independent references, and the bad-input cases a new user met."""

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cgf_optax.train import TrainConfig, cli, data, loop
from cgf_optax.train.config import parse_optimizer_spec
from cgf_optax.train.feed import BatchFeed, host_batch
from cgf_optax.train.metrics import MetricsSink, TrainClock
from cgf_optax.train.optimizers import schedule_of
from cgf_optax.train.step import Batch, TrainState, make_train_step

TINY = ["--d-model", "32", "--num-layers", "1", "--num-heads", "2",
        "--seq-len", "32", "--batch-size", "4", "--eval-batches", "2",
        "--telemetry-every", "0", "--no-progress"]


def _snapshot(root: Path) -> dict[str, str]:
  if not root.exists():
    return {}
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ pieces

def test_feed_yields_the_batches_of_batch_at_in_order():
  corpus = np.random.default_rng(0).integers(0, 256, 5000).astype(np.uint8)
  with BatchFeed(corpus, batch_size=3, seq_len=8, seed=7, start=5, stop=12,
                 prefetch=2) as feed:
    got = list(feed)
  assert [int(b.step) for b in got] == list(range(5, 12))
  for b in got:
    x, y = data.batch_at(corpus, int(b.step), 3, 8, 7)
    np.testing.assert_array_equal(np.asarray(b.x), x)
    np.testing.assert_array_equal(np.asarray(b.y), y)


def test_feed_chunks_stack_consecutive_steps_and_close_stops_early():
  corpus = np.arange(3000, dtype=np.uint8)
  b = host_batch(corpus, 4, 2, 5, seed=1, chunk=3)
  assert b.x.shape == (3, 2, 5)
  for k in range(3):
    np.testing.assert_array_equal(b.x[k], data.batch_at(corpus, 4 + k, 2, 5,
                                                        1)[0])
  feed = BatchFeed(corpus, batch_size=2, seq_len=5, seed=1, start=0,
                   stop=10_000, prefetch=2)
  it = iter(feed)
  next(it)
  feed.close()                  # the producer thread ends, not blocks
  assert feed._thread is not None and not feed._thread.is_alive()


def test_feed_reraises_a_producer_error():
  tiny = np.zeros(4, dtype=np.uint8)     # too short for any window
  with pytest.raises(data.DataError), BatchFeed(
      tiny, batch_size=1, seq_len=8, seed=0, start=0, stop=3) as feed:
    list(feed)


def test_sink_fetches_late_but_logs_every_step(tmp_path):
  clock = TrainClock()
  log = (tmp_path / "m.jsonl").open("w")
  sink = MetricsSink(log, clock, tokens_per_step=10, lag=3, warmup=0)
  losses = [2.0, float("nan"), 1.0, 0.5, float("inf")]
  for i, v in enumerate(losses, 1):
    sink.push(i, {"loss": jnp.float32(v), "g": jnp.float32(i)})
    assert len(sink.records) == max(0, i - 3)    # ``lag`` steps late
  sink.drain()
  log.close()
  lines = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text()
           .splitlines()]
  assert [r["step"] for r in lines] == [1, 2, 3, 4, 5]
  assert [r["loss"] for r in lines] == [2.0, None, 1.0, 0.5, None]
  assert lines[2]["bits"] == pytest.approx(1.0 / math.log(2))
  assert [r["nonfinite_steps"] for r in lines] == [0, 1, 1, 1, 2]
  assert [r["g"] for r in lines] == [1, 2, 3, 4, 5]
  assert sink.timed()[0] == 4 * 10


def test_sink_marks_divergence_after_a_run_of_nonfinite_losses():
  sink = MetricsSink(None, TrainClock(), tokens_per_step=1, lag=0,
                     diverged_after=3)
  for i, v in enumerate([1.0, np.nan, np.nan, 1.0, np.nan, np.nan], 1):
    sink.push(i, {"loss": np.float32(v)})
  assert not sink.diverged                 # never 3 in a row
  sink.push(7, {"loss": np.float32(np.inf)})
  assert sink.diverged


def test_sink_throughput_starts_after_warmup_steps():
  sink = MetricsSink(None, TrainClock(), tokens_per_step=7, lag=0, warmup=2)
  for i in range(1, 3):
    sink.push(i, {"loss": np.float32(1.0)})
  assert sink.timed()[0] == 7          # fewer than warmup + 1: from the first
  for i in range(3, 11):
    sink.push(i, {"loss": np.float32(1.0)})
  assert sink.timed()[0] == 7 * 7      # steps 3 .. 10


def test_clock_excludes_paused_time():
  clock = TrainClock(offset=5.0)
  with clock.paused():
    time.sleep(0.2)
  assert 5.0 <= clock.now() < 5.15


def test_step_logs_the_schedules_rate_and_matches_a_plain_update():
  """One engine step = value_and_grad + tx.update + apply, with the
  schedule's rate of the batch's step in the metrics."""
  from flax import nnx

  from cgf_optax.train.model import GPT, gpt_config
  mcfg = gpt_config("tiny", d_model=16, num_layers=1, num_heads=2,
                    max_seq_len=8)
  graphdef, params = nnx.split(GPT(mcfg, rngs=nnx.Rngs(0)), nnx.Param)
  sched = optax.linear_schedule(0.0, 1e-2, 10)
  tx = optax.adamw(sched)
  step = jax.jit(make_train_step(graphdef, tx, schedule=sched),
                 static_argnames="telemetry")
  x = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 8)), jnp.int32)
  y = jnp.roll(x, -1, axis=1)
  state = TrainState(params, tx.init(params))
  new, m = step(state, Batch(x, y, jnp.int32(3)))
  assert float(m["lr"]) == pytest.approx(3e-3)

  def loss(p):
    logits = nnx.merge(graphdef, p)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  val, g = jax.value_and_grad(loss)(params)
  u, _ = tx.update(g, tx.init(params), params)
  want = optax.apply_updates(params, u)
  assert float(m["loss"]) == pytest.approx(float(val), rel=1e-6)
  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(want),
                  strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_logged_lr_follows_the_optimizers_schedule(tmp_path):
  """``lr`` in metrics.jsonl is the schedule the optimizer was built with,
  evaluated at each step's count (warm-up then cosine)."""
  out = tmp_path / "r"
  assert cli.main(["train", *TINY, "--steps", "12", "--warmup-steps", "3",
                   "--optimizer", "adamw:lr=0.004", "--checkpoint-every",
                   "0", "--out", str(out)]) == 0
  recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text()
          .splitlines()]
  cfg = TrainConfig(steps=12, warmup_steps=3)
  sched = schedule_of(parse_optimizer_spec("adamw:lr=0.004"), cfg)
  for r in recs:
    s = r["step"] - 1
    assert r["lr"] == pytest.approx(float(sched(s)), rel=1e-6)
  # Closed form: warm-up is linear from 0 to the peak over 3 steps.
  assert recs[1]["lr"] == pytest.approx(0.004 / 3, rel=1e-6)
  assert [r["step"] for r in recs] == list(range(1, 13))


# ------------------------------------------------------------------ bad input

def _one_line_exit_2(argv, capsys, out: Path, *needles):
  before = _snapshot(out)
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    raise SystemExit(cli.main(argv))
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "Traceback" not in err, err
  for n in needles:
    assert n in err, (n, err)
  assert _snapshot(out) == before
  return err


@pytest.mark.parametrize("spec, needle", [
    ("adamw:lr=abc", "lr='abc'"),
    ("adamw:lr=-1", "lr=-1"),
    ("cgfm_adamw:weight_decay=x", "weight_decay='x'"),
    ("cgfm_adamw:rank=0", "cgfm_adamw:rank=0"),
])
def test_bad_optimizer_values_are_one_line(tmp_path, capsys, spec, needle):
  out = tmp_path / "run"
  _one_line_exit_2(["train", *TINY, "--optimizer", spec, "--out", str(out)],
                   capsys, out, needle)
  assert not out.exists()


def test_bad_flag_is_one_line_without_usage(tmp_path, capsys):
  out = tmp_path / "run"
  err = _one_line_exit_2(["train", *TINY, "--steps", "many", "--out",
                          str(out)], capsys, out, "--steps")
  assert "usage" not in err


def test_huge_batch_is_refused_before_allocating(tmp_path, capsys):
  out = tmp_path / "run"
  _one_line_exit_2(["train", *TINY, "--batch-size", "100000000", "--out",
                    str(out)], capsys, out, "--batch-size 100000000",
                   "GiB")
  assert not out.exists()


def test_memory_plan_over_the_device_is_refused_with_a_hint():
  plan = SimpleNamespace(argument_size_in_bytes=2 << 30,
                         output_size_in_bytes=1 << 30,
                         alias_size_in_bytes=1 << 30,
                         temp_size_in_bytes=6 << 30)
  compiled = SimpleNamespace(memory_analysis=lambda: plan)
  cfg = TrainConfig(model="small", batch_size=64, seq_len=256)
  with pytest.raises(loop.ResourceError) as e:
    loop.check_memory_plan(compiled, cfg, limit=4 << 30)
  msg = str(e.value)
  for needle in ("8.0 GiB", "4.0 GiB", "'small'", "--batch-size 64",
                 "--seq-len 256", "--remat"):
    assert needle in msg, msg
  loop.check_memory_plan(compiled, cfg, limit=9 << 30)    # fits: no error


def test_out_of_memory_during_training_is_one_line(tmp_path, capsys,
                                                   monkeypatch):
  real = loop._compile

  def failing(*args, **kwargs):
    compiled = real(*args, **kwargs)

    def boom(*a):
      raise jax.errors.JaxRuntimeError(
          "RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
    return {k: boom for k in compiled}
  monkeypatch.setattr(loop, "_compile", failing)
  out = tmp_path / "run"
  assert cli.main(["train", *TINY, "--steps", "3", "--checkpoint-every", "0",
                   "--out", str(out)]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1, err
  assert "out of device memory" in err and "--remat" in err


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_names_the_step_and_checkpoint_and_resume_continues(tmp_path):
  out = tmp_path / "run"
  cmd = [sys.executable, "-m", "cgf_optax.train.cli", "train", *TINY,
         "--steps", "100000", "--checkpoint-every", "5", "--out", str(out)]
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, env=env)
  ckpts = out / "checkpoints"
  deadline = time.time() + 240
  while time.time() < deadline and not (
      ckpts.is_dir() and any(c.name.isdigit() and int(c.name) >= 10
                             for c in ckpts.iterdir())):
    time.sleep(0.2)
  p.send_signal(signal.SIGINT)
  _, err = p.communicate(timeout=120)
  assert p.returncode == 130, err[-3000:]
  lines = [x for x in err.splitlines() if x.strip()]
  assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
  last = max(int(c.name) for c in ckpts.iterdir() if c.name.isdigit())
  assert f"checkpoint is step {last}" in lines[0] and "--resume" in lines[0]
  assert "after step" in lines[0]
  # The metrics hold every step up to the checkpoint.
  steps = [json.loads(x)["step"] for x in
           (out / "metrics.jsonl").read_text().splitlines()]
  assert steps[:last] == list(range(1, last + 1))
  r = subprocess.run([*cmd[:-4], "--steps", str(last + 2), "--out", str(out),
                      "--resume"], capture_output=True, text=True, env=env,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  steps = [json.loads(x)["step"] for x in
           (out / "metrics.jsonl").read_text().splitlines()]
  assert steps == list(range(1, last + 3))
