"""Training a GPT language model with cgf_optax: model, data, loop, CLI.

Uses the core (:mod:`cgf_optax`, :mod:`cgf_optax.nnx`); the core never
imports it. The command-line entry point is ``cgf-optax``
(:mod:`cgf_optax.train.cli`).
"""

from cgf_optax.train.checkpoint import CheckpointError, RunCheckpointer
from cgf_optax.train.config import OptimizerSpec, TrainConfig, parse_optimizer_spec
from cgf_optax.train.data import Corpus, DataError, batch_at, load_corpus
from cgf_optax.train.loop import RunResult, init_model, train_one
from cgf_optax.train.model import GPT, PRESETS, GPTConfig, gpt_config
from cgf_optax.train.optimizers import build_optimizer

__all__ = [
    "GPT",
    "PRESETS",
    "CheckpointError",
    "Corpus",
    "DataError",
    "GPTConfig",
    "OptimizerSpec",
    "RunCheckpointer",
    "RunResult",
    "TrainConfig",
    "batch_at",
    "build_optimizer",
    "gpt_config",
    "init_model",
    "load_corpus",
    "parse_optimizer_spec",
    "train_one",
]
