"""Issue 18, item 3: a whole-model context through `optax.masked`,
`optax.partition` and `optax.multi_transform`.

The CEGM transform inside sees only its part of the tree (the others'
parameters are `optax.MaskedNode`s); the context of the whole model is
passed unchanged. Reference: the same CEGM chain run alone on its part of
the tree with the context of that part only, and the other transform alone
on the rest. A context key that names no parameter of the whole model is
still an error.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cgf_optax

PARAMS = {
    "dense": {"bias": jnp.ones((4,)), "kernel": jnp.ones((6, 4))},
    "head": {"bias": jnp.ones((3,)), "kernel": jnp.ones((4, 3))},
    "w": jnp.ones((6, 2)),
}


def _context(seed=0):
  rng = np.random.default_rng(seed)
  return {"dense/kernel": jnp.asarray(rng.standard_normal((5, 6)),
                                      jnp.float32),
          "head/kernel": jnp.asarray(rng.standard_normal((2, 5, 4)),
                                     jnp.float32),
          "w": jnp.asarray(rng.standard_normal((5, 6)), jnp.float32)}


def _grads(step):
  rng = np.random.default_rng(100 + step)
  return jax.tree.map(
      lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32),
      PARAMS)


def _labels(params):
  """CEGM on the matrices but ``w`` (an embedding, say); AdamW on the rest,
  ``w`` included, whose context the caller passes all the same."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: "cegm" if x.ndim == 2 and p[0].key != "w" else "adam",
      params)


def _cegm():
  return cgf_optax.cegm_adamw(1e-2, num_heads=2, adapt_rate=0.1)


def _sub(tree, keys):
  """The sub-tree of ``tree`` at the top-level ``keys``."""
  return {k: tree[k] for k in keys}


def test_masked_ignores_the_context_of_masked_out_params():
  """The issue's reproduction, with the whole model's context; ``a``'s
  update equals cegm run on ``{"a"}`` alone; ``b`` passes through."""
  p = {"a": jnp.ones((2, 3)), "b": jnp.ones((2, 3))}
  ctx = {"a": jnp.arange(8.0).reshape(4, 2), "b": jnp.ones((4, 2))}
  tx = optax.masked(cgf_optax.cegm(1e-2), {"a": True, "b": False})
  ref = cgf_optax.cegm(1e-2)
  g = {"a": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones((2, 3))}
  u, _ = tx.update(g, tx.init(p), p, context=ctx)
  ru, _ = ref.update({"a": g["a"]}, ref.init({"a": p["a"]}), {"a": p["a"]},
                     context={"a": ctx["a"]})
  np.testing.assert_array_equal(u["a"], ru["a"])
  np.testing.assert_array_equal(u["b"], g["b"])


def test_masked_sub_tree_ignores_contexts_inside_it():
  """A mask ``False`` on a whole sub-tree: one MaskedNode stands for it,
  and the contexts of the kernels inside it are ignored."""
  tx = optax.masked(_cegm(), {"dense": False, "head": True, "w": True})
  state = tx.init(PARAMS)
  u, state = jax.jit(tx.update)(_grads(0), state, PARAMS, context=_context(),
                                value=jnp.float32(1.0))
  np.testing.assert_array_equal(u["dense"]["kernel"],
                                _grads(0)["dense"]["kernel"])


def test_a_typo_in_the_context_is_still_an_error():
  tx = optax.masked(_cegm(), {"dense": False, "head": True, "w": True})
  ctx = {**_context(), "haed/kernel": jnp.ones((5, 4))}
  with pytest.raises(ValueError, match=r"\['haed/kernel'\].*masked out"):
    tx.update(_grads(0), tx.init(PARAMS), PARAMS, context=ctx)
  # Without any masking, too (the error existed before).
  tx = _cegm()
  with pytest.raises(ValueError, match=r"\['haed/kernel'\]"):
    tx.update(_grads(0), tx.init(PARAMS), PARAMS, context=ctx)


@pytest.mark.parametrize("combine", ["partition", "multi_transform"])
def test_cegm_on_matrices_adamw_on_the_rest(combine):
  """The common composition, 3 jitted steps with the whole model's context
  and the loss: equal to each transform run alone on its own part."""
  make = getattr(optax, combine)
  tx = make({"cegm": _cegm(), "adam": optax.adamw(1e-2)}, _labels)
  cegm, adam = _cegm(), optax.adamw(1e-2)
  # The reference: cegm on its matrices (only their contexts), adamw on the
  # biases and w, each alone.
  mats = lambda t: {"dense": {"kernel": t["dense"]["kernel"]},
                    "head": {"kernel": t["head"]["kernel"]}}
  vecs = lambda t: {"dense": {"bias": t["dense"]["bias"]},
                    "head": {"bias": t["head"]["bias"]}, "w": t["w"]}
  p, rp = PARAMS, PARAMS
  state = tx.init(p)
  cs, as_ = cegm.init(mats(p)), adam.init(vecs(p))
  update = jax.jit(tx.update)
  for step in range(3):
    g, ctx, loss = _grads(step), _context(step), jnp.float32(2.0 - step / 2)
    u, state = update(g, state, p, context=ctx, value=loss)
    cu, cs = cegm.update(mats(g), cs, mats(rp), value=loss, context={
        k: ctx[k] for k in ("dense/kernel", "head/kernel")})
    au, as_ = adam.update(vecs(g), as_, vecs(rp))
    ref_u = jax.tree.map(lambda *x: x[0],
                         {"dense": {**cu["dense"], **au["dense"]},
                          "head": {**cu["head"], **au["head"]},
                          "w": au["w"]})
    for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(ref_u), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    p, rp = optax.apply_updates(p, u), optax.apply_updates(rp, ref_u)
  # λ moved (the loss reached entangle through partition).
  ent = [s for s in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, cgf_optax.EntangleState))
         if isinstance(s, cgf_optax.EntangleState)]
  assert len(ent) == 1 and float(ent[0].lam) != 0.9


def test_readme_excerpt_is_part_of_the_tested_docs_example():
  """The README's "Composing with masked / multi_transform" block is an
  excerpt of the docs example that `tests/test_docs.py` runs: every code
  line of it occurs there (so the README shows tested code)."""
  import pathlib
  import re
  root = pathlib.Path(__file__).resolve().parents[1]
  readme = (root / "README.md").read_text(encoding="utf-8")
  section = readme.split("### Composing with masked / multi_transform")[1]
  block = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
  guide = (root / "docs" / "flax-nnx.md").read_text(encoding="utf-8")
  example = guide.split("## Composing with masked / multi_transform")[1]
  example = re.search(r"```python\n(.*?)```", example, re.DOTALL).group(1)
  assert example.lstrip().startswith("import ")   # run by test_docs.py
  lines = [ln.split("  #")[0].rstrip() for ln in block.splitlines()
           if ln.strip() and not ln.lstrip().startswith("#")]
  missing = [ln for ln in lines if ln.strip() not in example]
  assert not missing, missing
