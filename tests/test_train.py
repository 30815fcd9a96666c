"""The training package and the `cgf-optax` CLI: runs, resume, data, bad input."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from cgf_optax.train import TrainConfig, cli, data, loop, parse_optimizer_spec

# A model and run small enough for a few seconds on a CPU.
TINY = ["--d-model", "32", "--num-layers", "1", "--num-heads", "2",
        "--seq-len", "32", "--batch-size", "4", "--eval-batches", "2",
        "--telemetry-every", "0", "--no-progress"]


def _cfg(tmp_path, **kw):
  base = dict(d_model=32, num_layers=1, num_heads=2, seq_len=32, batch_size=4,
              eval_batches=1, eval_every=3, telemetry_every=0, steps=6,
              checkpoint_every=3, progress=False, out=str(tmp_path))
  return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def corpus():
  return data.load_corpus("shakespeare")


# ----------------------------------------------------------------------------
# Data


def test_validation_plays_are_held_out(corpus):
  assert corpus.val_docs and corpus.train_docs
  assert not set(corpus.val_docs) & set(corpus.train_docs)
  assert set(corpus.val_docs) == set(data.SHAKESPEARE_VALIDATION)
  # No passage of a validation play occurs in the training bytes.
  train = corpus.train.tobytes()
  val = corpus.val.tobytes()
  rng = np.random.default_rng(0)
  for start in rng.integers(0, len(val) - 300, size=20):
    assert val[start:start + 300] not in train


def test_genre_split_is_disjoint():
  c = data.load_corpus("shakespeare", val_genres=("roman",))
  assert all(d.startswith("roman/") for d in c.val_docs)
  assert not any(d.startswith("roman/") for d in c.train_docs)


def test_batches_are_a_function_of_seed_and_step(corpus):
  x1, y1 = data.batch_at(corpus.train, 7, 3, 16, seed=1)
  x2, y2 = data.batch_at(corpus.train, 7, 3, 16, seed=1)
  x3, _ = data.batch_at(corpus.train, 8, 3, 16, seed=1)
  np.testing.assert_array_equal(x1, x2)
  np.testing.assert_array_equal(y1, y2)
  assert not np.array_equal(x1, x3)
  np.testing.assert_array_equal(x1[:, 1:], y1[:, :-1])   # next-byte targets
  assert x1.dtype == np.int32 and x1.shape == (3, 16)
  # A process's rows of a global batch are those rows of the whole batch.
  xr, yr = data.batch_at(corpus.train, 7, 3, 16, seed=1, rows=slice(1, 3))
  np.testing.assert_array_equal(xr, x1[1:3])
  np.testing.assert_array_equal(yr, y1[1:3])


def test_python_corpus_splits_by_file():
  c = data.load_corpus("python", max_bytes=300_000)
  assert not set(c.val_docs) & set(c.train_docs)
  assert len(c.val) > 0 and len(c.train) > len(c.val)


def test_folder_corpus_and_binary_files(tmp_path):
  for i in range(4):
    (tmp_path / f"doc{i}.txt").write_text(f"text number {i} " * 100)
  c = data.load_corpus(str(tmp_path))
  assert c.val_docs == ("doc3.txt",)
  (tmp_path / "blob.bin").write_bytes(b"\x00\x01" * 10)   # not a text suffix
  assert data.load_corpus(str(tmp_path)).val_docs == ("doc3.txt",)
  (tmp_path / "bad.txt").write_bytes(b"abc\x00def")
  with pytest.raises(data.DataError, match="bad.txt.*binary"):
    data.load_corpus(str(tmp_path))


def test_unigram_entropy_closed_form():
  x = np.array([0, 0, 1, 1, 2, 2, 3, 3], np.uint8)
  assert data.unigram_bits(x) == pytest.approx(2.0)


# ----------------------------------------------------------------------------
# Optimizer specs


def test_optimizer_spec_parsing():
  s = parse_optimizer_spec("cgfm_adamw:strategy=mean,rank=4,lr=0.01")
  assert s.name == "cgfm_adamw"
  assert dict(s.kwargs) == {"strategy": "mean", "rank": 4, "lr": 0.01}
  assert parse_optimizer_spec("adamw").label == "adamw"
  with pytest.raises(ValueError, match="unknown optimizer 'sgdx'"):
    parse_optimizer_spec("sgdx")
  with pytest.raises(ValueError, match="not key=value"):
    parse_optimizer_spec("adamw:b1")


def test_default_arms_run_at_the_learning_rates_of_their_sweep():
  """The demo's arms each peak at their own lr, the sweep's best
  (benchmarks/results/quality/demo-lr-sweep-cpu.json), whatever --lr is."""
  from pathlib import Path

  from cgf_optax.train.optimizers import schedule_of
  sweep = json.loads((Path(__file__).parent.parent / "benchmarks" / "results"
                      / "quality" / "demo-lr-sweep-cpu.json").read_text())
  cfg = TrainConfig(lr=1.0, steps=300)          # --lr reaches none of them
  specs = [parse_optimizer_spec(s) for s in cfg.optimizers]
  assert [s.name for s in specs] == ["adamw", "cgfm_adamw", "cegm_adamw",
                                     "muon"]
  for spec in specs:
    arm = spec.label.rpartition(",lr=")[0] or spec.name
    # Linear warm-up reaches the peak at the end of warm-up (step 30).
    peak = float(schedule_of(spec, cfg)(cfg.warmup))
    assert peak == pytest.approx(sweep["arms"][arm]["best_lr"]), spec.label


def test_table_names_the_reference_without_its_options():
  from cgf_optax.train import report
  run = loop.RunResult("adamw:lr=0.003", [{"step": 1, "val_bits": 3.0}],
                       1.0, 8, 0, False)
  head = report.results_table([run]).splitlines()[0]
  assert "steps to adamw val" in head and "x adamw " in head


# ----------------------------------------------------------------------------
# Training and resume


def test_compare_runs_every_optimizer_from_the_same_start(tmp_path, corpus):
  cfg = _cfg(tmp_path, telemetry_every=2)
  graphdef, params0 = loop.init_model(cfg)
  flat0 = [np.asarray(x).copy() for x in jax.tree.leaves(params0)]
  results = {}
  for name in ("adamw", "cgfm_adamw", "cegm_adamw", "cgfm:momentum=0.9"):
    spec = parse_optimizer_spec(name)
    results[name] = loop.train_one(cfg, spec, corpus, graphdef, params0,
                                   tmp_path / spec.slug)
  # params0 is not consumed (buffers donated only from copies).
  for a, b in zip(flat0, jax.tree.leaves(params0), strict=True):
    np.testing.assert_array_equal(a, np.asarray(b))
  for name, r in results.items():
    s, bits = r.series("bits")
    assert list(s) == list(range(1, 7)), name
    assert np.all(np.isfinite(bits)), name
    # The first loss is the same for all: same params, same first batch.
    assert bits[0] == pytest.approx(results["adamw"].series("bits")[1][0],
                                    rel=1e-6)
    assert list(r.series("val_bits")[0]) == [3, 6]
  # Telemetry: CGFM logs the split of the gradient, CEGM its λ.
  _, glob = results["cgfm_adamw"].series("scale_norm/global")
  _, loc = results["cgfm_adamw"].series("scale_norm/local")
  _, gn = results["cgfm_adamw"].series("grad_norm")
  assert len(glob) == 3 and np.all(glob > 0) and np.all(loc > 0)
  # The parts of a 2-scale split are orthogonal per matrix (a projection and
  # its residual) and vectors go whole to local, so norms add in squares.
  steps = results["cgfm_adamw"].series("scale_norm/global")[0]
  gn_at = dict(zip(*results["cgfm_adamw"].series("grad_norm"), strict=True))
  np.testing.assert_allclose(glob ** 2 + loc ** 2,
                             [gn_at[s] ** 2 for s in steps], rtol=1e-4)
  assert len(results["cegm_adamw"].series("entangle_lambda")[0]) == 6
  assert len(gn) == 6


def _final_params(r):
  return [np.asarray(x) for x in jax.tree.leaves(r.params)]


@pytest.mark.parametrize("name", ["adamw", "cgfm_adamw", "cegm_adamw"])
def test_resume_is_exact(tmp_path, corpus, name):
  spec = parse_optimizer_spec(name)
  straight_cfg = _cfg(tmp_path / "a", steps=8, checkpoint_every=4)
  graphdef, params0 = loop.init_model(straight_cfg)
  straight = loop.train_one(straight_cfg, spec, corpus, graphdef, params0,
                            tmp_path / "a")
  first = _cfg(tmp_path / "b", steps=8, checkpoint_every=4, stop_after=4)
  part = loop.train_one(first, spec, corpus, graphdef, params0, tmp_path / "b")
  assert part.records[-1]["step"] == 4
  resumed_cfg = _cfg(tmp_path / "b", steps=8, checkpoint_every=4, resume=True)
  resumed = loop.train_one(resumed_cfg, spec, corpus, graphdef, params0,
                           tmp_path / "b")
  np.testing.assert_array_equal(straight.series("loss")[1],
                                resumed.series("loss")[1])
  for a, b in zip(_final_params(straight), _final_params(resumed),
                  strict=True):
    np.testing.assert_array_equal(a, b)
  # The metrics log has each step once.
  steps = [json.loads(line)["step"]
           for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
           if line]
  assert steps == list(range(1, 9))


def test_resume_drops_log_lines_past_the_checkpoint(tmp_path, corpus):
  spec = parse_optimizer_spec("adamw")
  cfg = _cfg(tmp_path, steps=6, checkpoint_every=3, stop_after=5)
  graphdef, params0 = loop.init_model(cfg)
  loop.train_one(cfg, spec, corpus, graphdef, params0, tmp_path)
  # Simulate a crash after step 5: the newest checkpoint is then step 5
  # (forced at the stop); delete it, as if the crash came before the save.
  import shutil
  shutil.rmtree(tmp_path / "checkpoints" / "5")
  with (tmp_path / "metrics.jsonl").open("a") as f:
    f.write('{"step": 6, "lo')             # a torn line
  r = loop.train_one(_cfg(tmp_path, steps=6, checkpoint_every=3, resume=True),
                     spec, corpus, graphdef, params0, tmp_path)
  assert [rec["step"] for rec in r.records] == list(range(1, 7))


# ----------------------------------------------------------------------------
# The CLI


def test_cli_compare_writes_table_plots_and_metrics(tmp_path, capsys):
  out = tmp_path / "run"
  rc = cli.main(["compare", *TINY, "--steps", "4", "--eval-every", "2",
                 "--telemetry-every", "2",
                 "--optimizers", "adamw", "cgfm_adamw", "cegm_adamw",
                 "--out", str(out)])
  assert rc == 0
  text = capsys.readouterr().out
  assert "unigram entropy" in text and "steps to adamw val" in text
  for f in ("table.txt", "results.json", "compare.png",
            "compare-telemetry.png", "config.json"):
    assert (out / f).is_file(), f
  res = json.loads((out / "results.json").read_text())
  assert [r["label"] for r in res["results"]] == ["adamw", "cgfm_adamw",
                                                   "cegm_adamw"]
  assert all(r["steps"] == 4 for r in res["results"])
  for slug in ("adamw", "cgfm_adamw", "cegm_adamw"):
    lines = (out / slug / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4


def test_cli_train_and_resume(tmp_path, capsys):
  out = tmp_path / "t"
  args = ["train", *TINY, "--steps", "4", "--checkpoint-every", "2",
          "--optimizer", "cgfm_adamw:strategy=mean", "--out", str(out)]
  assert cli.main([*args, "--stop-after", "2"]) == 0
  assert cli.main([*args, "--resume"]) == 0
  assert (out / "train.png").is_file()
  # Starting again without --resume would overwrite the run: refused.
  assert cli.main(args) == 2
  assert "--resume" in capsys.readouterr().err
  # A different optimizer cannot resume this run's checkpoint.
  bad = [a if not a.startswith("cgfm_adamw") else "adamw" for a in args]
  assert cli.main([*bad, "--resume"]) == 2
  assert "different run" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--optimizers", "adamx"], "unknown optimizer 'adamx'"),
    (["--optimizers", "cgfm_adamw:rankk=3"], "no option 'rankk'"),
    (["--steps", "-3"], "--steps must be a positive integer"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--mesh", "data=0"], "--mesh"),
    (["--num-processes", "2"], "need --coordinator HOST:PORT"),
    (["--coordinator", "host"], "expected HOST:PORT or auto"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"],
     "--process-id 0 .. N - 1"),
    (["--coordinator", "auto", "--process-id", "0"], "leave out"),
    (["--data", "/nonexistent/path"], "does not exist"),
])
def test_cli_bad_input_exits_2(tmp_path, capsys, argv, message):
  with pytest.raises(SystemExit) as e:
    rc = cli.main(["compare", *TINY, "--out", str(tmp_path), *argv])
    raise SystemExit(rc)
  assert e.value.code == 2
  assert message in capsys.readouterr().err


def test_cli_empty_data_file_and_missing_checkpoint(tmp_path, capsys):
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  assert cli.main(["train", *TINY, "--data", str(empty), "--out",
                   str(tmp_path / "x")]) == 2
  assert "empty.txt has 0 bytes" in capsys.readouterr().err
  assert cli.main(["train", *TINY, "--resume", "--out",
                   str(tmp_path / "y")]) == 2
  assert "no checkpoint" in capsys.readouterr().err


def test_cli_corrupt_checkpoint(tmp_path, capsys):
  out = tmp_path / "c"
  args = ["train", *TINY, "--steps", "4", "--checkpoint-every", "2",
          "--out", str(out)]
  assert cli.main([*args, "--stop-after", "2"]) == 0
  for f in (out / "checkpoints" / "2" / "state").rglob("*"):
    if f.is_file() and f.stat().st_size > 0:
      f.write_bytes(b"garbage")
  assert cli.main([*args, "--resume"]) == 2
  err = capsys.readouterr().err
  assert "checkpoints/2" in err and "corrupt" in err


def test_console_script_help():
  r = subprocess.run([sys.executable, "-m", "cgf_optax.train.cli", "compare",
                      "--help"], capture_output=True, text=True, check=True)
  assert "--optimizers" in r.stdout and "--resume" in r.stdout


# ----------------------------------------------------------------------------
# Activation-level gradient flow in the training loop


def test_flow_with_unit_lambdas_is_bit_identical(tmp_path, corpus):
  spec = parse_optimizer_spec("adamw")
  base = _cfg(tmp_path / "a", num_layers=2, checkpoint_every=0, steps=3)
  graphdef, params0 = loop.init_model(base)
  plain = loop.train_one(base, spec, corpus, graphdef, params0,
                         tmp_path / "a")
  unit = _cfg(tmp_path / "b", num_layers=2, checkpoint_every=0, steps=3,
              flow="causal", telemetry_every=1)
  with_flow = loop.train_one(unit, spec, corpus, graphdef, params0,
                             tmp_path / "b")
  np.testing.assert_array_equal(plain.series("loss")[1],
                                with_flow.series("loss")[1])
  for a, b in zip(_final_params(plain), _final_params(with_flow),
                  strict=True):
    np.testing.assert_array_equal(a, b)
  # Telemetry per block; at λ = 1 the parts recombine to the cotangent, so
  # no step changes, yet both parts are measured and non-zero.
  for i in range(2):
    _, loc = with_flow.series(f"flow_local/{i}")
    _, glo = with_flow.series(f"flow_global/{i}")
    assert len(loc) == 3 and np.all(loc > 0) and np.all(glo > 0)


def test_remat_keeps_cegm_context(tmp_path, corpus):
  """--remat with cegm_adamw: the context is captured inside the
  rematerialised blocks, so training matches the run without remat."""
  spec = parse_optimizer_spec("cegm_adamw")
  runs = []
  for remat in (False, True):
    cfg = _cfg(tmp_path / str(remat), num_layers=2, checkpoint_every=0,
               steps=3, remat=remat)
    graphdef, params0 = loop.init_model(cfg)
    runs.append(loop.train_one(cfg, spec, corpus, graphdef, params0,
                               tmp_path / str(remat)))
  np.testing.assert_allclose(runs[0].series("loss")[1],
                             runs[1].series("loss")[1], rtol=1e-5)
  for a, b in zip(_final_params(runs[0]), _final_params(runs[1]),
                  strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_flow_lambdas_change_training(tmp_path, corpus):
  spec = parse_optimizer_spec("adamw")
  base = _cfg(tmp_path / "a", checkpoint_every=0, steps=2)
  graphdef, params0 = loop.init_model(base)
  plain = loop.train_one(base, spec, corpus, graphdef, params0, tmp_path / "a")
  damped = _cfg(tmp_path / "b", checkpoint_every=0, steps=2, flow="mean",
                flow_global=0.0)
  r = loop.train_one(damped, spec, corpus, graphdef, params0, tmp_path / "b")
  l0, l1 = plain.series("loss")[1], r.series("loss")[1]
  assert l0[0] == l1[0]          # same start: the forward pass is unchanged
  assert l0[1] != l1[1]          # different gradients, different second step


def test_cli_compare_resume_starts_optimizers_not_yet_begun(tmp_path, capsys):
  import shutil
  out = tmp_path / "cmp"
  args = ["compare", *TINY, "--steps", "4", "--checkpoint-every", "2",
          "--optimizers", "adamw", "cgfm_adamw:strategy=mean",
          "--out", str(out)]
  assert cli.main([*args, "--stop-after", "2"]) == 0
  shutil.rmtree(out / "cgfm_adamw_strategy_mean")   # as if never started
  assert cli.main([*args, "--resume"]) == 0
  assert "not started before" in capsys.readouterr().out
  res = json.loads((out / "results.json").read_text())
  assert [r["steps"] for r in res["results"]] == [4, 4]
  steps = [json.loads(x)["step"] for x in
           (out / "adamw" / "metrics.jsonl").read_text().splitlines()]
  assert steps == [1, 2, 3, 4]


def test_example_training_loop_runs():
  import pathlib
  root = pathlib.Path(__file__).resolve().parent.parent
  r = subprocess.run([sys.executable, str(root / "examples" /
                                          "nnx_training_loop.py"),
                      "--optimizer", "cegm_adamw", "--steps", "2"],
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "step    2" in r.stdout and "bits/byte" in r.stdout
