"""A decoder-only transformer language model in Flax nnx.

Pre-norm blocks (RMSNorm or LayerNorm), causal self-attention through
:func:`jax.nn.dot_product_attention` (cuDNN flash attention on GPUs when the
dtype allows it), rotary position embeddings, a GELU MLP and an optionally
tied output embedding. Kernels are ``[fan_in, fan_out]`` Dense layouts, the
layout :func:`cgf_optax.decompose` and :func:`cgf_optax.context_align`
assume, and with ``partitioned=True`` every kernel carries a partitioning
annotation (mesh axis names ``"data"`` and ``"model"``) that
:mod:`cgf_optax.train.parallel` uses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from cgf_optax.nnx import remat_call

__all__ = ["GPT", "GPTConfig", "PRESETS", "gpt_config"]


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  """Shape and numerics of a :class:`GPT`.

  Attributes:
    vocab_size: number of token ids (256 for bytes).
    d_model: width of the residual stream.
    num_layers: number of transformer blocks.
    num_heads: attention heads; must divide ``d_model``.
    mlp_ratio: hidden width of the MLP as a multiple of ``d_model``.
    max_seq_len: longest sequence the model is used with (rotary tables).
    norm: ``"rmsnorm"`` or ``"layernorm"``.
    tie_embeddings: reuse the token embedding as the output projection.
    dtype: compute dtype (``"float32"`` or ``"bfloat16"``); parameters stay
      ``param_dtype``.
    param_dtype: parameter dtype.
    remat: recompute each block's activations in the backward pass
      (saves memory for large models).
    init_std: standard deviation of the normal initialisers; output
      projections are scaled by ``1/sqrt(2 * num_layers)`` (GPT-2).
    partitioned: annotate every kernel with mesh axis names (``"data"`` for
      FSDP, ``"model"`` for tensor parallelism, Megatron layout). Flax then
      shards the variables at creation, so build the model under
      ``jax.set_mesh(mesh)`` with a mesh that has those axes.
    attention_impl: the ``implementation`` argument of
      :func:`jax.nn.dot_product_attention`: ``None`` (let JAX choose; works
      on every backend), ``"xla"`` or ``"cudnn"`` (fused flash attention on
      NVIDIA GPUs, bfloat16/float16 compute only).
  """

  vocab_size: int = 256
  d_model: int = 128
  num_layers: int = 2
  num_heads: int = 4
  mlp_ratio: int = 4
  max_seq_len: int = 1024
  norm: str = "rmsnorm"
  tie_embeddings: bool = True
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False
  init_std: float = 0.02
  partitioned: bool = False
  attention_impl: str | None = None

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "num_layers", "num_heads",
                 "mlp_ratio", "max_seq_len"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"GPTConfig.{name} must be a positive int, got "
                         f"{value!r}")
    if self.d_model % self.num_heads:
      raise ValueError(f"GPTConfig.num_heads ({self.num_heads}) must divide "
                       f"d_model ({self.d_model})")
    if (self.d_model // self.num_heads) % 2:
      raise ValueError("GPTConfig: the head size d_model/num_heads = "
                       f"{self.d_model // self.num_heads} must be even for "
                       "rotary embeddings")
    if self.norm not in ("rmsnorm", "layernorm"):
      raise ValueError(f"GPTConfig.norm must be 'rmsnorm' or 'layernorm', "
                       f"got {self.norm!r}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in ("float32", "bfloat16"):
        raise ValueError(f"GPTConfig.{name} must be 'float32' or 'bfloat16', "
                         f"got {getattr(self, name)!r}")
    if self.attention_impl not in (None, "xla", "cudnn"):
      raise ValueError("GPTConfig.attention_impl must be None, 'xla' or "
                       f"'cudnn', got {self.attention_impl!r}")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  def num_params(self) -> int:
    """Exact parameter count (embeddings included)."""
    d, f = self.d_model, self.mlp_ratio * self.d_model
    norm = d if self.norm == "rmsnorm" else 2 * d
    block = d * 3 * d + d * d + d * f + f + f * d + d + 2 * norm
    out = 0 if self.tie_embeddings else d * self.vocab_size
    return self.vocab_size * d + self.num_layers * block + norm + out

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token: 6·(non-embedding params) + attention.

    The usual estimate (Kaplan et al. 2020; PaLM appendix B): 6N for the
    matmuls' forward and backward, plus 12·L·d·T for attention scores and
    values (causal masking is not discounted, as in PaLM's MFU).
    """
    d, f = self.d_model, self.mlp_ratio * self.d_model
    n = self.num_layers * (4 * d * d + 2 * d * f) + d * self.vocab_size
    return 6.0 * n + 12.0 * self.num_layers * d * seq_len


