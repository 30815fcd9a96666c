"""Issue 18, item 6: the single-text-file branch of `load_corpus(path)`.

Split by position: the first 90% trains, the last 10% validates. Tested as
the Shakespeare split is: the sizes add up to the file, the two parts are
the file, and no validation window occurs in the training bytes (a split
that trained on the whole file would fail here).
"""

import numpy as np
import pytest

from cgf_optax.train import data


@pytest.mark.parametrize("size", [1024, 5000, 123_457])
def test_single_file_split_holds_out_the_tail(tmp_path, size):
  rng = np.random.default_rng(size)
  # Printable random text: every 32-byte window is unique (no repeats).
  text = bytes(rng.integers(32, 127, size=size, dtype=np.uint8))
  path = tmp_path / "corpus.txt"
  path.write_bytes(text)
  c = data.load_corpus(str(path))
  train, val = c.train.tobytes(), c.val.tobytes()
  assert len(train) + len(val) == size
  assert train + val == text                  # nothing lost, nothing twice
  assert len(val) == size - int(0.9 * size) and len(val) >= 100
  assert c.train_docs == (f"{path} [:90%]",)
  assert c.val_docs == (f"{path} [90%:]",)
  window = 32
  starts = rng.integers(0, len(val) - window, size=20)
  for start in [0, len(val) - window, *starts]:
    assert val[start:start + window] not in train, start


def test_single_file_too_small_is_refused(tmp_path):
  path = tmp_path / "small.txt"
  path.write_bytes(b"x" * 1023)
  with pytest.raises(data.DataError, match="1023 bytes; at least 1024"):
    data.load_corpus(str(path))
