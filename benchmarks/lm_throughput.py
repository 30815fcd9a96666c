"""Training throughput of a GPT language model with adamw and each cgf_optax alias.

One jitted train step (forward, backward, optimizer update, apply; params and
optimizer state donated) of :class:`cgf_optax.train.GPT`, timed for
``optax.adamw`` and for the aliases in the same process (or one subprocess per
arm with ``--isolate``), with the optimizers exactly as a training run builds
them (:func:`cgf_optax.train.optimizers.build_optimizer`: global-norm clipping,
warm-up + cosine schedule, weight decay on matrices). CEGM arms capture the
model's context (:func:`cgf_optax.nnx.capture_context`) in the same forward
pass and get the loss as ``value=``.

Usage::

  python benchmarks/lm_throughput.py --preset tiny --seq 128 --batch 4  # CPU
  python benchmarks/lm_throughput.py --preset 125m --batch 32           # GPU
  python benchmarks/lm_throughput.py --preset 350m --batch 16
  python benchmarks/lm_throughput.py --preset 1b --batch 16 --isolate \\
      --arms adamw cgfm_adamw/lowrank cegm_adamw

Arms (``--arms``, space-separated): ``adamw``, ``sgd`` (plain SGD: the
model's forward + backward with the cheapest possible update, to split step
time into model and optimizer), ``cgfm`` (lowrank), ``cgfm_adamw/lowrank``,
``cgfm_adamw/mean``, ``cgfm_adamw/temporal``, ``cegm_adamw``, ``cegm``; any
``NAME[/strategy][:key=value,...]`` with NAME one of adamw, cgfm,
cgfm_adamw, cegm, cegm_adamw adds constructor options (values as JSON), e.g.
``cegm_adamw:state_dtype=bfloat16,mu_dtype=bfloat16``. The CEGM arms use
``num_heads=4, adapt_rate=0.1`` (the CLI's default CEGM arm) unless given;
the benchmark's own option ``context_stride=k`` passes them the context of
every k-th position only (the captured activations ``[batch, seq, d]``
sliced ``[:, ::k]``), to measure what pooling over fewer tokens would save.

Model: ``--preset`` (``cgf_optax.train.model.PRESETS``) with ``--vocab``
(default 50304, GPT-2's padded vocabulary, so "125m" has 124M parameters,
"350m" 354M, "1b" 1.11B), tied embeddings, RMSNorm, bf16 compute
(``--dtype``), fp32 parameters (``--param-dtype``), ``--remat`` for
per-block rematerialisation (CEGM arms capture their context inside it,
through :func:`cgf_optax.nnx.remat_call`), ``--attention`` ``auto`` (cuDNN
flash attention on GPU with bf16 compute, JAX's choice elsewhere), ``cudnn``, ``xla`` or
``default``. Tokens: random ids, ``--batch × (--seq + 1)``, four batches
rotated through the steps.

Method:

* Compilation: every arm's step is lowered with abstract shapes and compiled
  ahead of time. adamw compiles first, alone, so that XLA's GEMM autotuning
  of the model (identical in every arm) runs on an idle GPU; the other arms
  then compile in parallel threads and reuse those autotuning results.
* Per arm: params (same seed for every arm) and state are created, ``--warmup``
  steps run (step 0 includes the low-rank bases' initial refresh), then
  ``--steps`` timed steps (rounded up to a multiple of ``refresh_every`` = 10,
  so the low-rank refreshes are in the mean in their true proportion) twice:
  (a) each step synchronised (``block_until_ready``) for the median and worst
  step; (b) the same number of steps dispatched back to back and synchronised
  once at the end, which is what a training loop sees: ``tokens/s`` and MFU
  come from (b), ``tokens/s (median)`` from (a).
* MFU = tokens/s × ``GPTConfig.flops_per_token(seq)`` (6·N + 12·L·d·T) /
  peak, the peak being ``--peak-tflops`` (default 989, the H100 SXM's dense
  bf16 rate; the JSON records it).
* Memory, three numbers per arm: ``planned_peak_bytes``, XLA's buffer
  assignment of the compiled step (arguments + outputs − donated aliases +
  temporaries: what the step needs at its peak, free of allocator effects);
  ``live_bytes``, the device's ``bytes_in_use`` with the arm's params, state
  and batches alive between steps; ``peak_bytes_in_use`` of the device
  allocator. That last counter cannot be reset, so in one process it is the
  maximum over the arms run so far (marked ``peak_is_process_max``); with
  ``--isolate`` every arm runs in a fresh subprocess and it is the arm's own
  peak. ``--isolate`` compiles all arms first in the parent into a
  persistent compilation cache (so the children load rather than compile).

Output: a table on stdout (and ``--markdown`` for a README table) and a JSON
file (``--out``; default ``benchmarks/results/lm_throughput-<device>-<preset>
.json``) with the command, versions, device, code version, arguments, model
and every step time.
"""