#: Named sizes for :func:`gpt_config`. "tiny" trains in minutes on a laptop
#: CPU; the others are for GPUs (parameter counts with the 256-byte
#: vocabulary and tied embeddings).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=128, num_layers=2, num_heads=4),            # 0.4M
    "small": dict(d_model=256, num_layers=4, num_heads=4),           # 3.2M
    "125m": dict(d_model=768, num_layers=12, num_heads=12),          # 85M
    "350m": dict(d_model=1024, num_layers=24, num_heads=16),         # 302M
    "1b": dict(d_model=2048, num_layers=20, num_heads=16),           # 1.0B
}


def gpt_config(preset: str = "tiny", **overrides: Any) -> GPTConfig:
  """A :class:`GPTConfig` from a named preset, with fields overridden."""
  if preset not in PRESETS:
    raise ValueError(f"unknown model preset {preset!r}; choose one of "
                     f"{sorted(PRESETS)}")
  unknown = set(overrides) - {f.name for f in dataclasses.fields(GPTConfig)}
  if unknown:
    raise ValueError(f"unknown GPTConfig fields {sorted(unknown)}")
  return GPTConfig(**{**PRESETS[preset], **overrides})


def _rope(x: jax.Array, positions: jax.Array) -> jax.Array:
  """Rotary embedding of ``x`` [batch, seq, heads, head_dim] (Su et al. 2021)."""
  half = x.shape[-1] // 2
  freq = 1.0 / (10000.0 ** (jnp.arange(half, dtype=jnp.float32) / half))
  angle = positions[:, None].astype(jnp.float32) * freq[None, :]
  sin = jnp.sin(angle)[None, :, None, :].astype(x.dtype)
  cos = jnp.cos(angle)[None, :, None, :].astype(x.dtype)
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _init(cfg: GPTConfig, std: float, names: tuple[str | None, ...],
          init: Callable | None = None) -> Callable:
  init = nnx.initializers.normal(std) if init is None else init
  return nnx.with_partitioning(init, names) if cfg.partitioned else init


def _norm(cfg: GPTConfig, rngs: nnx.Rngs) -> nnx.Module:
  kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
            rngs=rngs)
  if cfg.norm == "rmsnorm":
    return nnx.RMSNorm(cfg.d_model, **kw)
  return nnx.LayerNorm(cfg.d_model, **kw)


