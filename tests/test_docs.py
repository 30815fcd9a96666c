"""The documentation: every public name has an API entry, the site builds
with warnings as errors, and the guides' runnable snippets run."""

import contextlib
import importlib.util
import io
import pathlib
import re
import subprocess
import sys

import pytest

import cgf_optax

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
API_PAGE = DOCS / "api.rst"

# `.. autofunction:: cgf_optax.cgfm` and the like, in the API page.
_AUTODOC = re.compile(
    r"^\s*\.\.\s+auto(?:function|class|data|exception|module|attribute)::\s+"
    r"(\S+)\s*$", re.MULTILINE)

# Names documented on the API page beyond `cgf_optax.__all__`.
EXTRA_NAMES = ("cgf_optax.nnx.capture_context",
               "cgf_optax.losses.entanglement_penalty")


def documented_names() -> set[str]:
  return set(_AUTODOC.findall(API_PAGE.read_text(encoding="utf-8")))


def test_api_page_documents_every_public_name():
  documented = documented_names()
  missing = [name for name in cgf_optax.__all__
             if f"cgf_optax.{name}" not in documented]
  assert not missing, f"{API_PAGE.name} has no autodoc entry for {missing}"


def test_api_page_documents_the_extra_names():
  documented = documented_names()
  missing = [name for name in EXTRA_NAMES if name not in documented]
  assert not missing, f"{API_PAGE.name} has no autodoc entry for {missing}"


def _missing_doc_tools() -> list[str]:
  return [m for m in ("sphinx", "myst_parser", "furo")
          if importlib.util.find_spec(m) is None]


def test_docs_build_without_warnings(tmp_path):
  missing = _missing_doc_tools()
  if "sphinx" in missing:
    pytest.skip("sphinx is not importable: install the dev extra "
                "(pip install -e '.[dev]') to build the docs")
  assert not missing, (f"the docs need {missing}: install the dev extra "
                       "(pip install -e '.[dev]')")
  cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q",
         "-b", "html", "-d", str(tmp_path / "doctrees"), str(DOCS),
         str(tmp_path / "html")]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, (
      f"{' '.join(cmd)} failed ({proc.returncode}):\n"
      f"{proc.stdout}\n{proc.stderr}")
  assert (tmp_path / "html" / "api.html").exists()


def _python_blocks(page: pathlib.Path) -> list[str]:
  text = page.read_text(encoding="utf-8")
  return re.findall(r"^```python\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


# The complete programs in the guides: the ```python blocks that start with
# an import (the others are one-line excerpts).
GUIDE_SNIPPETS = [
    pytest.param(code, id=f"{page.stem}-{i}")
    for page in sorted(DOCS.glob("*.md"))
    for i, code in enumerate(_python_blocks(page))
    if code.lstrip().startswith("import ")
]


def test_guides_have_runnable_snippets():
  ids = {p.id.rsplit("-", 1)[0] for p in GUIDE_SNIPPETS}
  assert {"getting-started", "flax-nnx", "faq"} <= ids


@pytest.mark.parametrize("code", GUIDE_SNIPPETS)
def test_guide_snippet_runs(code):
  namespace = {"__name__": "__docs_snippet__"}
  with contextlib.redirect_stdout(io.StringIO()):
    exec(compile(code, "<docs snippet>", "exec"), namespace)


def test_getting_started_loop_converges():
  code = next(c for c in _python_blocks(DOCS / "getting-started.md")
              if c.lstrip().startswith("import "))
  ns = {"__name__": "__docs_snippet__"}
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(code, "getting-started.md", "exec"), ns)
  final = float(ns["loss_fn"](ns["params"], ns["x"], ns["y"]))
  assert final < 0.01, out.getvalue()


def test_api_page_documents_the_training_package():
  import cgf_optax.train
  documented = documented_names()
  missing = [n for n in cgf_optax.train.__all__
             if f"cgf_optax.train.{n}" not in documented
             and f"cgf_optax.train.model.{n}" not in documented]
  assert not missing, f"{API_PAGE.name} has no autodoc entry for {missing}"


def test_training_guide_names_every_flag():
  import dataclasses

  from cgf_optax.train import TrainConfig
  text = (DOCS / "training.md").read_text(encoding="utf-8")
  # Flags are documented in the guide or explicitly in --help only.
  help_only = {"progress", "eval_every", "eval_batches", "data_seed",
               "init_seed", "norm", "tie_embeddings", "out", "mesh",
               "batch_size", "seq_len", "steps"}
  missing = [f.name for f in dataclasses.fields(TrainConfig)
             if f.name not in help_only
             and f"--{f.name.replace('_', '-')}" not in text]
  assert not missing, f"docs/training.md does not mention {missing}"
