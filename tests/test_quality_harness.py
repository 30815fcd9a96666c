"""The quality benchmark's harness (benchmarks/quality): statistics, the
steps-to-target logic, the arms, and its smallest mode end to end."""

import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.quality import arms, harness, run  # noqa: E402


def test_t_interval_matches_closed_form():
  # ν = 1: the t quantile is the Cauchy one, tan(π(p - 1/2)).
  s = harness.t_interval([1.0, 3.0])
  t1 = math.tan(math.pi * (0.975 - 0.5))
  assert s["n"] == 2 and s["mean"] == pytest.approx(2.0)
  assert s["ci"] == pytest.approx(t1 * math.sqrt(2.0) / math.sqrt(2.0))
  # ν = 2: t_p = (2p - 1) / sqrt(2 p (1 - p)).
  s = harness.t_interval([1.0, 2.0, 3.0, None])
  p = 0.975
  t2 = (2 * p - 1) / math.sqrt(2 * p * (1 - p))
  assert s["n"] == 3 and s["std"] == pytest.approx(1.0)
  assert s["ci"] == pytest.approx(t2 / math.sqrt(3.0))
  assert harness.t_interval([5.0]) == {"mean": 5.0, "ci": None, "n": 1,
                                       "std": None}
  assert harness.t_interval([None])["mean"] is None


def test_steps_to_target():
  steps = [10, 20, 30, 40]
  assert harness.steps_to(steps, [4.0, 3.5, 3.0, 2.9], 3.0) == 30
  assert harness.steps_to(steps, [4.0, 3.5, 3.0, 2.9], 5.0) == 10
  assert harness.steps_to(steps, [4.0, 3.5, 3.0, 2.9], 2.0) is None
  # A non-finite or missing loss never counts as reaching the target.
  assert harness.steps_to(steps, [None, float("nan"), 2.5, 2.0], 3.0) == 30


def test_variability_definition():
  v = harness.variability([1.0] * 40, [0.5] * 40, [0.25] * 40, warmup=0)
  assert v == {"grad_norm_cv": 0.0, "grad_cos": 0.5, "update_cos": 0.25}
  g = [1.0, 3.0] * 10
  v = harness.variability(g, [0.0] * 20, [0.0] * 20, warmup=0, window=20)
  assert v["grad_norm_cv"] == pytest.approx(np.std(g) / np.mean(g))


def test_lr_grid_same_budget_and_span():
  for a in arms.ARMS.values():
    g = arms.lr_grid(a, 5)
    assert len(g) == 5 and g[2] == pytest.approx(a.lr_center)
    assert g[-1] / g[0] == pytest.approx(81.0)


def test_peers():
  g = {"w": jnp.arange(12.0).reshape(4, 3), "b": jnp.ones(3)}
  out, _ = arms.centralize().update(g, arms.centralize().init(g))
  np.testing.assert_allclose(out["w"].mean(0), 0.0, atol=1e-6)
  np.testing.assert_allclose(out["b"], g["b"])
  tx = arms.project_topr(rank=1, refresh=10)
  w = jax.random.normal(jax.random.key(0), (6, 4))
  out, st = tx.update({"w": w}, tx.init({"w": w}))
  assert np.linalg.matrix_rank(np.asarray(out["w"]), tol=1e-5) == 1
  u, s, vt = np.linalg.svd(np.asarray(w))
  np.testing.assert_allclose(out["w"], s[0] * np.outer(u[:, 0], vt[0]),
                             atol=1e-5)


