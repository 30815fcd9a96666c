"""The built wheel installs and works outside the source tree.

Slow (``-m slow``; `.ci/run` runs it after the suite): the wheel is built
from this checkout, installed with ``--no-deps`` into a fresh venv outside
it (the dependencies are read from the running environment's
site-packages, behind the wheel, so nothing is downloaded), and the
getting-started example runs there, importing the installed package.
"""

import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _run(cmd, **kwargs):
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                        env=env, timeout=600, **kwargs)
  assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
  return proc.stdout


def _getting_started() -> str:
  text = (ROOT / "docs" / "getting-started.md").read_text(encoding="utf-8")
  blocks = re.findall(r"^```python\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
  return next(b for b in blocks if b.lstrip().startswith("import "))


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_checkout(tmp_path):
  # Built from a copy of what the wheel is made of, so that no build output
  # of the checkout (a stale build/lib) can slip in, and none is left there.
  src = tmp_path / "src"
  shutil.copytree(ROOT / "cgf_optax", src / "cgf_optax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(ROOT / name, src / name)
  dist = tmp_path / "dist"
  _run([sys.executable, "-m", "pip", "wheel", "--no-deps",
        "--no-build-isolation", "-q", "-w", dist, src], cwd=tmp_path)
  (wheel,) = dist.glob("cgf_optax-*.whl")
  with zipfile.ZipFile(wheel) as zf:
    names = set(zf.namelist())
    metadata = next(zf.read(n).decode() for n in names
                    if n.endswith(".dist-info/METADATA"))
  assert "cgf_optax/transforms/decompose/_lowrank.py" in names
  assert not any(n.startswith("tests/") for n in names)
  assert "Description-Content-Type: text/markdown" in metadata
  assert "# cgf_optax" in metadata          # the README is the long description

  venv = tmp_path / "venv"
  _run([sys.executable, "-m", "venv", "--without-pip", venv])
  python = venv / "bin" / "python"
  purelib = pathlib.Path(_run(
      [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
  ).strip())
  # The dependencies, from this environment, after the venv's own packages.
  deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
  (purelib / "_cgf_optax_test_deps.pth").write_text("\n".join(sorted(deps)))
  _run([sys.executable, "-m", "pip", "--python", python, "install", "-q",
        "--no-deps", "--no-index", wheel])

  work = tmp_path / "elsewhere"
  work.mkdir()
  (work / "example.py").write_text(
      "import cgf_optax, pathlib, sys\n"
      f"assert pathlib.Path(cgf_optax.__file__).is_relative_to({str(venv)!r}),"
      " cgf_optax.__file__\n" + _getting_started()
      + "\nassert loss_fn(params, x, y) < 0.01\n")
  out = _run([python, "example.py"], cwd=work)
  assert "final loss" in out
  assert "usage" in _run([venv / "bin" / "cgf-optax", "--help"], cwd=work)