class Block(nnx.Module):
  """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
    d, f = cfg.d_model, cfg.mlp_ratio * cfg.d_model
    out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
              rngs=rngs)
    self.num_heads = cfg.num_heads
    self.attention_impl = cfg.attention_impl
    self.norm1 = _norm(cfg, rngs)
    # Megatron-style tensor parallelism: column-parallel qkv/up, row-parallel
    # out/down; the other axis is where FSDP shards. The qkv columns are
    # heads-major ([heads, 3, head_dim]), so a "model" split of them keeps
    # each head's q, k and v on one device (attention runs head-parallel).
    self.qkv = nnx.Linear(d, 3 * d, use_bias=False,
                          kernel_init=_init(cfg, cfg.init_std, ("data", "model")),
                          **kw)
    self.out = nnx.Linear(d, d, use_bias=False,
                          kernel_init=_init(cfg, out_std, ("model", "data")), **kw)
    self.norm2 = _norm(cfg, rngs)
    self.up = nnx.Linear(d, f, kernel_init=_init(cfg, cfg.init_std, ("data", "model")),
                         bias_init=_init(cfg, 0.0, ("model",),
                                         nnx.initializers.zeros_init()),
                         **kw)
    self.down = nnx.Linear(f, d, kernel_init=_init(cfg, out_std, ("model", "data")),
                           **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, d = x.shape
    h = self.num_heads
    qkv = self.qkv(self.norm1(x)).reshape(b, t, h, 3, d // h)
    positions = jnp.arange(t)
    q = _rope(qkv[:, :, :, 0], positions)
    k = _rope(qkv[:, :, :, 1], positions)
    a = jax.nn.dot_product_attention(q, k, qkv[:, :, :, 2], is_causal=True,
                                     implementation=self.attention_impl)
    x = x + self.out(a.reshape(b, t, d))
    return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


#: Vocabularies up to this size are embedded by a one-hot matrix product.
ONE_HOT_MAX_VOCAB = 1024


class GPT(nnx.Module):
  """Decoder-only transformer over token ids; returns logits [batch, seq, vocab].

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from cgf_optax.train import GPT, gpt_config
    >>> model = GPT(gpt_config("tiny", num_layers=1), rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((2, 16), jnp.int32)).shape
    (2, 16, 256)
  """

  def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(
        cfg.vocab_size, cfg.d_model, dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
        embedding_init=_init(cfg, cfg.init_std, ("model", "data")), rngs=rngs)
    self.blocks = nnx.List([Block(cfg, rngs=rngs)
                            for _ in range(cfg.num_layers)])
    self.norm = _norm(cfg, rngs)
    if not cfg.tie_embeddings:
      self.head = nnx.Linear(
          cfg.d_model, cfg.vocab_size, use_bias=False,
          dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
          kernel_init=_init(cfg, cfg.init_std, ("data", "model")), rngs=rngs)

  def _embed(self, tokens: jax.Array) -> jax.Array:
    """The token embeddings. For a small vocabulary, a one-hot matrix
    product: the same values (the product picks one row, at full
    precision), but its gradient is a matrix product too, where a gather's
    is a scatter-add whose atomic updates collide on the frequent tokens of
    real text (on a GPU, a byte model's step ran several times slower)."""
    if self.cfg.vocab_size > ONE_HOT_MAX_VOCAB:
      return self.embed(tokens)
    dtype = jnp.dtype(self.cfg.dtype)
    table = self.embed.embedding[...].astype(dtype)
    return jnp.dot(jax.nn.one_hot(tokens, self.cfg.vocab_size, dtype=dtype),
                   table, precision=jax.lax.Precision.HIGHEST)

  def __call__(self, tokens: jax.Array,
               hidden_hook: Callable[[int, jax.Array], jax.Array] | None = None
               ) -> jax.Array:
    """Logits for ``tokens`` [batch, seq] (int).

    Args:
      tokens: token ids.
      hidden_hook: optional ``f(layer, h) -> h`` applied to the residual
        stream after each block (e.g. :mod:`cgf_optax.flow`'s gradient-flow
        operation); it must return an array of the same shape.
    """
    if tokens.ndim != 2:
      raise ValueError(f"GPT expects tokens of shape [batch, seq], got "
                       f"{tokens.shape}")
    if tokens.shape[1] > self.cfg.max_seq_len:
      raise ValueError(f"sequence length {tokens.shape[1]} exceeds "
                       f"max_seq_len={self.cfg.max_seq_len}")
    x = self._embed(tokens)
    for i, block in enumerate(self.blocks):
      if self.cfg.remat:
        x = remat_call(block, x)   # visible to capture_context
      else:
        x = block(x)
      if hidden_hook is not None:
        x = hidden_hook(i, x)
    x = self.norm(x)
    if self.cfg.tie_embeddings:
      logits = self.embed.attend(x)
    else:
      logits = self.head(x)
    return logits.astype(jnp.float32)