from __future__ import annotations

import os
import sys

# Before jax is imported: the --isolate parent only compiles, so it must not
# take most of the GPU's memory (JAX preallocates 75% by default).
if "--isolate" in sys.argv and "--child" not in sys.argv:
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jaxlib  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import cgf_optax  # noqa: E402
from cgf_optax.train.config import OptimizerSpec, TrainConfig  # noqa: E402
from cgf_optax.train.model import GPT, PRESETS, GPTConfig, gpt_config  # noqa: E402
from cgf_optax.train.optimizers import build_optimizer, uses_context  # noqa: E402
from cgf_optax.train.step import Batch, TrainState, make_train_step  # noqa: E402

ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT_DIR not in sys.path:
  sys.path.insert(0, ROOT_DIR)
from benchmarks._results import sanitize, write_json  # noqa: E402

DEFAULT_ARMS = ("adamw", "cgfm_adamw/lowrank", "cgfm_adamw/mean",
                "cgfm_adamw/temporal", "cgfm", "cegm_adamw", "cegm")
OPTIMIZERS = ("adamw", "cgfm", "cgfm_adamw", "cegm", "cegm_adamw")
CEGM_DEFAULTS = {"num_heads": 4, "adapt_rate": 0.1}
REFRESH_EVERY = 10          # the aliases' default refresh period
H100_SXM_BF16_TFLOPS = 989.0
GiB = 1 << 30
MiB = 1 << 20


# ----------------------------------------------------------------------------
# Arms.


@dataclasses.dataclass(frozen=True)
class Arm:
  """One optimizer to time."""

  label: str
  name: str                      # a build_optimizer name, or "sgd"
  kwargs: tuple[tuple[str, Any], ...]
  context_stride: int = 1        # CEGM: keep every k-th position's context

  @property
  def with_context(self) -> bool:
    return self.name != "sgd" and uses_context(OptimizerSpec(self.name))


def parse_arm(text: str) -> Arm:
  """``NAME[/strategy][:key=value,...]`` → :class:`Arm`."""
  head, _, rest = text.partition(":")
  name, _, strategy = head.partition("/")
  if name == "sgd":
    if strategy or rest:
      raise ValueError("the sgd arm takes no options")
    return Arm("sgd", "sgd", ())
  if name not in OPTIMIZERS:
    raise ValueError(f"unknown arm {text!r}: the name must be sgd or one of "
                     f"{', '.join(OPTIMIZERS)}")
  kwargs: dict[str, Any] = {}
  if name in ("cegm", "cegm_adamw"):
    kwargs.update(CEGM_DEFAULTS)
  if strategy:
    if name not in ("cgfm", "cgfm_adamw"):
      raise ValueError(f"arm {text!r}: only cgfm and cgfm_adamw take a "
                       "/strategy")
    kwargs["strategy"] = strategy
  for item in filter(None, (p.strip() for p in rest.split(","))):
    key, eq, value = item.partition("=")
    if not eq:
      raise ValueError(f"arm option {item!r} in {text!r} is not key=value")
    try:
      kwargs[key.strip()] = json.loads(value)
    except json.JSONDecodeError:
      kwargs[key.strip()] = value.strip()
  stride = kwargs.pop("context_stride", 1)
  if not isinstance(stride, int) or stride < 1:
    raise ValueError(f"arm {text!r}: context_stride must be an int >= 1")
  if stride > 1 and name not in ("cegm", "cegm_adamw"):
    raise ValueError(f"arm {text!r}: context_stride is for the CEGM arms")
  return Arm(text, name, tuple(sorted(kwargs.items())), stride)


