"""The GPU quality study's machinery (benchmarks/quality/study.py) on the
``tiny`` protocol: the plan and its grid rule, resumable runs, the refusal
to mix setups, and the statistics against closed forms."""

import json
import math
import sys
from pathlib import Path

import pytest
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.quality import study  # noqa: E402

TINY = study.PROTOCOLS["tiny"]


def fake(out: Path, run_id: str, sel: float, test: float | None = None,
         **over) -> None:
  """A result file for the planned run ``run_id`` with the given losses."""
  plan = study.make_plan(TINY, out)
  spec = next(r for r in plan["runs"] if r["id"] == run_id)
  spec = {k: v for k, v in spec.items() if k not in ("done", "est_min")}
  res = {"spec": spec, "final": {"sel": sel, "test": sel if test is None
                                 else test},
         "diverged": False, "wall_s": 1.0, "tokens": 256,
         "curves": {"tokens": [128, 256], "train_s": [0.5, 1.0],
                    "test": [sel + 1.0, sel if test is None else test]},
         "device_kind": "cpu", "jax": "x", "corpus": {"sha256": "abc"},
         "setup": {"d_model": 16, "num_layers": 1, "num_heads": 2,
                   "seq_len": 16, "batch_size": 4, "dtype": "float32",
                   "attention": None}}
  res.update(over)
  study.write_json(out / "runs" / f"{run_id}.json", res)


def adamw_lrs(plan) -> list[float]:
  return sorted(r["lr"] for r in plan["runs"]
                if r["arm"] == "adamw" and r["role"] == "selection")


def test_plan_is_deterministic(tmp_path):
  a = study.make_plan(TINY, tmp_path)
  b = study.make_plan(TINY, tmp_path)
  assert json.dumps(a) == json.dumps(b)
  # Nothing run yet: three selection points per arm, all missing.
  assert adamw_lrs(a) == pytest.approx([1.5e-3, 3e-3, 6e-3])
  assert a["missing"] == [r["id"] for r in a["runs"]]


def test_plan_extends_the_grid_at_an_edge_then_refines(tmp_path):
  # The largest rate is best: the next point ×2 out (1.2e-2) is added.
  for k, loss in ((-2, 3.0), (0, 2.5), (2, 2.0)):
    fake(tmp_path, f"t1-adamw-lr{k:+d}-s0", loss)
  plan = study.make_plan(TINY, tmp_path)
  assert adamw_lrs(plan) == pytest.approx([1.5e-3, 3e-3, 6e-3, 1.2e-2])
  assert plan["missing"][0] == "t1-adamw-lr+4-s0"
  assert not any(r["role"] == "report" and r["arm"] == "adamw"
                 for r in plan["runs"])
  # 6e-3 is now interior and best: AdamW gets the ×√2 points around it.
  fake(tmp_path, "t1-adamw-lr+4-s0", 2.2)
  plan = study.make_plan(TINY, tmp_path)
  assert adamw_lrs(plan) == pytest.approx(
      [1.5e-3, 3e-3, 6e-3 / math.sqrt(2), 6e-3, 6e-3 * math.sqrt(2),
       1.2e-2])
  # Selection done (6e-3 still best): report seeds and the longer
  # budgets at 6e-3, nothing else for AdamW.
  fake(tmp_path, "t1-adamw-lr+1-s0", 2.1)
  fake(tmp_path, "t1-adamw-lr+3-s0", 2.05)
  plan = study.make_plan(TINY, tmp_path)
  rep = [r for r in plan["runs"] if r["arm"] == "adamw"
         and r["role"] != "selection"]
  assert {(r["role"], r["seed"], r["budget"]) for r in rep} == {
      ("report", 1, 1.0), ("report", 2, 1.0), ("speedup", 1, 1.5),
      ("speedup", 2, 1.5)}
  assert all(r["lr"] == pytest.approx(6e-3) for r in rep)
  assert plan["chosen"]["t1/adamw"]["lr"] == pytest.approx(6e-3)
  # The lowest rate best for another arm: extends downwards (no √2 points
  # for an arm outside the refined ones).
  for k, loss in ((-2, 1.0), (0, 2.0), (2, 3.0)):
    fake(tmp_path, f"t1-cegm_normalize_only-lr{k:+d}-s0", loss)
  plan = study.make_plan(TINY, tmp_path)
  lrs = sorted(r["lr"] for r in plan["runs"]
               if r["arm"] == "cegm_normalize_only")
  assert lrs == pytest.approx([7.5e-4, 1.5e-3, 3e-3, 6e-3])