def test_smoke_protocol_end_to_end(tmp_path):
  res = run.run(["--preset", "smoke", "--only", "main", "memory",
                 "--out", str(tmp_path)])
  main = json.loads((tmp_path / "main.json").read_text())
  assert main == json.loads(json.dumps(res["main"], default=float))
  assert (tmp_path / "main.png").exists()
  assert (tmp_path / "memory.png").exists()
  assert set(main["arms"]) == {"adamw", "ema_adamw"}
  for a in main["arms"].values():
    assert a["best_lr"] in a["lr_grid"] and len(a["lr_grid"]) == 2
    assert a["test"]["n"] == 2 and a["test"]["ci"] is not None
    assert a["steps_to_target"]["per_seed"] is not None
  # AdamW's target is its own seed mean: at least one of its seeds reaches it.
  assert main["arms"]["adamw"]["reached"] >= 1
  runs = main["runs"]["adamw"]
  target = main["target_test_bits"]
  assert target == pytest.approx(np.mean([r["curve"]["test"][-1]
                                          for r in runs]))
  for r, s in zip(runs, main["arms"]["adamw"]["steps_to_target"]["per_seed"],
                  strict=True):
    assert s == harness.steps_to(r["steps"], r["curve"]["test"], target)
  # --arms: one more arm merged in; the others and the target untouched.
  run.run(["--preset", "smoke", "--arms", "cgfm_flow_only",
           "--out", str(tmp_path)])
  merged = json.loads((tmp_path / "main.json").read_text())
  assert set(merged["arms"]) == {"adamw", "ema_adamw", "cgfm_flow_only"}
  for name in ("adamw", "ema_adamw"):
    assert merged["arms"][name] == main["arms"][name]
    assert merged["runs"][name] == main["runs"][name]
  assert merged["target_test_bits"] == target
  flow_arm = merged["arms"]["cgfm_flow_only"]
  assert flow_arm["group"] == "cgfm-ablation" and flow_arm["test"]["n"] == 2
  for r, s in zip(merged["runs"]["cgfm_flow_only"],
                  flow_arm["steps_to_target"]["per_seed"], strict=True):
    assert s == harness.steps_to(r["steps"], r["curve"]["test"], target)
  assert merged["merged"][-1]["arms"] == ["cgfm_flow_only"]
  mem = json.loads((tmp_path / "memory.json").read_text())["state_bytes"]
  # AdamW keeps two moments: twice the parameters; the EMA adds a third.
  assert mem["bench"]["adamw"] >= 2 * mem["bench"]["params_bytes"]
  assert mem["bench"]["ema_adamw"] > mem["bench"]["adamw"]


def test_arms_option_refuses_other_experiments(capsys):
  with pytest.raises(SystemExit) as e:
    run.parse(["--arms", "adamw", "--only", "noise"])
  assert e.value.code == 2
  assert "--arms applies to the 'main' experiment only" in (
      capsys.readouterr().err)


def test_arms_merge_needs_an_existing_main(tmp_path):
  with pytest.raises(FileNotFoundError, match="run the whole 'main'"):
    run.run(["--preset", "smoke", "--arms", "adamw", "--out", str(tmp_path)])


def test_flow_arm_changes_the_gradient_not_the_forward():
  """Through the engine's step: the flow arm's loss equals AdamW's (identity
  forward) while its gradient differs (λ_global = 0.5 reweights the causal
  mean part)."""
  from cgf_optax.train.step import Batch, TrainState
  setup = run.PRESETS["smoke"].setup
  graphdef, params = harness.init_params(setup, 0)
  x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16)))
  batch = Batch(x, jnp.roll(x, -1, axis=1), jnp.int32(0))
  out = {}
  for name in ("adamw", "cgfm_flow_only"):
    t = harness.Trainer(arms.ARMS[name], setup, graphdef)
    zeros = jax.tree.map(jnp.zeros_like, params)
    state = TrainState(params, t.tx.init(params), (zeros, zeros, 1e-3))
    _, m = t.step(state, batch)
    out[name] = m
  assert out["adamw"]["loss"] == out["cgfm_flow_only"]["loss"]
  assert abs(float(out["adamw"]["grad_norm"])
             - float(out["cgfm_flow_only"]["grad_norm"])) > 1e-4
