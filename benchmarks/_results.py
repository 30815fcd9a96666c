"""What every benchmark script shares: the file name of a device, and the
atomic write of its JSON result."""

from __future__ import annotations

import json
import os
import re
from typing import Any


def sanitize(s: str) -> str:
  """A device name as a file-name part: ``NVIDIA H100 80GB HBM3`` ->
  ``nvidia-h100-80gb-hbm3``."""
  return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-") or "device"


def write_json(result: dict[str, Any], out: str | os.PathLike[str]) -> str:
  """Writes ``result`` to ``out`` atomically (a temporary file, then a
  rename, so a killed run never leaves half a JSON); returns the path."""
  out = os.fspath(out)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  tmp = out + ".tmp"
  with open(tmp, "w") as f:
    json.dump(result, f, indent=1)
  os.replace(tmp, out)
  return out