def test_run_writes_files_and_resumes(tmp_path):
  assert study.run_chunk(TINY, tmp_path, 0.0) == []     # no time: nothing
  first = study.run_chunk(TINY, tmp_path, 600.0, limit=2, say=lambda m: None)
  plan0 = study.make_plan(TINY, Path(tmp_path / "empty"))
  assert first == plan0["missing"][:2]
  files = sorted((tmp_path / "runs").glob("*.json"))
  assert [f.stem for f in files] == sorted(first)
  before = {f.name: f.read_bytes() for f in files}
  for f in files:
    r = json.loads(f.read_text())
    assert r["spec"]["id"] == f.stem and r["spec"]["role"] == "selection"
    st = r["setup"]
    assert r["tokens"] == st["steps"] * st["batch_size"] * st["seq_len"]
    for key in ("sel", "test"):
      assert math.isfinite(r["final"][key]) and 0 < r["final"][key] < 8.1
      assert len(r["curves"][key]) == st["steps"] // st["eval_every"]
    assert len(r["train_bits"]["bits"]) <= 500
    assert r["curves"]["tokens"][-1] == r["tokens"]
    for key in ("wall_s", "device_kind", "jax", "commit", "optax"):
      assert r[key] not in (None, "")
    assert "manifest" in r["corpus"] and len(r["corpus"]["sha256"]) == 64
    assert r["model"]["n_params"] == study.n_params(TINY, TINY.sizes[0])
  # Resumes: the next missing run only; the done ones are not redone.
  more = study.run_chunk(TINY, tmp_path, 600.0, limit=1, say=lambda m: None)
  assert more == [plan0["missing"][2]]
  for name, data in before.items():
    assert (tmp_path / "runs" / name).read_bytes() == data
  assert not list((tmp_path / "runs").glob(".*.tmp"))


def test_aggregate_refuses_mixed_setups(tmp_path, capsys):
  fake(tmp_path, "t1-adamw-lr-2-s0", 3.0)
  fake(tmp_path, "t1-adamw-lr+0-s0", 2.0, device_kind="NVIDIA H200")
  assert study.main(["aggregate", "--out", str(tmp_path), "--protocol",
                     "tiny"]) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and "device_kind" in err
  fake(tmp_path, "t1-adamw-lr+0-s0", 2.0, corpus={"sha256": "other"})
  assert study.main(["aggregate", "--out", str(tmp_path), "--protocol",
                     "tiny"]) == 2
  assert "corpus_sha256" in capsys.readouterr().err
  fake(tmp_path, "t1-adamw-lr+0-s0", 2.0)
  assert study.main(["aggregate", "--out", str(tmp_path), "--protocol",
                     "tiny"]) == 0


def test_holm_against_a_hand_computed_example():
  # Sorted: 0.005 × 4 = 0.02, 0.01 × 3 = 0.03, 0.03 × 2 = 0.06,
  # 0.04 × 1 = 0.04 -> max(0.06, 0.04) = 0.06.
  adj, opened = study.holm([0.01, 0.04, 0.03, 0.005])
  assert adj == pytest.approx([0.03, 0.06, 0.06, 0.02])
  assert opened == [3, 1, 2, 4]
  assert study.holm([0.6, 0.5])[0] == pytest.approx([1.0, 1.0])