def build_tx(arm: Arm, steps: int) -> optax.GradientTransformation:
  """The optimizer as a training run of ``steps`` steps builds it."""
  cfg = TrainConfig(steps=steps)
  if arm.name == "sgd":
    sched = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup, steps)
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm),
                       optax.sgd(sched))
  return build_optimizer(OptimizerSpec(arm.name, arm.kwargs), cfg)


# ----------------------------------------------------------------------------
# The train step.


def make_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
              with_context: bool, context_stride: int = 1) -> Callable:
  """The training engine's step (:func:`cgf_optax.train.step.make_train_step`,
  what ``cgf-optax`` runs) on a ``[batch, seq + 1]`` token array:
  ``(params, opt_state, tokens) -> (params, opt_state, metrics)``, jitted,
  params and state donated."""
  engine_step = make_train_step(graphdef, tx, with_context=with_context,
                                context_stride=context_stride)

  def step(params, opt_state, tokens):
    batch = Batch(tokens[:, :-1], tokens[:, 1:], jnp.int32(0))
    state, metrics = engine_step(TrainState(params, opt_state), batch)
    return state.params, state.opt_state, metrics

  return jax.jit(step, donate_argnums=(0, 1))


def model_config(args: argparse.Namespace) -> GPTConfig:
  impl = args.attention
  if impl == "auto":
    on_gpu = jax.default_backend() == "gpu"
    impl = "cudnn" if on_gpu and args.dtype == "bfloat16" else None
  elif impl == "default":
    impl = None
  over = {k: getattr(args, k, 0) for k in ("d_model", "num_layers",
                                           "num_heads")
          if getattr(args, k, 0)}
  return gpt_config(args.preset, vocab_size=args.vocab, max_seq_len=args.seq,
                    **over,
                    dtype=args.dtype, param_dtype=args.param_dtype,
                    remat=args.remat, attention_impl=impl)


def mem_stats() -> dict[str, int] | None:
  try:
    st = jax.devices()[0].memory_stats()
  except Exception:  # noqa: BLE001 - some backends do not implement it
    return None
  return dict(st) if st else None


def tree_bytes(tree: Any) -> int:
  return int(sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(tree)))


def free_tree(tree: Any) -> None:
  for x in jax.tree.leaves(tree):
    if isinstance(x, jax.Array) and not x.is_deleted():
      x.delete()


class Bench:
  """The model, its abstract shapes and the batches shared by every arm."""

  def __init__(self, args: argparse.Namespace):
    self.args = args
    self.cfg = model_config(args)
    cfg, seed = self.cfg, args.seed
    self.init_params = jax.jit(
        lambda: nnx.split(GPT(cfg, rngs=nnx.Rngs(seed)), nnx.Param)[1])
    abstract_model = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(seed)))
    self.graphdef, self.abstract_params = nnx.split(abstract_model, nnx.Param)
    self.n_params = int(sum(x.size for x in jax.tree.leaves(
        self.abstract_params)))
    self.tokens_shape = (args.batch, args.seq + 1)
    self.steps = REFRESH_EVERY * math.ceil(args.steps / REFRESH_EVERY)

  def batches(self) -> list[jax.Array]:
    keys = jax.random.split(jax.random.key(self.args.seed + 1), 4)
    return [jax.random.randint(k, self.tokens_shape, 0, self.cfg.vocab_size,
                               jnp.int32) for k in keys]

  def lower(self, arm: Arm) -> tuple[Any, optax.GradientTransformation, float]:
    t0 = time.perf_counter()
    tx = build_tx(arm, self.args.schedule_steps)
    abstract_state = jax.eval_shape(tx.init, self.abstract_params)
    step = make_step(self.graphdef, tx, arm.with_context, arm.context_stride)
    lowered = step.lower(self.abstract_params, abstract_state,
                         jax.ShapeDtypeStruct(self.tokens_shape, jnp.int32))
    return lowered, tx, time.perf_counter() - t0


