"""Keyword arguments shared by several aliases, defined once (private).

An alias is written with only its own parameters and ``**shared``;
:func:`with_shared` gives it the full signature (for ``inspect``, Sphinx,
:func:`optax.inject_hyperparams` and the ``cgf-optax`` command), the shared
arguments' entries in its docstring's ``Args`` (at ``{shared_args}``), their
defaults, and the renamed keywords that still work, with a
``DeprecationWarning``, for one release.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

_KW = inspect.Parameter.KEYWORD_ONLY
_POS = inspect.Parameter.POSITIONAL_OR_KEYWORD


class Arg(NamedTuple):
  """One shared argument: its default, its type and its docstring entry."""

  default: Any
  annotation: Any
  doc: str
  positional: bool = False


def of(fn: Callable[..., Any], names: Mapping[str, str] | tuple[str, ...],
       *, positional: bool = False, **defaults: Any) -> dict[str, Arg]:
  """``fn``'s parameters as shared arguments, with ``fn``'s defaults unless
  given in ``defaults``; ``names`` maps an alias's name to ``fn``'s (a tuple:
  the same names). With ``positional`` they may be passed by position."""
  if isinstance(names, tuple):
    names = {n: n for n in names}
  params = inspect.signature(fn).parameters
  out = {}
  for name, own in names.items():
    p = params[own]
    what = "" if own == name else f"``{own}`` of "
    out[name] = Arg(defaults.get(name, p.default), p.annotation,
                    f"see {what}:func:`cgf_optax.{fn.__name__}`.", positional)
  return out


def with_shared(*groups: Mapping[str, Arg],
                renamed: Mapping[str, str] | None = None,
                ignore_others: bool = False):
  """Adds the arguments of ``groups`` to the decorated alias (and, with
  ``ignore_others``, a ``**ignored`` that takes any other keyword)."""
  shared = {k: a for g in groups for k, a in g.items()}
  renamed = dict(renamed or {})

  def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
    sig = inspect.signature(fn)
    own = [p for p in sig.parameters.values()
           if p.kind is not inspect.Parameter.VAR_KEYWORD]
    first_kw = next((i for i, p in enumerate(own) if p.kind is _KW), len(own))
    pos = [inspect.Parameter(k, _POS, default=a.default,
                             annotation=a.annotation)
           for k, a in shared.items() if a.positional]
    kw = [inspect.Parameter(k, _KW, default=a.default, annotation=a.annotation)
          for k, a in shared.items() if not a.positional]
    rest = ([inspect.Parameter("ignored", inspect.Parameter.VAR_KEYWORD,
                               annotation="Any")] if ignore_others else [])
    full = sig.replace(
        parameters=own[:first_kw] + pos + own[first_kw:] + kw + rest)

    @functools.wraps(fn)
    def alias(*args: Any, **kwargs: Any) -> Any:
      for old, new in renamed.items():
        if old in kwargs:
          warnings.warn(
              f"{fn.__name__}: `{old}` is deprecated, use `{new}` (it will be "
              "removed in the next release).", DeprecationWarning,
              stacklevel=2)
          if new in kwargs:
            raise TypeError(f"{fn.__name__}() got both `{old}` (deprecated) "
                            f"and `{new}`.")
          kwargs[new] = kwargs.pop(old)
      try:
        bound = full.bind(*args, **kwargs)
      except TypeError as e:
        raise TypeError(f"{fn.__name__}() {e}") from None
      bound.apply_defaults()
      bound.arguments.pop("ignored", None)
      return fn(**bound.arguments)

    alias.__signature__ = full
    # Not the decorated function's source: its `**shared` has no defaults to
    # read (Sphinx's `autodoc_preserve_defaults` reads them from the source).
    del alias.__wrapped__
    alias.__doc__ = (fn.__doc__ or "").replace(
        "    {shared_args}", "\n".join(f"    {k}: {a.doc}" for k, a in shared.items()))
    return alias
  return wrap
