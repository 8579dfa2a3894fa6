"""data_prep.miniimagenet on generated Ravi & Larochelle and class-folder
layouts."""

import io

import numpy as np
import pytest
from PIL import Image

from data_prep import miniimagenet
from data_prep.cache import PrepError
from maml_tf import image_data
from tests import image_files


def prepare(input_dir, output, **kw):
  return miniimagenet.prepare(miniimagenet.MiniImageNetPrepConfig(
      str(input_dir), str(output), **kw))


@pytest.fixture(scope="module")
def csv_layout(tmp_path_factory):
  return image_files.mini_csv_layout(tmp_path_factory.mktemp("mini") / "raw")


def test_csv_layout(csv_layout, tmp_path):
  index = prepare(csv_layout, tmp_path / "cache")
  assert index["split_scheme"] == "csv"
  assert {s: v["classes"] for s, v in index["splits"].items()} == {
      "train": 3, "val": 2, "test": 2}
  arrays = {s: np.load(tmp_path / "cache" / f"{s}.npy") for s in
            ("train", "val", "test")}
  assert arrays["train"].shape == (9, 84, 84, 3)
  assert arrays["val"].dtype == np.uint8
  # Row r of a split is its r-th image (classes sorted, files sorted),
  # converted to RGB and resized with LANCZOS.
  first = Image.open(csv_layout / "images" / "n0400000000.jpg")
  expected = np.asarray(first.convert("RGB").resize((84, 84), Image.LANCZOS))
  np.testing.assert_array_equal(arrays["val"][0], expected)
  classes = [c for c in index["classes"] if c["split"] == "val"]
  assert [(c["name"], c["array"], c["start"], c["count"]) for c in classes] \
      == [("n04", "val", 0, 3), ("n05", "val", 3, 3)]
  splits = image_data.load_cache(str(tmp_path / "cache"), "miniimagenet")
  assert splits["test"].example_shape == (84, 84, 3)
  assert isinstance(splits["test"].examples, np.memmap)


def test_folder_layout_and_workers_give_the_same_arrays(csv_layout, tmp_path):
  prepare(csv_layout, tmp_path / "a")
  folders = image_files.mini_folder_layout(csv_layout, tmp_path / "folders")
  index = prepare(folders, tmp_path / "b", num_workers=2)
  assert index["split_scheme"] == "folders"
  for split in ("train", "val", "test"):
    assert ((tmp_path / "a" / f"{split}.npy").read_bytes() ==
            (tmp_path / "b" / f"{split}.npy").read_bytes())


def test_unordered_csv_rows_and_gray_images(tmp_path):
  root = image_files.mini_csv_layout(tmp_path / "raw", per_class=2)
  lines = (root / "train.csv").read_text().splitlines()
  (root / "train.csv").write_text("\n".join([lines[0]] + lines[:0:-1]) + "\n")
  (root / "images" / "n0100000000.jpg").write_bytes(
      image_files.jpeg(1, mode="L"))
  prepare(root, tmp_path / "cache")
  train = np.load(tmp_path / "cache" / "train.npy")
  assert train.shape == (6, 84, 84, 3)
  # A grayscale JPEG becomes three equal channels.
  np.testing.assert_array_equal(train[0, ..., 0], train[0, ..., 2])


def edit(root, name, text):
  (root / name).write_text(text)


@pytest.mark.parametrize("breakage,message", [
    (lambda r: (r / "val.csv").unlink(), r"val.csv: not found"),
    (lambda r: edit(r, "test.csv", "file,class\nn0600000000.jpg,n06\n"),
     r"test.csv: header \['file', 'class'\], expected \['filename', 'label'\]"),
    (lambda r: (r / "images" / "n0200000001.jpg").unlink(),
     r"train.csv:6 names n0200000001.jpg, but .*images/n0200000001.jpg does "
     r"not exist"),
    (lambda r: (r / "images" / "n0500000002.jpg").write_bytes(b"\xff\xd8junk"),
     r"images/n0500000002.jpg: not a readable image"),
    (lambda r: edit(r, "test.csv", "filename,label\nn0100000000.jpg,n01\n"),
     r"test.csv:2: n0100000000.jpg is already listed in train.csv"),
    (lambda r: edit(r, "test.csv", "filename,label\nn0600000000.jpg\n"),
     r"test.csv:2: expected 'filename,label'"),
    # (Was a UnicodeDecodeError.)
    (lambda r: (r / "val.csv").write_bytes(bytes(range(128, 256))),
     r"val.csv: not a UTF-8 text file"),
])
def test_csv_errors_name_the_file(tmp_path, breakage, message):
  root = image_files.mini_csv_layout(tmp_path / "raw", per_class=3)
  breakage(root)
  with pytest.raises(PrepError, match=message):
    prepare(root, tmp_path / "cache")
  assert not (tmp_path / "cache").exists()
  assert [p.name for p in tmp_path.iterdir()] == ["raw"]  # no temp left


def test_truncated_jpeg_is_named(tmp_path):
  root = image_files.mini_csv_layout(tmp_path / "raw", per_class=2)
  path = root / "images" / "n0300000001.jpg"
  path.write_bytes(path.read_bytes()[:300])
  with pytest.raises(PrepError, match="n0300000001.jpg: not a readable image"):
    prepare(root, tmp_path / "cache")


def test_oversized_image_is_named(tmp_path, monkeypatch):
  """Pillow's guard against decompression bombs was a traceback."""
  root = image_files.mini_csv_layout(tmp_path / "raw", per_class=2)
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
  with pytest.raises(PrepError, match=r"\.jpg: not a readable image "
                     r"\(Image size \(\d+ pixels\) exceeds"):
    prepare(root, tmp_path / "cache")


def test_folder_errors(csv_layout, tmp_path):
  with pytest.raises(PrepError, match="expected images/ with train.csv"):
    prepare(tmp_path, tmp_path / "cache")
  folders = image_files.mini_folder_layout(csv_layout, tmp_path / "folders")
  (folders / "val" / "n04" / "n0400000000.jpg").rename(
      folders / "test" / "n04.jpg")
  with pytest.raises(PrepError, match="test/n04.jpg: expected only class "
                     "folders"):
    prepare(folders, tmp_path / "cache")
  (folders / "test" / "n04.jpg").unlink()
  (folders / "test" / "n04").mkdir()
  out = io.BytesIO()
  Image.new("RGB", (10, 10)).save(out, format="JPEG")
  (folders / "test" / "n04" / "x.jpg").write_bytes(out.getvalue())
  with pytest.raises(PrepError, match="class n04 is in both the val and the "
                     "test split"):
    prepare(folders, tmp_path / "cache")
  (folders / "test" / "n04" / "x.jpg").unlink()
  with pytest.raises(PrepError, match="test/n04: no images"):
    prepare(folders, tmp_path / "cache")
  with pytest.raises(PrepError, match="images: no such folder"):
    prepare(folders, tmp_path / "cache", layout="csv")