def compile_all(bench: Bench, arms: list[Arm], threads: int
                ) -> dict[str, tuple[Any, optax.GradientTransformation,
                                     dict[str, float]]]:
  """Lowers every arm (main thread) and compiles them: adamw alone, then the
  rest in ``threads`` parallel threads."""
  lowered = {}
  for arm in arms:
    lw, tx, t = bench.lower(arm)
    lowered[arm.label] = (lw, tx, t)
    print(f"  lowered {arm.label}: {t:.1f} s", flush=True)

  def comp(label: str):
    t0 = time.perf_counter()
    c = lowered[label][0].compile()
    return c, time.perf_counter() - t0

  out = {}
  first = [a.label for a in arms if a.name == "adamw"][:1]
  rest = [a.label for a in arms if a.label not in first]
  for label in first:
    c, t = comp(label)
    out[label] = c, t
    print(f"  compiled {label}: {t:.1f} s (alone)", flush=True)
  with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
    futs = {label: pool.submit(comp, label) for label in rest}
    for label, f in futs.items():
      out[label] = f.result()
      print(f"  compiled {label}: {out[label][1]:.1f} s", flush=True)
  return {label: (out[label][0], lowered[label][1],
                  {"lower_s": lowered[label][2], "compile_s": out[label][1]})
          for label in lowered}


def memory_plan(compiled: Any) -> dict[str, int] | None:
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001
    return None
  if m is None:
    return None
  keys = ("argument_size_in_bytes", "output_size_in_bytes",
          "alias_size_in_bytes", "temp_size_in_bytes",
          "generated_code_size_in_bytes")
  out = {k: int(getattr(m, k, 0) or 0) for k in keys}
  out["planned_peak_bytes"] = (out["argument_size_in_bytes"]
                               + out["output_size_in_bytes"]
                               - out["alias_size_in_bytes"]
                               + out["temp_size_in_bytes"])
  return out


def run_arm(bench: Bench, arm: Arm, compiled: Any,
            tx: optax.GradientTransformation, times: dict[str, float],
            batches: list[jax.Array]) -> dict[str, Any]:
  """Creates params and state, warms up and times one arm; frees them."""
  args = bench.args
  mem0 = mem_stats()
  params = bench.init_params()
  state = jax.jit(tx.init)(params)
  state_bytes = tree_bytes(state)
  jax.block_until_ready((params, state))
  mem_init = mem_stats()
  t0 = time.perf_counter()
  losses = []
  for i in range(args.warmup):
    params, state, loss = compiled(params, state, batches[i % len(batches)])
    losses.append(loss)
  jax.block_until_ready((params, state))
  warmup_s = time.perf_counter() - t0
  mem_live = mem_stats()

  n = bench.steps
  k = args.warmup
  step_s = []
  for i in range(n):
    t0 = time.perf_counter()
    params, state, loss = compiled(params, state, batches[(k + i) % len(batches)])
    jax.block_until_ready((params, state, loss))
    step_s.append(time.perf_counter() - t0)
  losses.append(loss)
  k += n
  t0 = time.perf_counter()
  for i in range(n):
    params, state, loss = compiled(params, state, batches[(k + i) % len(batches)])
  jax.block_until_ready((params, state, loss))
  pipelined_s = time.perf_counter() - t0
  losses.append(loss)
  mem_end = mem_stats()
  final_loss = float(losses[-1]["loss"])
  free_tree(params)
  free_tree(state)
  del params, state
  gc.collect()

  tokens = args.batch * args.seq
  flops = bench.cfg.flops_per_token(args.seq)
  peak = args.peak_tflops * 1e12
  ts = np.asarray(step_s)
  mean_s = pipelined_s / n
  out: dict[str, Any] = {
      "arm": arm.label,
      "optimizer": arm.name,
      "kwargs": dict(arm.kwargs),
      "context": arm.with_context,
      "context_stride": arm.context_stride,
      "timed_steps": n,
      "pipelined_step_s": mean_s,
      "median_step_s": float(np.median(ts)),
      "mean_synced_step_s": float(np.mean(ts)),
      "worst_step_s": float(np.max(ts)),
      "best_step_s": float(np.min(ts)),
      "tokens_per_s": tokens / mean_s,
      "tokens_per_s_median": tokens / float(np.median(ts)),
      "mfu": tokens / mean_s * flops / peak,
      "mfu_median": tokens / float(np.median(ts)) * flops / peak,
      "step_times_s": [float(x) for x in ts],
      "warmup_s": warmup_s,
      **times,
      "final_loss": final_loss,
      "loss_finite": bool(np.isfinite(final_loss)),
      "state_bytes": state_bytes,
      "memory_plan": memory_plan(compiled),
  }
  if mem_init is not None and mem_end is not None and mem0 is not None:
    out["memory"] = {
        "bytes_in_use_before": mem0.get("bytes_in_use"),
        "bytes_in_use_after_init": mem_init.get("bytes_in_use"),
        "live_bytes": (mem_live or mem_init).get("bytes_in_use"),
        "peak_bytes_in_use": mem_end.get("peak_bytes_in_use"),
        "bytes_limit": mem_end.get("bytes_limit"),
        "peak_is_process_max": not args.child,
    }
  return out


