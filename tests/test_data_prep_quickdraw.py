"""data_prep.quickdraw on generated numpy bitmap files."""

import os

import numpy as np
import pytest

from data_prep import quickdraw
from data_prep.cache import PrepError
from maml_tf import image_data
from tests import image_files


def prepare(input_dir, output, **kw):
  return quickdraw.prepare(quickdraw.QuickDrawPrepConfig(
      str(input_dir), str(output), **kw))


def fastforwardlabs(folder, seed, samples):
  """The fork's QuickDrawClassDataset.download, restated: returns
  {split: {category: drawing indices}}."""
  classes = sorted(os.listdir(folder))
  classes = [c[:-4] for c in classes]
  rs = np.random.RandomState(seed)
  rs.shuffle(classes)
  n = len(classes)
  num_train, num_val, _ = [int(float(r) / 100 * n) for r in (60, 20, 20)]
  result = {}
  for split in ("train", "val", "test"):
    labels = (classes[:num_train] if split == "train" else
              classes[num_train:num_train + num_val] if split == "val" else
              classes[num_train + num_val:])
    result[split] = {}
    for name in labels:
      data = np.load(os.path.join(folder, name + ".npy"))
      result[split][name] = rs.choice(data.shape[0], samples, replace=False)
  return result


def test_split_and_samples_reproduce_fastforwardlabs(tmp_path):
  raw = image_files.quickdraw_files(tmp_path / "raw", categories=12,
                                    drawings=30)
  index = prepare(raw, tmp_path / "cache", samples_per_class=7, seed=5)
  expected = fastforwardlabs(raw, 5, 7)
  assert {s: v["classes"] for s, v in index["splits"].items()} == {
      "train": 7, "val": 2, "test": 3}
  images = np.load(tmp_path / "cache" / "images.npy")
  assert images.shape == (84, 28, 28, 1)
  for c in index["classes"]:
    assert c["name"] in expected[c["split"]]
    rows = images[c["start"]:c["start"] + c["count"]].reshape(-1, 784)
    # Pixel 0 encodes the category, pixel 1 the drawing: the drawn ones, in
    # draw order.
    assert (rows[:, 0] == image_files.QUICKDRAW_NAMES.index(c["name"])).all()
    np.testing.assert_array_equal(rows[:, 1], expected[c["split"]][c["name"]])
  # Ink stays 255 -> 1 after the loader's scaling.
  splits = image_data.load_cache(str(tmp_path / "cache"), "quickdraw")
  x = splits["train"].transform(splits["train"].examples[:1])
  assert x.max() == 1.0 and x.dtype == np.float32


def test_defaults_and_all_samples(tmp_path):
  raw = image_files.quickdraw_files(tmp_path / "raw", categories=5,
                                    drawings=120)
  index = prepare(raw, tmp_path / "a")
  assert index["provenance"] == {"seed": 123, "samples_per_class": 100,
                                 "categories": 5}
  assert {s: v["classes"] for s, v in index["splits"].items()} == {
      "train": 3, "val": 1, "test": 1}
  assert all(c["count"] == 100 for c in index["classes"])
  index = prepare(raw, tmp_path / "b", samples_per_class=0)
  assert all(c["count"] == 120 for c in index["classes"])
  images = np.load(tmp_path / "b" / "images.npy").reshape(-1, 784)
  np.testing.assert_array_equal(images[:120, 1], np.arange(120))


def test_errors_name_the_file(tmp_path):
  raw = image_files.quickdraw_files(tmp_path / "raw", categories=6,
                                    drawings=10)
  with pytest.raises(PrepError, match=r"\.npy: 10 drawings, fewer than "
                     "--samples_per_class=100"):
    prepare(raw, tmp_path / "cache")
  np.save(raw / "sun.npy", np.zeros((10, 28, 28), np.uint8))
  with pytest.raises(PrepError, match=r"sun.npy: uint8 \(10, 28, 28\), "
                     r"expected uint8 \[N, 784\]"):
    prepare(raw, tmp_path / "cache", samples_per_class=5)
  (raw / "sun.npy").write_bytes(b"not numpy")
  with pytest.raises(PrepError, match="sun.npy: not a readable .npy file"):
    prepare(raw, tmp_path / "cache", samples_per_class=5)
  # An empty file, and an .npz archive, were an EOFError / AttributeError.
  (raw / "sun.npy").write_bytes(b"")
  with pytest.raises(PrepError, match="sun.npy: not a readable .npy file "
                     r"\(empty"):
    prepare(raw, tmp_path / "cache", samples_per_class=5)
  with open(raw / "sun.npy", "wb") as f:
    np.savez(f, drawings=np.zeros((10, 784), np.uint8))
  with pytest.raises(PrepError, match="sun.npy: not a readable .npy file "
                     r"\(an .npz archive"):
    prepare(raw, tmp_path / "cache", samples_per_class=5)
  small = image_files.quickdraw_files(tmp_path / "few", categories=4)
  with pytest.raises(PrepError, match="4 <category>.npy files give 2/0/2 "
                     "train/val/test categories"):
    prepare(small, tmp_path / "cache")
  assert not (tmp_path / "cache").exists()


def test_unwritable_output_is_named(tmp_path):
  """It was a FileExistsError traceback from os.makedirs."""
  raw = image_files.quickdraw_files(tmp_path / "raw", categories=12,
                                    drawings=8)
  (tmp_path / "file").write_text("")
  with pytest.raises(PrepError, match="--output=.*file/cache: cannot write "
                     "a cache there .*file is not a directory"):
    prepare(raw, tmp_path / "file" / "cache", samples_per_class=4)
