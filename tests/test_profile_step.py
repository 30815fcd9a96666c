"""benchmarks/profile_step.py: its trace arithmetic, and a CPU smoke run."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from benchmarks import profile_step as ps  # noqa: E402


@pytest.mark.parametrize("events, want", [
    ([], 0),
    ([("a", 0, 10)], 10),
    ([("a", 0, 10), ("b", 5, 10)], 15),            # overlap
    ([("a", 0, 10), ("b", 20, 5)], 15),            # gap
    ([("b", 20, 5), ("a", 0, 10), ("c", 2, 3)], 15),  # unsorted, nested
    ([("a", 0, 10), ("b", 10, 10)], 20),           # touching
])
def test_union_of_intervals(events, want):
  assert ps.union_ns(events) == want


def test_kernel_kinds():
  assert ps.kind_of("cudnn_generated_fort_native_sdpa_sm90_flash_bprop") == (
      "attention")
  assert ps.kind_of("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT") == "gemm"
  assert ps.kind_of("input_add_reduce_fusion_1") == "reduction"
  assert ps.kind_of("MemcpyD2H") == "copy/memset"
  assert ps.kind_of("loop_add_fusion_1") == "other fusion"


def test_hlo_counts():
  text = ("%c = (f32[]) conditional(%p, %a, %b)\n"
          "%f = f32[2] fusion(%x), kind=kLoop\n%g = f32[2] fusion(%y)\n")
  assert ps.hlo_counts(text) == {"conditional": 1, "while": 0, "fusion": 2,
                                 "custom-call": 0}


def test_cpu_smoke(tmp_path, capsys):
  """Two arms of a tiny GPT on the CPU: the JSON has a row per arm with the
  deltas to adamw, and the optimizer-alone bytes. The conditional-free
  low-rank setting compiles without a conditional; the default with one."""
  out = tmp_path / "p.json"
  ps.main(["--preset", "tiny", "--seq", "16", "--batch", "2", "--vocab", "64",
           "--steps", "2", "--warmup", "2", "--arms", "adamw",
           "cgfm_adamw/lowrank:refresh_every=1,init_power_iters=1", "cgfm",
           "--optimizer-size", "10m", "--optimizers", "cgfm/lowrank",
           "--out", str(out)])
  res = json.loads(out.read_text())
  rows = {r["arm"]: r for r in res["rows"]}
  assert list(rows) == ["adamw",
                        "cgfm_adamw/lowrank:refresh_every=1,init_power_iters=1",
                        "cgfm"]
  for r in rows.values():
    assert r["wall_ms"] > 0 and r["kernels_per_step"] > 0
    assert r["vs_adamw"]["wall_ms"] == pytest.approx(
        r["wall_ms"] - rows["adamw"]["wall_ms"])
  assert rows["adamw"]["vs_adamw"]["wall_ratio"] == 1.0
  assert rows["cgfm_adamw/lowrank:refresh_every=1,init_power_iters=1"][
      "hlo"]["conditional"] == 0
  assert rows["cgfm"]["hlo"]["conditional"] == 1
  opt = {r["optimizer"]: r for r in res["optimizer_step"]["rows"]}
  assert set(opt) == {"adamw", "cgfm/lowrank"}   # adamw always runs
  assert opt["adamw"]["floor_bytes_per_param"] == 28
  assert "wrote" in capsys.readouterr().out