# ----------------------------------------------------------------------------
# Report.


def add_ratios(rows: list[dict[str, Any]]) -> None:
  base = next((r for r in rows if r["optimizer"] == "adamw"), None)
  for r in rows:
    if base is None:
      r["vs_adamw"] = r["vs_adamw_median"] = None
    else:
      r["vs_adamw"] = r["tokens_per_s"] / base["tokens_per_s"]
      r["vs_adamw_median"] = (r["tokens_per_s_median"]
                              / base["tokens_per_s_median"])


def fmt_bytes(x: int | None) -> str:
  return "-" if x is None else f"{x / GiB:.1f}"


def table_rows(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
  head = ["arm", "tokens/s", "MFU", "× adamw", "median ms", "worst ms",
          "× adamw (median)", "state GiB", "planned peak GiB", "peak GiB",
          "loss"]
  body = []
  for r in rows:
    plan = r.get("memory_plan") or {}
    mem = r.get("memory") or {}
    peak = mem.get("peak_bytes_in_use")
    peak_s = fmt_bytes(peak) + ("*" if mem.get("peak_is_process_max") else "")
    body.append([
        r["arm"], f"{r['tokens_per_s']:,.0f}", f"{100 * r['mfu']:.1f}%",
        "-" if r["vs_adamw"] is None else f"{r['vs_adamw']:.3f}",
        f"{1e3 * r['median_step_s']:.1f}", f"{1e3 * r['worst_step_s']:.1f}",
        "-" if r["vs_adamw_median"] is None else f"{r['vs_adamw_median']:.3f}",
        fmt_bytes(r["state_bytes"]), fmt_bytes(plan.get("planned_peak_bytes")),
        peak_s if peak is not None else "-", f"{r['final_loss']:.3f}"])
  return head, body


def print_table(rows: list[dict[str, Any]], title: str) -> None:
  head, body = table_rows(rows)
  widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
  print(title)
  print("  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True)))
  for b in body:
    print("  ".join(c.rjust(w) for c, w in zip(b, widths, strict=True)))
  if any((r.get("memory") or {}).get("peak_is_process_max") for r in rows):
    print("* peak_bytes_in_use is the process's maximum over the arms run so "
          "far (use --isolate for per-arm peaks)")


def markdown(rows: list[dict[str, Any]]) -> str:
  head, body = table_rows(rows)
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  lines += ["| " + " | ".join(b) + " |" for b in body]
  return "\n".join(lines)


def code_version() -> dict[str, Any]:
  """``CGF_OPTAX_COMMIT`` (set it when the tree is copied without its .git:
  a copy's git, if any, may not be the code that runs), and git's view."""
  here = os.path.dirname(os.path.abspath(__file__))
  out: dict[str, Any] = {"env": os.environ.get("CGF_OPTAX_COMMIT")}
  try:
    out["commit"] = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
        text=True, timeout=10, check=True).stdout.strip()
    out["dirty"] = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
        capture_output=True, text=True, timeout=10,
        check=True).stdout.split("\n")
    out["dirty"] = [x for x in out["dirty"] if x]
  except Exception:  # noqa: BLE001 - no git (e.g. a copied tree)
    pass
  return out


def gpu_info() -> str | None:
  try:
    return subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
         "clocks.max.sm,power.limit", "--format=csv,noheader"],
        capture_output=True, text=True, timeout=20, check=True).stdout.strip()
  except Exception:  # noqa: BLE001
    return None