def test_paired_matches_scipy_and_the_verdict_rule():
  arm, base = [2.00, 2.02, 1.97, 2.01], [2.03, 2.04, 2.01, 2.02]
  p = study.paired(arm, base)
  ref = stats.ttest_rel(arm, base)
  assert p["mean"] == pytest.approx(-0.025)
  assert p["p"] == pytest.approx(ref.pvalue)
  ci = ref.confidence_interval(0.95)
  assert (p["lo"], p["hi"]) == pytest.approx((ci.low, ci.high))
  assert study.verdict(-0.05, -0.01, -0.03, 0.01) == "supported"
  assert study.verdict(-0.05, -0.001, -0.005, 0.01) == "inconclusive"
  assert study.verdict(-0.004, 0.02, 0.008, 0.01) == "not supported"
  assert study.verdict(0.01, 0.03, 0.02, 0.01) == "not supported (worse)"
  assert study.verdict(-0.2, 0.1, -0.05, 0.01) == "inconclusive"


def test_token_equivalent_speedup_on_a_power_law():
  # L = 5 D^-0.1 exactly: the fit is exact and a loss reached by AdamW at
  # 1.4 × 10^6 tokens is worth 1.4 × 10^6 AdamW tokens.
  tokens = [1e6, 1.25e6, 1.5e6]
  a, c = study.power_law_fit(tokens, [5 * d ** -0.1 for d in tokens])
  assert (a, c) == pytest.approx((math.log(5), 0.1))
  eq = study.token_equivalent(a, c, 5 * 1.4e6 ** -0.1)
  assert eq == pytest.approx(1.4e6, rel=1e-9)
  assert study.token_equivalent(a, -0.1, 2.0) is None


def test_durations():
  assert study.parse_duration("9m") == 540
  assert study.parse_duration("90") == 90
  assert study.parse_duration("1h") == 3600


def test_muon_orthogonalises_hidden_matrices_only():
  """The study's Muon: a hidden matrix's step is its gradient's polar
  factor U Vᵀ (up to Newton–Schulz's accuracy and a scale), the embedding's
  is Adam's first step, the same size in every entry with the gradient's
  sign (the direction comes out as a descent direction, before the
  learning rate)."""
  import jax
  import numpy as np

  from benchmarks.quality.arms import hidden_matrices, muon_direction
  rng = np.random.default_rng(0)
  g = {"blocks": {"up": {"kernel": rng.normal(size=(8, 8))}},
       "embed": {"embedding": rng.normal(size=(16, 8))}}
  g = jax.tree.map(lambda x: np.asarray(x, np.float32), g)
  dims = hidden_matrices(g)
  assert dims["embed"]["embedding"] is None
  assert dims["blocks"]["up"]["kernel"] is not None
  tx = muon_direction(0.15)
  u, _ = tx.update(g, tx.init(g), g)
  w = np.asarray(u["blocks"]["up"]["kernel"])
  a, _, bt = np.linalg.svd(g["blocks"]["up"]["kernel"])
  polar = a @ bt
  cos = (w * polar).sum() / np.linalg.norm(w) / np.linalg.norm(polar)
  assert cos > 0.95
  e = np.asarray(u["embed"]["embedding"])
  assert np.all(np.sign(e) == np.sign(g["embed"]["embedding"]))
  np.testing.assert_allclose(np.abs(e), np.abs(e).mean(), rtol=1e-3)


