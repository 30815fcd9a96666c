"""Flax nnx glue: capture the context (kernel inputs) that CEGM aligns with.

Nothing in :mod:`cgf_optax.transforms` depends on this module; it only turns a
Flax model's forward pass into the ``context={path: activations}`` mapping
that :func:`cgf_optax.context_align` takes.
"""

from cgf_optax.nnx._capture import Captured, capture_context, remat_call

__all__ = ["Captured", "capture_context", "remat_call"]