# ----------------------------------------------------------------------------
# Main.


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--preset", choices=tuple(PRESETS), default="125m")
  p.add_argument("--vocab", type=int, default=50304)
  p.add_argument("--d-model", type=int, default=0,
                 help="override the preset's width (0: keep)")
  p.add_argument("--num-layers", type=int, default=0,
                 help="override the preset's depth (0: keep)")
  p.add_argument("--num-heads", type=int, default=0,
                 help="override the preset's heads (0: keep)")
  p.add_argument("--seq", type=int, default=1024)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                 help="compute dtype")
  p.add_argument("--param-dtype", choices=("float32", "bfloat16"),
                 default="float32")
  p.add_argument("--remat", action="store_true",
                 help="rematerialise each block in the backward pass")
  p.add_argument("--attention", choices=("auto", "cudnn", "xla", "default"),
                 default="auto")
  p.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS))
  p.add_argument("--steps", type=int, default=30,
                 help="timed steps per arm and per timing mode (rounded up to "
                      f"a multiple of {REFRESH_EVERY})")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--schedule-steps", type=int, default=1000,
                 help="the training length the schedules are built for")
  p.add_argument("--peak-tflops", type=float, default=H100_SXM_BF16_TFLOPS,
                 help="peak dense TFLOP/s for MFU (H100 SXM bf16: 989)")
  p.add_argument("--threads", type=int, default=8,
                 help="parallel compilations")
  p.add_argument("--isolate", action="store_true",
                 help="one subprocess per arm (per-arm peak memory)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--markdown", action="store_true",
                 help="also print the table as markdown")
  p.add_argument("--out", help="JSON path (default under benchmarks/results/)")
  p.add_argument("--child", help=argparse.SUPPRESS)   # --isolate's subprocess
  args = p.parse_args(argv)
  if args.warmup < 1 or args.steps < 1 or args.batch < 1 or args.seq < 2:
    p.error("--warmup, --steps and --batch must be >= 1, --seq >= 2")
  try:
    arms = [parse_arm(a) for a in args.arms]
  except ValueError as e:
    p.error(str(e))
  if len({a.label for a in arms}) != len(arms):
    p.error("--arms has duplicates")
  args.arm_list = arms
  return args


def child_argv(args: argparse.Namespace, arm: Arm) -> list[str]:
  """The arguments of ``--isolate``'s subprocess for ``arm``."""
  out = ["--arms", arm.label]
  for key in ("preset", "vocab", "d_model", "num_layers", "num_heads", "seq",
              "batch", "dtype", "param_dtype",
              "attention", "steps", "warmup", "schedule_steps", "peak_tflops",
              "seed"):
    out += ["--" + key.replace("_", "-"), str(getattr(args, key))]
  if args.remat:
    out.append("--remat")
  return out


