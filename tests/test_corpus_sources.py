"""The ``pylib`` corpus (Python sources under several roots) and the data
manifest of every corpus.

Each property is checked against a reference computed here from the files
themselves: which contents are distinct (a set of bytes), which names the
hash rule holds out (``sha256(name)[0] < 26``), and the SHA-256 of the
documents joined with newlines in the order the corpus lists them.
"""

import hashlib
import json

import pytest

from cgf_optax.train import cli, data


def _write(root, files):
  for rel, text in files.items():
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text)


def _read(roots, name):
  """The bytes of document ``label/rel``, read here."""
  label, rel = name.split("/", 1)
  return (roots[label] / rel).read_bytes()


def _joined_sha(roots, names):
  return hashlib.sha256(b"\n".join(_read(roots, n) for n in names)).hexdigest()


def test_identical_files_are_kept_once_and_bad_files_skipped(tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  same = b"def f():\n  return 1\n"
  _write(a, {"pkg/one.py": same, "two.py": b"x = 2\n", "empty.py": b"",
             "nul.py": b"x = 1\x00\n", "notes.txt": b"not python\n"})
  _write(b, {"copy.py": same, "three.py": b"y = 3\n", "sub/two.py": b"x = 2\n"})
  (b / "dangling.py").symlink_to(tmp_path / "missing.py")
  c = data.load_sources({"a": a, "b": b})
  names = sorted(c.train_docs + c.val_docs)
  # Distinct non-empty contents without NUL: three; each kept under the
  # first of its names in sorted order.
  assert names == ["a/pkg/one.py", "a/two.py", "b/three.py"]
  joined = c.train.tobytes() + c.val.tobytes()
  assert joined.count(same) == 1 and joined.count(b"x = 2\n") == 1


def test_split_follows_the_name_hash_and_is_stable_when_files_are_added(
    tmp_path):
  root = tmp_path / "src"
  _write(root, {f"m{i:03d}.py": f"value = {i}\n".encode() for i in range(80)})
  before = data.load_sources({"lib": root})
  held = {n for n in before.train_docs + before.val_docs
          if hashlib.sha256(n.encode()).digest()[0] < 26}
  assert set(before.val_docs) == held and 0 < len(held) < 80
  _write(root, {f"n{i:03d}.py": f"other = {i}\n".encode() for i in range(40)})
  after = data.load_sources({"lib": root})
  assert set(before.val_docs) <= set(after.val_docs)
  assert set(before.train_docs) <= set(after.train_docs)
  assert len(after.val_docs) + len(after.train_docs) == 120


@pytest.mark.parametrize("count", [2, 3, 5])
def test_each_split_has_a_document(tmp_path, count):
  for trial in range(20):
    root = tmp_path / f"{count}-{trial}"
    _write(root, {f"f{trial}_{i}.py": f"v = {trial}, {i}\n".encode()
                  for i in range(count)})
    c = data.load_sources({"r": root})
    assert c.train_docs and c.val_docs
    assert len(c.train_docs) + len(c.val_docs) == count


def test_manifest_hashes_the_joined_bytes(tmp_path):
  roots = {"a": tmp_path / "a", "b": tmp_path / "b"}
  _write(roots["a"], {f"p{i}.py": f"a = {i}\n".encode() * 3 for i in range(30)})
  _write(roots["b"], {f"q{i}.py": f"b = {i}\n".encode() for i in range(30)})
  c = data.load_sources(roots)
  m = c.manifest
  assert m["files"] == {"train": len(c.train_docs), "val": len(c.val_docs)}
  assert m["sha256"]["train"] == _joined_sha(roots, c.train_docs)
  assert m["sha256"]["val"] == _joined_sha(roots, c.val_docs)
  size = sum(len(_read(roots, n)) for n in c.val_docs)
  assert m["bytes"]["val"] == size + len(c.val_docs) - 1   # newlines between


def test_manifest_is_in_the_run_results(tmp_path, capsys):
  folder = tmp_path / "docs"
  _write(folder, {f"d{i}.txt": f"line {i} of a small text\n".encode() * 40
                  for i in range(10)})
  out = tmp_path / "run"
  assert cli.main(["train", "--d-model", "16", "--num-layers", "1",
                   "--num-heads", "2", "--seq-len", "16", "--batch-size", "2",
                   "--eval-batches", "1", "--telemetry-every", "0",
                   "--steps", "2", "--checkpoint-every", "0", "--no-progress",
                   "--data", str(folder), "--out", str(out)]) == 0
  manifest = json.loads((out / "results.json").read_text())["data_manifest"]
  # _load_path holds out every tenth file: d9.txt.
  train = b"\n".join((folder / f"d{i}.txt").read_bytes() for i in range(9))
  val = (folder / "d9.txt").read_bytes()
  assert manifest["sha256"] == {"train": hashlib.sha256(train).hexdigest(),
                                "val": hashlib.sha256(val).hexdigest()}
  assert manifest["bytes"] == {"train": len(train), "val": len(val)}
  assert manifest["files"] == {"train": 9, "val": 1}


def test_pylib_reads_each_sysconfig_root_once(tmp_path, monkeypatch):
  std, site = tmp_path / "lib", tmp_path / "site-packages"
  _write(std, {"json/a.py": b"import os\n", "b.py": b"pass\n"})
  _write(site, {"pkg/c.py": b"x = 1\n", "pkg/d.py": b"y = 2\n"})
  monkeypatch.setattr(data.sysconfig, "get_paths", lambda: {
      "stdlib": str(std), "purelib": str(site), "platlib": str(site)})
  c = data.load_corpus("pylib")
  assert sorted(c.train_docs + c.val_docs) == [
      "purelib/pkg/c.py", "purelib/pkg/d.py", "stdlib/b.py", "stdlib/json/a.py"]
