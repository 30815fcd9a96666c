"""Sharded training on 8 virtual CPU devices: jit (FSDP + tensor parallel) and
shard_map (data parallel, split norms) against one device, and the CLI's
``--mesh``.

The checks run in subprocesses (``tests/sharded_checks.py``), because XLA
creates the 8 CPU devices only if ``XLA_FLAGS`` says so before JAX starts.

Tolerances (the sharded run computes the same function with reductions in
another order, in float32, over ``sharded_checks.STEPS`` steps):

* losses: relative difference below ``LOSS_RTOL`` (about 3e-7 is seen);
* params: the L2 norm of the difference below ``PARAM_RTOL`` times the L2
  norm of the params' change over the run (1e-6 to 1e-4 is seen), and the
  largest entry's difference below ``PARAM_MAX_RTOL`` times the largest
  entry's change. The latter is loose because Adam turns a rounding-level
  difference of a near-zero gradient entry into a difference of up to its
  whole step (``m / sqrt(v)`` of a tiny gradient is about ±1): up to 1.2e-2
  is seen for adamw, 1e-5 for cgfm and cegm;
* the shard_map norm and pooling checks, whose arithmetic is the same up to
  summation order, ``COLLECTIVE_RTOL``.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "sharded_checks.py"

LOSS_RTOL = 1e-5
PARAM_RTOL = 1e-3
PARAM_MAX_RTOL = 5e-2
COLLECTIVE_RTOL = 1e-4


def _run(*args: str) -> dict:
  env = dict(os.environ)
  # Optimisation level 0: XLA compiles about twice as fast, and the runs
  # compared are compiled alike.
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                      + " --xla_force_host_platform_device_count=8"
                      + " --xla_backend_optimization_level=0").strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(
      [str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                     if p])
  proc = subprocess.run([sys.executable, str(SCRIPT), *args], env=env,
                        cwd=REPO, capture_output=True, text=True, timeout=900,
                        check=False)
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS=")]
  assert proc.returncode == 0 and lines, (
      f"subprocess failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
  return json.loads(lines[-1][len("RESULTS="):])


def _check_equal(name: str, r: dict) -> None:
  assert r["loss_rel"] < LOSS_RTOL, (name, r)
  assert r["param_rel"] < PARAM_RTOL, (name, r)
  assert r["param_max_rel"] < PARAM_MAX_RTOL, (name, r)


def _check_jit(name: str, r: dict) -> None:
  _check_equal(name, r)
  # The state is on the params' mesh, sharded as derived from the params,
  # and the step kept it so; arrays shaped like a param are sharded like it.
  assert r["state_on_mesh"] and r["state_as_derived"], (name, r)
  assert r["params_shaped_like_params"], (name, r)
  # No large replicated array: nothing replicated is longer than one side of
  # a matrix (norm scales, step counts, small per-head contexts).
  assert r["largest_replicated"] <= r["largest_param_axis"], (name, r)
  assert r["sharded_arrays"] > 0, (name, r)
  if r["bases_sharded"] is not None:
    assert r["bases_sharded"], (name, r)
  if "largest_collective" in r:
    # The update gathers or reduces no whole matrix (nor the context).
    assert r["largest_collective"] < r["smallest_matrix"], (name, r)


@pytest.mark.parametrize("names", [("adamw", "cgfm", "cgfm_adamw"),
                                   ("cegm", "cegm_adamw")],
                         ids=["adamw-cgfm", "cegm"])
def test_sharded_gpt_matches_one_device(names):
  """k steps of GPT training, sharded under jit on a (data=4, model=2) mesh
  and data-parallel inside shard_map, equal one-device training."""
  res = _run("gpt", *names)
  assert set(res["jit"]) == set(names) == set(res["shard_map"])
  for name in names:
    _check_jit(name, res["jit"][name])
    _check_equal(name, res["shard_map"][name])
    _check_equal(name, res["shard_map_vs_jit"][name])


def test_shard_map_collectives_equal_unsharded():
  """Norms over leaves split across devices (FSDP) and the CEGM loss and
  context pooling over a batch split across devices, inside shard_map."""
  res = _run("collectives")
  fsdp = res["fsdp"]
  control = fsdp.pop("normalize-global-no-axis")
  for name, r in fsdp.items():
    # The value first: a wrong reduction fails here, on its number, even
    # when shard_map's replication check also stopped the checked run.
    if "rel_unchecked" in r:
      assert r["rel_unchecked"] < COLLECTIVE_RTOL, (name, r)
    assert "error" not in r and r["rel"] < COLLECTIVE_RTOL, (name, r)
  assert sum("rel_unchecked" in r for r in fsdp.values()) == 4, fsdp
  assert control["rel"] > 100 * COLLECTIVE_RTOL, control   # axis_name matters
  with_axis, without = res["batch_axes"]["with_axis"], \
      res["batch_axes"]["without_axis"]
  assert with_axis["rel"] < COLLECTIVE_RTOL, with_axis
  assert with_axis["device_spread"] == 0.0, with_axis   # identical everywhere
  assert with_axis["lam_diff"] < 1e-6, with_axis
  assert without["rel"] > 100 * COLLECTIVE_RTOL, without
  assert without["device_spread"] > 100 * COLLECTIVE_RTOL, without


def test_cli_mesh_trains_resumes_and_restores_sharded(tmp_path):
  """`cgf-optax train --mesh data=4,model=2`, stopped and resumed, logs the
  losses of the unsharded run; its checkpoint restores sharded."""
  res = _run("cli", str(tmp_path))
  assert res["steps"] == [4, 4], res
  assert res["loss_rel"] < LOSS_RTOL, res
  assert res["mesh"] == {"data": 4, "model": 2}, res
  assert res["restored_step"] == 4, res
  assert res["restored_sharded_like_target"], res
  assert res["restored_sharded_arrays"] > 0, res


@pytest.mark.slow
def test_sharded_strategies_match_one_device():
  """The other decompose strategies, sharded under jit."""
  names = ("cgfm_adamw-temporal", "cgfm_adamw-mean")
  res = _run("jit", *names)
  for name in names:
    _check_jit(name, res[name])