def run_child(args: argparse.Namespace) -> None:
  """--isolate's subprocess: one arm, its result as JSON to ``args.child``."""
  bench = Bench(args)
  arm = args.arm_list[0]
  compiled = compile_all(bench, [arm], 1)[arm.label]
  row = run_arm(bench, arm, *compiled, bench.batches())
  with open(args.child, "w") as f:
    json.dump(row, f)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  if args.isolate or args.child:
    cache = os.environ.get("CGF_BENCH_CACHE")
    if cache:
      jax.config.update("jax_compilation_cache_dir", cache)
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
      jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  if args.child:
    run_child(args)
    return {}

  dev = jax.devices()[0]
  bench = Bench(args)
  cfg = bench.cfg
  print(f"device: {dev.device_kind} ({dev.platform}); jax {jax.__version__}, "
        f"flax {flax.__version__}, optax {optax.__version__}")
  print(f"model: {args.preset} L={cfg.num_layers} d={cfg.d_model} "
        f"vocab={cfg.vocab_size}: {bench.n_params / 1e6:.1f}M params "
        f"({args.param_dtype}), compute {args.dtype}, attention "
        f"{cfg.attention_impl or 'default'}, remat {args.remat}; batch "
        f"{args.batch} × seq {args.seq}; {cfg.flops_per_token(args.seq) / 1e9:.3f}"
        f" GFLOP/token")
  t_start = time.perf_counter()
  rows: list[dict[str, Any]] = []
  failed: list[dict[str, Any]] = []
  if args.isolate:
    cache = tempfile.mkdtemp(prefix="cgf_bench_cache_")
    os.environ["CGF_BENCH_CACHE"] = cache
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    compiled = compile_all(bench, args.arm_list, args.threads)
    compile_times = {k: v[2] for k, v in compiled.items()}
    del compiled
    gc.collect()
    env = dict(os.environ)
    env.pop("XLA_PYTHON_CLIENT_PREALLOCATE", None)
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.90")
    for arm in args.arm_list:
      with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tf:
        path = tf.name
      cmd = [sys.executable, os.path.abspath(__file__),
             *child_argv(args, arm), "--child", path]
      print(f"  running {arm.label} in a subprocess", flush=True)
      res = subprocess.run(cmd, env=env, capture_output=True, text=True)
      if res.returncode:   # e.g. out of memory: record it, go on
        print(res.stdout[-2000:], res.stderr[-3000:], file=sys.stderr)
        print(f"    {arm.label} FAILED (exit {res.returncode})", flush=True)
        failed.append({"arm": arm.label, "returncode": res.returncode,
                       "stderr_tail": res.stderr[-3000:]})
        continue
      with open(path) as f:
        row = json.load(f)
      os.unlink(path)
      row["parent_compile"] = compile_times[arm.label]
      rows.append(row)
      print(f"    {arm.label}: {row['tokens_per_s']:,.0f} tokens/s, "
            f"peak {fmt_bytes((row.get('memory') or {}).get('peak_bytes_in_use'))}"
            " GiB "
            f"(child compile {row['compile_s']:.1f} s)", flush=True)
  else:
    compiled = compile_all(bench, args.arm_list, args.threads)
    batches = bench.batches()
    for arm in args.arm_list:
      row = run_arm(bench, arm, *compiled[arm.label], batches)
      rows.append(row)
      print(f"  {arm.label}: {row['tokens_per_s']:,.0f} tokens/s "
            f"({100 * row['mfu']:.1f}% MFU), median "
            f"{1e3 * row['median_step_s']:.1f} ms", flush=True)
      del compiled[arm.label]
      gc.collect()
  wall = time.perf_counter() - t_start
  add_ratios(rows)
  title = (f"GPT {args.preset} ({bench.n_params / 1e6:.0f}M), batch "
           f"{args.batch} × {args.seq}, {args.dtype} compute, "
           f"{dev.device_kind}; MFU against {args.peak_tflops:g} TFLOP/s")
  print()
  if rows:
    print_table(rows, title)
  if args.markdown and rows:
    print()
    print(markdown(rows))

  result = {
      "benchmark": "lm_throughput",
      "command": ["python", "benchmarks/lm_throughput.py",
                  *(argv if argv is not None else sys.argv[1:])],
      "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
      "versions": {
          "python": platform.python_version(), "jax": jax.__version__,
          "jaxlib": jaxlib.__version__, "flax": flax.__version__,
          "optax": optax.__version__, "numpy": np.__version__,
          "cgf_optax": cgf_optax.__version__,
      },
      "code": code_version(),
      "device": {
          "kind": dev.device_kind, "platform": dev.platform,
          "count": jax.device_count(), "host_cpus": os.cpu_count(),
          "nvidia_smi": gpu_info(),
      },
      "env": {k: os.environ.get(k) for k in (
          "XLA_FLAGS", "XLA_PYTHON_CLIENT_MEM_FRACTION",
          "XLA_PYTHON_CLIENT_PREALLOCATE")},
      "args": {k: v for k, v in vars(args).items() if k != "arm_list"},
      "model": {**dataclasses.asdict(cfg), "params": bench.n_params,
                "flops_per_token": cfg.flops_per_token(args.seq)},
      "tokens_per_step": args.batch * args.seq,
      "peak_flops": args.peak_tflops * 1e12,
      "timing": {
          "timed_steps": bench.steps, "warmup": args.warmup,
          "isolate": args.isolate, "wall_s": wall,
          "tokens_per_s": "from steps dispatched back to back, one sync",
          "median": "from steps synchronised one by one",
          "donated": "params, optimizer state",
      },
      "results": rows,
      "failed": failed,
  }
  out = args.out or os.path.join(
      os.path.dirname(os.path.abspath(__file__)), "results",
      f"lm_throughput-{sanitize(dev.device_kind)}-{args.preset}.json")
  print(f"\nwrote {write_json(result, out)}")
  return result


if __name__ == "__main__":
  main()
