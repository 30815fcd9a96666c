"""``cgf-optax``: train a small GPT with one optimizer, or compare several.

    cgf-optax compare                      # AdamW, CGFM, CEGM, Muon on Shakespeare
    cgf-optax compare --optimizers adamw cgfm_adamw:strategy=mean --steps 200
    cgf-optax train --optimizer cegm_adamw:num_heads=4 --out runs/cegm
    cgf-optax train --optimizer cegm_adamw --out runs/cegm --resume
    cgf-optax train --mesh data=16 --coordinator host0:1234 \\
        --num-processes 2 --process-id 0     # on each host, its own id

Every flag is a field of :class:`cgf_optax.train.TrainConfig`. Bad input
(unknown optimizer or option, missing data, a checkpoint of another run)
exits with status 2 and a message that names it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import typing
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cgf_optax.train.config import TrainConfig, parse_optimizer_spec

__all__ = ["main", "parse_args"]


class _Parser(argparse.ArgumentParser):
  """Reports a bad flag in one line (no usage block) and exits with 2."""

  def error(self, message: str) -> typing.NoReturn:
    self.exit(2, f"{self.prog}: error: {message}\n")


def _add_config_flags(p: argparse.ArgumentParser, *, single: bool) -> None:
  hints = typing.get_type_hints(TrainConfig)
  for f in dataclasses.fields(TrainConfig):
    flag = "--" + f.name.replace("_", "-")
    meta = dict(f.metadata)
    help_ = meta.pop("help", "")
    default = f.default
    if f.name == "optimizers":
      if single:
        p.add_argument("--optimizer", dest="optimizers", default="adamw",
                       type=lambda s: (s,), metavar="SPEC",
                       help="optimizer spec NAME[:key=value,...], e.g. "
                       "cgfm_adamw:strategy=mean,rank=4 (default adamw)")
      else:
        p.add_argument(flag, default=default, metavar="SPEC", help=help_
                       + " (default: %(default)s)", **meta)
      continue
    if f.name == "out" and single:
      default = "runs/train"
    kind = hints[f.name]
    if kind is bool:
      p.add_argument(flag, default=default,
                     action=argparse.BooleanOptionalAction, help=help_)
    else:
      p.add_argument(flag, default=default, type=kind, help=help_
                     + " (default: %(default)s)", **meta)


def parse_args(argv: Sequence[str] | None = None
               ) -> tuple[str, TrainConfig]:
  """``(command, config)``; exits with status 2 on bad flags."""
  parser = _Parser(
      prog="cgf-optax", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  p_train = sub.add_parser("train", help="train with one optimizer")
  _add_config_flags(p_train, single=True)
  p_cmp = sub.add_parser("compare", help="train with several optimizers from "
                         "the same initialisation and batches, then tabulate "
                         "and plot")
  _add_config_flags(p_cmp, single=False)
  args = parser.parse_args(argv)
  values = {f.name: getattr(args, f.name)
            for f in dataclasses.fields(TrainConfig)}
  values["optimizers"] = tuple(values["optimizers"])
  try:
    cfg = TrainConfig(**values)
  except ValueError as e:
    (p_train if args.command == "train" else p_cmp).error(str(e))
  return args.command, cfg


def _baselines(corpus) -> dict[str, float]:
  from cgf_optax.train.data import unigram_bits
  return {"uniform (8 bits)": 8.0,
          f"unigram entropy ({unigram_bits(corpus.val):.2f})":
          unigram_bits(corpus.val)}


def _has_checkpoint(run_dir: Path) -> bool:
  """Whether a run saved a checkpoint to resume from (a folder named by a
  step number; Orbax renames a save to that name only when it is whole)."""
  ckpts = run_dir / "checkpoints"
  return ckpts.is_dir() and any(p.name.isdigit() and p.is_dir()
                                for p in ckpts.iterdir())


def _write_atomic(path: Path, text: str) -> None:
  """Writes ``text`` to a new file that then replaces ``path``: a crash
  leaves the old file or the new one, never a torn one."""
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  tmp.replace(path)


def start_processes(cfg: TrainConfig) -> None:
  """Joins JAX's multi-process runtime as ``--coordinator`` says (nothing
  for one process)."""
  from cgf_optax import sharding

  if cfg.coordinator == "auto":
    sharding.initialize(heartbeat_timeout=cfg.heartbeat_timeout)
  elif cfg.coordinator:
    sharding.initialize(cfg.coordinator, cfg.num_processes, cfg.process_id,
                        heartbeat_timeout=cfg.heartbeat_timeout)


def _silent(*args: Any, **kwargs: Any) -> None:
  """``print`` of the processes other than 0."""


def run(command: str, cfg: TrainConfig) -> dict[str, Any]:
  """Runs ``train`` or ``compare``; returns the summary written to
  ``results.json``.

  With several processes each runs this alike; only process 0 prints and
  writes the summary, tables and plots.
  """
  import jax

  from cgf_optax import sharding
  from cgf_optax.train import data, loop, report
  from cgf_optax.train.optimizers import build_optimizer

  start_processes(cfg)        # before anything starts JAX's backends
  primary = jax.process_index() == 0
  say = print if primary else _silent

  specs = [parse_optimizer_spec(s) for s in cfg.optimizers]
  if command == "train":
    specs = specs[:1]
  for spec in specs:          # constructor errors before any training
    build_optimizer(spec, cfg)
  loop.check_sizes(cfg)       # before any batch is allocated
  corpus = data.load_corpus(cfg.data)
  if len(corpus.train) < cfg.seq_len + 2 or len(corpus.val) < cfg.seq_len + 2:
    raise data.DataError(
        f"{cfg.data}: {len(corpus.train):,} training and {len(corpus.val):,} "
        f"validation bytes are too few for --seq-len {cfg.seq_len}")
  out = Path(cfg.out)
  out.mkdir(parents=True, exist_ok=True)
  config_text = json.dumps(cfg.to_json(), indent=1) + "\n"
  # Written now for a new run folder; otherwise only after training, so a
  # refused --resume (a bad checkpoint, another run's folder) changes nothing.
  if primary and not (out / "config.json").exists():
    _write_atomic(out / "config.json", config_text)
  graphdef, params0 = loop.init_model(cfg)
  n_params = sum(x.size for x in jax.tree.leaves(params0))
  base = _baselines(corpus)
  mesh = sharding.mesh_of(params0)
  where = (jax.devices()[0].device_kind if mesh is None else
           f"{mesh.size} x {jax.devices()[0].device_kind}, mesh "
           + ", ".join(f"{a}={n}" for a, n in mesh.shape.items())
           + (f", {jax.process_count()} processes"
              if jax.process_count() > 1 else ""))
  say(f"data: {corpus.describe()}")
  say(f"model: GPT preset {cfg.model!r}, {n_params:,} parameters, "
        f"{cfg.seq_len} bytes per sequence, {cfg.batch_size} sequences per "
        f"step; device: {where}")
  say("reference points (validation bits per byte): uniform guess 8.000, "
        f"unigram entropy {data.unigram_bits(corpus.val):.3f}")
  results = []
  t0 = time.time()
  for spec in specs:
    run_dir = out if command == "train" else out / spec.slug
    run_cfg = cfg
    if command == "compare" and cfg.resume and not _has_checkpoint(run_dir):
      # The comparison stopped before this optimizer began, or before its
      # first checkpoint: start it.
      say(f"{spec.label}: not started before (no checkpoint), starting "
            "from step 0")
      run_cfg = dataclasses.replace(cfg, resume=False)
    results.append(loop.train_one(run_cfg, spec, corpus, graphdef, params0,
                                  run_dir, desc=f"{spec.label:>16}"))
  table = report.results_table(results, reference=specs[0].label)
  uni = data.unigram_bits(corpus.val)
  say()
  say(table)
  say(f"\nLosses are bits per byte ('train' is the mean of the last 20 "
        f"steps; 'val' is on held-out documents). A uniform guess scores "
        f"8.000 and the byte unigram entropy is {uni:.3f}.")
  for r in results:
    if r.nonfinite_steps:
      say(f"{r.label}: {r.nonfinite_steps} steps had a non-finite loss")
  summary = {"command": " ".join(["cgf-optax", *sys.argv[1:]]),
             "config": cfg.to_json(), "corpus": corpus.describe(),
             "data_manifest": corpus.manifest,
             "n_params": n_params, "device": jax.devices()[0].device_kind,
             "mesh": {} if mesh is None else dict(mesh.shape),
             "processes": jax.process_count(),
             "unigram_bits": uni, "wall_s": time.time() - t0,
             "results": [r.summary() for r in results]}
  ref = results[0].final_val
  for r, s in zip(results, summary["results"], strict=True):
    s["steps_to_reference_val"] = r.steps_to(ref)
  if not primary:
    return summary
  files = report.plot_runs(results, out / f"{command}.png", baselines=base)
  _write_atomic(out / "config.json", config_text)
  _write_atomic(out / "results.json", json.dumps(summary, indent=1) + "\n")
  _write_atomic(out / "table.txt", table + "\n")
  print(f"wrote {out}/table.txt, results.json, metrics.jsonl and "
        + ", ".join(str(f.name) for f in files))
  return summary


def _interrupted(command: str, e: Any) -> str:
  where = (f"the last complete checkpoint is step {e.checkpoint} in "
           f"{e.directory}; run the same command with --resume to continue "
           "from it" if e.checkpoint is not None else
           "no checkpoint was written yet (--checkpoint-every sets how "
           "often); a new run starts from step 0")
  return (f"cgf-optax {command}: interrupted during {e.label} after step "
          f"{e.step}; {where}")


def _warning_line(command: str) -> Any:
  """``warnings.showwarning`` that prints one line, no source location."""
  def show(message: Any, *args: Any, **kwargs: Any) -> None:
    print(f"cgf-optax {command}: warning: {message}", file=sys.stderr)
  return show


def _lost_process(command: str, e: Exception) -> typing.NoReturn:
  """Ends one of several processes whose computation failed (status 1).

  A collective fails at once on the survivors when a process dies, but
  JAX's exit would then wait in its shutdown barrier for the dead process
  until the heartbeat timeout (100 s), and abort; this process leaves now
  instead, with one line. A checkpoint being written is abandoned (never
  committed).
  """
  import jax

  reason = " ".join(str(e).split())[:300]
  print(f"cgf-optax {command}: error: process {jax.process_index()} of "
        f"{jax.process_count()} stopped: {reason}. With several processes "
        "this usually means another one died; start them all again with "
        "--resume to continue from the last complete checkpoint",
        file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(1)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the CLI; returns the exit status (2: bad input, 130: Ctrl-C; 1
  when one of several processes fails, :func:`_lost_process`)."""
  try:
    command, cfg = parse_args(argv)
  except KeyboardInterrupt:
    return 130
  from jax.errors import JaxRuntimeError

  from cgf_optax._validation import HyperparameterTypeError
  from cgf_optax.train.checkpoint import CheckpointError
  from cgf_optax.train.config import ConfigError
  from cgf_optax.train.data import DataError
  from cgf_optax.train.loop import Interrupted
  try:
    with warnings.catch_warnings():
      warnings.showwarning = _warning_line(command)
      run(command, cfg)
  except (DataError, CheckpointError, ConfigError,
          HyperparameterTypeError) as e:
    print(f"cgf-optax {command}: error: {e}", file=sys.stderr)
    return 2
  except Interrupted as e:
    print(_interrupted(command, e), file=sys.stderr)
    return 130
  except KeyboardInterrupt:
    print(f"cgf-optax {command}: interrupted before training began; nothing "
          "was written to resume from", file=sys.stderr)
    return 130
  except JaxRuntimeError as e:
    if not cfg.coordinator:
      raise
    _lost_process(command, e)
  return 0


if __name__ == "__main__":
  sys.exit(main())