def test_aggregate_claims_and_speedup_on_fake_runs(tmp_path):
  """AdamW's losses follow L = 5 D^-0.1 exactly; cgfm_adamw's seed mean is
  AdamW's loss at 1.2× its tokens: speed-up 1.2, and its one claim's
  interval and p are scipy's paired t (Holm with one claim changes
  nothing)."""
  law = lambda d: 5 * d ** -0.1  # noqa: E731
  for arm in ("adamw", "cgfm_adamw"):
    for k, loss in ((-2, 3.0), (0, 2.0), (2, 3.0), (-1, 2.5), (1, 2.5)):
      fake(tmp_path, f"t1-{arm}-lr{k:+d}-s0", loss)
  for s in (1, 2):
    fake(tmp_path, f"t1-adamw-lr+0-s{s}", 9.0, law(256))
    fake(tmp_path, f"t1-adamw-lr+0-s{s}-x1.5", 9.0, law(384), tokens=384)
  arm = [law(1.2 * 256) + 0.001, law(1.2 * 256) - 0.003]
  for s, v in zip((1, 2), arm, strict=True):
    fake(tmp_path, f"t1-cgfm_adamw-lr+0-s{s}", 9.0, v)
  summary = study.aggregate(TINY, tmp_path)
  rep = summary["sizes"]["t1"]["report"]
  mean = sum(arm) / 2
  assert rep["cgfm_adamw"]["test_mean"] == pytest.approx(mean)
  d_eq = (mean / 5) ** (-1 / 0.1)
  assert rep["cgfm_adamw"]["speedup_vs_adamw"] == pytest.approx(d_eq / 256)
  assert rep["adamw"]["speedup_vs_adamw"] == pytest.approx(1.0)
  (claim,) = summary["claims"]
  ref = stats.ttest_rel(arm, [law(256)] * 2)
  ci = ref.confidence_interval(0.95)
  assert claim["arm"] == "cgfm_adamw"
  assert claim["p_holm"] == pytest.approx(ref.pvalue)
  assert (claim["holm_lo"], claim["holm_hi"]) == pytest.approx(
      (ci.low, ci.high))
  assert claim["verdict"] == study.verdict(ci.low, ci.high, mean - law(256),
                                           0.01)
  assert (tmp_path / "summary.md").exists()
  assert (tmp_path / "loss-t1.png").exists()


def test_plan_estimate_takes_the_gpu_share_of_measured_runs(tmp_path):
  # Two AdamW selection runs that shared the device with 3 others: 600 s
  # and 900 s of wall time are 2 and 3 GPU-minutes; their median, 2.5,
  # stands for every projected AdamW run of that size and budget.
  fake(tmp_path, "t1-adamw-lr-2-s0", 3.0, wall_s=600.0, concurrent=5)
  fake(tmp_path, "t1-adamw-lr+0-s0", 2.0, wall_s=900.0, concurrent=3)
  spec = study._spec(json.loads(
      (tmp_path / "runs" / "t1-adamw-lr+0-s0.json").read_text()))
  results = study.load_results(tmp_path)
  assert study.measured_minutes(spec, results) == pytest.approx(
      (600 / 5 / 60 + 900 / 3 / 60) / 2)
  # Another arm, or a run without `concurrent`, is not measured.
  other = study.RunSpec(spec.size, "cgfm_adamw", "selection", 0, 1e-3, 0)
  assert study.measured_minutes(other, results) is None
  fake(tmp_path, "t1-adamw-lr+0-s0", 2.0, wall_s=900.0)
  assert study.measured_minutes(spec, study.load_results(tmp_path)) == (
      pytest.approx(600 / 5 / 60))
  assert "t1/adamw" in study.make_plan(TINY, tmp_path)[
      "estimate_gpu_minutes"]["measured_arms"]


def test_parallel_runs_spread_over_the_visible_gpus(monkeypatch):
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
  gpus = study.visible_gpus()
  assert gpus == ["3", "5"]
  busy: list[str | None] = []
  for _ in range(5):                 # --parallel 5 over two GPUs
    busy.append(study.pick_gpu(busy, gpus))
  assert busy == ["3", "5", "3", "5", "3"]
  busy.remove("5")                    # a run on GPU 5 finished
  assert study.pick_gpu(busy, gpus) == "5"
  assert study.pick_gpu(busy, []) is None
