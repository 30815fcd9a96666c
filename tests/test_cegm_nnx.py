"""End to end: a small Flax nnx transformer trains with `cegm_adamw`.

The context is captured by `cgf_optax.nnx.capture_context` inside the loss
function (the same forward pass that computes the loss), the step runs under
`nnx.jit`, and `nnx.Optimizer(model, tx, wrt=nnx.Param).update(model, grads,
context=ctx, value=loss)` forwards both extra arguments to the chain.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import cgf_optax
from cgf_optax.nnx import capture_context

# A copy of an early version of cgf_optax.train.GPT
# (tests do not import from examples/).


class Block(nnx.Module):

  def __init__(self, d: int, heads: int, *, rngs: nnx.Rngs):
    self.heads = heads
    self.norm1 = nnx.RMSNorm(d, rngs=rngs)
    self.qkv = nnx.Linear(d, 3 * d, use_bias=False, rngs=rngs)
    self.out = nnx.Linear(d, d, use_bias=False, rngs=rngs)
    self.norm2 = nnx.RMSNorm(d, rngs=rngs)
    self.up = nnx.Linear(d, 4 * d, rngs=rngs)
    self.down = nnx.Linear(4 * d, d, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, d = x.shape
    qkv = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    a = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    x = x + self.out(a.reshape(b, t, d))
    return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class TinyGPT(nnx.Module):

  def __init__(self, d: int, layers: int, heads: int, seq: int, *,
               rngs: nnx.Rngs, vocab: int = 32):
    self.embed = nnx.Embed(vocab, d, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (seq, d)))
    self.blocks = nnx.List([Block(d, heads, rngs=rngs) for _ in range(layers)])
    self.norm = nnx.RMSNorm(d, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed(tokens) + self.pos[: tokens.shape[1]]
    for block in self.blocks:
      x = block(x)
    return self.embed.attend(self.norm(x))   # tied output embedding


D, LAYERS, HEADS, SEQ, VOCAB, BATCH = 16, 1, 2, 8, 32, 4
LINEARS = {"qkv": D, "out": D, "up": D, "down": 4 * D}   # name -> fan-in
KERNELS = {f"blocks/{i}/{n}/kernel": fan_in
           for i in range(LAYERS) for n, fan_in in LINEARS.items()}


def _data():
  """A fixed small dataset: each row counts up from its own offset mod 7."""
  rng = np.random.default_rng(0)
  starts = rng.integers(0, 7, BATCH)
  seq = (starts[:, None] + np.arange(SEQ + 1)[None, :]) % 7 + 1
  return jnp.asarray(seq[:, :-1], jnp.int32), jnp.asarray(seq[:, 1:], jnp.int32)


def loss_fn(model, x, y):
  with capture_context(model) as ctx:
    logits = model(x)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss, ctx


@nnx.jit
def train_step(model, optimizer, x, y):
  (loss, ctx), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, x, y)
  optimizer.update(model, grads, context=ctx, value=loss)
  return loss, ctx


def _model(seed):
  return TinyGPT(D, LAYERS, HEADS, SEQ, rngs=nnx.Rngs(seed), vocab=VOCAB)


def test_tiny_transformer_trains_with_cegm_adamw():
  tx = cgf_optax.cegm_adamw(1e-2, num_heads=HEADS, adapt_rate=0.1,
                            weight_decay=1e-4)

  @nnx.jit    # one compilation instead of many eager initialisers
  def create():
    model = _model(0)
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  model, optimizer = create()
  x, y = _data()
  losses = []
  for _ in range(30):
    loss, ctx = train_step(model, optimizer, x, y)
    losses.append(float(loss))
  assert all(np.isfinite(losses))
  assert losses[-1] < 0.7 * losses[0], losses

  # The context: one entry per linear kernel, keyed by its parameter path,
  # with the kernel's fan-in as the feature size, tokens [batch, seq].
  params = nnx.state(model, nnx.Param)
  kernel_shapes = {
      "/".join(str(k) for k in path): leaf.shape
      for path, leaf in nnx.to_flat_state(params)}
  assert set(ctx) == set(KERNELS)
  for key, fan_in in KERNELS.items():
    assert ctx[key].shape == (BATCH, SEQ, fan_in), key
    assert kernel_shapes[key][0] == fan_in

  # The context did reach context_align (its EMA moved, one step per
  # update) and the loss reached entangle (λ moved from 0.9).
  ent, ali = optimizer.opt_state[0], optimizer.opt_state[1]
  assert float(ent.lam) != pytest.approx(0.9)
  counted = {
      jax.tree_util.keystr(path, simple=True, separator="/"): int(v)
      for path, v in jax.tree_util.tree_flatten_with_path(ali.steps)[0]}
  counted = {k.removesuffix("/value"): v for k, v in counted.items()}
  for key in KERNELS:
    assert counted[key] == 30, (key, counted)


class Twice(nnx.Module):

  def __init__(self, rngs):
    self.lin = nnx.Linear(3, 3, rngs=rngs)
    self.head = nnx.Linear(3, 2, rngs=rngs)

  def __call__(self, x):
    return self.head(self.lin(self.lin(x)))


def test_layer_called_twice_stacks_its_inputs():
  x = jnp.arange(6.0).reshape(2, 3)

  @nnx.jit
  def run(x):
    model = Twice(nnx.Rngs(0))
    with capture_context(model) as ctx:
      y = model(x)
    return model, ctx, model.lin(x), y, model(x)

  model, ctx, lin_x, y_captured, y_plain = run(x)
  np.testing.assert_array_equal(y_captured, y_plain)   # the output unchanged
  assert set(ctx) == {"lin/kernel", "head/kernel"}
  assert ctx["lin/kernel"].shape == (2, 2, 3)      # [calls, batch, fan_in]
  np.testing.assert_array_equal(ctx["lin/kernel"][0], x)
  np.testing.assert_allclose(ctx["lin/kernel"][1], lin_x, rtol=1e-6)
  assert ctx["head/kernel"].shape == (2, 3)
  # A stacked context is a valid context: leading axes are all tokens.
  tx = cgf_optax.context_align()
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  grads = jax.tree.map(jnp.ones_like, params)
  updates, state = jax.jit(tx.update)(grads, tx.init(params), context=ctx)
  assert jax.tree.structure(updates) == jax.tree.structure(grads)
  assert int(state.steps["lin"]["kernel"]) == 1


class Attention(nnx.Module):

  def __init__(self, rngs):
    self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=8,
                                       qkv_features=8, decode=False,
                                       rngs=rngs)

  def __call__(self, x):
    return self.attn(x)


def test_attention_projections_are_captured():
  """nnx.MultiHeadAttention's query/key/value projections (LinearGeneral with
  one input axis, kernels [in, heads, head_dim]) are captured; its output
  projection (two input axes) is not, as documented."""
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 8)),
                  jnp.float32)
  tx = cgf_optax.cegm_adamw(1e-3, num_heads=2)

  @nnx.jit
  def run(x):
    model = Attention(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    def loss_fn(model):
      with capture_context(model) as ctx:
        y = model(x)
      return jnp.mean(y**2), ctx

    (loss, ctx), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads, context=ctx, value=loss)
    return ctx, optimizer.opt_state[1].steps

  ctx, steps = run(x)
  names = ("query", "key", "value")
  assert set(ctx) == {f"attn/{n}/kernel" for n in names}
  for n in names:
    np.testing.assert_array_equal(ctx[f"attn/{n}/kernel"], x)
    assert int(steps["attn"][n]["kernel"]) == 1
  assert steps["attn"]["out"]["kernel"] is None or int(
      steps["attn"]["out"]["kernel"]) == 0


def test_linear_call_is_restored():
  linear_call = nnx.Linear.__dict__.get("__call__")
  general_call = nnx.LinearGeneral.__dict__.get("__call__")
  model = Twice(nnx.Rngs(0))
  with capture_context(model):
    assert nnx.Linear.__dict__.get("__call__") is not linear_call
  assert nnx.Linear.__dict__.get("__call__") is linear_call
  assert nnx.LinearGeneral.__dict__.get("__call__") is general_call
  # Also when the forward pass raises.
  with pytest.raises(RuntimeError, match="boom"), capture_context(model):
    raise RuntimeError("boom")
  assert nnx.Linear.__dict__.get("__call__") is linear_call
  assert nnx.LinearGeneral.__dict__.get("__call__") is general_call
  # Outside the block nothing is recorded.
  with capture_context(model) as ctx:
    pass
  model(jnp.ones((1, 3)))
  assert ctx == {}


def test_einsum_layers_are_captured_when_the_kernel_is_fan_in_first():
  class Heads(nnx.Module):

    def __init__(self, rngs):
      # contracts the input's features with the kernel's first axis: captured
      self.proj = nnx.Einsum("btd,dhk->bthk", (8, 2, 4), rngs=rngs)
      # kernel laid out [out, in]: not a [fan_in, ...] map, so skipped
      self.back = nnx.Einsum("btd,hd->bth", (3, 8), rngs=rngs)

    def __call__(self, x):
      return self.proj(x).sum() + self.back(x).sum()

  model = Heads(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 5, 8))
  with cgf_optax.nnx.capture_context(model) as ctx:
    model(x)
  assert set(ctx) == {"proj/kernel"}
  np.testing.assert_array_equal(np.asarray(ctx["proj/kernel"]), np.asarray(x))


class _Block(nnx.Module):
  def __init__(self, d, rngs):
    self.up = nnx.Linear(d, 2 * d, rngs=rngs)
    self.down = nnx.Linear(2 * d, d, rngs=rngs)

  def __call__(self, x):
    return x + self.down(jax.nn.gelu(self.up(x)))


class _Stack(nnx.Module):
  def __init__(self, d, n, remat, rngs):
    self.blocks = nnx.List([_Block(d, rngs) for _ in range(n)])
    self.head = nnx.Linear(d, 3, rngs=rngs)
    self.remat = remat

  def __call__(self, x):
    for b in self.blocks:
      x = cgf_optax.nnx.remat_call(b, x) if self.remat else b(x)
    return self.head(x)


def _loss_ctx_grads(model, x):
  def loss_fn(m):
    with capture_context(m) as ctx:
      y = m(x)
    return jnp.sum(y ** 2), dict(ctx)
  (loss, ctx), g = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  return loss, ctx, g


@pytest.mark.parametrize("jit", [False, True])
def test_remat_call_captures_like_a_plain_call(jit):
  """Blocks called through remat_call: the same keys and activations as
  without remat, the same loss and gradients, under jit or not."""
  x = jax.random.normal(jax.random.key(0), (2, 5, 4))
  out = []
  for remat in (False, True):
    model = _Stack(4, 2, remat, nnx.Rngs(0))
    f = nnx.jit(_loss_ctx_grads) if jit else _loss_ctx_grads
    out.append(f(model, x))
  (l0, c0, g0), (l1, c1, g1) = out
  assert sorted(c0) == sorted(c1) == sorted(
      [f"blocks/{i}/{n}/kernel" for i in range(2) for n in ("up", "down")]
      + ["head/kernel"])
  for k in c0:
    np.testing.assert_allclose(c0[k], c1[k], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_remat_call_without_capture_is_plain_remat():
  """No capture open: remat_call is nnx.remat; gradients match the plain
  call, and the recorded context of an unrelated capture stays empty."""
  x = jax.random.normal(jax.random.key(1), (3, 4))
  block = _Block(4, nnx.Rngs(1))
  np.testing.assert_allclose(cgf_optax.nnx.remat_call(block, x), block(x),
                             rtol=1e-6)
  other = nnx.Linear(2, 2, rngs=nnx.Rngs(2))
  with capture_context(other) as ctx:     # block is not part of `other`
    cgf_optax.nnx.remat_call(block, x)
  assert ctx == {}
