"""The docstring examples of every cgf_optax module run as doctests.

Equivalent to ``pytest --doctest-modules cgf_optax``, but collected with the
rest of the suite (and so run by ``pytest -n 2 tests``).
"""

import doctest
import importlib
import inspect
import io
import pkgutil

import pytest

import cgf_optax

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE

MODULES = sorted(
    ["cgf_optax"] + [m.name for m in pkgutil.walk_packages(
        cgf_optax.__path__, prefix="cgf_optax.")])


@pytest.mark.parametrize("name", MODULES)
def test_module_doctests(name):
  module = importlib.import_module(name)
  out = io.StringIO()
  runner = doctest.DocTestRunner(optionflags=FLAGS, verbose=False)
  for test in doctest.DocTestFinder(exclude_empty=True).find(module, name):
    runner.run(test, out=out.write)
  failed, _ = runner.summarize(verbose=False)
  assert failed == 0, f"doctests failed in {name}:\n{out.getvalue()}"


def _public_functions():
  names = [n for n in cgf_optax.__all__
           if inspect.isfunction(getattr(cgf_optax, n))]
  return names + ["losses.entanglement_penalty"]


@pytest.mark.parametrize("name", _public_functions())
def test_public_function_has_a_doctest_example(name):
  obj = cgf_optax
  for part in name.split("."):
    obj = getattr(obj, part)
  assert ">>>" in (obj.__doc__ or ""), f"cgf_optax.{name} has no example"


def test_doctests_are_found():
  attempted = 0
  for name in MODULES:
    module = importlib.import_module(name)
    for test in doctest.DocTestFinder(exclude_empty=True).find(module, name):
      attempted += len(test.examples)
  assert attempted > 0
