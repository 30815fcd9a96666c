"""Short versions of the soak benchmark (`benchmarks/soak.py`).

The benchmark runs 10,000 steps of every alias and its results are in
`benchmarks/results/soak-cpu.json`; these run it for a few dozen steps (CI)
or a thousand (``-m slow``) and assert what it measures: one compilation of
the step (none after step 1, by the jit cache and by JAX's compile log),
unchanged shapes and dtypes of parameters and optimizer state, a constant
set of live JAX arrays, and finite losses.
"""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _soak_module():
  spec = importlib.util.spec_from_file_location(
      "soak_benchmark", ROOT / "benchmarks" / "soak.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _check(result: dict, labels: list[str]) -> None:
  assert [r["label"] for r in result["results"]] == labels
  for r in result["results"]:
    c = r["compile"]
    assert c["cache_size_after_step_1"] == 1, r["label"]
    assert c["cache_size_at_end"] == 1, r["label"]
    assert c["logged_compiles_after_step_1"] == 0, (r["label"], c)
    assert c["logged_compiles_total"] >= 1, r["label"]   # the log is counted
    assert r["dtypes"]["stable"], (r["label"], r["dtypes"]["changed"])
    assert r["nonfinite_losses"] == 0, r["label"]
    assert r["loss_last_window"] < r["loss_first_window"], r["label"]
  m = result["memory"]
  assert m["live_arrays_start"] == m["live_arrays_end"]
  assert m["live_bytes_max_minus_min"] == 0


def test_soak_short(tmp_path):
  labels = ["adamw", "cgfm_adamw:strategy=lowrank,refresh_every=5",
            "cegm_adamw:adapt_rate=0.1"]
  result = _soak_module().main(
      ["--steps", "30", "--window", "10", "--optimizers", *labels,
       "--out", str(tmp_path / "soak.json")])
  _check(result, labels)
  assert (tmp_path / "soak.json").is_file()


@pytest.mark.slow
def test_soak_every_alias_1000_steps(tmp_path):
  soak = _soak_module()
  labels = list(soak.DEFAULT_OPTIMIZERS)
  result = soak.main(["--steps", "1000", "--window", "100",
                      "--out", str(tmp_path / "soak.json")])
  _check(result, labels)
  assert result["memory"]["rss_flat"], result["memory"]
